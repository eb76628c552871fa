"""The "pallas_gpu" implementation of the fused linear op (Triton lowering).

Forward: a program per tile of bn rows and per vocabulary slice loops over
the slice's tiles of bv columns; each logits tile [bn, bv] is accumulated over
hidden chunks of bd with plgpu.dot (tensor cores, float32 accumulation),
folded into an online log-sum-exp in registers and dropped: no logits reach
HBM. Slices (BlockSizes.vocab_splits; 0 = enough for ~512 programs) keep the
GPU busy when there are few rows; an O(S·N) XLA step merges their states.

Backward: Triton programs cannot share an accumulator, and a [bn, D] one per
program does not fit in registers, so d(hidden) and d(weight) are formed one
vocabulary chunk of c columns at a time, in a lax.scan: a Pallas kernel
recomputes the chunk's logits tiles and writes dlogits = g · (onehot −
exp(logits − lse)) [N, c] (hidden's dtype), and two cuBLAS matmuls contract it
into d(hidden) and d(weight)[:, chunk] (chunked_xla.backward_scan). Peak
temporary memory is N × c plus a float32 d(hidden), independent of V.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dro_fast.kernels import config
from dro_fast.kernels import online_lse
from dro_fast.kernels.linear_logprobs import chunked_xla
from dro_fast.kernels.sequence_logprobs.pallas_gpu import check_offsets

# Tuned on an H100 (benchmarks/RESULTS.md#kernels-on-the-h100).
# vocab_splits=0: split the vocabulary across programs when there are few row
# tiles (short batches), see online_lse.auto_splits.
_DEFAULT = config.BlockSizes(rows=128, vocab=128, hidden=64, vocab_chunk=2048,
                             num_warps=8, num_stages=3, vocab_splits=0)


def _logits_tile(hidden_ref, weight_ref, rows, row_ok, cols, col_ok, d, bd):
  """float32 hidden[rows] @ weight[:, cols], accumulated over D in bd chunks."""

  def body(k, acc):
    ks = k * bd + jnp.arange(bd)
    k_ok = ks < d
    h = plgpu.load(hidden_ref.at[rows[:, None], ks[None, :]],
                   mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    w = plgpu.load(weight_ref.at[ks[:, None], cols[None, :]],
                   mask=k_ok[:, None] & col_ok[None, :], other=0.0)
    return acc + plgpu.dot(h, w)

  return jax.lax.fori_loop(0, pl.cdiv(d, bd), body,
                           jnp.zeros((rows.shape[0], cols.shape[0]),
                                     jnp.float32))


def _forward_kernel(hidden_ref, weight_ref, targets_ref, m_ref, l_ref, t_ref,
                    *, n, d, vocab, bn, bv, bd, tiles_per_split):
  """Partial online log-sum-exp of one row tile over one vocabulary slice."""
  split = pl.program_id(1)
  rows = pl.program_id(0) * bn + jnp.arange(bn)
  row_ok = rows < n
  targets = plgpu.load(targets_ref.at[rows], mask=row_ok, other=0)

  def body(j, state):
    cols = (split * tiles_per_split + j) * bv + jnp.arange(bv)
    col_ok = cols < vocab
    x = _logits_tile(hidden_ref, weight_ref, rows, row_ok, cols, col_ok, d, bd)
    return online_lse.update(state, x, cols[None, :], col_ok[None, :],
                             targets[:, None])

  m, l, t = jax.lax.fori_loop(0, tiles_per_split, body,
                              online_lse.init_state(bn))
  out = split * n + rows
  plgpu.store(m_ref.at[out], m, mask=row_ok)
  plgpu.store(l_ref.at[out], l, mask=row_ok)
  plgpu.store(t_ref.at[out], t, mask=row_ok)


def _dlogits_kernel(hidden_ref, weight_ref, targets_ref, lse_ref, g_ref,
                    dlogits_ref, *, n, d, vocab, bn, bv, bd):
  """dlogits for a weight chunk [D, vocab]; targets are chunk-relative."""
  rows = pl.program_id(0) * bn + jnp.arange(bn)
  cols = pl.program_id(1) * bv + jnp.arange(bv)
  row_ok, col_ok = rows < n, cols < vocab
  targets = plgpu.load(targets_ref.at[rows], mask=row_ok, other=-1)
  lse = plgpu.load(lse_ref.at[rows], mask=row_ok, other=0.0)
  g = plgpu.load(g_ref.at[rows], mask=row_ok, other=0.0)
  x = _logits_tile(hidden_ref, weight_ref, rows, row_ok, cols, col_ok, d, bd)
  onehot = (cols[None, :] == targets[:, None]).astype(jnp.float32)
  dx = g[:, None] * (onehot - jnp.exp(x - lse[:, None]))
  plgpu.store(dlogits_ref.at[rows[:, None], cols[None, :]],
              dx.astype(dlogits_ref.dtype),
              mask=row_ok[:, None] & col_ok[None, :])


def _blocks(n, d, vocab, block_sizes):
  block_sizes = block_sizes or _DEFAULT
  block_sizes.check_gpu()
  check_offsets(n, d)
  check_offsets(d, vocab)
  # tl.dot needs every tile dimension >= 16.
  bn = max(16, min(block_sizes.rows, pl.next_power_of_2(n)))
  bv = max(16, min(block_sizes.vocab, pl.next_power_of_2(vocab)))
  bd = max(16, min(block_sizes.hidden, pl.next_power_of_2(d)))
  return block_sizes, dict(n=n, d=d, bn=bn, bv=bv, bd=bd)


def _compiler_params(block_sizes):
  return plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                              num_stages=block_sizes.num_stages)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def linear_token_logprobs(hidden, weight, targets, block_sizes=None,
                          interpret=None):
  """Same contract as reference.linear_token_logprobs."""
  (n, d), vocab = hidden.shape, weight.shape[1]
  block_sizes, kw = _blocks(n, d, vocab, block_sizes)
  vocab_tiles = pl.cdiv(vocab, kw["bv"])
  splits = online_lse.auto_splits(pl.cdiv(n, kw["bn"]), vocab_tiles,
                                  block_sizes.vocab_splits)
  m, l, t = pl.pallas_call(
      functools.partial(_forward_kernel, vocab=vocab,
                        tiles_per_split=pl.cdiv(vocab_tiles, splits), **kw),
      grid=(pl.cdiv(n, kw["bn"]), splits),
      out_shape=[jax.ShapeDtypeStruct((splits * n,), jnp.float32)] * 3,
      compiler_params=_compiler_params(block_sizes),
      interpret=config.resolve_interpret(interpret, "gpu"),
      name="linear_token_logprobs_fwd",
  )(hidden, weight, targets)
  return online_lse.combine_partials(
      *(x.reshape(splits, n) for x in (m, l, t)))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def linear_token_logprobs_bwd(hidden, weight, targets, lse, g,
                              block_sizes=None, interpret=None):
  """Same contract as reference.linear_token_logprobs_bwd."""
  (n, d), vocab = hidden.shape, weight.shape[1]
  block_sizes, kw = _blocks(n, d, vocab, block_sizes)
  chunk = min(block_sizes.vocab_chunk, vocab)
  dtype = jnp.result_type(hidden.dtype, weight.dtype)
  dlogits_call = pl.pallas_call(
      functools.partial(_dlogits_kernel, vocab=chunk, **kw),
      grid=(pl.cdiv(n, kw["bn"]), pl.cdiv(chunk, kw["bv"])),
      out_shape=jax.ShapeDtypeStruct((n, chunk), dtype),
      compiler_params=_compiler_params(block_sizes),
      interpret=config.resolve_interpret(interpret, "gpu"),
      name="linear_token_logprobs_dlogits",
  )
  # Chunk-relative targets: the kernel sees its chunk as vocabulary [0, c).
  return chunked_xla.backward_scan(
      hidden, weight, targets, chunk,
      lambda w, start: dlogits_call(hidden, w, targets - start, lse, g))
