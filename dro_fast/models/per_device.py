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


def over_batch(fn: Callable[..., jax.Array], batched: tuple[bool, ...]
               ) -> Callable[..., jax.Array]:
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
  """
  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return fn(*args)
    rows = P(tuple(a for a in mesh.axis_names
                   if a in partitioning.BATCH_AXES))
    # check_vma=False: Pallas calls declare no varying mesh axes on their
    # outputs; every output here is per-device rows by construction.
    return jax.shard_map(fn, in_specs=tuple(rows if b else P()
                                            for b in batched),
                         out_specs=rows, check_vma=False)(*args)
  return wrapped
