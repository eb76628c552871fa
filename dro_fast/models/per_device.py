"""Custom kernels under the trainer's device mesh.

XLA's SPMD partitioner cannot split a Pallas kernel: Mosaic refuses to lower
one that is not inside a shard_map ("Mosaic kernels cannot be automatically
partitioned"), and a Triton kernel is just as opaque to it. The trainer
traces its update under its mesh (training/steps.py sets it with
jax.sharding.use_abstract_mesh) and splits every batch over the mesh's
batch axes, data x fsdp (training/sharding.batch_sharding); the devices of
one model group (the `model` axis) hold the same rows. `over_batch` runs a
kernel per device on that device's rows of the batch, the same on every
device of a model group.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from dro_fast.models import partitioning


def over_batch(fn: Callable[..., jax.Array], batched: tuple[bool, ...],
               heads: tuple[int | None, ...] | None = None,
               out_heads: int | None = None) -> Callable[..., jax.Array]:
  """fn run per device under the ambient mesh.

  Positional arguments marked True in `batched` are split on their leading
  (batch) axis over the mesh's batch axes (data, fsdp) and replicated over
  the others (model); the rest (pytrees too) are replicated, so their
  gradients are summed over the mesh by shard_map's transpose. Every
  device of a model group computes the same rows: the transpose divides the
  output's cotangent by the size of the axes out_specs leaves out (model)
  before it sums the inputs' cotangents over them, so nothing is counted M
  times (tests/training/test_model_axis.py). The output is split on its
  leading axis over the batch axes. Without an ambient mesh of more than one
  device this is fn itself.

  heads: per argument, the axis of its attention heads, or None; on a mesh
  with a `model` axis those axes are split over it (each model shard
  computes its own heads, as the projections around attention are split,
  partitioning.RULES), and the output's `out_heads` axis too. fn must then
  work on any whole number of heads; the model axis divides them
  (sharding.check_model_axis).
  """
  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return fn(*args)
    batch = tuple(a for a in mesh.axis_names if a in partitioning.BATCH_AXES)
    split = heads is not None and dict(zip(
        mesh.axis_names, mesh.axis_sizes)).get(partitioning.MODEL_AXIS, 1) > 1

    def spec(is_batched: bool, head_axis: int | None) -> P:
      parts = [batch if is_batched else None]
      if split and head_axis is not None:
        parts += [None] * (head_axis + 1 - len(parts))
        parts[head_axis] = partitioning.MODEL_AXIS
      return P(*parts)

    in_heads = heads if split else (None,) * len(batched)
    # check_vma=False: Pallas calls declare no varying mesh axes on their
    # outputs; every output here is per-device rows by construction.
    return jax.shard_map(
        fn, in_specs=tuple(spec(b, h) for b, h in zip(batched, in_heads)),
        out_specs=spec(True, out_heads if split else None),
        check_vma=False)(*args)
  return wrapped
