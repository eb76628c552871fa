"""The Haiku T5 on its own: sizes, layouts, precision and cached decoding."""

from __future__ import annotations

import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import decoding
from dro_fast import models
from dro_fast.models import network
from dro_fast.models import pretrained
from dro_fast.models.attention import attention_logits
from dro_fast.models.layers import Dense

CONFIG = models.preset("tiny", dropout_rate=0.0)
B, S, T = 3, 21, 19


def _tokens(seed=0):
  rng = np.random.default_rng(seed)
  encoder = rng.integers(2, CONFIG.vocab_size, (B, S)).astype(np.int32)
  encoder[1, 15:] = CONFIG.pad_id
  targets = rng.integers(2, CONFIG.vocab_size, (B, T)).astype(np.int32)
  return jnp.asarray(encoder), jnp.asarray(targets)


@pytest.fixture(scope="module")
def params():
  encoder, targets = _tokens()
  return models.t5(CONFIG).init(jax.random.key(0), encoder, targets)


@pytest.mark.parametrize("name, expected", [
    ("flan-t5-large", 783_150_080), ("flan-t5-xl", 2_849_757_184),
    ("t5-v1_1-small", 76_961_152)])
def test_parameter_counts(name, expected):
  # The Haiku model's own parameters (shapes only, nothing allocated) agree
  # with the closed-form count; the expected figures are the published sizes
  # of google/flan-t5-{large,xl} and t5-v1_1-small.
  config = models.preset(name, scan_layers=True)
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(models.t5(config).init, jax.random.key(0), tokens,
                          tokens)
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == expected
  assert models.parameter_count(config) == expected


def test_parameter_paths_are_t5x_names(params):
  flat = pretrained.flatten(params)
  assert flat["encoder/layers_1/attention/query/kernel"].shape == (32, 32)
  assert flat["encoder/relpos_bias/rel_embedding"].shape == (4, 32)
  assert flat["decoder/layers_0/encoder_decoder_attention/out/kernel"].shape \
      == (32, 32)
  assert flat["decoder/logits_dense/kernel"].shape == (32, 256)
  assert flat["token_embedder/embedding"].shape == (256, 32)
  assert "decoder/layers_1/mlp/wi_1/kernel" in flat


def _dense_loss(seed, x_shape, features, dtype, form):
  """A Dense layer's params, input, cotangent and jitted value-and-grad of
  sum(Dense(x) · cotangent) w.r.t. (params, x)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=x_shape).astype(np.float32)
  cotangent = rng.normal(size=(*x_shape[:-1], features)).astype(np.float32)
  dense = hk.without_apply_rng(hk.transform(
      lambda x: Dense(features, dtype, form=form, name="d")(x)))
  params = dense.init(jax.random.key(0), x)

  def loss(params, x):
    y = dense.apply(params, x)
    assert y.dtype == dtype
    return jnp.sum(y.astype(jnp.float32) * cotangent)

  return params, x, cotangent, jax.jit(jax.value_and_grad(loss, (0, 1)))


@pytest.mark.parametrize("form", ["cpu_row_major", "xla"])
def test_dense_gradients_match_a_float64_reference(form):
  # "cpu_row_major": Dense runs the CPU backend's VJP (models/cpu.py: d(x)
  # contracting the kernel in place, d(kernel) through a row-major xᵀ);
  # "xla": jnp.dot and autodiff. Value and both gradients against NumPy
  # float64, on random inputs.
  params, x, cotangent, grad_fn = _dense_loss(3, (2, 5, 7), 6, jnp.float32,
                                              form)
  kernel = np.asarray(params["d"]["kernel"], np.float64)
  value, (grad_params, grad_x) = grad_fn(params, x)
  x64, c64 = x.astype(np.float64), cotangent.astype(np.float64)
  np.testing.assert_allclose(value, np.sum((x64 @ kernel) * c64), rtol=1e-5)
  np.testing.assert_allclose(grad_x, c64 @ kernel.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      grad_params["d"]["kernel"],
      x64.reshape(-1, 7).T @ c64.reshape(-1, 6), rtol=1e-5, atol=1e-6)


def test_bfloat16_cpu_dense_runs_bfloat16_gemms_with_float32_gradients():
  # bfloat16 compute on the CPU form: the value and gradients stay within
  # bfloat16 rounding of a float64 reference, the kernel gradient comes
  # back in float32, and every GEMM of the compiled gradient takes bfloat16
  # operands (a float32 one would mean XLA:CPU upcast it).
  params, x, cotangent, grad_fn = _dense_loss(4, (2, 24, 32), 40,
                                              jnp.bfloat16, "cpu_row_major")
  value, (grad_params, grad_x) = grad_fn(params, x)
  assert grad_params["d"]["kernel"].dtype == jnp.float32
  # The reference rounds the inputs as the layer does.
  kernel = np.asarray(params["d"]["kernel"].astype(jnp.bfloat16), np.float64)
  x64 = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
  c64 = cotangent.astype(np.float64)
  want_dx = c64 @ kernel.T
  want_dk = x64.reshape(-1, 32).T @ c64.reshape(-1, 40)
  np.testing.assert_allclose(value, np.sum((x64 @ kernel) * c64), rtol=2e-2)
  for got, want in ((grad_x, want_dx), (grad_params["d"]["kernel"], want_dk)):
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
  hlo = grad_fn.lower(params, x).compile().as_text()
  assert sum(" dot(" in line for line in hlo.splitlines()) == 3
  for block in hlo.split("\n\n"):       # one computation per block
    if " dot(" in block:
      header = block.strip().splitlines()[0]     # its parameters' types
      assert "f32[" not in header.split("->")[0], header


def _model_jaxpr(config) -> str:
  model = models.t5(config)
  encoder, targets = _tokens()
  params = jax.eval_shape(model.init, jax.random.key(0), encoder, targets)
  return str(jax.make_jaxpr(
      lambda p: model.apply.logits(p, None, encoder, targets).sum())(params))


def test_matmul_field_chooses_the_cpu_forms():
  # matmul "cpu_row_major": every Dense and the logits go through the CPU
  # form's custom VJP (models/cpu.py's `matmul`); "xla" traces none.
  def cpu_forms(matmul):
    return _model_jaxpr(CONFIG.replace(matmul=matmul)).count("name=matmul")

  # Per encoder layer 4 + 3 projections, per decoder layer 8 + 3; the
  # logits once.
  want = (7 * CONFIG.num_encoder_layers + 11 * CONFIG.num_decoder_layers
          + 1)
  assert cpu_forms("cpu_row_major") == want
  assert cpu_forms("xla") == 0


def _attention_loss(dtype, shape):
  """Random q, k, v [B, q|t, H, K], a bias and cotangent, and the jitted
  value-and-grad of sum(attention(q, k, v) · cotangent) through
  attention_logits and the einsum that combines the values."""
  rng = np.random.default_rng(5)
  b, q_len, t_len, heads, width = shape
  q, k, v = (rng.normal(size=(b, n, heads, width)).astype(np.float32)
             for n in (q_len, t_len, t_len))
  bias = rng.normal(size=(1, heads, q_len, t_len)).astype(np.float32)
  cotangent = rng.normal(size=(b, q_len, heads, width)).astype(np.float32)

  def loss(q, k, v, bias):
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    logits = attention_logits(q, k)
    assert logits.dtype == jnp.float32
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(dtype)
    out = jnp.einsum("bhqt,bthk->bqhk", weights, v)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  return (q, k, v, bias), cotangent, jax.jit(
      jax.value_and_grad(loss, (0, 1, 2, 3)))


def _attention_reference(q, k, v, bias, cotangent):
  """The loss and its gradients in float64 NumPy, written out by hand."""
  q, k, v, bias, c = (np.asarray(x, np.float64)
                      for x in (q, k, v, bias, cotangent))
  logits = np.einsum("bqhk,bthk->bhqt", q, k) + bias
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("bhqt,bthk->bqhk", w, v)
  d_w = np.einsum("bqhk,bthk->bhqt", c, v)
  d_v = np.einsum("bhqt,bqhk->bthk", w, c)
  d_logits = w * (d_w - np.sum(d_w * w, -1, keepdims=True))
  d_q = np.einsum("bhqt,bthk->bqhk", d_logits, k)
  d_k = np.einsum("bhqt,bqhk->bthk", d_logits, q)
  d_bias = d_logits.sum(0, keepdims=True)
  return np.sum(out * c), (d_q, d_k, d_v, d_bias)


def test_attention_logits_match_a_float64_reference():
  # attention_logits' own VJP, value and all four gradients of attention.
  args, cotangent, grad_fn = _attention_loss(jnp.float32, (2, 5, 7, 3, 4))
  value, grads = grad_fn(*args)
  want_value, want_grads = _attention_reference(*args, cotangent)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bfloat16_attention_logits_backward_in_bfloat16():
  # Autodiff of the float32-output logits einsum would run the two backward
  # products with float32 operands (on a GPU: float32 / TF32 GEMMs). The
  # model's gradient lowered for "cuda" has no dot with a float32
  # [B, H, q, t] operand, and the values stay within bfloat16 rounding of
  # float64.
  args, cotangent, grad_fn = _attention_loss(jnp.bfloat16, (2, 8, 16, 2, 16))
  rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
             for x in args[:3]] + [args[3]]
  _, grads = grad_fn(*args)
  _, want_grads = _attention_reference(*rounded, cotangent)
  for got, want in zip(grads, want_grads):
    got = np.asarray(got, np.float64)
    assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)

  config = CONFIG.replace(dtype="bfloat16", matmul="xla")
  encoder, targets = _tokens()
  model = models.t5(config)
  params = jax.eval_shape(model.init, jax.random.key(0), encoder, targets)

  def loss(params):
    return model.apply.logits(params, None, encoder, targets).sum()

  text = jax.jit(jax.grad(loss)).trace(params).lower(
      lowering_platforms=("cuda",)).as_text()
  dots = [line.rsplit(":", 1)[-1] for line in text.splitlines()
          if "stablehlo.dot_general" in line]
  assert len(dots) > 10, dots
  float32_4d = [d for d in dots
                if re.search(r"tensor<\d+x\d+x\d+x\d+xf32>.*->", d)]
  assert not float32_4d, float32_4d


@pytest.mark.parametrize("changes", [dict(scan_layers=True),
                                     dict(remat="full"),
                                     dict(scan_layers=True, remat="dots"),
                                     dict(scan_layers=True,
                                          remat="dots_except_mlp_hidden")])
def test_scan_and_remat_compute_the_same_function(params, changes):
  encoder, targets = _tokens(1)
  config = CONFIG.replace(**changes)
  scanned = pretrained.stack_layers(params, config)

  def loss(model_config, p):
    logits = models.t5(model_config).apply.logits(p, None, encoder, targets)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3]), logits

  (value, logits), grads = jax.value_and_grad(
      lambda p: loss(CONFIG, p), has_aux=True)(params)
  (value2, logits2), grads2 = jax.value_and_grad(
      lambda p: loss(config, p), has_aux=True)(scanned)
  np.testing.assert_allclose(logits2, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value2, value, rtol=1e-6)
  grads = pretrained.stack_layers(grads, config)
  for path, g in pretrained.flatten(grads).items():
    np.testing.assert_allclose(pretrained.flatten(grads2)[path], g,
                               rtol=1e-4, atol=1e-6, err_msg=path)


def test_remat_policies_keep_less_in_the_documented_order():
  # What the backward keeps of the forward (jax's own accounting of a
  # function's residuals), per remat policy, for the tiny model.
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  encoder, targets = _tokens()
  kept = {}
  for remat in models.REMAT_POLICIES:
    model = models.t5(CONFIG.replace(remat=remat))
    params = model.init(jax.random.key(0), encoder, targets)
    residuals = saved_residuals(
        lambda p, model=model: model.apply.logits(
            p, None, encoder, targets).sum(), params)
    kept[remat] = (sum(a.size * a.dtype.itemsize for a, _ in residuals),
                   sum(f"'{name}'" in description for _, description
                       in residuals for name
                       in network.SAVED_EXCEPT_MLP_HIDDEN))
  assert (kept["none"][0] > kept["dots"][0] > kept["dots_except_mlp_hidden"][0]
          > kept["full"][0]), kept
  # Query, key, value and output of each attention: one per encoder layer,
  # two per decoder layer.
  assert kept["dots_except_mlp_hidden"][1] == 4 * (
      CONFIG.num_encoder_layers + 2 * CONFIG.num_decoder_layers), kept


def test_bfloat16_forward_stays_close_to_float32(params):
  # Stated tolerance: bfloat16 compute (float32 params, norms, softmax and
  # logits) keeps logits within 3% relative (Frobenius) of float32.
  encoder, targets = _tokens(2)
  logits32 = models.t5(CONFIG).apply.logits(params, None, encoder, targets)
  logits16 = models.t5(CONFIG.replace(dtype="bfloat16")).apply.logits(
      params, None, encoder, targets)
  assert logits16.dtype == jnp.float32
  error = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
  assert error < 3e-2, error


def test_dropout_only_when_training(params):
  encoder, targets = _tokens(3)
  model = models.t5(CONFIG.replace(dropout_rate=0.3))
  eval1 = model.apply.logits(params, None, encoder, targets)
  eval2 = model.apply.logits(params, jax.random.key(1), encoder, targets)
  train1 = model.apply.logits(params, jax.random.key(1), encoder, targets,
                              is_training=True)
  train2 = model.apply.logits(params, jax.random.key(2), encoder, targets,
                              is_training=True)
  np.testing.assert_array_equal(eval1, eval2)
  assert not np.allclose(train1, eval1)
  assert not np.allclose(train1, train2)


def test_functions_are_views_of_one_forward(params):
  """encode, decode, logits and a first decode_step agree."""
  encoder, targets = _tokens(5)
  model = models.t5(CONFIG).apply
  encoded = model.encode(params, None, encoder)
  states = model.decode(params, None, encoder, targets)
  logits = model.logits(params, None, encoder, targets)
  np.testing.assert_array_equal(states.encoded, encoded)
  assert states.hidden.shape == (B, T, CONFIG.d_model)
  np.testing.assert_allclose(
      logits, np.asarray(states.hidden, np.float64) @ np.asarray(
          states.weight, np.float64), rtol=1e-5, atol=1e-5)
  # The first cached step sees the start token alone, as position 0 of the
  # teacher-forced decoder does.
  cache = model.init_cache(params, None, encoded, T)
  step = model.decode_step(
      params, None, jnp.full((B,), CONFIG.decoder_start_id, jnp.int32),
      jnp.asarray(0, jnp.int32), cache, encoder)
  np.testing.assert_allclose(step.logits, logits[:, 0], rtol=1e-5, atol=1e-5)
  assert step.cache.self_key.shape == (CONFIG.num_decoder_layers, B, T,
                                       CONFIG.num_heads, CONFIG.d_kv)


def _eos_heavy(params):
  """Params whose EOS logit is boosted so that some rows stop early."""
  flat = pretrained.flatten(params)
  kernel = np.array(flat["decoder/logits_dense/kernel"])
  kernel[:, CONFIG.eos_id] *= 4.0
  kernel[:, CONFIG.eos_id] += 0.6
  flat["decoder/logits_dense/kernel"] = jnp.asarray(kernel)
  return pretrained.unflatten(flat)


def _uncached_greedy(params, encoder, max_length):
  """Greedy decoding by re-running the teacher-forced model on the prefix."""
  model = models.t5(CONFIG)
  tokens = np.zeros((B, max_length), np.int32)
  done = np.zeros(B, bool)
  for i in range(max_length):
    logits = model.apply.logits(params, None, encoder, jnp.asarray(tokens))
    chosen = np.where(done, CONFIG.pad_id, np.argmax(logits[:, i], axis=-1))
    tokens[:, i] = chosen
    done |= chosen == CONFIG.eos_id
  return tokens


def test_cached_decoding_equals_uncached(params):
  encoder, _ = _tokens(4)
  params = _eos_heavy(params)
  max_length = 12
  cached = np.asarray(decoding.generate(params, encoder, config=CONFIG,
                                        max_length=max_length))
  expected = _uncached_greedy(params, encoder, max_length)
  np.testing.assert_array_equal(cached, expected)
  # Stops are exercised: rows end at different steps, padded afterwards.
  eos_steps = {int(np.argmax(row == CONFIG.eos_id)) for row in expected
               if (row == CONFIG.eos_id).any()}
  assert len(eos_steps) >= 2, expected
  scanned = decoding.generate(
      pretrained.stack_layers(params, CONFIG.replace(scan_layers=True)),
      encoder, config=CONFIG.replace(scan_layers=True), max_length=max_length)
  np.testing.assert_array_equal(scanned, expected)


def test_sampling_is_deterministic_per_rng(params):
  encoder, _ = _tokens(5)
  sample = lambda rng, **kw: np.asarray(decoding.generate(
      params, encoder, config=CONFIG, max_length=10,
      sampling=decoding.SamplingConfig(**kw), rng=rng))
  a = sample(jax.random.key(7), temperature=1.0)
  np.testing.assert_array_equal(a, sample(jax.random.key(7), temperature=1.0))
  assert not np.array_equal(a, sample(jax.random.key(8), temperature=1.0))
  greedy = np.asarray(decoding.generate(params, encoder, config=CONFIG,
                                        max_length=10))
  # top-k 1 and a tiny top-p keep only the argmax.
  np.testing.assert_array_equal(
      sample(jax.random.key(9), temperature=0.7, top_k=1), greedy)
  np.testing.assert_array_equal(
      sample(jax.random.key(9), temperature=0.7, top_p=1e-6), greedy)


def test_filter_logits_keeps_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.isfinite(np.asarray(decoding.filter_logits(
      logits, decoding.SamplingConfig(temperature=1.0, **kw))))[0].tolist()
  assert kept(top_p=0.75) == [True, True, False, False]
  assert kept(top_p=0.8) == [True, True, False, False]
  assert kept(top_p=0.81) == [True, True, True, False]
  assert kept(top_k=3) == [True, True, True, False]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_p=0.0), "top_p")])
def test_bad_sampling_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    decoding.SamplingConfig(**kwargs)


def test_sampling_needs_rng(params):
  encoder, _ = _tokens(6)
  with pytest.raises(ValueError, match="needs an rng"):
    decoding.generate(params, encoder, config=CONFIG, max_length=4,
                      sampling=decoding.SamplingConfig(temperature=1.0))


@pytest.mark.parametrize("changes, message", [
    (dict(variant="v2"), "variant"), (dict(dtype="float16"), "dtype"),
    (dict(remat="some"), "remat"), (dict(num_heads=0), "num_heads"),
    (dict(matmul="cpu"), "matmul must be one of")])
def test_bad_config(changes, message):
  with pytest.raises(ValueError, match=message):
    CONFIG.replace(**changes)
  with pytest.raises(ValueError, match="Unknown T5 preset"):
    models.preset("t5-huge")
