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
from dro_fast.kernels import online_lse
from dro_fast.kernels.sequence_logprobs import reference


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
    return online_lse.update(carry, tile.astype(jnp.float32), cols,
                             cols >= j * chunk, targets[:, None]), None

  (m, l, t), _ = lax.scan(body, online_lse.init_state(n),
                          jnp.arange(num_chunks))
  lse = m + jnp.log(l)
  return t - lse, lse


token_logprobs_bwd = reference.token_logprobs_bwd
