"""Vocabulary-parallel linear_sequence_logprobs: the projection split over V.

When the output projection [D, V] is split over its columns on a mesh axis
(tensor parallelism, e.g. "model" of size M), each device holds the slice
weight[:, i·V_s : (i+1)·V_s], V_s = V / M, i = lax.axis_index(axis). Neither
the whole weight nor any logits are gathered or materialised:

forward, per shard i (the registry implementation's row forward, e.g. the
Pallas kernels, on the local slice and the local target ids
targets − i·V_s):
  lse_i [N]  log Σ_{v in shard i} exp(logit_v) (the shard's running max and
             sum of exponentials, m_i + log l_i);
  t_i [N]    the target's logit where the target falls in shard i, else 0
             (lp_i + lse_i from the kernel's log-prob lp_i);
combine, plain JAX over the axis (a pmax of one and a psum of two [N]
float32 values):
  m = pmax(lse_i);  lse = m + log psum(exp(lse_i − m));  t = psum(t_i);
  log-prob = t − lse, the same on every device of the axis.

backward (custom VJP), per shard: the implementation's backward with the
global lse and the local targets (another shard's target is −1, which no
column matches) gives dlogits_i = g · (onehot_i − exp(logits_i − lse)),
contracted into the shard's d(hidden) partial and its own d(weight) slice;
the d(hidden) partials are summed over the axis, d(weight) stays local.
The "xla" implementation (autodiff in the registry) is plain JAX with the
logits of the shard materialised, differentiated by JAX through the psum:
the independent baseline of the custom VJP.

Contract of `vocab_parallel_linear_sequence_logprobs` (called inside a
shard_map, or wherever `axis_name` is bound):
  - weight is this device's [D, V_s] slice, in axis order;
  - hidden [B, T, D], targets [B, T] (global ids in [0, V)) and mask [B, T]
    are the same on every device of the axis;
  - the [B] float32 result is the same on every device of the axis.
The implementations with a custom VJP (every one but "xla") run under
shard_map(check_vma=False), as dro_fast's kernels do (Pallas calls declare
no varying mesh axes): shard_map then hands each device 1/M of a
replicated output's cotangent and sums a replicated input's cotangents
over the axis itself, so the backward psums g first and returns the local
d(hidden) partial (the psum of the partials is shard_map's, in hidden's
dtype: bfloat16 partials are rounded before they are summed). "xla" runs
under either setting (JAX differentiates its psum).

`vocab_parallel` builds that shard_map from a mesh: global arrays in,
the batch split over `batch_axes`, the vocabulary over `vocab_axis`.

Glossary: B batch, T target length, D hidden width, V vocabulary, V_s its
per-shard slice, M the vocabulary axis' size, N = B·T rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from dro_fast.kernels import config
from dro_fast.kernels import registry
from dro_fast.kernels import validation
from dro_fast.kernels.sequence_logprobs import ops as sequence_ops


def _check_no_vma(weight: jax.Array, axis_name: str, implementation: str):
  """The custom-VJP path runs under shard_map(check_vma=False) only."""
  aval = jax.typeof(weight)
  # The axes a value varies over: manual_axis_type.varying in this JAX,
  # vma in the JAX releases before it.
  mat = getattr(aval, "manual_axis_type", None)
  varying = getattr(mat, "varying", None) or getattr(aval, "vma", ())
  if axis_name in varying:
    raise ValueError(
        f"vocab-parallel implementation {implementation!r} must run under "
        f"jax.shard_map(..., check_vma=False) (its kernels declare no "
        f"varying mesh axes); only implementation='xla' runs under "
        f"check_vma=True.")


def _local_targets(targets, vocab_shard, axis_name):
  """(local ids, in this shard) of global ids [N]: ids − axis_index · V_s."""
  local = targets - lax.axis_index(axis_name) * vocab_shard
  return local, (local >= 0) & (local < vocab_shard)


def _combine(lse_shard, target_shard, axis_name):
  """(log-probs [N], lse [N]) from every shard's lse and target logit."""
  m = lax.pmax(lse_shard, axis_name)
  total, target = lax.psum((jnp.exp(lse_shard - m), target_shard), axis_name)
  lse = m + jnp.log(total)
  return target - lse, lse


def _shard_forward(static, hidden, weight, targets):
  """(log-probs [N], global lse [N], local targets with −1 off-shard)."""
  impl = registry.get(static.implementation)
  local, in_shard = _local_targets(targets, weight.shape[1], static.axis_name)
  # Every row gets an id inside the slice (the kernels' contract); rows
  # whose target is elsewhere keep only the slice's lse.
  logprobs, lse_shard = impl.linear_token_logprobs(
      hidden, weight, jnp.where(in_shard, local, 0), static.block_sizes,
      static.interpret)
  # (t − lse) + lse: t to within float32 rounding of the larger of the two.
  target_shard = jnp.where(in_shard, logprobs + lse_shard, 0.0)
  logprobs, lse = _combine(lse_shard, target_shard, static.axis_name)
  return logprobs, lse, jnp.where(in_shard, local, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows_custom_vjp(static, hidden, weight, targets):
  return _shard_forward(static, hidden, weight, targets)[0]


def _rows_fwd(static, hidden, weight, targets):
  logprobs, lse, local = _shard_forward(static, hidden, weight, targets)
  return logprobs, (hidden, weight, local, lse)


def _rows_bwd(static, residuals, g):
  hidden, weight, local, lse = residuals
  impl = registry.get(static.implementation)
  # Each device holds 1/M of the replicated output's cotangent (shard_map
  # with check_vma=False); its transpose sums the d(hidden) partials.
  g = lax.psum(g.astype(jnp.float32), static.axis_name)
  dhidden, dweight = impl.linear_token_logprobs_bwd(
      hidden, weight, local, lse, g, static.block_sizes, static.interpret)
  return dhidden, dweight, None


_rows_custom_vjp.defvjp(_rows_fwd, _rows_bwd)


def _rows_autodiff(axis_name, hidden, weight, targets):
  """The "xla" form: shard logits materialised, JAX's autodiff throughout."""
  logits = jnp.dot(hidden, weight, preferred_element_type=jnp.float32)
  local, _ = _local_targets(targets, weight.shape[1], axis_name)
  m_shard = lax.stop_gradient(jnp.max(logits, axis=-1))
  lse_shard = m_shard + jnp.log(jnp.sum(jnp.exp(logits - m_shard[:, None]),
                                        axis=-1))
  onehot = local[:, None] == jnp.arange(logits.shape[1])[None, :]
  # The one-hot row is empty where the target is another shard's.
  target_shard = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  m = lax.pmax(lax.stop_gradient(lse_shard), axis_name)
  total, target = lax.psum((jnp.exp(lse_shard - m), target_shard),
                           axis_name)
  return target - (m + jnp.log(total))


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call: a hashable custom_vjp argument."""
  implementation: str
  block_sizes: config.BlockSizes | None
  interpret: Any
  axis_name: str


def vocab_parallel_linear_token_logprobs(
    hidden: jax.Array, weight: jax.Array, targets: jax.Array, *,
    axis_name: str, implementation: str | None = None,
    block_sizes: config.BlockSizes | None = None,
    interpret: Any = None) -> jax.Array:
  """Per-position log-probs with the projection split over `axis_name`.

  Args:
    hidden: [..., D] float32 or bfloat16, the same on every device of the
      axis.
    weight: [D, V_s] this device's slice of the [D, V] projection (columns
      axis_index · V_s onwards).
    targets: [...] global ids in [0, V), the same on every device.
    axis_name: the mesh axis the vocabulary is split over.
    implementation, block_sizes, interpret: as for linear_token_logprobs;
      they apply to each shard's [D, V_s] slice.

  Returns:
    [...] float32, the same on every device of the axis, differentiable
    w.r.t. hidden and the weight slice (see the module docstring).
  """
  validation.check_floating("hidden", hidden)
  validation.check_floating("weight", weight)
  if weight.ndim != 2 or weight.shape[0] != hidden.shape[-1]:
    raise ValueError(f"weight must be this shard's [D, V / M] slice with "
                     f"D = hidden.shape[-1] = {hidden.shape[-1]}; got "
                     f"{tuple(weight.shape)}.")
  if tuple(targets.shape) != tuple(hidden.shape[:-1]):
    raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}; "
                     f"got {tuple(targets.shape)}.")
  impl = registry.get(implementation)
  rows = hidden.reshape(-1, hidden.shape[-1])                     # [N, D]
  flat_targets = targets.reshape(-1).astype(jnp.int32)
  if impl.autodiff:
    logprobs = _rows_autodiff(axis_name, rows, weight, flat_targets)
  else:
    _check_no_vma(weight, axis_name, impl.name)
    logprobs = _rows_custom_vjp(
        _Static(impl.name, block_sizes, interpret, axis_name), rows, weight,
        flat_targets)
  return logprobs.reshape(targets.shape)


def vocab_parallel_linear_sequence_logprobs(
    hidden: jax.Array, weight: jax.Array, targets: jax.Array,
    mask: jax.Array, *, axis_name: str, implementation: str | None = None,
    block_sizes: config.BlockSizes | None = None,
    interpret: Any = None) -> jax.Array:
  """linear_sequence_logprobs with the projection split over `axis_name`.

  Called inside a shard_map (module docstring: the contract).

  Args:
    hidden: [B, T, D] this device's rows, the same on every device of the
      axis.
    weight: [D, V_s] this device's slice of the [D, V] projection.
    targets: [B, T] global token ids in [0, V) (any value where mask is 0).
    mask: [B, T] bool or 0/1.
    axis_name: the mesh axis the vocabulary is split over.
    implementation, block_sizes, interpret: as for linear_sequence_logprobs,
      per shard.

  Returns:
    [B] float32, the same on every device of the axis.
  """
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [B, T, D], got shape {hidden.shape}.")
  validation.check_targets_mask(targets, mask, tuple(hidden.shape[:2]),
                                "hidden [B, T, D]")
  per_token = vocab_parallel_linear_token_logprobs(
      hidden, weight, targets, axis_name=axis_name,
      implementation=implementation, block_sizes=block_sizes,
      interpret=interpret)
  return sequence_ops.masked_sum(per_token, mask)


def vocab_parallel(mesh: Any = None, *, vocab_axis: str = "model",
                   batch_axes: Sequence[str] | None = None,
                   implementation: str | None = None,
                   block_sizes: config.BlockSizes | None = None,
                   interpret: Any = None
                   ) -> Callable[..., jax.Array]:
  """vocab_parallel_linear_sequence_logprobs on global arrays over a mesh.

  Args:
    mesh: a jax.sharding.Mesh or AbstractMesh with Auto axes (as
      training.sharding.make_mesh builds); None: the ambient mesh
      (jax.sharding.get_abstract_mesh(), as the trainer sets it).
    vocab_axis: the mesh axis the projection's V is split over.
    batch_axes: the mesh axes B is split over; None: every other axis.
    implementation, block_sizes, interpret: as for linear_sequence_logprobs.

  Returns:
    fn(hidden [B, T, D], weight [D, V], targets [B, T], mask [B, T]) -> [B]
    float32, split over batch_axes. The shard_map reshards its inputs to
    hidden/targets/mask split on B over batch_axes and weight split on V
    over vocab_axis (a weight already laid out so moves nothing); B must
    divide by the batch axes' product and V by the vocab axis' size.
  """
  def fn(hidden, weight, targets, mask):
    m = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if m.empty:
      raise ValueError("vocab_parallel needs a mesh: pass one or call it "
                       "under jax.sharding.use_mesh / use_abstract_mesh.")
    names = tuple(m.axis_names)
    if vocab_axis not in names:
      raise ValueError(f"vocab_axis {vocab_axis!r} is not an axis of the "
                       f"mesh {names}; pass one of them.")
    batch = (tuple(a for a in names if a != vocab_axis)
             if batch_axes is None else tuple(batch_axes))
    unknown = [a for a in batch if a not in names or a == vocab_axis]
    if unknown:
      raise ValueError(f"batch_axes {unknown} are not mesh axes other than "
                       f"the vocab axis {vocab_axis!r}; the mesh has "
                       f"{names}.")
    shards = dict(zip(names, m.axis_sizes))[vocab_axis]
    vocab = weight.shape[-1]
    if vocab % shards:
      divisors = [k for k in range(1, 65) if vocab % k == 0]
      raise ValueError(
          f"the vocabulary V = {vocab} (weight [D, V]) does not divide by "
          f"the {vocab_axis!r} axis' size {shards}; pad V to a multiple of "
          f"it or use a {vocab_axis!r} size among {divisors}.")
    rows = P(batch or None)
    per_shard = functools.partial(
        vocab_parallel_linear_sequence_logprobs, axis_name=vocab_axis,
        implementation=implementation, block_sizes=block_sizes,
        interpret=interpret)
    # check_vma=False: Pallas calls declare no varying mesh axes on their
    # outputs (the cotangent convention is in the module docstring).
    return jax.shard_map(
        per_shard, mesh=m,
        in_specs=(rows, P(None, vocab_axis), rows, rows), out_specs=rows,
        check_vma=False)(hidden, weight, targets, mask)
  return fn
