"""sequence_logprobs, token_logprobs and dro_residual against float64 NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.lib import numpy_reference as ref
from dro_fast import kernels
from tests.kernels import cases


def _value_and_vjp(implementation, logits, targets, mask, cotangent,
                   block_sizes=cases.SMALL_BLOCKS):
  fn = lambda x: kernels.sequence_logprobs(
      x, targets, mask, implementation=implementation,
      block_sizes=block_sizes)
  value, vjp = jax.vjp(fn, logits)
  return value, vjp(cotangent)[0]


def _check(implementation, logits, targets, mask, cotangent, value_tol,
           grad_tol, block_sizes=cases.SMALL_BLOCKS):
  """Value and VJP against float64 NumPy; returns (value, dlogits)."""
  value, dlogits = _value_and_vjp(implementation, logits, targets, mask,
                                  cotangent, block_sizes)
  cases.close(value, ref.sequence_logprobs(logits, targets, mask),
              **value_tol)
  cases.close(dlogits, ref.sequence_logprobs_vjp(logits, targets, mask,
                                                 cotangent), **grad_tol)
  return value, dlogits


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("implementation", cases.IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(2, 5, 300), (3, 7, 130)])
def test_matches_float64_reference(implementation, dtype, shape):
  logits, targets, mask, g = cases.random_inputs(0, *shape, dtype)
  value, dlogits = _check(implementation, logits, targets, mask, g,
                          cases.tolerance(dtype, "value"),
                          cases.tolerance(dtype, "grad"))

  assert value.dtype == jnp.float32 and value.shape == shape[:1]
  assert dlogits.dtype == dtype and dlogits.shape == shape
  # The all-masked last row: value 0 and gradient 0, exactly.
  assert float(value[-1]) == 0.0
  assert not np.any(np.asarray(dlogits[-1], np.float32))


@pytest.mark.parametrize("implementation", cases.IMPLEMENTATIONS)
def test_t5_vocabulary_with_default_blocks(implementation):
  # 32128 = 251 · 128: not a multiple of any power-of-2 tile above 128.
  logits, targets, mask, g = cases.random_inputs(1, 1, 3, 32128, jnp.float32)
  _check(implementation, logits, targets, mask, g,
         dict(rtol=1e-5, atol=1e-4), dict(rtol=1e-4, atol=1e-6),
         block_sizes=None)


@pytest.mark.parametrize("implementation", cases.IMPLEMENTATIONS)
def test_large_logits_stay_finite(implementation):
  logits, targets, mask, g = cases.random_inputs(2, 2, 5, 300, jnp.float32,
                                                 scale=1e4)
  value, dlogits = _check(implementation, logits, targets, mask, g,
                          dict(rtol=1e-6, atol=1e-2),
                          dict(rtol=1e-5, atol=1e-5))
  assert np.all(np.isfinite(value)) and np.all(np.isfinite(dlogits))


@pytest.mark.parametrize("implementation", cases.IMPLEMENTATIONS)
def test_dro_residual_value_and_gradients(implementation):
  logits, targets, mask, g_delta = cases.random_inputs(3, 2, 5, 300,
                                                       jnp.float32)
  rng = np.random.default_rng(3)
  rewards, values, ref_lp = (jnp.asarray(rng.normal(size=2), jnp.float32)
                             for _ in range(3))
  g_logp = jnp.asarray(rng.normal(size=2), jnp.float32)
  tau = 0.7

  def fn(x, v):
    return kernels.dro_residual(x, targets, mask, rewards, v, ref_lp, tau=tau,
                                implementation=implementation,
                                block_sizes=cases.SMALL_BLOCKS)

  (residual, logp), vjp = jax.vjp(fn, logits, values)
  dlogits, dvalues = vjp((g_delta, g_logp))

  logp_ref = ref.sequence_logprobs(logits, targets, mask)
  cases.close(logp, logp_ref, rtol=1e-5, atol=1e-4)
  cases.close(residual, np.asarray(rewards) - np.asarray(values)
              - tau * (logp_ref - np.asarray(ref_lp)), rtol=1e-5, atol=1e-4)
  # δ depends on log π with slope −τ: the logits' cotangent is g_logp − τ·g_δ.
  cases.close(dlogits, ref.sequence_logprobs_vjp(
      logits, targets, mask, np.asarray(g_logp) - tau * np.asarray(g_delta)),
              rtol=1e-4, atol=1e-5)
  cases.close(dvalues, -np.asarray(g_delta), rtol=1e-6)


def test_token_logprobs_any_leading_shape():
  logits, targets, _, _ = cases.random_inputs(4, 2, 3, 50, jnp.float32)
  out = kernels.token_logprobs(logits[None], targets[None],
                               implementation="chunked_xla")
  expected, _ = ref.token_logprobs(logits, targets)
  cases.close(out[0], expected, rtol=1e-5, atol=1e-5)


def test_default_implementation_follows_the_target_platform():
  assert kernels.default_implementation() == {
      "tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(kernels.target_platform(),
                                                    "chunked_xla")


@pytest.mark.parametrize("call, message", [
    (lambda x, t, m: kernels.sequence_logprobs(x[0], t, m), "logits must be"),
    (lambda x, t, m: kernels.sequence_logprobs(x, t[:, :2], m),
     "targets must have shape"),
    (lambda x, t, m: kernels.sequence_logprobs(x, t.astype(jnp.float32), m),
     "targets must be integer"),
    (lambda x, t, m: kernels.sequence_logprobs(x, t, m[:1]),
     "mask must have shape"),
    (lambda x, t, m: kernels.sequence_logprobs(x.astype(jnp.int32), t, m),
     "logits must be floating"),
    (lambda x, t, m: kernels.sequence_logprobs(x, t, m, implementation="cuda"),
     "Unknown implementation 'cuda'"),
    (lambda x, t, m: kernels.dro_residual(x, t, m, jnp.zeros(3), jnp.zeros(2),
                                          jnp.zeros(2), tau=1.0),
     r"rewards must have shape \(2,\)"),
])
def test_bad_arguments_are_named(call, message):
  logits, targets, mask, _ = cases.random_inputs(5, 2, 3, 20, jnp.float32)
  with pytest.raises((ValueError, TypeError), match=message):
    call(logits, targets, mask)


def test_block_sizes_are_validated():
  with pytest.raises(ValueError, match="BlockSizes.rows must be an int >= 1"):
    kernels.BlockSizes(rows=0)
  logits, targets, mask, _ = cases.random_inputs(6, 2, 3, 20, jnp.float32)
  with pytest.raises(ValueError, match="pallas_tpu needs"):
    kernels.sequence_logprobs(logits, targets, mask,
                              implementation="pallas_tpu",
                              block_sizes=kernels.BlockSizes(rows=12))
  with pytest.raises(ValueError, match="power-of-2"):
    kernels.sequence_logprobs(logits, targets, mask,
                              implementation="pallas_gpu",
                              block_sizes=kernels.BlockSizes(vocab=100))


@pytest.mark.parametrize("splits", [0, 3, 16])
def test_pallas_gpu_vocab_splits(splits):
  # 300 / 32 = 10 vocab tiles over 3 slices of 4 (the last slice is short)
  # or more slices than tiles (clamped to 10).
  logits, targets, mask, g = cases.random_inputs(7, 2, 5, 300, jnp.float32)
  blocks = kernels.BlockSizes(rows=2, vocab=32, vocab_splits=splits)
  value, dlogits = _value_and_vjp("pallas_gpu", logits, targets, mask, g,
                                  block_sizes=blocks)
  cases.close(value, ref.sequence_logprobs(logits, targets, mask),
              rtol=1e-5, atol=1e-4)
  cases.close(dlogits, ref.sequence_logprobs_vjp(logits, targets, mask, g),
              rtol=1e-4, atol=1e-5)
