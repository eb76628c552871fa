"""The materialised T5 attention that the flash kernels compute, in pure jnp.

The contract of ops.flash_attention (autodiff gives its gradients). Shapes:
B batch, q queries, k keys, H heads, K per-head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dro_fast.kernels import config
from dro_fast.kernels.flash_attention.config import CallConfig
from dro_fast.kernels.flash_attention.relative_bias import RelativeBias


def flash_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                    *, relative_bias: RelativeBias | None,
                    lengths: jax.Array | None, causal: bool = False,
                    **unused) -> jax.Array:
  """Same contract as ops.flash_attention, with every [B, H, q, k] array.

  unused: ops' implementation, tiling and interpret arguments, ignored.
  """
  del unused
  return attention_and_lse(queries, keys, values,
                           relative_bias=relative_bias, lengths=lengths,
                           causal=causal)[0]


def forward(queries, keys, values, table, lengths,
            static: CallConfig) -> tuple[jax.Array, jax.Array]:
  """attention_and_lse with the bias as ops passes it (its table, static)."""
  return attention_and_lse(queries, keys, values,
                           relative_bias=static.relative_bias(table),
                           lengths=lengths, causal=static.causal)


def attention_and_lse(queries, keys, values, *, relative_bias, lengths,
                      causal=False) -> tuple[jax.Array, jax.Array]:
  """(output [B, q, H, K], log-sum-exp [B, H, q] float32).

  The kernels' forward outputs: a query that sees no key gets output 0 and
  log-sum-exp NEG_LARGE.
  """
  q_len, k_len = queries.shape[1], keys.shape[1]
  logits = jnp.einsum("bqhk,bthk->bhqt", queries, keys,
                      preferred_element_type=jnp.float32)         # [B,H,q,k]
  if relative_bias is not None:
    logits = logits + relative_bias.dense(q_len, k_len)
  key_index = jnp.arange(k_len)
  visible = jnp.ones((1, 1, 1, k_len), jnp.bool_)
  if lengths is not None:
    visible = key_index < jnp.reshape(lengths, (-1, 1, 1, 1))
  if causal:
    visible = visible & (key_index[None, :] <= jnp.arange(q_len)[:, None])
  masked = jnp.where(visible, logits, -jnp.inf)
  peak = jnp.max(masked, axis=-1, keepdims=True)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.exp(masked - peak)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  empty = total == 0
  weights = weights / jnp.where(empty, 1.0, total)
  lse = jnp.where(empty, config.NEG_LARGE,
                  peak + jnp.log(jnp.where(empty, 1.0, total)))[..., 0]
  out = jnp.einsum("bhqt,bthk->bqhk", weights.astype(values.dtype), values,
                   preferred_element_type=jnp.float32)
  return out.astype(queries.dtype), lse
