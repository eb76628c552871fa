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
D is one block (the whole hidden width). Tails of N and V are masked: rows or
columns past the end carry unspecified values, so both the dlogits tile and
the operand tile are zeroed there before any contraction (0 · NaN is NaN).
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

_DEFAULT = config.BlockSizes(rows=256, vocab=512)


def _logits_tile(hidden_ref, weight_ref, row0, col0, n, vocab):
  """Masked float32 logits tile [bn, bv] plus its (rows, cols) indices."""
  h = hidden_ref[...]                                             # [bn, D]
  w = weight_ref[...]                                             # [D, bv]
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
  x, _, cols, _, _ = _logits_tile(hidden_ref, weight_ref, i * bn, j * bv, n,
                                  vocab)
  seq_tpu.fold_tile(x, cols, vocab, targets_ref, m_ref, l_ref, t_ref)
  pl.when(j == pl.num_programs(1) - 1)(
      lambda: seq_tpu.write_outputs(m_ref, l_ref, t_ref, logprobs_ref,
                                    lse_ref))


def _dhidden_kernel(targets_ref, lse_ref, g_ref, hidden_ref, weight_ref,
                    dhidden_ref, acc_ref, *, n, vocab, bn, bv):
  i, j = pl.program_id(0), pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  logits, rows, cols, _, w = _logits_tile(hidden_ref, weight_ref, i * bn,
                                          j * bv, n, vocab)
  dlogits = _dlogits(logits, rows, cols, targets_ref, lse_ref, g_ref, n, vocab)
  # [bn, bv] x [D, bv]ᵀ -> [bn, D]
  acc_ref[...] += lax.dot_general(
      dlogits.astype(w.dtype), w, (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    dhidden_ref[...] = acc_ref[...].astype(dhidden_ref.dtype)


def _dweight_kernel(targets_ref, lse_ref, g_ref, hidden_ref, weight_ref,
                    dweight_ref, acc_ref, *, n, vocab, bn, bv):
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  logits, rows, cols, h, _ = _logits_tile(hidden_ref, weight_ref, i * bn,
                                          j * bv, n, vocab)
  dlogits = _dlogits(logits, rows, cols, targets_ref, lse_ref, g_ref, n, vocab)
  h_rows = i * bn + lax.broadcasted_iota(jnp.int32, h.shape, 0)
  h = jnp.where(h_rows < n, h, jnp.zeros_like(h))
  # [bn, D]ᵀ x [bn, bv] -> [D, bv]
  acc_ref[...] += lax.dot_general(
      h, dlogits.astype(h.dtype), (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    dweight_ref[...] = acc_ref[...].astype(dweight_ref.dtype)


def _tiles(n, vocab, block_sizes):
  block_sizes = block_sizes or _DEFAULT
  block_sizes.check_tpu()
  bn = config.fit_rows(block_sizes.rows, n, 8)
  bv = min(block_sizes.vocab, config.round_up(vocab, 128))
  return bn, bv


def _params(*semantics):
  # 32 MiB fits every TPU generation's VMEM (v4 has 32 MiB; v5e/v6e 128).
  return pltpu.CompilerParams(dimension_semantics=semantics,
                              vmem_limit_bytes=32 * 1024 * 1024)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def linear_token_logprobs(hidden, weight, targets, block_sizes=None,
                          interpret=None):
  """Same contract as reference.linear_token_logprobs."""
  (n, d), vocab = hidden.shape, weight.shape[1]
  bn, bv = _tiles(n, vocab, block_sizes)
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
      interpret=config.tpu_interpret(interpret),
      name="linear_token_logprobs_fwd",
  )(targets.reshape(n, 1), hidden, weight)
  return logprobs[:, 0], lse[:, 0]


def _backward_call(kernel, grid, spec_index, out_spec, out_like, scratch,
                   hidden, weight, targets, lse, g, block_sizes, interpret,
                   name):
  """One backward launch; spec_index maps grid (a, b) to (row tile, vocab tile)."""
  (n, d), vocab = hidden.shape, weight.shape[1]
  bn, bv = _tiles(n, vocab, block_sizes)
  row = pl.BlockSpec((bn, 1), lambda a, b: (spec_index(a, b)[0], 0))
  return pl.pallas_call(
      functools.partial(kernel, n=n, vocab=vocab, bn=bn, bv=bv),
      grid=grid(n, vocab, bn, bv),
      in_specs=[row, row, row,
                pl.BlockSpec((bn, d), lambda a, b: (spec_index(a, b)[0], 0)),
                pl.BlockSpec((d, bv), lambda a, b: (0, spec_index(a, b)[1]))],
      out_specs=out_spec(bn, bv, d),
      out_shape=jax.ShapeDtypeStruct(out_like.shape, out_like.dtype),
      scratch_shapes=[pltpu.VMEM(scratch(bn, bv, d), jnp.float32)],
      compiler_params=_params("parallel", "arbitrary"),
      interpret=config.tpu_interpret(interpret),
      name=name,
  )(targets.reshape(n, 1), lse.reshape(n, 1), g.reshape(n, 1), hidden, weight)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def linear_dhidden(hidden, weight, targets, lse, g, block_sizes=None,
                   interpret=None):
  """d(hidden) [N, D]: grid (row tiles, vocab tiles), vocab sequential."""
  return _backward_call(
      _dhidden_kernel,
      grid=lambda n, v, bn, bv: (pl.cdiv(n, bn), pl.cdiv(v, bv)),
      spec_index=lambda i, j: (i, j),
      out_spec=lambda bn, bv, d: pl.BlockSpec((bn, d), lambda i, j: (i, 0)),
      out_like=hidden, scratch=lambda bn, bv, d: (bn, d),
      hidden=hidden, weight=weight, targets=targets, lse=lse, g=g,
      block_sizes=block_sizes, interpret=interpret,
      name="linear_token_logprobs_dhidden")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def linear_dweight(hidden, weight, targets, lse, g, block_sizes=None,
                   interpret=None):
  """d(weight) [D, V]: grid (vocab tiles, row tiles), rows sequential."""
  return _backward_call(
      _dweight_kernel,
      grid=lambda n, v, bn, bv: (pl.cdiv(v, bv), pl.cdiv(n, bn)),
      spec_index=lambda j, i: (i, j),
      out_spec=lambda bn, bv, d: pl.BlockSpec((d, bv), lambda j, i: (0, j)),
      out_like=weight, scratch=lambda bn, bv, d: (d, bv),
      hidden=hidden, weight=weight, targets=targets, lse=lse, g=g,
      block_sizes=block_sizes, interpret=interpret,
      name="linear_token_logprobs_dweight")


def linear_token_logprobs_bwd(hidden, weight, targets, lse, g,
                              block_sizes=None, interpret=None):
  """Same contract as reference.linear_token_logprobs_bwd."""
  args = (hidden, weight, targets, lse, g, block_sizes, interpret)
  return linear_dhidden(*args), linear_dweight(*args)
