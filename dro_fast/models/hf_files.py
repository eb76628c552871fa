"""Writing Hugging Face model folders: safetensors shards, whole or not at all.

What transformers' from_pretrained reads, written by dro_fast's exporters
(models.hf_t5, models.hf_decoder):

- write_safetensors_shards: tensors in as few files as `max_shard_bytes`
  allows, in the names save_pretrained gives them: one file
  `model.safetensors`, or `model-0000k-of-0000n.safetensors` with the index
  `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map":
  {tensor: file}}).
- staged_directory: a folder that appears whole or not at all. Everything is
  written into a temporary folder beside it, renamed into place when the
  body ends without an error and removed when it raises; an existing
  non-empty folder is refused (ExportError) unless `overwrite`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Mapping

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ExportError(ValueError):
  """An export that cannot be written as asked; the message says why."""


def shard_name(k: int, n: int) -> str:
  """save_pretrained's name of shard k (1-based) of n."""
  return f"model-{k:05d}-of-{n:05d}.safetensors"


def _plan_shards(tensors: Mapping[str, np.ndarray],
                 max_shard_bytes: int) -> list[list[str]]:
  """Tensor names in order, cut where a shard would pass max_shard_bytes.

  A tensor larger than the limit gets a shard of its own (a tensor is never
  split, as in save_pretrained).
  """
  shards: list[list[str]] = [[]]
  size = 0
  for name, array in tensors.items():
    nbytes = array.nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def write_safetensors_shards(tensors: Mapping[str, np.ndarray],
                             out_dir: str | os.PathLike,
                             max_shard_bytes: int = 2**30) -> dict:
  """Writes `tensors` as save_pretrained does; returns the index.

  Args:
    tensors: HF tensor name -> array, in the order the shards take them;
      each array is written in its own dtype (ml_dtypes.bfloat16 included).
    out_dir: an existing folder (e.g. staged_directory's); files of the same
      names are replaced.
    max_shard_bytes: the most bytes of tensor data in one shard.

  Returns:
    {"metadata": {"total_size": bytes}, "weight_map": {name: file}}: what
    model.safetensors.index.json holds, also where one file holds every
    tensor (then no index file is written, as save_pretrained does).

  Raises:
    ExportError: max_shard_bytes < 1 or no tensors.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if max_shard_bytes < 1:
    raise ExportError(f"`max_shard_bytes` must be >= 1, got "
                      f"{max_shard_bytes}.")
  if not tensors:
    raise ExportError("no tensors to write.")
  out_dir = os.fspath(out_dir)
  shards = _plan_shards(tensors, max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [shard_name(k + 1, len(shards)) for k in range(len(shards))])
  weight_map = {}
  for file, members in zip(names, shards):
    # transformers refuses a safetensors file whose metadata lacks "format".
    safetensors.numpy.save_file(
        {name: np.ascontiguousarray(tensors[name]) for name in members},
        os.path.join(out_dir, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in members})
  index = {"metadata": {"total_size": int(sum(a.nbytes
                                               for a in tensors.values()))},
           "weight_map": weight_map}
  if len(shards) > 1:
    write_json(os.path.join(out_dir, INDEX_FILE), index)
  return index


def write_json(path: str | os.PathLike, obj) -> None:
  """JSON as transformers writes its files: indented, sorted, a newline."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
  """Refuses a non-empty folder (unless overwrite) or a file at `out_dir`."""
  out_dir = os.fspath(out_dir)
  if os.path.isdir(out_dir):
    if os.listdir(out_dir) and not overwrite:
      raise ExportError(
          f"{out_dir} exists and is not empty; name a new folder, or set "
          "`overwrite` to replace it.")
  elif os.path.lexists(out_dir):
    raise ExportError(f"{out_dir} is a file, not a folder; name a new "
                      "folder.")


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike,
                     overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary folder that becomes `out_dir` when the body ends.

  The temporary folder is a sibling of `out_dir` (same file system, so the
  final rename is atomic). When the body raises, it is removed and
  `out_dir` is left as it was. With `overwrite`, an existing `out_dir` is
  moved aside, replaced, then deleted.

  Raises:
    ExportError: `out_dir` is a non-empty folder and not `overwrite`, or a
      file.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  check_out_dir(out_dir, overwrite)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent,
                             prefix=f".{os.path.basename(out_dir)}.partial-")
  try:
    yield staging
    os.chmod(staging, 0o777 & ~_umask())    # mkdtemp makes it 0o700
    if os.path.isdir(out_dir) and os.listdir(out_dir):
      # rename(2) replaces an empty folder only: move the old one aside.
      old = tempfile.mkdtemp(dir=parent,
                             prefix=f".{os.path.basename(out_dir)}.old-")
      os.replace(out_dir, os.path.join(old, "dir"))
      try:
        os.replace(staging, out_dir)
      except BaseException:
        os.replace(os.path.join(old, "dir"), out_dir)
        os.rmdir(old)
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask
