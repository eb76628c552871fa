"""T5Config.attention="cudnn": fused attention through
jax.nn.dot_product_attention.

No GPU here, so the same call runs with jax's "xla" implementation (a test
registration, DOT_PRODUCT_XLA) to check its values, masks and gradients, and
the model is lowered for "cuda" (T5Config.platform "gpu") to check that
cuDNN's custom calls (forward, and backward with the relative position
bias's gradient) are what a GPU would compile.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.models import attention
from tests.models import attention_cases
from tests.models.attention_cases import B, CONFIG, S, T

# The cudnn entry's jax.nn.dot_product_attention call, run by XLA.
DOT_PRODUCT_XLA = "dot_product_attention_xla"
_DOT_PRODUCT_XLA_FN = functools.partial(attention.dot_product_attention,
                                        implementation="xla")


@pytest.fixture
def dot_product_xla(monkeypatch):
  """Registers DOT_PRODUCT_XLA for one test."""
  monkeypatch.setitem(attention.IMPLEMENTATIONS, DOT_PRODUCT_XLA,
                      _DOT_PRODUCT_XLA_FN)
  return DOT_PRODUCT_XLA


@pytest.mark.parametrize("implementation", [attention.xla_attention,
                                            _DOT_PRODUCT_XLA_FN],
                         ids=["materialised", "dot_product_attention"])
@pytest.mark.parametrize("causal", [False, True], ids=["padded", "causal"])
def test_attention_matches_a_float64_reference(causal, implementation):
  attention_cases.check_against_reference(implementation, causal)


@pytest.fixture(scope="module")
def params():
  encoder, targets = attention_cases.tokens()
  return models.t5(CONFIG).init(jax.random.key(0), encoder, targets)


def test_fused_model_matches_the_materialised_one(params, dot_product_xla):
  attention_cases.check_matches_materialised(dot_product_xla, params)


def test_fused_decoder_is_causal(params, dot_product_xla):
  # The decoder's position t sees targets before t only (inputs are shifted
  # right by one), so changing targets from 10 on leaves logits 0..10 alone.
  encoder, targets = attention_cases.tokens()
  model = models.t5(CONFIG.replace(attention=dot_product_xla))
  apply = jax.jit(lambda t: model.apply.logits(params, None, encoder, t))
  base = apply(targets)
  later = targets.copy()
  later[:, 10:] = (later[:, 10:] + 5) % CONFIG.vocab_size
  out = apply(later)
  np.testing.assert_array_equal(out[:, :11], base[:, :11])
  assert not np.array_equal(out[:, 11:], base[:, 11:])


def test_fused_model_ignores_keys_past_the_length(params, dot_product_xla):
  # Example 1 is 15 tokens right-padded to 21. Its encoder keys past 15 hold
  # the pad embedding; masked by length, they change nothing, so its logits
  # equal those of the 15 tokens run alone.
  encoder, targets = attention_cases.tokens()
  model = models.t5(CONFIG.replace(attention=dot_product_xla))
  full = model.apply.logits(params, None, encoder, targets)
  alone = model.apply.logits(params, None, encoder[1:2, :15], targets[1:2])
  np.testing.assert_allclose(np.asarray(full[1], np.float32),
                             np.asarray(alone[0], np.float32), atol=0.05,
                             rtol=0.05)


def _pretend_cudnn(monkeypatch):
  """Lets jax lower cuDNN attention on a host without CUDA."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  for name, value in (("check_cudnn_version", lambda: 91000),
                      ("check_compute_capability", lambda capability: True),
                      ("is_cuda_compute_capability_equal",
                       lambda capability: False)):
    if not hasattr(cudnn, name):
      pytest.skip(f"jax's cuDNN attention module has no {name}")
    monkeypatch.setattr(cudnn, name, value)


# The GPU's program: cuDNN attention and no CPU form.
GPU_CONFIG = CONFIG.replace(attention="cudnn", platform="gpu")


def _even_tokens():
  # cuDNN takes a bias with even lengths only (the trainer's RunConfig
  # checks them).
  encoder, targets = attention_cases.tokens()
  return encoder[:, :S - 1], targets[:, :T - 1]


def _lowered_gradient(config, encoder, targets) -> str:
  """StableHLO text of the model's gradient, lowered for "cuda"."""
  model = models.t5(config)
  params = jax.eval_shape(model.init, jax.random.key(0), encoder, targets)

  def loss(params):
    return jnp.sum(model.apply.logits(params, None, encoder, targets).astype(
        jnp.float32))

  return jax.jit(jax.grad(loss)).trace(params).lower(
      lowering_platforms=("cuda",)).as_text()


def test_model_lowers_to_cudnn_fused_attention_for_cuda(monkeypatch):
  _pretend_cudnn(monkeypatch)
  config = GPU_CONFIG.replace(scan_layers=True)
  encoder, targets = _even_tokens()
  text = _lowered_gradient(config, encoder, targets)
  calls = [line.split("custom_call @")[1].split("(")[0]
           for line in text.splitlines() if "custom_call @__cudnn$fmha" in line]
  # Encoder and decoder self-attention take the relative position bias (and
  # return its gradient); cross-attention has key lengths only.
  assert sorted(set(calls)) == [
      "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward",
      "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"], calls
  # No [B, H, S, S] logits exist, as they do on the "xla" path.
  logits = f"tensor<{B}x{config.num_heads}x{S - 1}x{S - 1}x"
  assert logits not in text
  assert logits in _lowered_gradient(config.replace(attention="xla"),
                                     encoder, targets)


@pytest.mark.parametrize("remat, runs", [
    ("none", 1), ("dots", 1), ("dots_except_mlp_hidden", 1), ("full", 2)])
def test_remat_keeps_cudnn_forward_outputs(monkeypatch, remat, runs):
  # cuDNN's backward needs its forward's output and softmax statistics. The
  # "dots" policies save them (jax's policies alone do not: the backward
  # would run every cuDNN forward again); "full" recomputes every one.
  _pretend_cudnn(monkeypatch)
  text = _lowered_gradient(GPU_CONFIG.replace(remat=remat), *_even_tokens())
  forward_calls = sum(1 for line in text.splitlines()
                      if "custom_call @__cudnn$fmha" in line
                      and "Backward" not in line)
  # One per attention: encoder self, decoder self and cross.
  attentions = CONFIG.num_encoder_layers + 2 * CONFIG.num_decoder_layers
  assert forward_calls == runs * attentions


def test_dro_v_step_lowers_with_cudnn_attention_for_cuda(monkeypatch):
  # The whole trainer step (policy, separate value encoder, losses, two
  # Adafactor updates) as a GPU would build it, with the leaner remat.
  from dro_fast.models import value  # pylint: disable=g-import-not-at-top
  from dro_fast.training import optim  # pylint: disable=g-import-not-at-top
  from dro_fast.training import steps  # pylint: disable=g-import-not-at-top
  _pretend_cudnn(monkeypatch)
  config = GPU_CONFIG.replace(scan_layers=True,
                              remat="dots_except_mlp_hidden")
  algorithm = steps.AlgorithmConfig(algo="dro_v", value_net="separate")
  trainer = steps.build_trainer(algorithm, config, optim.make_optimizer(1e-4),
                                optim.make_optimizer(1e-4))

  def init_state(key):
    tokens = jnp.ones((1, 2), jnp.int32)
    policy_key, value_key, state_key = jax.random.split(key, 3)
    policy = models.t5(config).init(policy_key, tokens, tokens)
    net = value.value_network(config, "separate")
    values = value.init_from_policy(net.init(value_key, tokens, None), policy)
    return trainer.init(policy, values, state_key)

  b, s, t = 4, 16, 8
  spec = jax.ShapeDtypeStruct
  batch = {"inputs": spec((b, s), jnp.int32),
           "targets": spec((b, t), jnp.int32),
           "target_mask": spec((b, t), jnp.bool_),
           "mismatched_targets": spec((b, t), jnp.int32),
           "mismatched_mask": spec((b, t), jnp.bool_),
           **{name: spec((b,), jnp.float32) for name in
              ("rewards", "ref_logprobs", "mismatched_ref_logprobs")}}
  state = jax.eval_shape(init_state, jax.random.key(0))
  text = jax.jit(trainer.update).trace(state, batch).lower(
      lowering_platforms=("cuda",)).as_text()
  calls = {line.split("custom_call @")[1].split("(")[0]
           for line in text.splitlines() if "custom_call @__cudnn$fmha" in line}
  assert calls == {
      "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward",
      "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, calls
  assert f"tensor<{b}x{config.num_heads}x{s}x{s}x" not in text


@pytest.mark.parametrize("changes, message", [
    (dict(attention="flash_v0"), "attention must be one of"),
    (dict(attention="cudnn", dtype="float32"), "bfloat16"),
    (dict(attention="cudnn", dtype="bfloat16", dropout_rate=0.1),
     "applies no dropout to the attention weights, got dropout_rate=0.1: "
     "set dropout_rate=0"),
])
def test_bad_attention_config(changes, message):
  with pytest.raises(ValueError, match=message):
    models.preset("tiny", **changes)


def test_cudnn_needs_platform_gpu():
  with pytest.raises(ValueError, match="needs a CUDA GPU; platform is 'cpu'"):
    models.t5(CONFIG.replace(attention="cudnn", platform="cpu"))
  # Explicitly "gpu": trusted, so that a CPU host can lower the program.
  assert GPU_CONFIG.resolved() is GPU_CONFIG


@pytest.mark.parametrize("backend, platform_version, error", [
    ("gpu", "cuda 12080", None),
    ("gpu", "rocm 60342", "ROCm has no cuDNN"),
    ("gpu", "ROCm 6.3", "ROCm has no cuDNN"),
    ("cpu", "cpu", "platform is 'cpu'"),
    ("tpu", "PJRT C API", "platform is 'tpu'"),
])
def test_auto_platform_tells_nvidia_from_rocm(monkeypatch, backend,
                                              platform_version, error):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  device = types.SimpleNamespace(
      client=types.SimpleNamespace(platform_version=platform_version))
  monkeypatch.setattr(jax, "devices", lambda: [device])
  config = CONFIG.replace(attention="cudnn")
  assert config.platform == "auto"
  if error is None:
    assert config.resolved() == config.replace(platform="gpu")
  else:
    with pytest.raises(ValueError, match=error):
      config.resolved()


def test_register_keeps_the_built_in_implementations():
  with pytest.raises(ValueError, match="'cudnn' is built in"):
    attention.register("cudnn", _DOT_PRODUCT_XLA_FN)
  assert attention.IMPLEMENTATIONS["cudnn"] is attention.dot_product_attention
