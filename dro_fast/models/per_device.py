"""Custom kernels under the trainer's device mesh.

XLA's SPMD partitioner cannot split a Pallas kernel: Mosaic refuses to lower
one that is not inside a shard_map ("Mosaic kernels cannot be automatically
partitioned"), and a Triton kernel is just as opaque to it. The trainer
traces its update under its mesh (training/steps.py sets it with
jax.sharding.use_abstract_mesh) and splits every batch over all the mesh's
axes (training/sharding.batch_sharding). `over_batch` runs a kernel per
device on that device's rows of the batch.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P


def over_batch(fn: Callable[..., jax.Array], batched: tuple[bool, ...]
               ) -> Callable[..., jax.Array]:
  """fn run per device under the ambient mesh.

  Positional arguments marked True in `batched` are split on their leading
  (batch) axis over every mesh axis; the others (pytrees too) are
  replicated, so their gradients are summed over the mesh by shard_map's
  transpose. The output is split on its leading axis. Without an ambient
  mesh of more than one device this is fn itself.
  """
  def wrapped(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return fn(*args)
    rows = P(mesh.axis_names)
    # check_vma=False: Pallas calls declare no varying mesh axes on their
    # outputs; every output here is per-device rows by construction.
    return jax.shard_map(fn, in_specs=tuple(rows if b else P()
                                            for b in batched),
                         out_specs=rows, check_vma=False)(*args)
  return wrapped
