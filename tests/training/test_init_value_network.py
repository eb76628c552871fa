"""training.init.init_params with a separate value network of its own shape.

A value_config of another shape than the policy's (a 1B value network of an
8B policy) has a trunk of its own: without value_trunk it is drawn at
random (the policy's trunk does not fit it); with value_trunk it is that.
"""

from __future__ import annotations

import jax
import numpy as np

from dro_fast import models
from dro_fast.training import init
from dro_fast.training.config import AlgorithmConfig


def _shapes(tree):
  return jax.tree.map(lambda x: x.shape, tree)


def test_a_value_network_of_its_own_shape_gets_its_own_trunk():
  policy = models.decoder_preset("tiny_decoder")
  value_config = policy.replace(hidden_size=32, intermediate_size=96,
                                num_layers=1)
  algorithm = AlgorithmConfig(algo="dro_v", value_net="separate")
  key = jax.random.key(0)
  policy_params, value_params = init.init_params(
      policy, algorithm, key, value_config=value_config)
  alone = models.value.value_network(value_config, "separate").init(
      jax.random.key(1), np.ones((1, 2), np.int32), np.zeros((1, 32)))
  assert _shapes(value_params) == _shapes(alone)
  embed = "model/embed_tokens"
  assert value_params[embed]["embedding"].shape == (256, 32)
  assert policy_params[embed]["embedding"].shape == (256, 64)
  # A pretrained trunk of that shape is taken as it is.
  trunk = jax.tree.map(lambda x: x + 1, value_params)
  _, given = init.init_params(policy, algorithm, key,
                              value_config=value_config, value_trunk=trunk)
  np.testing.assert_array_equal(
      given[embed]["embedding"], trunk[embed]["embedding"])
  # The policy's own shape still copies the policy's trunk.
  _, same = init.init_params(policy, algorithm, key, value_config=policy)
  np.testing.assert_array_equal(
      same[embed]["embedding"], policy_params[embed]["embedding"])
