"""The "pallas_tpu" implementation of the fused linear op: three Mosaic kernels.

Every kernel recomputes logits tiles hidden[bn, D] @ weight[D, bv] on the MXU
(float32 accumulation) and never writes them to HBM:
- forward, grid (N/bn, V/bv), vocab axis sequential: online log-sum-exp in
  VMEM scratch, as the sequence_logprobs kernel;
- d(hidden), grid (N/bn, V/bv), vocab axis sequential: dlogits tile
  g · (onehot − exp(logits − lse)) contracted into a [bn, D] float32 scratch
  accumulator with the weight tile;
- d(weight), grid (V/bv, N/bn), row axis sequential: the same dlogits tile
  contracted with the hidden tile into a [D, bv] float32 accumulator.
D is one block (the whole hidden width), so VMEM grows with D: the tiles
come from default_block_sizes(D, dtype) unless given. Tails of N and V are
masked: rows or columns past the end carry unspecified values, so the
dlogits tile and the operand it is contracted with (weight in d(hidden),
hidden in d(weight)) are zeroed there first (0 · NaN is NaN); the forward
masks the logits tile instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dro_fast.kernels import config
from dro_fast.kernels.sequence_logprobs import pallas_tpu as seq_tpu

# The scoped-VMEM limit every kernel asks for. VMEM per TensorCore
# (pltpu.get_tpu_info): v5e and v6e 128 MiB, v5p 64 MiB, v4 16 MiB; the
# compiler's default scoped limit is lower (16-32 MiB). 32 MiB fits every
# generation from v5 on; v4 accepts the request, but only 16 MiB exist.
VMEM_LIMIT_BYTES = 32 * 1024 * 1024

# VMEM the tiles may plan for (vmem_bytes), per generation; the rest of the
# limit is margin for Mosaic's own scratch and the estimate's error (4%
# above Mosaic's own figure where one was reported: 32.6 MiB for d(weight)
# at D = 4096, bfloat16, 256 x 512).
VMEM_BUDGET_BYTES = {"v5e": 24 * 2**20, "v5p": 24 * 2**20,
                     "v6e": 24 * 2**20, "v4": 12 * 2**20}

# (rows, vocab) tiles, best first. rows sets the forward's and d(hidden)'s
# arithmetic intensity (the weight tile streams past a resident hidden
# tile: 2·rows/itemsize FLOP per byte, 4·rows/itemsize for d(hidden)) and
# vocab sets d(weight)'s (4·vocab/itemsize), so both shrink in turn. At
# bfloat16 and 256 x 256: 256 FLOP/byte in the forward, 512 in both
# backward kernels, at or above the v5e / v5p ridge points (~240 / ~170
# FLOP/byte) but under v6e's (~560), where more rows would pay; which
# tiles run fastest is for a measurement on the chip.
_CANDIDATES = ((256, 512), (256, 256), (128, 256), (128, 128), (64, 128),
               (32, 128), (8, 128))


def vmem_bytes(d: int, itemsize: int, rows: int, vocab: int) -> int:
  """Estimated VMEM of the hungriest of the three kernels at (rows, vocab).

  Double-buffered input and output blocks, the float32 accumulator, the
  zeroed operand copy and a few float32 [rows, vocab] temporaries (logits,
  exp, dlogits).
  """
  hidden, weight = rows * d * itemsize, d * vocab * itemsize
  tile = 4 * rows * vocab * 4
  forward = 2 * (hidden + weight) + tile
  dhidden = 2 * (2 * hidden + weight) + 4 * rows * d + weight + tile
  dweight = 2 * (hidden + 2 * weight) + 4 * d * vocab + hidden + tile
  return max(forward, dhidden, dweight)


def default_block_sizes(d: int, dtype, generation: str | None = None
                        ) -> config.BlockSizes:
  """The default tiles for hidden width d and operand dtype on a TPU.

  The first of _CANDIDATES whose vmem_bytes fits the generation's budget.
  The kernels hold a whole [rows, D] hidden tile and [D, vocab] weight tile
  (plus a float32 accumulator of one of those shapes), so the tiles shrink
  as D grows: at bfloat16 256 x 512 up to D = 2048 (T5-XL), 256 x 256 at
  4096 (XXL); at float32 256 x 512 up to D = 1024, 256 x 256 at 2048,
  128 x 128 at 4096 (v4: smaller still). A kernel traced for a TPU cannot
  see which generation it will be compiled for (deviceless compilation
  traces on the host), so None, what the ops use, takes the smallest
  budget among v5e, v5p and v6e (today all equal); pass generation="v4"
  (or other tiles) for less VMEM.

  Args:
    d: hidden width D.
    dtype: dtype of hidden and weight.
    generation: "v4", "v5e", "v5p", "v6e", or None.

  Returns:
    BlockSizes with rows and vocab set (the other fields are not used here).
  """
  if generation is None:
    budget = min(VMEM_BUDGET_BYTES[g] for g in ("v5e", "v5p", "v6e"))
  elif generation in VMEM_BUDGET_BYTES:
    budget = VMEM_BUDGET_BYTES[generation]
  else:
    raise ValueError(f"Unknown TPU generation {generation!r}; choose one of "
                     f"{sorted(VMEM_BUDGET_BYTES)} or None.")
  itemsize = jnp.dtype(dtype).itemsize
  for rows, vocab in _CANDIDATES:
    if vmem_bytes(d, itemsize, rows, vocab) <= budget:
      return config.BlockSizes(rows=rows, vocab=vocab)
  raise ValueError(
      f"pallas_tpu: no tile fits D={d} ({jnp.dtype(dtype).name}) in "
      f"{budget / 2**20:.0f} MiB of VMEM; use implementation='chunked_xla'.")


def _logits_tile(hidden_ref, weight_ref, row0, col0, vocab, mask_weight):
  """float32 logits tile [bn, bv] plus its (rows, cols) indices.

  Columns past V are unspecified (the weight tile's tail); with
  mask_weight the weight tile is zeroed there, for a kernel that contracts
  with it again.
  """
  h = hidden_ref[...]                                             # [bn, D]
  w = weight_ref[...]                                             # [D, bv]
  if mask_weight:
    w_cols = col0 + lax.broadcasted_iota(jnp.int32, w.shape, 1)
    w = jnp.where(w_cols < vocab, w, jnp.zeros_like(w))
  logits = jnp.dot(h, w, preferred_element_type=jnp.float32)      # [bn, bv]
  rows = row0 + lax.broadcasted_iota(jnp.int32, logits.shape, 0)
  cols = col0 + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  return logits, rows, cols, h, w


def _dlogits(logits, rows, cols, targets_ref, lse_ref, g_ref, n, vocab):
  """g · (onehot − softmax) for one tile, zero outside [0, N) x [0, V)."""
  onehot = (cols == targets_ref[...]).astype(jnp.float32)
  dlogits = g_ref[...] * (onehot - jnp.exp(logits - lse_ref[...]))
  return jnp.where((rows < n) & (cols < vocab), dlogits, 0.0)


def _forward_kernel(targets_ref, hidden_ref, weight_ref, logprobs_ref, lse_ref,
                    m_ref, l_ref, t_ref, *, n, vocab, bn, bv):
  i, j = pl.program_id(0), pl.program_id(1)
  pl.when(j == 0)(lambda: seq_tpu.init_scratch(m_ref, l_ref, t_ref))
  # Logits past V are masked by fold_tile (a select, not a product).
  x, _, cols, _, _ = _logits_tile(hidden_ref, weight_ref, i * bn, j * bv,
                                  vocab, mask_weight=False)
  seq_tpu.fold_tile(x, cols, vocab, targets_ref, m_ref, l_ref, t_ref)
  pl.when(j == pl.num_programs(1) - 1)(
      lambda: seq_tpu.write_outputs(m_ref, l_ref, t_ref, logprobs_ref,
                                    lse_ref))


def _backward_kernel(targets_ref, lse_ref, g_ref, hidden_ref, weight_ref,
                     out_ref, acc_ref, *, n, vocab, bn, bv, wrt):
  """d(hidden) or d(weight) (`wrt`), accumulated over the sequential axis.

  wrt "hidden": grid (i, j), vocab tiles sequential; wrt "weight": grid
  (j, i), row tiles sequential. The accumulator is float32.
  """
  if wrt == "hidden":
    i, j = pl.program_id(0), pl.program_id(1)
  else:
    j, i = pl.program_id(0), pl.program_id(1)
  step = pl.program_id(1)

  @pl.when(step == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  # d(weight) contracts dlogits with hidden only: the weight's tail columns
  # reach nothing but logits that _dlogits replaces by 0.
  logits, rows, cols, h, w = _logits_tile(hidden_ref, weight_ref, i * bn,
                                          j * bv, vocab,
                                          mask_weight=wrt == "hidden")
  dlogits = _dlogits(logits, rows, cols, targets_ref, lse_ref, g_ref, n, vocab)
  if wrt == "hidden":
    # [bn, bv] x [D, bv]ᵀ -> [bn, D]
    acc_ref[...] += lax.dot_general(
        dlogits.astype(w.dtype), w, (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32)
  else:
    h_rows = i * bn + lax.broadcasted_iota(jnp.int32, h.shape, 0)
    h = jnp.where(h_rows < n, h, jnp.zeros_like(h))
    # [bn, D]ᵀ x [bn, bv] -> [D, bv]
    acc_ref[...] += lax.dot_general(
        h, dlogits.astype(h.dtype), (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)

  @pl.when(step == pl.num_programs(1) - 1)
  def _finish():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _tiles(hidden, vocab, block_sizes):
  (n, d), dtype = hidden.shape, hidden.dtype
  block_sizes = block_sizes or default_block_sizes(d, dtype)
  block_sizes.check_tpu()
  bn = config.fit_rows(block_sizes.rows, n, 8)
  bv = min(block_sizes.vocab, config.round_up(vocab, 128))
  return bn, bv


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics,
                              vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _cost(hidden, weight, bn, matmuls):
  """XLA's view of one launch (a Mosaic kernel is opaque to its cost model).

  `matmuls` [N, D] x [D, V] products, one exp per logit, hidden and the
  outputs once and the weight once per row tile.
  """
  (n, d), vocab = hidden.shape, weight.shape[1]
  weight_reads = pl.cdiv(n, bn) * weight.size * weight.dtype.itemsize
  return pl.CostEstimate(
      flops=2 * matmuls * n * d * vocab, transcendentals=n * vocab,
      bytes_accessed=hidden.size * hidden.dtype.itemsize + weight_reads)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def linear_token_logprobs(hidden, weight, targets, block_sizes=None,
                          interpret=None):
  """Same contract as reference.linear_token_logprobs."""
  (n, d), vocab = hidden.shape, weight.shape[1]
  bn, bv = _tiles(hidden, vocab, block_sizes)
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  logprobs, lse = pl.pallas_call(
      functools.partial(_forward_kernel, n=n, vocab=vocab, bn=bn, bv=bv),
      grid=(pl.cdiv(n, bn), pl.cdiv(vocab, bv)),
      in_specs=[row, pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, bv), lambda i, j: (0, j))],
      out_specs=[row, row],
      out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 2,
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 3,
      compiler_params=_params("parallel", "arbitrary"),
      cost_estimate=_cost(hidden, weight, bn, matmuls=1),
      interpret=config.resolve_interpret(interpret, "tpu"),
      name="linear_token_logprobs_fwd",
  )(targets.reshape(n, 1), hidden, weight)
  return logprobs[:, 0], lse[:, 0]


@functools.partial(jax.jit,
                   static_argnames=("wrt", "block_sizes", "interpret"))
def _backward_call(wrt, hidden, weight, targets, lse, g, block_sizes=None,
                   interpret=None):
  """One backward launch: d(hidden) [N, D] or d(weight) [D, V] (`wrt`)."""
  (n, d), vocab = hidden.shape, weight.shape[1]
  bn, bv = _tiles(hidden, vocab, block_sizes)
  if wrt == "hidden":      # grid (row tiles, vocab tiles), vocab sequential
    grid, rows_axis = (pl.cdiv(n, bn), pl.cdiv(vocab, bv)), 0
    out_spec = pl.BlockSpec((bn, d), lambda i, j: (i, 0))
    out_like, scratch = hidden, (bn, d)
  else:                    # grid (vocab tiles, row tiles), rows sequential
    grid, rows_axis = (pl.cdiv(vocab, bv), pl.cdiv(n, bn)), 1
    out_spec = pl.BlockSpec((d, bv), lambda j, i: (0, j))
    out_like, scratch = weight, (d, bv)
  row = pl.BlockSpec((bn, 1), lambda *ij: (ij[rows_axis], 0))
  return pl.pallas_call(
      functools.partial(_backward_kernel, n=n, vocab=vocab, bn=bn, bv=bv,
                        wrt=wrt),
      grid=grid,
      in_specs=[row, row, row,
                pl.BlockSpec((bn, d), lambda *ij: (ij[rows_axis], 0)),
                pl.BlockSpec((d, bv), lambda *ij: (0, ij[1 - rows_axis]))],
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct(out_like.shape, out_like.dtype),
      scratch_shapes=[pltpu.VMEM(scratch, jnp.float32)],
      compiler_params=_params("parallel", "arbitrary"),
      cost_estimate=_cost(hidden, weight, bn, matmuls=2),
      interpret=config.resolve_interpret(interpret, "tpu"),
      name=f"linear_token_logprobs_d{wrt}",
  )(targets.reshape(n, 1), lse.reshape(n, 1), g.reshape(n, 1), hidden, weight)


def linear_dhidden(hidden, weight, targets, lse, g, block_sizes=None,
                   interpret=None):
  """d(hidden) [N, D]."""
  return _backward_call("hidden", hidden, weight, targets, lse, g,
                        block_sizes, interpret)


def linear_dweight(hidden, weight, targets, lse, g, block_sizes=None,
                   interpret=None):
  """d(weight) [D, V]."""
  return _backward_call("weight", hidden, weight, targets, lse, g,
                        block_sizes, interpret)


def linear_token_logprobs_bwd(hidden, weight, targets, lse, g,
                              block_sizes=None, interpret=None):
  """Same contract as reference.linear_token_logprobs_bwd."""
  args = (hidden, weight, targets, lse, g, block_sizes, interpret)
  return linear_dhidden(*args), linear_dweight(*args)
