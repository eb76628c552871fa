"""T5 flash attention as a differentiable op over the Mosaic kernels.

Shapes: B batch, q queries, k keys, H heads, K per-head width.

The op takes T5's layout [B, q, H, K], transposes to the kernels' [B, H, S,
K] with the lengths padded to whole blocks (O(B·S·H·K) work, small beside
the S² of attention) and builds the relative-position bias tiles from the
[H, buckets] table (pallas_tpu's docstring). Its custom VJP saves the output
and the log-sum-exp [B, H, q] only (tagged with `residual_names`, for the
remat policies that keep them); the backward recomputes the probabilities
from the log-sum-exp tile by tile (flash attention 2) and folds the bias
tiles' gradient back into the table.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from dro_fast.models.flash_attention import pallas_tpu
from dro_fast.models.flash_attention.pallas_tpu import BlockSizes
from dro_fast.models.layers import RelativeBias

# Log-sum-exp of padded query rows: exp(s − this) is 0, so a padded row has
# probabilities (and gradients) 0.
_PADDED_ROW_LSE = 1e30


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (custom_vjp's nondiff argument)."""
  causal: bool
  bidirectional: bool | None          # None: no bias.
  max_distance: int
  block_sizes: BlockSizes
  interpret: Any
  residual_names: tuple[str, str] | None

  def tiling(self, q_len: int, k_len: int,
             num_buckets: int) -> pallas_tpu.Tiling:
    if self.bidirectional is None:
      return pallas_tpu.tiling(self.block_sizes, q_len, k_len,
                               causal=self.causal, constant_from=None,
                               constant_below=None)
    # relative_position_bucket holds one bucket per direction beyond
    # max_distance (and below num_buckets, its exact range's bound);
    # unidirectional, every distance >= 0 is bucket 0.
    far = max(self.max_distance, num_buckets)
    return pallas_tpu.tiling(self.block_sizes, q_len, k_len,
                             causal=self.causal,
                             constant_from=far if self.bidirectional else 0,
                             constant_below=-far)

  def relative_bias(self, table: jax.Array) -> RelativeBias:
    return RelativeBias(table, self.bidirectional, self.max_distance)


def _tile_buckets(static: _Static, tiles: pallas_tpu.Tiling,
                  table: jax.Array | None) -> jax.Array | None:
  """[nd, bq, bk] int32 bucket of each distinct tile's entries."""
  if table is None:
    return None
  return static.relative_bias(table).buckets(
      jnp.asarray(tiles.relative_positions()))


def _bias_tiles(table: jax.Array | None,
                buckets: jax.Array | None) -> jax.Array | None:
  """[H, nd, bq, bk] float32: table[h, buckets], as a chain of selects that
  XLA fuses into one pass writing the tiles (a gather's layout would pad the
  head axis to 128 lanes)."""
  if table is None:
    return None
  tiles = jnp.broadcast_to(table[:, :1, None, None], (table.shape[0],
                                                      *buckets.shape))
  for bucket in range(1, table.shape[1]):
    tiles = jnp.where(buckets == bucket, table[:, bucket, None, None, None],
                      tiles)
  return tiles


def _to_heads(x: jax.Array, length: int) -> jax.Array:
  """[B, S, H, K] -> [B, H, length, K], zero-padded."""
  x = jnp.swapaxes(x, 1, 2)
  return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))


def _from_heads(x: jax.Array, length: int) -> jax.Array:
  """[B, H, S_pad, K] -> [B, length, H, K]."""
  return jnp.swapaxes(x[:, :, :length], 1, 2)


def _forward(static: _Static, q, k, v, table, lengths):
  tiles = static.tiling(q.shape[1], k.shape[1],
                        0 if table is None else table.shape[1])
  buckets = _tile_buckets(static, tiles, table)
  out, lse = pallas_tpu.forward(
      _to_heads(q, tiles.q_len), _to_heads(k, tiles.k_len),
      _to_heads(v, tiles.k_len), _bias_tiles(table, buckets), lengths,
      tiles=tiles, interpret=static.interpret)
  return _from_heads(out, q.shape[1]), lse[:, :, :q.shape[1], 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static: _Static, q, k, v, table, lengths):
  return _forward(static, q, k, v, table, lengths)[0]


def _attention_fwd(static, q, k, v, table, lengths):
  out, lse = _forward(static, q, k, v, table, lengths)
  if static.residual_names is not None:
    out = checkpoint_name(out, static.residual_names[0])
    lse = checkpoint_name(lse, static.residual_names[1])
  return out, (q, k, v, table, lengths, out, lse)


def _attention_bwd(static, residuals, d_out):
  q, k, v, table, lengths, out, lse = residuals
  q_len = q.shape[1]
  tiles = static.tiling(q_len, k.shape[1],
                        0 if table is None else table.shape[1])
  d_out = d_out.astype(q.dtype)
  di = jnp.einsum("bqhk,bqhk->bhq", d_out.astype(jnp.float32),
                  out.astype(jnp.float32))                        # [B, H, q]
  rows = ((0, 0), (0, 0), (0, tiles.q_len - q_len))
  buckets = _tile_buckets(static, tiles, table)
  dq, dk, dv, d_table = pallas_tpu.backward(
      _to_heads(q, tiles.q_len), _to_heads(k, tiles.k_len),
      _to_heads(v, tiles.k_len), _to_heads(d_out, tiles.q_len),
      jnp.pad(lse, rows, constant_values=_PADDED_ROW_LSE)[..., None],
      jnp.pad(di, rows)[..., None], _bias_tiles(table, buckets), buckets,
      lengths, tiles=tiles, num_buckets=0 if table is None else table.shape[1],
      interpret=static.interpret)
  if d_table is not None:
    d_table = jnp.sum(d_table, axis=-1)                           # [H, buckets]
  return (_from_heads(dq, q_len), _from_heads(dk, k.shape[1]),
          _from_heads(dv, k.shape[1]), d_table, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                    *, relative_bias: RelativeBias | None,
                    lengths: jax.Array | None, causal: bool = False,
                    block_sizes: BlockSizes | None = None,
                    interpret: Any = None,
                    residual_names: tuple[str, str] | None = None
                    ) -> jax.Array:
  """T5 attention (no 1/√K scale) without a [B, H, q, k] array.

  Args:
    queries: [B, q, H, K]; keys, values: [B, k, H, K]; one floating dtype,
      the compute dtype (products in it, float32 accumulation and softmax).
    relative_bias: the relative-position bias as its table (query and key
      positions are the indices 0, 1, ...), or None for no bias.
    lengths: [B] (or [1]) int visible keys per example (keys are
      right-padded); None: all k.
    causal: query i sees keys j <= i only (needs q == k).
    block_sizes: tiles (None: BlockSizes()).
    interpret: pallas_call's interpret: False runs Mosaic (a TPU, or a
      lowering for one), pltpu.InterpretParams() the TPU simulator; None
      picks by jax.default_backend() (pallas_tpu.interpret_params).
    residual_names: checkpoint_name tags for the saved output and
      log-sum-exp, or None.

  Returns:
    [B, q, H, K] in the queries' dtype; a query that sees no key gets 0.
    Differentiable w.r.t. queries, keys, values and relative_bias.table.
  """
  if not queries.dtype == keys.dtype == values.dtype:
    raise ValueError(f"flash_attention takes one dtype; got queries "
                     f"{queries.dtype}, keys {keys.dtype}, values "
                     f"{values.dtype}.")
  if interpret is None:
    interpret = pallas_tpu.interpret_params(jax.default_backend())
  batch, k_len = keys.shape[0], keys.shape[1]
  if lengths is None:
    lengths = jnp.full((batch,), k_len, jnp.int32)
  else:
    lengths = jnp.minimum(jnp.broadcast_to(lengths, (batch,)),
                          k_len).astype(jnp.int32)
  static = _Static(
      causal=causal,
      bidirectional=None if relative_bias is None else
      relative_bias.bidirectional,
      max_distance=0 if relative_bias is None else relative_bias.max_distance,
      block_sizes=block_sizes or BlockSizes(), interpret=interpret,
      residual_names=residual_names)
  table = None if relative_bias is None else relative_bias.table.astype(
      jnp.float32)
  return _attention(static, queries, keys, values, table, lengths)
