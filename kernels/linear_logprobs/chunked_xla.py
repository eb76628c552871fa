"""The "chunked_xla" implementation: a lax.scan over vocabulary chunks.

Forward: each chunk's logits hidden @ weight[:, chunk] ([N, c] float32) feed an
online log-sum-exp and are dropped. Backward: each chunk's logits are
recomputed, turned into dlogits = g · (onehot − exp(logits − lse)), and
contracted at once into d(hidden) += dlogits @ weight[:, chunk]ᵀ and
d(weight)[:, chunk] = hiddenᵀ @ dlogits. Peak temporary memory is N × c
floats, independent of V.

The last chunk is shifted left to stay in bounds (no padded copy of the
weight); entries an earlier chunk covered are masked out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dro_fast.kernels import config
from dro_fast.kernels.sequence_logprobs import chunked_xla


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
    logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)  # [N, c]
    cols = jnp.broadcast_to(cols, logits.shape)
    valid = jnp.broadcast_to(valid, logits.shape)
    return chunked_xla.online_lse_update(carry, logits, cols, valid,
                                         targets), None

  (m, l, t), _ = lax.scan(body, chunked_xla.init_state(n),
                          jnp.arange(num_chunks))
  lse = m + jnp.log(l)
  return t - lse, lse


def linear_token_logprobs_bwd(hidden, weight, targets, lse, g,
                              block_sizes=None, interpret=None):
  """Same contract as reference.linear_token_logprobs_bwd."""
  del interpret
  vocab = weight.shape[1]
  chunk, num_chunks = _chunking(vocab, block_sizes)
  compute_dtype = jnp.result_type(hidden.dtype, weight.dtype)

  def body(carry, j):
    dhidden, dweight = carry
    start, w, cols, valid = _chunk(weight, j, chunk, vocab)
    logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)  # [N, c]
    onehot = cols[None, :] == targets[:, None]
    dlogits = g[:, None] * (onehot - jnp.exp(logits - lse[:, None]))
    dlogits = jnp.where(valid[None, :], dlogits, 0.0).astype(compute_dtype)
    dhidden = dhidden + jnp.dot(dlogits, w.T,
                                preferred_element_type=jnp.float32)
    dw = jnp.dot(hidden.T, dlogits, preferred_element_type=jnp.float32)
    # Add (not overwrite): the shifted last chunk overlaps the previous one,
    # whose columns it leaves at zero.
    dweight = lax.dynamic_update_slice_in_dim(
        dweight, lax.dynamic_slice_in_dim(dweight, start, chunk, 1) + dw,
        start, axis=1)
    return (dhidden, dweight), None

  init = (jnp.zeros(hidden.shape, jnp.float32),
          jnp.zeros(weight.shape, jnp.float32))
  (dhidden, dweight), _ = lax.scan(body, init, jnp.arange(num_chunks))
  return dhidden.astype(hidden.dtype), dweight.astype(weight.dtype)
