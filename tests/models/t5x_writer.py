"""Writes a checkpoint in T5X's on-disk layout, independently of the loader.

checkpoint_<step>/checkpoint is a msgpack map {version, optimizer: {target,
state}} (flax.serialization's encoding: ndarray leaves as ext type 1 holding
msgpack((shape, dtype name, bytes))); large arrays are TensorStore zarr
stores in sub-directories named by their path with '/' -> '.', referenced
from the msgpack by a TensorStore spec with a path relative to the directory.
"""

from __future__ import annotations

import os

import msgpack
import numpy as np
import tensorstore as ts


def _ndarray_ext(value):
  if isinstance(value, np.ndarray):
    payload = msgpack.packb((value.shape, value.dtype.name,
                             value.tobytes("C")), use_bin_type=True)
    return msgpack.ExtType(1, payload)
  raise TypeError(f"cannot serialise {type(value)}")


def write(directory: str, flat: dict[str, np.ndarray],
          inline_below: int = 64, recorded_kvstore: str = "file",
          legacy_path: bool = False) -> None:
  """flat: "encoder/layers_0/attention/query/kernel" -> array.

  recorded_kvstore: "file", or "gcs" as in checkpoints T5X wrote to GCS
  (the arrays are still written locally). legacy_path: the spec's path
  beside its kvstore, as tensorstore < 0.1.14 wrote it.
  """
  os.makedirs(directory, exist_ok=True)
  target: dict = {}
  for path, value in flat.items():
    value = np.asarray(value)
    node = target
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    if value.size < inline_below:
      node[leaf] = value
      continue
    name = "target." + path.replace("/", ".")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": name},
            "metadata": {"shape": list(value.shape),
                         "chunks": list(value.shape),
                         "dtype": value.dtype.str, "compressor": None}}
    absolute = dict(spec, kvstore={"driver": "file",
                                   "path": os.path.join(directory, name)})
    store = ts.open(absolute, create=True).result()
    store.write(value).result()
    if recorded_kvstore == "gcs":
      spec = dict(spec, kvstore={"driver": "gcs", "bucket": "t5-data",
                                 "path": name})
    if legacy_path:
      spec = dict(spec, path=name, kvstore={
          k: v for k, v in spec["kvstore"].items() if k != "path"})
    node[leaf] = spec
  contents = {"version": 3, "optimizer": {
      "target": target, "state": {"step": np.asarray(1000, np.int32),
                                  "param_states": {}}}}
  with open(os.path.join(directory, "checkpoint"), "wb") as f:
    f.write(msgpack.packb(contents, default=_ndarray_ext, use_bin_type=True))
