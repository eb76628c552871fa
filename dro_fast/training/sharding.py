"""Device meshes and shardings with jax.sharding.

--mesh=data:4,fsdp:2,model:2 builds a 4 x 2 x 2 mesh (AXES; an axis left
out has size 1). The batch is split over data x fsdp (every device of a
model group sees the same examples). Parameters and optimizer states are
split by logical axis names (models/partitioning.py: each parameter's
dimensions are named by its path, and RULES map the names to mesh axes):
the width over fsdp, attention heads, MLP hidden units and the vocabulary
over model (Megatron's column- and row-parallel pairs), replicated over
data. An array that no rule puts on fsdp (an unnamed path, a scalar, a
norm) is split on its largest remaining dimension divisible by the fsdp
size, so FSDP still spreads every array. XLA inserts the all-gathers,
all-reduces and reduce-scatters.

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
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from dro_fast.models import partitioning
from dro_fast.training import optim

AXES = partitioning.AXES
BATCH_AXES = partitioning.BATCH_AXES
RULES = partitioning.RULES

# Adafactor's factored second moments (optax.FactoredState): v_row drops
# the parameter's largest dimension, v_col its second largest.
_FACTORED = {"v_row": 0, "v_col": 1}


def parse_mesh(spec: str, num_devices: int | None = None) -> dict[str, int]:
  """"data:4,fsdp:2" -> {"data": 4, "fsdp": 2, "model": 1}; checks them.

  An empty spec means all devices on "data". The sizes' product must equal
  the number of devices.
  """
  num_devices = num_devices or jax.device_count()
  if not spec:
    return {axis: num_devices if axis == "data" else 1 for axis in AXES}
  sizes = {}
  for part in spec.split(","):
    name, _, size = part.partition(":")
    name = name.strip()
    if name not in AXES or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"`mesh`: {part!r} is not AXIS:SIZE with AXIS in "
                       f"{AXES} and SIZE a positive integer (e.g. "
                       f"`mesh`=data:2,fsdp:2,model:2).")
    if name in sizes:
      raise ValueError(f"`mesh` names {name!r} twice.")
    sizes[name] = int(size)
  sizes = {axis: sizes.get(axis, 1) for axis in AXES}
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f"`mesh`={spec} has {int(np.prod(list(sizes.values())))}"
                     f" devices but {num_devices} are available.")
  return sizes


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
  """The mesh of parse_mesh's sizes (an axis left out: 1) over `devices`.

  devices None: all of JAX's; a TPU topology's devices compile for a slice
  this host lacks.
  """
  return jax.make_mesh(tuple(sizes.get(a, 1) for a in AXES), AXES,
                       axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def mesh_spec(mesh: Mesh) -> str:
  """The `mesh` flag of a mesh, e.g. "data:2,fsdp:2,model:2"."""
  return ",".join(f"{a}:{mesh.shape[a]}" for a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp; replicated over model."""
  return NamedSharding(mesh, P(tuple(a for a in mesh.axis_names
                                     if a in BATCH_AXES)))


def array_sharding(shape: tuple[int, ...], mesh: Mesh,
                   axes: Sequence[str | None] | None = None,
                   rules: Sequence[tuple[str, str | None]] = RULES
                   ) -> NamedSharding:
  """An array's sharding from its logical `axes` (None: unnamed) by `rules`.

  A dimension whose mesh axis does not divide it stays whole: for fsdp the
  array then falls back as an unnamed one does (its largest remaining
  dimension divisible by the fsdp size goes over fsdp; replicated when none
  is); for any other axis that is an error (`check_model_axis` says which
  sizes work before any array is placed).

  Raises:
    ValueError: a dimension named onto model (or data) that its size does
      not divide.
  """
  spec: list[str | None] = [None] * len(shape)
  if axes is not None:
    for i, axis in enumerate(partitioning.mesh_axes(axes, rules)):
      if axis is None or axis not in mesh.shape or mesh.shape[axis] == 1:
        continue
      if shape[i] % mesh.shape[axis]:
        if axis == "fsdp":
          continue
        raise ValueError(f"dimension {i} of size {shape[i]} (logical "
                         f"{axes[i]!r}) is not divisible by the mesh's "
                         f"{axis} axis of size {mesh.shape[axis]}.")
      if axis not in spec:
        spec[i] = axis
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp > 1 and "fsdp" not in spec:
    candidates = [i for i, d in enumerate(shape)
                  if spec[i] is None and d % fsdp == 0 and d > 1]
    if candidates:
      spec[max(candidates, key=lambda i: shape[i])] = "fsdp"
  return NamedSharding(mesh, P(*spec))


def _key_name(entry) -> str | None:
  for field in ("key", "name"):
    value = getattr(entry, field, None)
    if isinstance(value, str):
      return value
  return None


def _describe(path) -> tuple[str, str, str | None]:
  """(group, parameter path, factored field) of a leaf's key path.

  group: the TrainState field the leaf sits under without its _params /
  _opt_state suffix ("policy", "value"), so an optimizer state finds its
  parameter's shape; parameter path: "module/name" when the path ends in a
  Haiku params dict's two keys; the field: "v_row" / "v_col" under
  Adafactor's factored state.
  """
  names = [_key_name(entry) for entry in path]
  group = names[0] if names and isinstance(path[0],
                                           jax.tree_util.GetAttrKey) else ""
  group = group.removesuffix("_params").removesuffix("_opt_state")
  param = ""
  if len(path) >= 2 and all(isinstance(e, jax.tree_util.DictKey)
                            for e in path[-2:]) and None not in names[-2:]:
    param = f"{names[-2]}/{names[-1]}"
  field = next((n for n in names if n in _FACTORED), None)
  return group, param, field


def tree_axes(tree) -> Any:
  """The logical axes of every leaf of a pytree (None: unnamed).

  Parameters are named by their path (partitioning.logical_axes), their
  full-size optimizer states alike; Adafactor's factored statistics (a
  dimension fewer) take their parameter's axes less the dimension they
  drop, when the tree holds that parameter (a TrainState does); otherwise
  None.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return jax.tree_util.tree_unflatten(treedef, _leaf_axes(leaves))


def _leaf_axes(leaves) -> list[tuple[str | None, ...] | None]:
  """tree_axes of tree_flatten_with_path's leaves, in their order."""
  described = [(_describe(path), tuple(np.shape(x)))
               for path, x in leaves]
  shapes = {}
  for (group, param, field), shape in described:
    if param and field is None and partitioning.logical_axes(
        param, len(shape)) is not None:
      shapes.setdefault((group, param), shape)
  out = []
  for (group, param, field), shape in described:
    axes = partitioning.logical_axes(param, len(shape)) if param else None
    if field is not None and param:
      axes = None
      full = shapes.get((group, param))
      named = partitioning.logical_axes(param)
      if full is not None and named is not None and len(full) >= 2:
        dropped = optim.factored_axes(full, 1)[_FACTORED[field]]
        if full[:dropped] + full[dropped + 1:] == shape:
          axes = named[:dropped] + named[dropped + 1:]
    out.append(axes)
  return out


def tree_shardings(tree, mesh: Mesh,
                   rules: Sequence[tuple[str, str | None]] = RULES):
  """array_sharding for every leaf of a pytree (of arrays or shape structs).

  Each leaf by its logical axes (tree_axes) and `rules`.

  Raises:
    ValueError: a parameter dimension the model axis does not divide (the
      message names the parameter).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = []
  for (path, x), named in zip(leaves, _leaf_axes(leaves)):
    try:
      out.append(array_sharding(tuple(np.shape(x)), mesh, named, rules))
    except ValueError as e:
      raise ValueError(f"{jax.tree_util.keystr(path)}: {e}") from None
  return jax.tree_util.tree_unflatten(treedef, out)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  rows = int(np.prod([mesh.shape[a] for a in mesh.axis_names
                      if a in BATCH_AXES]))
  if batch_size % rows:
    raise ValueError(f"`batch_size`={batch_size} must be divisible by the "
                     f"mesh's data x fsdp devices ({rows}), over which the "
                     "batch is split.")


def check_model_axis(mesh: Mesh, configs: Sequence[tuple[str, Any]],
                     rules: Sequence[tuple[str, str | None]] = RULES
                     ) -> None:
  """Raises ValueError unless the model axis divides every dimension it
  splits (heads, kv heads, MLP width, vocabulary) of each (what, config)
  of `configs` (T5Config or DecoderConfig), naming the sizes that do."""
  partitioning.check_model_axis(mesh_spec(mesh), dict(mesh.shape), configs,
                                rules)


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
