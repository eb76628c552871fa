"""The decoder-only network on its own: layout, backends, value, config.

Parity with transformers is in test_hf_decoder.py; here the properties that
need no reference: padding does not change a row, the splash kernel (in the
Pallas interpreter) equals the "xla" path, remat and bfloat16 run, the value
networks, and DecoderConfig's one-line refusals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.models import value
# By name: `dro_fast.models.decoder` is the builder function, which hides
# the module of the same name.
from dro_fast.models.decoder import _visible
from dro_fast.models.decoder import cudnn_attention
from dro_fast.models.decoder import xla_attention

# Gemma-3-like: both window kinds, q/k norms, (1 + w) norms, post norms.
GEMMA = models.DecoderConfig(
    family="gemma3", vocab_size=96, hidden_size=32, num_layers=3,
    num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
    sliding_window=3, layer_types=("sliding_attention", "full_attention",
                                   "sliding_attention"),
    rope_theta=1e6, rope_local_theta=1e4,
    rope_scaling=(("factor", 4.0), ("rope_type", "linear")), qk_norm=True,
    norm_plus_one=True, post_norms=True, embed_scale=True,
    query_pre_attn_scalar=8, hidden_act="gelu_tanh",
    tie_word_embeddings=True)
INPUTS = np.asarray([[5, 17, 33, 9, 2], [7, 3, -1, -1, -1]], np.int32)
TARGETS = np.asarray([[8, 19, 50, -1], [23, 24, 25, 26]], np.int32)


@functools.lru_cache(maxsize=None)
def _logits(config):
  """The jitted logits of `config`'s decoder (jit: op by op is slow), one
  compilation per config and shape for the whole module."""
  return jax.jit(models.decoder(config).apply.logits)


@functools.lru_cache(maxsize=None)
def _params(config, key=0):
  @jax.jit
  def init(rng):
    params = models.decoder(config).init(rng, INPUTS, TARGETS)
    # Nonzero norm weights, so that (1 + w) and w differ.
    return jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
        params)
  return init(jax.random.key(key))


def test_padding_does_not_change_a_row():
  params = _params(GEMMA)
  logits_fn = _logits(GEMMA)
  logits = logits_fn(params, None, INPUTS, TARGETS)
  wider_inputs = np.pad(INPUTS, ((0, 0), (0, 3)), constant_values=-1)
  wider_targets = np.pad(TARGETS, ((0, 0), (0, 2)), constant_values=-1)
  wider = logits_fn(params, None, wider_inputs, wider_targets)
  np.testing.assert_allclose(wider[:, :TARGETS.shape[1]], logits, atol=1e-5)


@pytest.mark.slow     # ~17 s on one core: the Pallas interpreter
def test_splash_equals_xla_in_the_interpreter():
  config = GEMMA.replace(scan_layers=True)
  params = jax.jit(models.decoder(config).init)(jax.random.key(0), INPUTS,
                                                TARGETS)
  xla = _logits(config)(params, None, INPUTS, TARGETS)
  splash = _logits(config.replace(attention="splash",
                                  attention_interpret=True))(
                                      params, None, INPUTS, TARGETS)
  np.testing.assert_allclose(splash, xla, atol=2e-5, rtol=1e-5)


@pytest.mark.slow     # ~20 s each on one core: two gradient compilations
@pytest.mark.parametrize("remat", ["full", "dots_except_mlp_hidden"])
def test_remat_and_scan_give_the_same_gradients(remat):
  params = _params(GEMMA)
  net = models.decoder(GEMMA)
  scanned_config = GEMMA.replace(scan_layers=True, remat=remat)
  scanned_net = models.decoder(scanned_config)
  scanned = jax.jit(scanned_net.init)(jax.random.key(0), INPUTS, TARGETS)
  # The same values, stacked.
  for module in scanned:
    if module.startswith("model/layers/"):
      rest = module[len("model/layers/"):]
      scanned[module] = {k: jnp.stack([params[f"model/layers_{i}/{rest}"][k]
                                       for i in range(3)])
                         for k in scanned[module]}
    else:
      scanned[module] = params[module]

  def loss(apply, params):
    return jnp.sum(apply.logits(params, None, INPUTS, TARGETS) ** 2)

  plain = jax.jit(jax.grad(lambda p: loss(net.apply, p)))(params)
  grads = jax.jit(jax.grad(lambda p: loss(scanned_net.apply, p)))(scanned)
  # Float32 rounding differs between the forms: 1e-5 of the largest entry.
  for ours, theirs in (
      (grads["model/layers/self_attn/q_proj"]["kernel"][2],
       plain["model/layers_2/self_attn/q_proj"]["kernel"]),
      (grads["model/embed_tokens"]["embedding"],
       plain["model/embed_tokens"]["embedding"])):
    np.testing.assert_allclose(ours, theirs,
                               atol=1e-5 * np.abs(theirs).max())


def test_bfloat16_compute_is_close_to_float32():
  params = _params(GEMMA)
  full = _logits(GEMMA)(params, None, INPUTS, TARGETS)
  states = jax.eval_shape(
      models.decoder(GEMMA.replace(dtype="bfloat16")).apply.decode, params,
      None, INPUTS, TARGETS)
  assert states.hidden.dtype == jnp.bfloat16
  assert states.weight.dtype == jnp.bfloat16
  half = _logits(GEMMA.replace(dtype="bfloat16"))(params, None, INPUTS,
                                                  TARGETS)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.1 * np.abs(full).max())


def test_value_networks_on_a_decoder():
  config = GEMMA.replace(tie_word_embeddings=False, scan_layers=True)
  policy = models.decoder(config)
  policy_params = jax.jit(policy.init)(jax.random.key(0), INPUTS, TARGETS)
  separate = value.value_network(config, "separate")
  params = jax.jit(separate.init)(jax.random.key(1), INPUTS, None)
  assert set(params) - set(policy_params) == {"value_head"}
  assert "lm_head" not in params
  params = value.init_from_policy(params, policy_params)
  values = jax.jit(separate.apply)(params, None, INPUTS, None)
  assert values.shape == (2,) and values.dtype == jnp.float32
  # The separate trunk equals the policy's encoded state (same weights).
  encoded = jax.jit(policy.apply.decode)(policy_params, None, INPUTS,
                                         TARGETS).encoded
  shared = value.value_network(config, "shared")
  head = {"value_head": params["value_head"]}
  assert set(shared.init(jax.random.key(0), INPUTS, encoded)) == {
      "value_head"}
  np.testing.assert_allclose(jax.jit(shared.apply)(head, None, INPUTS,
                                                   encoded),
                             values, rtol=1e-5, atol=1e-6)


def test_config_refusals_are_one_line():
  for changes, field in (({"attention": "flash"}, "attention"),
                         ({"num_kv_heads": 3}, "num_heads"),
                         ({"layer_types": ("full_attention",)},
                          "layer_types"),
                         ({"attention": "cudnn"}, "attention='cudnn'"),
                         ({"rope_scaling": (("rope_type", "yarn"),)},
                          "rope_scaling")):
    with pytest.raises(ValueError, match=field) as e:
      GEMMA.replace(**changes)
    assert "\n" not in str(e.value)
  assert hash(GEMMA) == hash(GEMMA.replace())


def test_cudnn_and_splash_are_refused_where_they_cannot_run():
  """The run's backend decision refuses them, naming the field."""
  from dro_fast import backend  # pylint: disable=g-import-not-at-top
  from dro_fast.training.run_config import RunConfig  # pylint: disable=g-import-not-at-top
  cudnn = RunConfig(workdir="", model=GEMMA.replace(dtype="bfloat16",
                                                    attention="cudnn"))
  with pytest.raises(ValueError, match="`attention`=cudnn .* needs a CUDA"):
    backend.resolve(cudnn, "cpu")
  assert backend.resolve(cudnn, "gpu").model.matmul == "xla"
  splash = RunConfig(workdir="", model=GEMMA.replace(attention="splash"))
  with pytest.raises(ValueError, match="`attention`=splash is a Pallas TPU"):
    backend.resolve(splash, "gpu")
  assert backend.resolve(splash, "cpu").model.attention_interpret


@pytest.mark.parametrize("window", [None, 3])
def test_the_cudnn_call_masks_as_the_xla_core(window):
  """The "cudnn" path's one dot_product_attention call, run by XLA here:
  causal, right-padded keys, the window, grouped heads, the scale."""
  keys_ = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys_[0], (2, 7, 4, 8))
  k = jax.random.normal(keys_[1], (2, 7, 2, 8))
  v = jax.random.normal(keys_[2], (2, 7, 2, 8))
  lengths = jnp.asarray([7, 4])
  index = jnp.arange(7)
  visible = _visible(jnp.broadcast_to(index, (2, 7)), index,
                     index[None] < lengths[:, None], window is not None,
                     window)
  want = jax.jit(functools.partial(xla_attention, scale=0.3, softcap=None))(
      q, k, v, visible)
  got = jax.jit(functools.partial(cudnn_attention, scale=0.3, window=window,
                                  implementation="xla"))(q, k, v, lengths)
  # Rows past a row's length are padding (the model never reads them).
  for b, n in enumerate([7, 4]):
    np.testing.assert_allclose(got[b, :n], want[b, :n], atol=1e-5)
