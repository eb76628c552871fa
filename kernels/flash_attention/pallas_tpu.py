"""The "pallas_tpu" flash attention: Mosaic kernels, forward and backward.

One forward kernel, and one backward kernel for dq, dk, dv and the bias
tiles' gradient.

Shapes: B batch, H heads, q / k query / key lengths, Sq / Sk those lengths
padded to the blocks, K per-head width, bq / bk the blocks, nd the number of
distinct bias tiles.

Layout: `forward` and `backward` (the registry's entries) take T5's [B, q,
H, K] and transpose to the kernels' [B, H, S, K] with the lengths padded to
whole blocks (O(B·S·H·K) work, small beside the S² of attention); per-row
statistics travel as [B, H, Sq, 1] columns. Every block's last two
dimensions are (multiple of 8, multiple of 128) or the full extent, as
Mosaic requires.

Relative-position bias: T5's bias depends on key index − query index only,
so the bias of tile (i, j) depends on its offset j·bk − i·bq only, and tiles
far from the diagonal (|distance| ≥ max_distance everywhere in the tile) all
hold one bucket. `forward` builds the nd distinct tiles [H, nd, bq, bk]
float32 (nd = 5 at 128×128 blocks and T5's max distance 128, whatever the
length) from the [H, buckets] table; a head's tiles stay in VMEM and each
grid step adds tile `tile_index(i, j)`. The backward accumulates the logits'
gradient of each distinct tile in the same layout (summed over batch and all
tiles of that offset), which `backward` folds back into the table: no [B, H,
q, k] array exists in either pass.

Masking: keys at or past `lengths[b]` (scalar-prefetched) and, when causal,
keys after the query are masked; tiles that are masked entirely are skipped,
and their blocks' index maps are clamped to a tile that is read anyway, so
skipped tiles cost no DMA. A query that sees no key gets output 0, a finite
log-sum-exp (NEG_LARGE) and zero gradients.

Forward grid (B, H, q tiles, k tiles), the last axis sequential, carrying an
online softmax (m, l, acc) in VMEM scratch. Backward grid (H, B, k tiles,
q tiles), all but H sequential: dk, dv accumulate over q tiles, dq over the
whole (b, h) in a [Sq, K] float32 scratch, and the bias gradient over b too,
so p = exp(s − lse) and ds are computed once per tile for all four
gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

from dro_fast.kernels import config
from dro_fast.kernels.flash_attention.config import BlockSizes
from dro_fast.kernels.flash_attention.config import CallConfig

NEG_LARGE = config.NEG_LARGE

# Log-sum-exp of padded query rows in the backward: exp(s − this) is 0, so a
# padded row has probabilities (and gradients) 0.
_PADDED_ROW_LSE = 1e30

# s = q · kᵀ: contract the last dimension of both.
_TRANS_B = (((1,), (1,)), ((), ()))
# pᵀ · do: contract the first dimension of both.
_TRANS_A = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static geometry of one call: blocks, padded lengths, bias tiles.

  Attributes:
    block_q, block_k: the blocks used (BlockSizes fitted to the lengths).
    q_len, k_len: the lengths padded to whole blocks.
    causal: key j visible to query i only when j <= i.
    step: gcd(block_q, block_k); tile offsets j·bk − i·bq are multiples.
    first_tile: offset (in steps) of bias tile 0; tiles before it equal it.
    num_tiles: nd, distinct bias tiles (0 without a bias); offsets past the
      last equal the last.
  """
  block_q: int
  block_k: int
  q_len: int
  k_len: int
  causal: bool
  step: int
  first_tile: int
  num_tiles: int

  @property
  def grid_q(self) -> int:
    return self.q_len // self.block_q

  @property
  def grid_k(self) -> int:
    return self.k_len // self.block_k

  def tile_index(self, i, j):
    """Bias tile of grid tile (i, j): its offset, clamped to the distinct."""
    offset = j * (self.block_k // self.step) - i * (self.block_q // self.step)
    return jnp.clip(offset - self.first_tile, 0, self.num_tiles - 1)

  def relative_positions(self) -> np.ndarray:
    """[nd, bq, bk] int32: key index − query index in each bias tile."""
    offsets = (self.first_tile + np.arange(self.num_tiles)) * self.step
    return (offsets[:, None, None] + np.arange(self.block_k)[None, None, :]
            - np.arange(self.block_q)[None, :, None]).astype(np.int32)


def tiling(block_sizes: BlockSizes, q_len: int, k_len: int, *, causal: bool,
           constant_from: int | None, constant_below: int | None) -> Tiling:
  """The Tiling of a call.

  Args:
    block_sizes: requested blocks.
    q_len, k_len: unpadded lengths.
    causal: causal mask (needs q_len == k_len).
    constant_from: the bias's bucket is the same for every key − query
      distance >= this; None without a bias.
    constant_below: ... and for every distance <= this.
  """
  if causal and q_len != k_len:
    raise ValueError(f"causal flash attention needs as many queries as keys "
                     f"(self-attention); got {q_len} and {k_len}.")
  bq = min(block_sizes.block_q, config.round_up(q_len, 128))
  bk = min(block_sizes.block_k, config.round_up(k_len, 128))
  q_pad, k_pad = config.round_up(q_len, bq), config.round_up(k_len, bk)
  step = int(np.gcd(bq, bk))
  if constant_from is None:
    return Tiling(bq, bk, q_pad, k_pad, causal, step, 0, 0)
  # Tile offset o covers distances [o·step − (bq−1), o·step + (bk−1)].
  # Tiles at or before `first` are all <= constant_below, those at or after
  # `last` all >= constant_from; the grid's offsets bound both.
  first = max((constant_below - bk + 1) // step,
              -(q_pad // bq - 1) * (bq // step))
  last = min(-(-(constant_from + bq - 1) // step),
             (k_pad // bk - 1) * (bk // step))
  return Tiling(bq, bk, q_pad, k_pad, causal, step, first, last - first + 1)


def call_tiling(static: CallConfig, q_len: int, k_len: int,
                num_buckets: int) -> Tiling:
  """The Tiling of a call with the bias rule of `static` (num_buckets wide)."""
  if static.bidirectional is None:
    return tiling(static.block_sizes, q_len, k_len, causal=static.causal,
                  constant_from=None, constant_below=None)
  # relative_position_bucket holds one bucket per direction beyond
  # max_distance (and below num_buckets, its exact range's bound);
  # unidirectional, every distance >= 0 is bucket 0.
  far = max(static.max_distance, num_buckets)
  return tiling(static.block_sizes, q_len, k_len, causal=static.causal,
                constant_from=far if static.bidirectional else 0,
                constant_below=-far)


def _visible(tiles: Tiling, b, i, j, lengths_ref):
  """[bq, bk] bool: which keys of tile (i, j) the queries see."""
  shape = (tiles.block_q, tiles.block_k)
  cols = j * tiles.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  visible = cols < lengths_ref[b]
  if tiles.causal:
    rows = i * tiles.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
    visible = visible & (cols <= rows)
  return visible


def _tile_runs(tiles: Tiling, b, i, j, lengths_ref):
  """Whether tile (i, j) has a visible key."""
  runs = j * tiles.block_k < lengths_ref[b]
  if tiles.causal:
    runs = runs & (j * tiles.block_k < (i + 1) * tiles.block_q)
  return runs


def _div(x, divisor: int):
  """x // divisor for int32 x >= 0, the divisor made int32.

  lax.div: Mosaic lowers no floor division's sign for an unknown TPU. Under
  jax_enable_x64 a Python int divisor would be int64, which lax.div refuses
  beside an int32 x.
  """
  return lax.div(x, jnp.int32(divisor))


def _last_key_tile(tiles: Tiling, b, lengths_ref, i=None):
  """The last k tile of example b's keys (0 when none); with i, query tile i's.

  With query tile i given (causal), the last k tile that tile reads.
  """
  last = _div(lengths_ref[b] + tiles.block_k - 1, tiles.block_k) - 1
  if tiles.causal and i is not None:
    last = jnp.minimum(last, _div((i + 1) * tiles.block_q - 1, tiles.block_k))
  return jnp.maximum(last, 0)


def _logits(tiles, q_ref, k_ref, bias_ref, i, j):
  """s = q · kᵀ (+ bias tile) [bq, bk] float32."""
  s = lax.dot_general(q_ref[...], k_ref[...], _TRANS_B,
                      preferred_element_type=jnp.float32)
  if bias_ref is not None:
    s = s + bias_ref[tiles.tile_index(i, j)]
  return s


def _forward_kernel(lengths_ref, q_ref, k_ref, v_ref, *refs, tiles: Tiling):
  if tiles.num_tiles:
    bias_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  else:
    bias_ref = None
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_ref[...] = jnp.full(m_ref.shape, NEG_LARGE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(_tile_runs(tiles, b, i, j, lengths_ref))
  def _():
    s = _logits(tiles, q_ref, k_ref, bias_ref, i, j)
    visible = _visible(tiles, b, i, j, lengths_ref)
    m_prev = m_ref[...]                                           # [bq, 1]
    m_new = jnp.maximum(m_prev, jnp.max(jnp.where(visible, s, NEG_LARGE),
                                        axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)               # [bq, bk]
    alpha = jnp.exp(m_prev - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + jnp.dot(
        p.astype(v_ref.dtype), v_ref[...],
        preferred_element_type=jnp.float32)
    m_ref[...] = m_new

  @pl.when(j == tiles.grid_k - 1)
  def _():
    l = l_ref[...]
    empty = l == 0.0
    l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, NEG_LARGE, m_ref[...] + jnp.log(l))


def _call(kernel, *, grid, in_specs, out_specs, out_shape, scratch_shapes,
          semantics, interpret, name):
  """pallas_call over `grid` with the lengths [B] as its scalar prefetch."""
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
          out_specs=out_specs, scratch_shapes=scratch_shapes),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=interpret,
      name=name)


def _forward_call(q, k, v, bias_tiles, lengths, *, tiles: Tiling,
                  interpret: Any) -> tuple[jax.Array, jax.Array]:
  """Attention output and log-sum-exp, in the kernels' layout.

  Args:
    q: [B, H, Sq, K]; k, v: [B, H, Sk, K], padded to tiles' lengths.
    bias_tiles: [H, nd, bq, bk] float32, or None (tiles.num_tiles == 0).
    lengths: [B] int32 visible keys per example (<= the unpadded Sk).
    tiles: the call's Tiling.
    interpret: pallas_call's interpret (False: Mosaic).

  Returns:
    (out [B, H, Sq, K] in q.dtype, lse [B, H, Sq, 1] float32).
  """
  batch, heads, _, width = q.shape
  bq, bk = tiles.block_q, tiles.block_k

  def kv_index(b, h, i, j, lengths_ref):
    return b, h, jnp.minimum(j, _last_key_tile(tiles, b, lengths_ref, i)), 0

  def q_index(b, h, i, j, lengths_ref):
    del j, lengths_ref
    return b, h, i, 0

  row = pl.BlockSpec((None, None, bq, width), q_index)
  column = pl.BlockSpec((None, None, bq, 1), q_index)
  key = pl.BlockSpec((None, None, bk, width), kv_index)
  in_specs = [row, key, key]
  operands = [q, k, v]
  if tiles.num_tiles:
    in_specs.append(pl.BlockSpec((None, tiles.num_tiles, bq, bk),
                                 lambda b, h, i, j, _: (h, 0, 0, 0)))
    operands.append(bias_tiles)
  return _call(
      functools.partial(_forward_kernel, tiles=tiles),
      grid=(batch, heads, tiles.grid_q, tiles.grid_k),
      in_specs=in_specs,
      out_specs=[row, column],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, tiles.q_len, 1),
                                      jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, 1), jnp.float32),
                      pltpu.VMEM((bq, width), jnp.float32)],
      semantics=("parallel", "parallel", "parallel", "arbitrary"),
      interpret=interpret, name="t5_flash_attention_fwd",
  )(lengths, *operands)


def _backward_kernel(lengths_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                     *refs, tiles: Tiling, num_buckets: int):
  if tiles.num_tiles:
    (bias_ref, buckets_ref, dq_ref, dk_ref, dv_ref, dtable_ref,
     dq_acc, dk_acc, dv_acc, dbias_acc) = refs
  else:
    bias_ref = dbias_acc = None
    dq_ref, dk_ref, dv_ref, dq_acc, dk_acc, dv_acc = refs
  b, j, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  last_i = tiles.grid_q - 1

  @pl.when((j == 0) & (i == 0))
  def _():
    dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

  @pl.when(i == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  if dbias_acc is not None:
    @pl.when((b == 0) & (j == 0) & (i == 0))
    def _():
      dbias_acc[...] = jnp.zeros(dbias_acc.shape, jnp.float32)

  @pl.when(_tile_runs(tiles, b, i, j, lengths_ref))
  def _():
    s = _logits(tiles, q_ref, k_ref, bias_ref, i, j)
    visible = _visible(tiles, b, i, j, lengths_ref)
    p = jnp.where(visible, jnp.exp(s - lse_ref[...]), 0.0)       # [bq, bk]
    do = do_ref[...]
    dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, _TRANS_A,
                                   preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v_ref[...], _TRANS_B,
                         preferred_element_type=jnp.float32)      # [bq, bk]
    ds = p * (dp - di_ref[...])
    dk_acc[...] += lax.dot_general(ds.astype(q_ref.dtype), q_ref[...],
                                   _TRANS_A,
                                   preferred_element_type=jnp.float32)
    rows = pl.ds(pl.multiple_of(i * tiles.block_q, tiles.block_q),
                 tiles.block_q)
    dq_acc[rows, :] += jnp.dot(ds.astype(k_ref.dtype), k_ref[...],
                               preferred_element_type=jnp.float32)
    if dbias_acc is not None:
      index = tiles.tile_index(i, j)
      dbias_acc[index] += ds

  @pl.when(i == last_i)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

  @pl.when((j == tiles.grid_k - 1) & (i == last_i))
  def _():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)

  if dbias_acc is not None:
    # The head's last step: fold its tiles' gradient into the table, one
    # masked sum over the rows per bucket; ops.py sums the lanes.
    @pl.when((b == pl.num_programs(1) - 1) & (j == tiles.grid_k - 1)
             & (i == last_i))
    def _():
      rows = tiles.num_tiles * tiles.block_q
      d_bias = dbias_acc[...].reshape(rows, tiles.block_k)
      buckets = buckets_ref[...].reshape(rows, tiles.block_k)
      def fold(bucket, carry):
        dtable_ref[pl.ds(bucket, 1), :] = jnp.sum(
            jnp.where(buckets == bucket, d_bias, 0.0), axis=0, keepdims=True)
        return carry

      lax.fori_loop(0, num_buckets, fold, 0)


def _backward_call(q, k, v, d_out, lse, di, bias_tiles, buckets, lengths, *,
                   tiles: Tiling, num_buckets: int, interpret: Any):
  """Gradients of `_forward_call`'s output for the cotangent d_out.

  Args:
    q, k, v, bias_tiles, lengths, tiles, interpret: as for `_forward_call`.
    d_out: [B, H, Sq, K] cotangent of the output, in q.dtype (zeros in
      padded rows).
    lse: [B, H, Sq, 1] float32, `_forward_call`'s.
    di: [B, H, Sq, 1] float32, Σ_K d_out · out per row.
    buckets: [nd, bq, bk] int32, the bucket of each bias tile entry, or None.
    num_buckets: the table's width.

  Returns:
    (dq, dk, dv like q, k, v; d_table [H, buckets, bk] float32, the table's
    gradient still to be summed over its last axis, or None).
  """
  batch, heads, _, width = q.shape
  bq, bk = tiles.block_q, tiles.block_k

  def q_index(h, b, j, i, lengths_ref):
    del lengths_ref
    if tiles.causal:                # Query tiles before the key tile: skipped.
      i = jnp.maximum(i, _div(j * bk, bq))
    return b, h, i, 0

  def kv_index(h, b, j, i, lengths_ref):
    del i
    return b, h, jnp.minimum(j, _last_key_tile(tiles, b, lengths_ref)), 0

  query = pl.BlockSpec((None, None, bq, width), q_index)
  column = pl.BlockSpec((None, None, bq, 1), q_index)
  key = pl.BlockSpec((None, None, bk, width), kv_index)
  in_specs = [query, key, key, query, column, column]
  operands = [q, k, v, d_out, lse, di]
  key_grad = pl.BlockSpec((None, None, bk, width),
                          lambda h, b, j, i, _: (b, h, j, 0))
  out_specs = [pl.BlockSpec((None, None, tiles.q_len, width),
                            lambda h, b, j, i, _: (b, h, 0, 0)),
               key_grad, key_grad]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
  scratch_shapes = [pltpu.VMEM((tiles.q_len, width), jnp.float32),
                    pltpu.VMEM((bk, width), jnp.float32),
                    pltpu.VMEM((bk, width), jnp.float32)]
  if tiles.num_tiles:
    in_specs += [pl.BlockSpec((None, tiles.num_tiles, bq, bk),
                              lambda h, b, j, i, _: (h, 0, 0, 0)),
                 pl.BlockSpec((tiles.num_tiles, bq, bk),
                              lambda h, b, j, i, _: (0, 0, 0))]
    operands += [bias_tiles, buckets]
    out_specs.append(pl.BlockSpec((None, num_buckets, bk),
                                  lambda h, b, j, i, _: (h, 0, 0)))
    out_shape.append(jax.ShapeDtypeStruct((heads, num_buckets, bk),
                                          jnp.float32))
    scratch_shapes.append(pltpu.VMEM((tiles.num_tiles, bq, bk), jnp.float32))
  grads = _call(
      functools.partial(_backward_kernel, tiles=tiles,
                        num_buckets=num_buckets),
      grid=(heads, batch, tiles.grid_k, tiles.grid_q),
      in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      scratch_shapes=scratch_shapes,
      semantics=("parallel", "arbitrary", "arbitrary", "arbitrary"),
      interpret=interpret, name="t5_flash_attention_bwd",
  )(lengths, *operands)
  if tiles.num_tiles:
    return tuple(grads)
  return (*grads, None)


def _tile_buckets(static: CallConfig, tiles: Tiling,
                  table: jax.Array | None) -> jax.Array | None:
  """[nd, bq, bk] int32 bucket of each distinct tile's entries."""
  if table is None:
    return None
  return static.relative_bias(table).buckets(
      jnp.asarray(tiles.relative_positions()))


def _bias_tiles(table: jax.Array | None,
                buckets: jax.Array | None) -> jax.Array | None:
  """[H, nd, bq, bk] float32: table[h, buckets].

  Built as a chain of selects that XLA fuses into one pass writing the
  tiles (a gather's layout would pad the head axis to 128 lanes).
  """
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


def _num_buckets(table: jax.Array | None) -> int:
  return 0 if table is None else table.shape[1]


def forward(q, k, v, table, lengths,
            static: CallConfig) -> tuple[jax.Array, jax.Array]:
  """Same contract as reference.forward: (out [B, q, H, K], lse [B, H, q])."""
  tiles = call_tiling(static, q.shape[1], k.shape[1], _num_buckets(table))
  buckets = _tile_buckets(static, tiles, table)
  out, lse = _forward_call(
      _to_heads(q, tiles.q_len), _to_heads(k, tiles.k_len),
      _to_heads(v, tiles.k_len), _bias_tiles(table, buckets), lengths,
      tiles=tiles, interpret=static.interpret)
  return _from_heads(out, q.shape[1]), lse[:, :, :q.shape[1], 0]


def backward(q, k, v, table, lengths, out, lse, d_out, static: CallConfig):
  """(dq, dk, dv, d_table [H, buckets] or None) of `forward`'s output.

  Recomputes the probabilities from the log-sum-exp tile by tile (flash
  attention 2) and folds the bias tiles' gradient back into the table.
  """
  q_len = q.shape[1]
  tiles = call_tiling(static, q_len, k.shape[1], _num_buckets(table))
  d_out = d_out.astype(q.dtype)
  di = jnp.einsum("bqhk,bqhk->bhq", d_out.astype(jnp.float32),
                  out.astype(jnp.float32))                        # [B, H, q]
  rows = ((0, 0), (0, 0), (0, tiles.q_len - q_len))
  buckets = _tile_buckets(static, tiles, table)
  dq, dk, dv, d_table = _backward_call(
      _to_heads(q, tiles.q_len), _to_heads(k, tiles.k_len),
      _to_heads(v, tiles.k_len), _to_heads(d_out, tiles.q_len),
      jnp.pad(lse, rows, constant_values=_PADDED_ROW_LSE)[..., None],
      jnp.pad(di, rows)[..., None], _bias_tiles(table, buckets), buckets,
      lengths, tiles=tiles, num_buckets=_num_buckets(table),
      interpret=static.interpret)
  if d_table is not None:
    d_table = jnp.sum(d_table, axis=-1)                           # [H, buckets]
  return (_from_heads(dq, q_len), _from_heads(dk, k.shape[1]),
          _from_heads(dv, k.shape[1]), d_table)
