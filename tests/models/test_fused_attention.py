"""T5Config.attention="cudnn": fused attention through
jax.nn.dot_product_attention.

No GPU here, so the same call runs with jax's "xla" implementation to check
its values, masks and gradients, and the model is lowered for "cuda" to
check that cuDNN's custom calls (forward, and backward with the relative
position bias's gradient) are what a GPU would compile.
"""

from __future__ import annotations

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.models.t5 import fused_attention

# dro_fast.models re-exports the function t5 under the module's name.
t5_module = sys.modules["dro_fast.models.t5"]

CONFIG = models.preset("tiny", dropout_rate=0.0, dtype="bfloat16")
B, S, T = 3, 21, 19


@pytest.fixture(params=["xla", t5_module.MEMORY_STAND_IN])
def fused_on_cpu(request, monkeypatch):
  """Runs attention="cudnn" through jax's XLA implementation of the call,
  and through the memory stand-in (what cudnn_memory_stand_in() swaps in)."""
  monkeypatch.setattr(t5_module, "_FUSED_ATTENTION", {"cudnn": request.param})


def _attention_reference(q, k, v, bias, lengths, causal, cotangent):
  """float64 output and gradients (q, k, v, bias) of T5 attention."""
  q, k, v, bias, cotangent = (np.asarray(a, np.float64)
                              for a in (q, k, v, bias, cotangent))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
  keys = np.arange(k.shape[1])
  visible = keys[None, None, None, :] < lengths[:, None, None, None]
  if causal:
    visible = visible & (keys[None, :] <= np.arange(q.shape[1])[:, None])
  logits = np.where(visible, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v)
  d_weights = np.einsum("bqhd,bkhd->bhqk", cotangent, v)
  d_logits = weights * (d_weights - (d_weights * weights).sum(-1,
                                                              keepdims=True))
  return out, (np.einsum("bhqk,bkhd->bqhd", d_logits, k),
               np.einsum("bhqk,bqhd->bkhd", d_logits, q),
               np.einsum("bhqk,bqhd->bkhd", weights, cotangent),
               d_logits.sum(0, keepdims=True))


@pytest.mark.parametrize("implementation", ["xla", t5_module.MEMORY_STAND_IN])
@pytest.mark.parametrize("causal", [False, True], ids=["padded", "causal"])
def test_fused_attention_matches_a_float64_reference(causal, implementation):
  rng = np.random.default_rng(1)
  b, q_len, k_len, h, d = 3, 6, 6 if causal else 9, 2, 8
  q, k, v, cotangent = (rng.normal(size=shape).astype(np.float32) for shape in
                        ((b, q_len, h, d), (b, k_len, h, d), (b, k_len, h, d),
                         (b, q_len, h, d)))
  bias = rng.normal(size=(1, h, q_len, k_len)).astype(np.float32)
  lengths = np.array([k_len, 4, 1] if not causal else [k_len] * b, np.int32)

  def loss(q, k, v, bias):
    out = fused_attention(q, k, v, bias, None if causal else lengths, causal,
                          implementation)
    return jnp.sum(out * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                       has_aux=True)(q, k, v, bias)
  want_out, want_grads = _attention_reference(q, k, v, bias, lengths, causal,
                                              cotangent)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for name, got, want in zip("q k v bias".split(), grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def _tokens(seed=0):
  rng = np.random.default_rng(seed)
  encoder = rng.integers(2, CONFIG.vocab_size, (B, S)).astype(np.int32)
  encoder[1, 15:] = CONFIG.pad_id        # right-padded, as dro_fast.data pads
  encoder[2, 4:] = CONFIG.pad_id
  targets = rng.integers(2, CONFIG.vocab_size, (B, T)).astype(np.int32)
  return encoder, targets


@pytest.fixture(scope="module")
def params():
  encoder, targets = _tokens()
  return models.t5(CONFIG).init(jax.random.key(0), encoder, targets)


def _logits_and_grads(config, params, encoder, targets):
  model = models.t5(config)
  cotangent = jax.random.normal(jax.random.key(2),
                                (B, T, config.vocab_size), jnp.float32)

  def loss(params):
    logits = model.apply(params, None, encoder, targets).astype(jnp.float32)
    return jnp.sum(logits * cotangent), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def test_fused_model_matches_the_materialised_one(params, fused_on_cpu):
  # Same parameters, bfloat16 compute: the fused call and the "xla" path
  # differ only in where the bias is rounded to bfloat16.
  encoder, targets = _tokens()
  fused = _logits_and_grads(CONFIG.replace(attention="cudnn"), params,
                            encoder, targets)
  materialised = _logits_and_grads(CONFIG, params, encoder, targets)
  scale = float(jnp.max(jnp.abs(materialised[0])))
  np.testing.assert_allclose(fused[0], materialised[0], atol=0.02 * scale)
  flat_fused = dict(jax.tree_util.tree_leaves_with_path(fused[1]))
  for path, want in jax.tree_util.tree_leaves_with_path(materialised[1]):
    got = flat_fused[path]
    assert float(jnp.max(jnp.abs(want))) > 0, path
    error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert error < 0.05, (jax.tree_util.keystr(path), error)


def test_fused_decoder_is_causal(params, fused_on_cpu):
  # The decoder's position t sees targets before t only (inputs are shifted
  # right by one), so changing targets from 10 on leaves logits 0..10 alone.
  encoder, targets = _tokens()
  model = models.t5(CONFIG.replace(attention="cudnn"))
  apply = jax.jit(lambda t: model.apply(params, None, encoder, t))
  base = apply(targets)
  later = targets.copy()
  later[:, 10:] = (later[:, 10:] + 5) % CONFIG.vocab_size
  out = apply(later)
  np.testing.assert_array_equal(out[:, :11], base[:, :11])
  assert not np.array_equal(out[:, 11:], base[:, 11:])


def test_fused_model_ignores_keys_past_the_length(params, fused_on_cpu):
  # Example 1 is 15 tokens right-padded to 21. Its encoder keys past 15 hold
  # the pad embedding; masked by length, they change nothing, so its logits
  # equal those of the 15 tokens run alone.
  encoder, targets = _tokens()
  model = models.t5(CONFIG.replace(attention="cudnn"))
  full = model.apply(params, None, encoder, targets)
  alone = model.apply(params, None, encoder[1:2, :15], targets[1:2])
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


def test_model_lowers_to_cudnn_fused_attention_for_cuda(monkeypatch):
  _pretend_cudnn(monkeypatch)
  config = CONFIG.replace(attention="cudnn", scan_layers=True)
  encoder, targets = _tokens()
  # cuDNN takes a bias with even lengths only (see the next test).
  encoder, targets = encoder[:, :S - 1], targets[:, :T - 1]
  params = jax.eval_shape(models.t5(config).init, jax.random.key(0), encoder,
                          targets)

  def lowered(config):
    model = models.t5(config)

    def loss(params):
      return jnp.sum(model.apply(params, None, encoder, targets).astype(
          jnp.float32))

    return jax.jit(jax.grad(loss)).trace(params).lower(
        lowering_platforms=("cuda",)).as_text()

  text = lowered(config)
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
  assert logits in lowered(config.replace(attention="xla"))


def test_remat_keeps_cudnn_forward_outputs(monkeypatch):
  # cuDNN's backward needs its forward's output and softmax statistics. The
  # "dots" policies save them (jax's policies alone did not: the backward
  # ran every cuDNN forward again); "full" recomputes every one.
  from dro_fast import cpu_gemm  # pylint: disable=g-import-not-at-top
  _pretend_cudnn(monkeypatch)
  encoder, targets = _tokens()
  encoder, targets = encoder[:, :S - 1], targets[:, :T - 1]

  def forward_calls(remat):
    config = CONFIG.replace(attention="cudnn", scan_layers=False,
                            remat=remat)
    model = models.t5(config)
    params = jax.eval_shape(model.init, jax.random.key(0), encoder, targets)

    def loss(params):
      return jnp.sum(model.apply(params, None, encoder, targets).astype(
          jnp.float32))

    with cpu_gemm.accelerator_paths():
      text = jax.jit(jax.grad(loss)).trace(params).lower(
          lowering_platforms=("cuda",)).as_text()
    return sum(1 for line in text.splitlines()
               if "custom_call @__cudnn$fmha" in line
               and "Backward" not in line)

  # One per attention: encoder self, decoder self and cross.
  attentions = CONFIG.num_encoder_layers + 2 * CONFIG.num_decoder_layers
  assert forward_calls("none") == attentions
  assert forward_calls("dots") == attentions
  assert forward_calls("dots_except_mlp_hidden") == attentions
  assert forward_calls("full") == 2 * attentions


def test_memory_stand_in_keeps_what_cudnn_keeps():
  # Under the "dots" policies the stand-in's output and log-sum-exp are
  # saved for the backward, as cuDNN's are; the [B, H, q, k] logits are
  # not, under any policy but "none".
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  encoder, targets = _tokens()
  attentions = CONFIG.num_encoder_layers + 2 * CONFIG.num_decoder_layers
  for remat in ("dots", "dots_except_mlp_hidden", "full"):
    config = CONFIG.replace(attention="cudnn", remat=remat)
    model = models.t5(config)
    with t5_module.cudnn_memory_stand_in():
      params = model.init(jax.random.key(0), encoder, targets)
      residuals = saved_residuals(
          lambda p, model=model: model.apply(p, None, encoder, targets).sum(),
          params)
    tagged = sum("fused_attention_" in description
                 for _, description in residuals)
    assert tagged == (0 if remat == "full" else 2 * attentions), (remat,
                                                                  tagged)
    # (The [1, H, q, k] relative-position bias is kept, as cuDNN keeps it.)
    assert not any(a.ndim == 4 and a.shape[0] == B
                   and a.shape[-2:] in ((S, S), (T, T), (T, S))
                   for a, _ in residuals), remat
  assert t5_module._FUSED_ATTENTION == {"cudnn": "cudnn"}  # pylint: disable=protected-access


def test_dro_v_step_lowers_with_cudnn_attention_for_cuda(monkeypatch):
  # The whole trainer step (policy, separate value encoder, losses, two
  # Adafactor updates) as a GPU would build it, with the leaner remat.
  from dro_fast import cpu_gemm  # pylint: disable=g-import-not-at-top
  from dro_fast.models import value  # pylint: disable=g-import-not-at-top
  from dro_fast.training import optim  # pylint: disable=g-import-not-at-top
  from dro_fast.training import steps  # pylint: disable=g-import-not-at-top
  _pretend_cudnn(monkeypatch)
  config = CONFIG.replace(attention="cudnn", scan_layers=True,
                          remat="dots_except_mlp_hidden")
  algorithm = steps.AlgorithmConfig(algo="dro_v", value_net="separate")
  trainer = steps.make_trainer(algorithm, config, optim.make_optimizer(1e-4),
                               optim.make_optimizer(1e-4))

  def init_state(key):
    tokens = jnp.ones((1, 2), jnp.int32)
    policy_key, value_key, state_key = jax.random.split(key, 3)
    policy = models.t5(config).init(policy_key, tokens, tokens)
    net = value.value_network(config, "separate")
    values = value.init_from_policy(net.init(value_key, tokens), policy)
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
  with cpu_gemm.accelerator_paths():
    text = jax.jit(trainer.update).trace(state, batch).lower(
        lowering_platforms=("cuda",)).as_text()
  calls = {line.split("custom_call @")[1].split("(")[0]
           for line in text.splitlines() if "custom_call @__cudnn$fmha" in line}
  assert calls == {
      "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward",
      "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, calls
  assert f"tensor<{b}x{config.num_heads}x{s}x{s}x" not in text


def test_cudnn_refuses_odd_lengths_with_a_clear_error(monkeypatch):
  _pretend_cudnn(monkeypatch)
  model = models.t5(CONFIG.replace(attention="cudnn"))
  encoder, targets = _tokens()           # S = 21: odd
  with pytest.raises(ValueError, match="odd sequence lengths in its backward pass; got 21"):
    jax.eval_shape(model.init, jax.random.key(0), encoder, targets)


@pytest.mark.parametrize("changes, message", [
    (dict(attention="flash"), "attention must be one of"),
    (dict(attention="cudnn", dtype="float32"), "bfloat16"),
])
def test_bad_attention_config(changes, message):
  with pytest.raises(ValueError, match=message):
    models.preset("tiny", **changes)


def test_fused_attention_refuses_attention_dropout(fused_on_cpu):
  config = CONFIG.replace(attention="cudnn", dropout_rate=0.1)
  encoder, targets = _tokens()
  model = models.t5(config)
  with pytest.raises(ValueError, match="dropout_rate=0"):
    model.init(jax.random.key(0), encoder, targets, is_training=True)


@pytest.mark.parametrize("backend, platform_version, expected", [
    ("gpu", "cuda 12080", True),
    ("gpu", "rocm 60342", False),
    ("gpu", "ROCm 6.3", False),
    ("cpu", "cpu", False),
    ("tpu", "PJRT C API", False),
])
def test_cuda_backend_tells_nvidia_from_rocm(monkeypatch, backend,
                                             platform_version, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  device = types.SimpleNamespace(
      client=types.SimpleNamespace(platform_version=platform_version))
  monkeypatch.setattr(jax, "devices", lambda: [device])
  assert models.cuda_backend() is expected
