"""linear_sequence_logprobs against float64 NumPy on materialised logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.lib import numpy_reference as ref
from dro_fast import kernels
from tests.kernels import cases

# bfloat16 operands: dlogits is rounded to bfloat16 before each contraction,
# as on the MXU / tensor cores, so the gradients carry ~2**-8 relative error.
LINEAR_GRAD_TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5),
                         "bfloat16": dict(rtol=3e-2, atol=3e-2)}


def _inputs(seed, batch, time, hidden, vocab, dtype):
  rng = np.random.default_rng(seed)
  _, targets, mask, g = cases.random_inputs(seed, batch, time, vocab, dtype)
  h = jnp.asarray(rng.normal(size=(batch, time, hidden)), dtype)
  w = jnp.asarray(rng.normal(size=(hidden, vocab)) / np.sqrt(hidden) * 2,
                  dtype)
  return h, w, targets, mask, g


def _check(h, w, targets, mask, g, dh_tol, dw_tol, **op_args):
  """Value and VJP against float64 NumPy; returns (value, dh, dw)."""
  fn = lambda h, w: kernels.linear_sequence_logprobs(  # noqa: E731
      h, w, targets, mask, **op_args)
  value, vjp = jax.vjp(fn, h, w)
  dh, dw = vjp(g)
  cases.close(value, ref.linear_sequence_logprobs(h, w, targets, mask),
              rtol=1e-5, atol=5e-4)
  dh_ref, dw_ref = ref.linear_sequence_logprobs_vjp(h, w, targets, mask, g)
  cases.close(dh, dh_ref, **dh_tol)
  cases.close(dw, dw_ref, **dw_tol)
  return value, dh, dw


@pytest.mark.parametrize("dtype", cases.DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("implementation", cases.IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", [(2, 5, 24, 300), (3, 7, 40, 130)])
def test_matches_float64_reference(implementation, dtype, shape):
  h, w, targets, mask, g = _inputs(10, *shape, dtype)
  tol = LINEAR_GRAD_TOLERANCE[jnp.dtype(dtype).name]
  value, dh, dw = _check(h, w, targets, mask, g, tol, tol,
                         implementation=implementation,
                         block_sizes=cases.SMALL_BLOCKS)

  assert value.dtype == jnp.float32 and value.shape == shape[:1]
  assert dh.dtype == dtype and dh.shape == h.shape
  assert dw.dtype == dtype and dw.shape == w.shape
  assert float(value[-1]) == 0.0
  assert not np.any(np.asarray(dh[-1], np.float32))


@pytest.mark.parametrize("implementation", cases.IMPLEMENTATIONS)
def test_t5_vocabulary_with_default_blocks(implementation):
  h, w, targets, mask, g = _inputs(11, 1, 3, 32, 32128, jnp.float32)
  _check(h, w, targets, mask, g, dict(rtol=1e-4, atol=1e-5),
         dict(rtol=1e-4, atol=1e-6), implementation=implementation)


def test_bad_weight_shape_is_named():
  h, w, targets, mask, _ = _inputs(12, 2, 3, 8, 20, jnp.float32)
  with pytest.raises(ValueError, match=r"weight must be \[D, V\]"):
    kernels.linear_sequence_logprobs(h, w.T, targets, mask)
  with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
    kernels.linear_sequence_logprobs(h[0], w, targets, mask)


@pytest.mark.parametrize("splits", [0, 3])
def test_pallas_gpu_vocab_splits(splits):
  h, w, targets, mask, g = _inputs(13, 2, 5, 24, 300, jnp.float32)
  blocks = kernels.BlockSizes(rows=16, vocab=32, hidden=16, vocab_chunk=128,
                              vocab_splits=splits)
  _check(h, w, targets, mask, g, dict(rtol=1e-4, atol=1e-5),
         dict(rtol=1e-4, atol=1e-5), implementation="pallas_gpu",
         block_sizes=blocks)
