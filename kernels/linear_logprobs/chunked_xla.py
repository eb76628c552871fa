"""The "chunked_xla" implementation: a lax.scan over vocabulary chunks.

Forward: each chunk's logits hidden @ weight[:, chunk] ([N, c] float32) feed an
online log-sum-exp and are dropped. Backward: each chunk's logits are
recomputed, turned into dlogits = g · (onehot − exp(logits − lse)), and
contracted at once into d(hidden) += dlogits @ weight[:, chunk]ᵀ and
d(weight)[:, chunk] = hiddenᵀ @ dlogits. Peak temporary memory is N × c
floats plus a float32 d(hidden), independent of V.

The last chunk is shifted left to stay in bounds (no padded copy of the
weight); entries an earlier chunk covered are masked out.

Every product takes its operands as given (the compute dtype) and
accumulates in float32; no operand is ever a bare transpose (see
backward_scan), which is the form every backend runs without a layout copy.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from dro_fast.kernels import config
from dro_fast.kernels import online_lse


def _chunking(vocab: int, block_sizes: config.BlockSizes | None):
  block_sizes = block_sizes or config.BlockSizes()
  chunk = min(block_sizes.vocab_chunk, vocab)
  return chunk, -(-vocab // chunk)


def _chunk(weight, j, chunk, vocab):
  """weight[:, chunk j] [D, c], its column ids [c] and which are new [c]."""
  start = jnp.minimum(j * chunk, vocab - chunk)
  w = lax.dynamic_slice_in_dim(weight, start, chunk, axis=1)
  cols = start + jnp.arange(chunk, dtype=jnp.int32)
  return start, w, cols, cols >= j * chunk


def linear_token_logprobs(hidden, weight, targets, block_sizes=None,
                          interpret=None):
  """Same contract as reference.linear_token_logprobs."""
  del interpret
  n = hidden.shape[0]
  vocab = weight.shape[1]
  chunk, num_chunks = _chunking(vocab, block_sizes)

  def body(carry, j):
    _, w, cols, valid = _chunk(weight, j, chunk, vocab)
    logits = jnp.dot(hidden, w,
                     preferred_element_type=jnp.float32)            # [N, c]
    cols = jnp.broadcast_to(cols, logits.shape)
    valid = jnp.broadcast_to(valid, logits.shape)
    return online_lse.update(carry, logits, cols, valid,
                             targets[:, None]), None

  (m, l, t), _ = lax.scan(body, online_lse.init_state(n),
                          jnp.arange(num_chunks))
  lse = m + jnp.log(l)
  return t - lse, lse


def backward_scan(hidden, weight, targets, chunk, dlogits_fn):
  """d(hidden), d(weight) from per-chunk dlogits, one chunk at a time.

  dlogits_fn(w_chunk [D, c], start) -> dlogits [N, c] in the compute dtype.
  A column's dlogits does not depend on which chunk computes it, so the
  shifted last chunk simply rewrites the overlapping d(weight) columns with
  the same values; for d(hidden) the overlapping weight columns are zeroed so
  that they count once.

  Two choices are part of the algorithm on every backend:
    - the d(weight) carry is float32 whatever the weight's dtype, cast once
      at the end: XLA:CPU updates a bfloat16 carry out of place, copying all
      of it for every chunk, and a float32 one in place
      (benchmarks/RESULTS.md#kernels-on-the-cpu). It holds D × V float32
      during the backward pass (twice a bfloat16 d(weight));
    - hiddenᵀ [D, N] is materialised row-major once, outside the scan, so
      that each chunk's d(weight) = hiddenᵀ @ dlogits takes a row-major
      operand: XLA:CPU sees a bare transpose as a column-major layout that
      its YNNPACK matmul does not take (the GEMM falls back to Eigen). One
      [D, N] copy per backward pass, small beside the [D, V] gradient.
  d(hidden) accumulates in float32.
  """
  vocab = weight.shape[1]
  num_chunks = -(-vocab // chunk)
  n, d = hidden.shape
  hidden_t = lax.optimization_barrier(
      hidden.T.reshape(-1)).reshape(d, n)                         # [D, N]

  def body(carry, j):
    dhidden, dweight = carry
    start, w, _, valid = _chunk(weight, j, chunk, vocab)
    dlogits = dlogits_fn(w, start)                                # [N, c]
    w_new = jnp.where(valid[None, :], w, jnp.zeros_like(w))
    # dlogits @ w_newᵀ, contracting c in place (no transposed operand).
    dhidden = dhidden + lax.dot_general(
        dlogits, w_new.astype(dlogits.dtype),
        (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dw = jnp.dot(hidden_t.astype(dlogits.dtype), dlogits,
                 preferred_element_type=jnp.float32)              # [D, c]
    dweight = lax.dynamic_update_slice_in_dim(
        dweight, dw.astype(dweight.dtype), start, axis=1)
    return (dhidden, dweight), None

  init = (jnp.zeros(hidden.shape, jnp.float32),
          jnp.zeros(weight.shape, jnp.float32))
  (dhidden, dweight), _ = lax.scan(body, init, jnp.arange(num_chunks))
  return dhidden.astype(hidden.dtype), dweight.astype(weight.dtype)


def linear_token_logprobs_bwd(hidden, weight, targets, lse, g,
                              block_sizes=None, interpret=None):
  """Same contract as reference.linear_token_logprobs_bwd."""
  del interpret
  chunk, _ = _chunking(weight.shape[1], block_sizes)
  compute_dtype = jnp.result_type(hidden.dtype, weight.dtype)

  def dlogits_fn(w, start):
    logits = jnp.dot(hidden, w,
                     preferred_element_type=jnp.float32)            # [N, c]
    cols = start + jnp.arange(w.shape[1], dtype=jnp.int32)
    onehot = cols[None, :] == targets[:, None]
    dlogits = g[:, None] * (onehot - jnp.exp(logits - lse[:, None]))
    return dlogits.astype(compute_dtype)

  return backward_scan(hidden, weight, targets, chunk, dlogits_fn)
