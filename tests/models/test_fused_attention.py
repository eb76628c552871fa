"""The fused attention implementations of T5Config.attention, and the table.

"cudnn" (jax.nn.dot_product_attention): no GPU here, so the same call runs
with jax's "xla" implementation (an implementation passed by value,
DOT_PRODUCT_XLA) to check its values, masks and gradients, and the model is
lowered for "cuda" (T5Config.matmul "xla", a GPU's) to check that cuDNN's custom
calls (forward, and backward with the relative position bias's gradient)
are what a GPU would compile.

"flash" (dro_fast.kernels.flash_attention, tested against float64 in
tests/kernels/test_flash_attention.py): the model in the TPU simulator
against attention "xla", its residuals under remat, and the edges it shares
with "xla": the key-mask contract and queries that see no key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.models import attention
from dro_fast.models.attention import AttentionMask
from dro_fast.models.config import ATTENTIONS
from dro_fast.models.config import AttentionImplementation
from dro_fast.models.layers import RelativeBias
from tests.models import attention_cases
from tests.models.attention_cases import B, CONFIG, S, T

# The cudnn entry's jax.nn.dot_product_attention call, run by XLA.
_DOT_PRODUCT_XLA_FN = functools.partial(attention.dot_product_attention,
                                        implementation="xla")
DOT_PRODUCT_XLA = AttentionImplementation("dot_product_attention_xla",
                                          _DOT_PRODUCT_XLA_FN)


@pytest.fixture
def dot_product_xla():
  """T5Config.attention that runs DOT_PRODUCT_XLA."""
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
  attention_cases.check_matches_materialised(
      CONFIG.replace(attention=dot_product_xla), params)


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
GPU_CONFIG = CONFIG.replace(attention="cudnn", matmul="xla")


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


def test_the_table_is_fixed_and_names_the_config_s_choices():
  # config.py validates against its own tuple, importing no implementation;
  # the table has exactly those entries and cannot be changed.
  assert tuple(attention.IMPLEMENTATIONS) == ATTENTIONS
  assert all(attention.IMPLEMENTATIONS[name].name == name
             for name in attention.IMPLEMENTATIONS)
  with pytest.raises(TypeError):
    attention.IMPLEMENTATIONS["cudnn"] = DOT_PRODUCT_XLA
  assert (attention.IMPLEMENTATIONS["cudnn"].fn
          is attention.dot_product_attention)
  assert attention.implementation(DOT_PRODUCT_XLA) is DOT_PRODUCT_XLA
  assert CONFIG.replace(attention=DOT_PRODUCT_XLA).attention is DOT_PRODUCT_XLA


def test_an_implementation_of_one_s_own_is_fused():
  with pytest.raises(ValueError, match="applies no dropout"):
    CONFIG.replace(attention=DOT_PRODUCT_XLA, dropout_rate=0.1)


# The tiny model, its layers scanned so that each stack's attention is
# traced (and simulated) once.
FLASH_CONFIG = CONFIG.replace(attention="flash", scan_layers=True)


def test_flash_model_matches_the_materialised_one():
  encoder, targets = attention_cases.tokens()
  params = models.t5(FLASH_CONFIG).init(jax.random.key(0), encoder, targets)
  attention_cases.check_matches_materialised(FLASH_CONFIG, params)


@pytest.mark.parametrize("remat", ["none", "dots", "dots_except_mlp_hidden",
                                   "full"])
def test_remat_keeps_the_flash_residuals(remat):
  # Under the "dots" policies the output and log-sum-exp (FUSED_RESIDUALS)
  # are saved, so no forward kernel runs twice; "full" saves neither. No
  # [B, H, q, k] array (bias or logits) is a residual under any policy.
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  encoder, targets = attention_cases.tokens()
  config = FLASH_CONFIG.replace(attention_interpret=False, remat=remat,
                                scan_layers=False)
  model = models.t5(config)
  params = jax.eval_shape(model.init, jax.random.key(0), encoder, targets)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
  residuals = saved_residuals(
      lambda p: model.apply.logits(p, None, encoder, targets).sum(), params)
  attentions = config.num_encoder_layers + 2 * config.num_decoder_layers
  tagged = sum("fused_attention_" in description
               for _, description in residuals)
  assert tagged == (0 if remat == "full" else 2 * attentions)
  assert not any(a.ndim == 4 and a.shape[-2:] in ((S, S), (T, T), (T, S))
                 for a, _ in residuals)


def test_flash_config_checks():
  with pytest.raises(ValueError, match="applies no dropout"):
    models.preset("tiny", attention="flash", dropout_rate=0.1)
  assert attention.takes_relative_bias("flash")
  assert not attention.takes_relative_bias("xla")
  assert not attention.takes_relative_bias(DOT_PRODUCT_XLA)


def test_a_mask_that_is_not_a_leading_run_is_refused():
  # The fused implementations read the key mask as lengths; a concrete
  # mask with a valid key after a masked one would be read wrongly.
  mask = AttentionMask(key_valid=jnp.asarray([[True, True, False],
                                              [True, False, True]]))
  message = (r"AttentionMask.key_valid row 1 is not a leading run of valid "
             r"keys \(\[1, 0, 1\]\)")
  with pytest.raises(ValueError, match=message):
    mask.lengths()
  x = jnp.ones((2, 3, 1, 8), jnp.float32)
  with pytest.raises(ValueError, match=message):
    attention.flash_attention(x, x, x, bias=None, mask=mask, interpret=True)
  # A traced mask cannot be read: it is taken as leading runs (the model's
  # masks are, over right-padded inputs).
  lengths = jax.jit(lambda valid: AttentionMask(valid).lengths())(
      mask.key_valid)
  np.testing.assert_array_equal(lengths, [2, 2])
  np.testing.assert_array_equal(
      AttentionMask(key_valid=jnp.asarray([[True, False, False]])).lengths(),
      [1])


def test_flash_model_refuses_a_pad_inside_the_input():
  # Run eagerly, the model's encoder mask is concrete, so the flash
  # attention checks it before any kernel runs.
  encoder, targets = attention_cases.tokens()
  model = models.t5(FLASH_CONFIG)
  params = jax.eval_shape(model.init, jax.random.key(0), encoder, targets)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
  encoder[0, 3] = CONFIG.pad_id
  with pytest.raises(ValueError, match="row 0 is not a leading run"):
    model.apply.logits(params, None, encoder, targets)


def test_a_query_that_sees_no_key_gets_zero_from_xla_and_flash():
  # Example 0 has no valid key (an empty input): both give 0 there, and
  # the same values and gradients everywhere.
  rng = np.random.default_rng(5)
  b, q_len, k_len, h, d = 2, 3, 5, 2, 8
  q, k, v, cotangent = (rng.normal(size=shape).astype(np.float32) for shape in
                        ((b, q_len, h, d), (b, k_len, h, d), (b, k_len, h, d),
                         (b, q_len, h, d)))
  table = rng.normal(size=(h, CONFIG.relative_attention_num_buckets)).astype(
      np.float32)
  mask = AttentionMask(key_valid=jnp.arange(k_len)[None, :]
                       < jnp.asarray([[0], [3]]))

  def loss(name, q, k, v, table):
    bias = RelativeBias(table, True, CONFIG.relative_attention_max_distance)
    impl = attention.IMPLEMENTATIONS[name]
    if impl.relative_bias:
      out = impl.fn(q, k, v, bias=bias, mask=mask, interpret=True)
    else:
      out = impl.fn(q, k, v, bias=bias.dense(q_len, k_len), mask=mask)
    return jnp.sum(out * cotangent), out

  results = {}
  for name in ("xla", "flash"):
    (_, out), grads = jax.value_and_grad(
        functools.partial(loss, name), argnums=(0, 1, 2, 3), has_aux=True)(
            q, k, v, table)
    np.testing.assert_array_equal(out[0], 0.0, err_msg=name)
    np.testing.assert_array_equal(grads[0][0], 0.0, err_msg=name)
    assert float(jnp.max(jnp.abs(out[1]))) > 0, name
    results[name] = (out, *grads)
  for what, got, want in zip(("out", "q", "k", "v", "table"),
                             results["flash"], results["xla"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                               err_msg=what)
