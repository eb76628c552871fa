"""The "chunked_xla" implementation: vocabulary tiles in a lax.scan.

The forward keeps a float32 online log-sum-exp over vocabulary chunks, so no
float32 copy of the [N, V] logits is ever made (a bfloat16 input stays
bfloat16 in memory); the backward is the single fused elementwise pass of the
reference, which writes only the gradient itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dro_fast.kernels import config
from dro_fast.kernels.sequence_logprobs import reference


def online_lse_update(carry, x, cols, valid, targets):
  """Folds one float32 tile x [N, c] into the online log-sum-exp state.

  The state is (running max m, running sum l of exp(x − m), target logit t),
  each [N]. `cols` [N, c] holds each entry's vocabulary index and `valid`
  [N, c] says which entries belong to this tile (the rest are padding or were
  counted by an earlier tile).
  """
  m, l, t = carry
  x = jnp.where(valid, x, config.NEG_LARGE)
  m_new = jnp.maximum(m, jnp.max(x, axis=1))
  l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
  t = t + jnp.sum(jnp.where(valid & (cols == targets[:, None]), x, 0.0), axis=1)
  return m_new, l, t


def init_state(n: int):
  return (jnp.full((n,), config.NEG_LARGE, jnp.float32),
          jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))


def token_logprobs(logits: jax.Array, targets: jax.Array,
                   block_sizes: config.BlockSizes | None = None,
                   interpret=None) -> tuple[jax.Array, jax.Array]:
  """Same contract as reference.token_logprobs."""
  del interpret
  block_sizes = block_sizes or config.BlockSizes()
  n, vocab = logits.shape
  chunk = min(block_sizes.vocab_chunk, vocab)
  num_chunks = -(-vocab // chunk)

  def body(carry, j):
    # The last chunk is shifted left to stay in bounds (no padded copy of the
    # logits); entries an earlier chunk already counted are masked out.
    start = jnp.minimum(j * chunk, vocab - chunk)
    tile = lax.dynamic_slice_in_dim(logits, start, chunk, axis=1)  # [N, c]
    cols = start + lax.broadcasted_iota(jnp.int32, tile.shape, 1)
    return online_lse_update(carry, tile.astype(jnp.float32), cols,
                             cols >= j * chunk, targets), None

  (m, l, t), _ = lax.scan(body, init_state(n), jnp.arange(num_chunks))
  lse = m + jnp.log(l)
  return t - lse, lse


token_logprobs_bwd = reference.token_logprobs_bwd
