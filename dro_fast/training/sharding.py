"""Device meshes and shardings with jax.sharding.

--mesh=data:4,fsdp:2 builds a 4 x 2 mesh. The batch is split over both axes
(every device sees different examples, as FSDP needs); each parameter and
optimizer-state array is split along its largest dimension divisible by the
fsdp size (replicated when none is), so parameters and optimizer states are
spread over fsdp and replicated over data. XLA inserts the all-gathers and
reduce-scatters.

Across processes (hosts), call `initialize_distributed` first (the CLI does,
from --coordinator_address, --num_processes and --process_id); the same mesh
then spans every process's devices. Every process holds the same global batch
on the host and `global_batch` copies to each of its devices only that
device's rows; `to_host` gathers a sharded tree back. docs/SCALING.md says
how this maps onto TPU pod slices and GPU clusters.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator, Mapping

import jax
from jax.experimental import multihost_utils
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
      raise ValueError(f"`mesh`: {part!r} is not AXIS:SIZE with AXIS in "
                       f"{AXES} and SIZE a positive integer (e.g. "
                       f"`mesh`=data:4,fsdp:2).")
    if name in sizes:
      raise ValueError(f"`mesh` names {name!r} twice.")
    sizes[name] = int(size)
  sizes = {axis: sizes.get(axis, 1) for axis in AXES}
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f"`mesh`={spec} has {int(np.prod(list(sizes.values())))}"
                     f" devices but {num_devices} are available.")
  return sizes


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  """The mesh of parse_mesh's sizes over `devices`.

  devices None: all of JAX's; a TPU topology's devices compile for a slice
  this host lacks.
  """
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


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
    raise ValueError(f"`batch_size`={batch_size} must be divisible by the "
                     f"number of devices in the mesh ({mesh.size}).")


def initialize_distributed(coordinator_address: str | None,
                           num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed.initialize, with CPU collectives that work across hosts.

  Must run before anything touches a JAX device. On the CPU, cross-process
  collectives need an implementation (gloo, over TCP); GPUs and TPUs use
  their own (NCCL; ICI and DCN), so the setting is harmless there.

  Args:
    coordinator_address: host:port of process 0, reachable from every
      process; None (with the others None) lets JAX detect the cluster
      (Cloud TPU, SLURM, Open MPI).
    num_processes: processes in the run.
    process_id: this process's index, 0 to num_processes - 1.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
  """Runs the block on process 0, then on the others.

  For work that writes files into the shared workdir (the demo data, the
  reference log-prob cache) that the other processes then read instead of
  writing them too. Every process must reach the end of the block.
  """
  primary = jax.process_index() == 0
  if not primary:
    barrier(name)
  yield
  if primary:
    barrier(name)


def check_same_on_every_process(text: str, what: str) -> None:
  """Raises ValueError unless `text` is the same on every process.

  Each process feeds its devices' rows of a batch from its own copy of the
  data, so copies that differ would silently mix two datasets.
  """
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8],
                         np.uint32)
  digests = multihost_utils.process_allgather(digest)   # [processes, 2]
  differ = [i for i, d in enumerate(digests) if (d != digests[0]).any()]
  if differ:
    raise ValueError(
        f"{what} on process(es) {differ} differs from process 0's. Every "
        "process must read the same files: give them one shared `workdir` "
        "(or the same `train_data` and `tokenizer`).")


def global_batch(batch: Mapping[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """A host batch (the same global batch on every process) as global arrays.

  Each process copies to its own devices only the rows that `sharding`
  assigns them, so with several processes no process needs the others' data
  on its devices; with one process this equals jax.device_put.
  """
  return {name: jax.make_array_from_callback(np.shape(x), sharding,
                                             lambda index, x=x: x[index])
          for name, x in batch.items()}


def to_host(tree: Any) -> Any:
  """NumPy copies of a tree's arrays, gathered across processes if sharded."""
  def fetch(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return multihost_utils.process_allgather(leaf, tiled=True)
    return np.asarray(jax.device_get(leaf))
  return jax.tree.map(fetch, tree)
