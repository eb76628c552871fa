"""Device meshes and shardings with jax.sharding.

--mesh=data:4,fsdp:2 builds a 4 x 2 mesh. The batch is split over both axes
(every device sees different examples, as FSDP needs); each parameter and
optimizer-state array is split along its largest dimension divisible by the
fsdp size (replicated when none is), so parameters and optimizer states are
spread over fsdp and replicated over data. XLA inserts the all-gathers and
reduce-scatters. Across hosts, call jax.distributed.initialize first (the CLI
does, from its flags) and the same mesh spans every process's devices.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

AXES = ("data", "fsdp")


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
  """"data:4,fsdp:2" -> {"data": 4, "fsdp": 2}; checks names and sizes.

  An empty spec means all devices on "data". The sizes' product must equal
  the number of devices.
  """
  num_devices = num_devices or jax.device_count()
  if not spec:
    return {"data": num_devices, "fsdp": 1}
  sizes = {}
  for part in spec.split(","):
    name, _, size = part.partition(":")
    name = name.strip()
    if name not in AXES or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"--mesh: {part!r} is not AXIS:SIZE with AXIS in "
                       f"{AXES} and SIZE a positive integer (e.g. "
                       f"--mesh=data:4,fsdp:2).")
    if name in sizes:
      raise ValueError(f"--mesh names {name!r} twice.")
    sizes[name] = int(size)
  sizes = {axis: sizes.get(axis, 1) for axis in AXES}
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f"--mesh={spec} has {int(np.prod(list(sizes.values())))}"
                     f" devices but {num_devices} are available.")
  return sizes


def make_mesh(sizes: dict[str, int]) -> Mesh:
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over every device."""
  return NamedSharding(mesh, P(AXES))


def array_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """The largest dimension divisible by the fsdp size goes over fsdp."""
  fsdp = mesh.shape["fsdp"]
  spec = [None] * len(shape)
  if fsdp > 1:
    candidates = [i for i, d in enumerate(shape) if d % fsdp == 0 and d > 1]
    if candidates:
      spec[max(candidates, key=lambda i: shape[i])] = "fsdp"
  return NamedSharding(mesh, P(*spec))


def tree_shardings(tree, mesh: Mesh):
  """array_sharding for every leaf of a pytree (of arrays or shape structs)."""
  return jax.tree.map(lambda x: array_sharding(tuple(x.shape), mesh), tree)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"--batch_size={batch_size} must be divisible by the "
                     f"number of devices in the mesh ({mesh.size}).")
