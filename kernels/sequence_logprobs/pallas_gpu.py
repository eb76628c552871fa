"""The "pallas_gpu" implementation: Pallas kernels lowered through Triton.

Triton programs run independently, so a reduction cannot span programs the
way the TPU kernel's sequential grid axis does. Forward: a program per tile of
bn rows and per vocabulary slice (BlockSizes.vocab_splits) loops over its
slice in bv-wide masked loads, keeping an online log-sum-exp in registers, and
writes the partial (max, sum, target logit); an O(S·N) XLA step combines the
slices. The logits are read once. Backward: a fully
parallel (rows, vocab) grid of tiles, each writing g · (onehot − exp(x − lse)).

Block shapes are powers of 2 (Triton); tails of N and V are masked loads and
stores. Offsets are int32 in Triton, hence the N·V < 2**31 check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dro_fast.kernels import config
from dro_fast.kernels import online_lse

# Tuned on an H100 (benchmarks/RESULTS.md#kernels-on-the-h100).
_DEFAULT = config.BlockSizes(rows=1, vocab=2048, num_warps=4, num_stages=2,
                             vocab_splits=4)


def check_offsets(*shape: int):
  size = 1
  for dim in shape:
    size *= dim
  if size >= 2**31:
    raise ValueError(
        f"pallas_gpu addresses tensors with int32 offsets; a tensor of shape "
        f"{shape} has {size} >= 2**31 elements. Split the batch or use "
        f"implementation='chunked_xla'.")


def _forward_kernel(logits_ref, targets_ref, m_ref, l_ref, t_ref, *,
                    n: int, vocab: int, bn: int, bv: int, tiles_per_split: int):
  """Partial online log-sum-exp of one row tile over one vocabulary slice."""
  split = pl.program_id(1)
  rows = pl.program_id(0) * bn + jnp.arange(bn)                  # [bn]
  row_ok = rows < n
  targets = plgpu.load(targets_ref.at[rows], mask=row_ok, other=0)

  def body(j, state):
    cols = (split * tiles_per_split + j) * bv + jnp.arange(bv)    # [bv]
    ok = row_ok[:, None] & (cols < vocab)[None, :]
    x = plgpu.load(logits_ref.at[rows[:, None], cols[None, :]], mask=ok,
                   other=config.NEG_LARGE,
                   eviction_policy="evict_first").astype(jnp.float32)
    return online_lse.update(state, x, cols[None, :], ok, targets[:, None])

  m, l, t = jax.lax.fori_loop(0, tiles_per_split, body,
                              online_lse.init_state(bn))
  out = split * n + rows                                          # [S·N] slot
  plgpu.store(m_ref.at[out], m, mask=row_ok)
  plgpu.store(l_ref.at[out], l, mask=row_ok)
  plgpu.store(t_ref.at[out], t, mask=row_ok)


def _backward_kernel(logits_ref, targets_ref, lse_ref, g_ref, dlogits_ref, *,
                     n: int, vocab: int, bn: int, bv: int):
  rows = pl.program_id(0) * bn + jnp.arange(bn)
  cols = pl.program_id(1) * bv + jnp.arange(bv)
  row_ok = rows < n
  ok = row_ok[:, None] & (cols < vocab)[None, :]
  targets = plgpu.load(targets_ref.at[rows], mask=row_ok, other=0)
  lse = plgpu.load(lse_ref.at[rows], mask=row_ok, other=0.0)
  g = plgpu.load(g_ref.at[rows], mask=row_ok, other=0.0)
  x = plgpu.load(logits_ref.at[rows[:, None], cols[None, :]], mask=ok,
                 other=0.0, eviction_policy="evict_first").astype(jnp.float32)
  onehot = (cols[None, :] == targets[:, None]).astype(jnp.float32)
  dx = g[:, None] * (onehot - jnp.exp(x - lse[:, None]))
  plgpu.store(dlogits_ref.at[rows[:, None], cols[None, :]],
              dx.astype(dlogits_ref.dtype), mask=ok)


def _tiles(n, vocab, block_sizes):
  block_sizes = block_sizes or _DEFAULT
  block_sizes.check_gpu()
  check_offsets(n, vocab)
  bv = min(block_sizes.vocab, pl.next_power_of_2(vocab))
  bn = min(block_sizes.rows, pl.next_power_of_2(n))
  params = plgpu.CompilerParams(num_warps=block_sizes.num_warps,
                                num_stages=block_sizes.num_stages)
  return bn, bv, params


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def token_logprobs(logits, targets, block_sizes=None, interpret=None):
  """Same contract as reference.token_logprobs."""
  n, vocab = logits.shape
  bn, bv, params = _tiles(n, vocab, block_sizes)
  splits = online_lse.auto_splits(pl.cdiv(n, bn), pl.cdiv(vocab, bv),
                                  (block_sizes or _DEFAULT).vocab_splits)
  tiles_per_split = pl.cdiv(pl.cdiv(vocab, bv), splits)
  m, l, t = pl.pallas_call(
      functools.partial(_forward_kernel, n=n, vocab=vocab, bn=bn, bv=bv,
                        tiles_per_split=tiles_per_split),
      grid=(pl.cdiv(n, bn), splits),
      out_shape=[jax.ShapeDtypeStruct((splits * n,), jnp.float32)] * 3,
      compiler_params=params,
      interpret=config.resolve_interpret(interpret, "gpu"),
      name="token_logprobs_fwd",
  )(logits, targets)
  # Combine the slices' partial states: O(S·N), a few microseconds.
  return online_lse.combine_partials(
      *(x.reshape(splits, n) for x in (m, l, t)))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def token_logprobs_bwd(logits, targets, lse, g, block_sizes=None,
                       interpret=None):
  """Same contract as reference.token_logprobs_bwd."""
  n, vocab = logits.shape
  bn, bv, params = _tiles(n, vocab, block_sizes)
  return pl.pallas_call(
      functools.partial(_backward_kernel, n=n, vocab=vocab, bn=bn, bv=bv),
      grid=(pl.cdiv(n, bn), pl.cdiv(vocab, bv)),
      out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
      compiler_params=params,
      interpret=config.resolve_interpret(interpret, "gpu"),
      name="token_logprobs_bwd",
  )(logits, targets, lse, g)
