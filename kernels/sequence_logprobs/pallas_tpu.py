"""The "pallas_tpu" implementation: Mosaic kernels over (row, vocab) tiles.

Forward: grid (N/bn, V/bv); the vocabulary axis is the innermost, sequential
("arbitrary") axis and carries an online log-sum-exp in VMEM scratch, so the
logits are read exactly once. Backward: the same grid, both axes parallel;
each tile writes g · (onehot − exp(x − lse)) from the saved lse, so the
softmax is never stored.

Layout: per-row vectors travel as [N, 1] columns, so every block's last two
dimensions are (multiple of 8, multiple of 128) or the full extent, as Mosaic
requires. Tails of N and V are handled by pl.cdiv grids; entries past V are
masked before the max and the sum; rows past N are computed on padding and
their writes dropped.

Tiles: default_block_sizes, 256 x 2048 for every dtype and generation. The
working set does not depend on D: one [bn, bv] tile (2 MiB at float32),
double-buffered in (and out, in the backward), plus float32 temporaries.
It compiles under the compiler's default scoped-VMEM limit on v4, v5e, v5p
and v6e (16 MiB on v4 and v5e; benchmarks/tpu_kernels.py), so no
vmem_limit_bytes is asked for; a tile 4x wider does not fit
(tests/kernels/test_tpu_compile.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dro_fast.kernels import config
from dro_fast.kernels import online_lse


def init_scratch(m_ref, l_ref, t_ref):
  """Empties the [bn, 1] online log-sum-exp scratch at a row tile's start."""
  for ref, value in zip((m_ref, l_ref, t_ref), online_lse.init_state(
      *m_ref.shape)):
    ref[...] = value


def fold_tile(x, cols, vocab, targets_ref, m_ref, l_ref, t_ref):
  """Folds the float32 tile x [bn, bv] (columns `cols`) into the scratch."""
  state = online_lse.update((m_ref[...], l_ref[...], t_ref[...]), x, cols,
                            cols < vocab, targets_ref[...], keepdims=True)
  for ref, value in zip((m_ref, l_ref, t_ref), state):
    ref[...] = value


def write_outputs(m_ref, l_ref, t_ref, logprobs_ref, lse_ref):
  lse = m_ref[...] + jnp.log(l_ref[...])
  lse_ref[...] = lse
  logprobs_ref[...] = t_ref[...] - lse


def _forward_kernel(targets_ref, logits_ref, logprobs_ref, lse_ref,
                    m_ref, l_ref, t_ref, *, vocab: int, block_vocab: int):
  j = pl.program_id(1)
  pl.when(j == 0)(lambda: init_scratch(m_ref, l_ref, t_ref))
  x = logits_ref[...].astype(jnp.float32)                         # [bn, bv]
  cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  fold_tile(x, cols, vocab, targets_ref, m_ref, l_ref, t_ref)
  pl.when(j == pl.num_programs(1) - 1)(
      lambda: write_outputs(m_ref, l_ref, t_ref, logprobs_ref, lse_ref))


def _backward_kernel(targets_ref, lse_ref, g_ref, logits_ref, dlogits_ref, *,
                     block_vocab: int):
  j = pl.program_id(1)
  x = logits_ref[...].astype(jnp.float32)                         # [bn, bv]
  cols = j * block_vocab + lax.broadcasted_iota(jnp.int32, x.shape, 1)
  probs = jnp.exp(x - lse_ref[...])
  onehot = (cols == targets_ref[...]).astype(jnp.float32)
  dlogits_ref[...] = (g_ref[...] * (onehot - probs)).astype(dlogits_ref.dtype)


def default_block_sizes(dtype=None,
                        generation: str | None = None) -> config.BlockSizes:
  """The default tiles: 256 rows x 2048 vocabulary entries.

  The same for any dtype and generation (the module docstring says why
  they fit); the signature matches
  linear_logprobs.pallas_tpu.default_block_sizes.
  """
  del dtype, generation
  return config.BlockSizes(rows=256, vocab=2048)


def _cost(logits, passes: int) -> pl.CostEstimate:
  """XLA's view of one launch (a Mosaic kernel is opaque to its cost model).

  A few VPU operations and one exp per logit; the logits read once, and
  dlogits written once by the backward (passes=2).
  """
  return pl.CostEstimate(
      flops=4 * logits.size, transcendentals=logits.size,
      bytes_accessed=passes * logits.size * logits.dtype.itemsize)


def _tiles(n: int, vocab: int, block_sizes: config.BlockSizes | None):
  block_sizes = block_sizes or default_block_sizes()
  block_sizes.check_tpu()
  bn = config.fit_rows(block_sizes.rows, n, 8)
  bv = min(block_sizes.vocab, config.round_up(vocab, 128))
  return bn, bv


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def token_logprobs(logits, targets, block_sizes=None, interpret=None):
  """Same contract as reference.token_logprobs."""
  n, vocab = logits.shape
  bn, bv = _tiles(n, vocab, block_sizes)
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  logprobs, lse = pl.pallas_call(
      functools.partial(_forward_kernel, vocab=vocab, block_vocab=bv),
      grid=(pl.cdiv(n, bn), pl.cdiv(vocab, bv)),
      in_specs=[row, pl.BlockSpec((bn, bv), lambda i, j: (i, j))],
      out_specs=[row, row],
      out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * 2,
      scratch_shapes=[pltpu.VMEM((bn, 1), jnp.float32)] * 3,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=_cost(logits, passes=1),
      interpret=config.resolve_interpret(interpret, "tpu"),
      name="token_logprobs_fwd",
  )(targets.reshape(n, 1), logits)
  return logprobs[:, 0], lse[:, 0]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def token_logprobs_bwd(logits, targets, lse, g, block_sizes=None,
                       interpret=None):
  """Same contract as reference.token_logprobs_bwd."""
  n, vocab = logits.shape
  bn, bv = _tiles(n, vocab, block_sizes)
  row = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
  tile = pl.BlockSpec((bn, bv), lambda i, j: (i, j))
  return pl.pallas_call(
      functools.partial(_backward_kernel, block_vocab=bv),
      grid=(pl.cdiv(n, bn), pl.cdiv(vocab, bv)),
      in_specs=[row, row, row, tile],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel")),
      cost_estimate=_cost(logits, passes=2),
      interpret=config.resolve_interpret(interpret, "tpu"),
      name="token_logprobs_bwd",
  )(targets.reshape(n, 1), lse.reshape(n, 1), g.reshape(n, 1), logits)
