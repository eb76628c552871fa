"""Value networks: separate (own encoder) and shared (policy encoder)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.models import value

CONFIG = models.preset("tiny", dropout_rate=0.0)


def _tokens():
  tokens = np.random.default_rng(0).integers(2, 256, (3, 9)).astype(np.int32)
  tokens[1, 4:] = 0
  return jnp.asarray(tokens)


def test_masked_mean_ignores_padding():
  encoded = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.asarray([[True, True, False], [False, False, False]])
  np.testing.assert_allclose(value.masked_mean(encoded, mask),
                             [[1.0, 2.0], [0.0, 0.0]])


def test_separate_value_starts_from_the_policy_encoder():
  tokens = _tokens()
  policy = models.t5(CONFIG)
  policy_params = policy.init(jax.random.key(0), tokens, tokens)
  net = value.value_network(CONFIG, "separate")
  params = net.init(jax.random.key(1), tokens, None)
  assert set(params) - set(policy_params) == {"value_head"}
  params = value.init_from_policy(params, policy_params)
  # Give the head weights so the value depends on the encoder.
  params["value_head"]["w"] = jnp.ones_like(params["value_head"]["w"])
  values = net.apply(params, None, tokens, None)
  assert values.shape == (3,) and values.dtype == jnp.float32

  encoded = policy.apply.encode(policy_params, None, tokens)
  shared = value.value_network(CONFIG, "shared")
  head = {"value_head": params["value_head"]}
  np.testing.assert_allclose(shared.apply(head, None, tokens, encoded),
                             values, rtol=1e-5)
  # Padding beyond a row's tokens does not change its value.
  longer = jnp.pad(tokens, ((0, 0), (0, 3)))
  np.testing.assert_allclose(net.apply(params, None, longer, None), values,
                             rtol=1e-5, atol=1e-6)


def test_shared_value_has_only_a_head():
  tokens = _tokens()
  encoded = jnp.ones((3, 9, CONFIG.d_model))
  params = value.value_network(CONFIG, "shared").init(
      jax.random.key(0), tokens, encoded)
  assert set(params) == {"value_head"}


def test_value_network_errors():
  with pytest.raises(ValueError, match="kind must be one of"):
    value.value_network(CONFIG, "double")
  with pytest.raises(ValueError, match="same T5Config"):
    value.init_from_policy({"encoder/x": {}, "value_head": {}}, {})
