"""Reference-policy log-probabilities, computed once and cached on disk.

log π_ref(y|x) of every training example under the initial (SFT) parameters
is fixed for the whole run, so it is computed in one pass before training
and stored with TensorStore (zarr), keyed by the data's fingerprints (those
the workdir records: data.prepare.fingerprints), the parameters and the
model config. Caches of other keys in a run's own folder are removed. A later run with
the same key reads it back instead of recomputing, after checking every
array against the SHA-256 recorded beside it (a damaged cache is computed
again, never trusted). Writes go to a temporary directory that is renamed
into place, so a killed run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Mapping

from absl import logging
import numpy as np
import tensorstore as ts

from dro_fast import fileio

# Which arrays feed each cached log-prob: output name -> (targets, mask).
SINGLE = {"ref_logprobs": ("targets", "target_mask")}
KTO = dict(SINGLE, mismatched_ref_logprobs=("mismatched_targets",
                                            "mismatched_mask"))
PAIRWISE = {"chosen_ref_logprobs": ("chosen", "chosen_mask"),
            "rejected_ref_logprobs": ("rejected", "rejected_mask")}

# Written last into a cache directory: its key and, per array, the shape,
# dtype and SHA-256 of the values, checked on every read.
MANIFEST = "manifest.json"


# A cache's folder name: cache_key's digest.
_KEY = re.compile(r"[0-9a-f]{32}")


def cache_key(*fingerprints: str) -> str:
  return hashlib.sha256("|".join(fingerprints).encode()).hexdigest()[:32]


def compute(logprob_fn: Callable, params, arrays: Mapping[str, np.ndarray],
            outputs: Mapping[str, tuple[str, str]], batch_size: int
            ) -> dict[str, np.ndarray]:
  """Runs logprob_fn(params, inputs, targets, mask) over the dataset.

  The last batch is padded (by repeating the first rows) to keep one
  compiled shape; padded results are dropped.
  """
  num = len(arrays["inputs"])
  results = {name: np.zeros((num,), np.float32) for name in outputs}
  for start in range(0, num, batch_size):
    index = np.arange(start, start + batch_size) % num
    for name, (targets, mask) in outputs.items():
      values = np.asarray(logprob_fn(params, arrays["inputs"][index],
                                     arrays[targets][index],
                                     arrays[mask][index]))
      stop = min(start + batch_size, num)
      results[name][start:stop] = values[:stop - start]
  return results


def _spec(path: str) -> dict:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def _sha256(values: np.ndarray) -> str:
  """SHA-256 (hex) of the values as little-endian float32, in C order."""
  return hashlib.sha256(
      np.ascontiguousarray(values, "<f4").tobytes()).hexdigest()


def _record(values: np.ndarray) -> dict:
  """What MANIFEST records of one array."""
  return {"shape": list(values.shape), "dtype": "float32",
          "sha256": _sha256(values)}


class DamagedCacheError(Exception):
  """A cache directory whose contents disagree with its MANIFEST file.

  The message names the file and what is wrong.
  """


def _read_checked(directory: str, key: str) -> dict[str, np.ndarray]:
  """The arrays of the cache in `directory`, each checked against MANIFEST.

  Raises:
    DamagedCacheError: MANIFEST is missing, unreadable or for another key,
      or an array cannot be read or differs from it in shape, dtype or
      SHA-256 (a missing chunk reads as the fill value, so the digest is
      what catches it).
  """
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except FileNotFoundError:
    raise DamagedCacheError(f"{path} is missing") from None
  except (OSError, ValueError) as e:
    raise DamagedCacheError(f"{path} is not readable JSON ({e})") from None
  try:
    expected = {name: (tuple(entry["shape"]), entry["dtype"],
                       entry["sha256"])
                for name, entry in recorded["arrays"].items()}
    recorded_key = recorded["key"]
  except (KeyError, TypeError, AttributeError):
    raise DamagedCacheError(
        f"{path} lacks the key and each array's shape, dtype and sha256 "
        "(an edited file, or one an older version wrote)") from None
  if recorded_key != key or not expected:
    raise DamagedCacheError(f"{path} records key {recorded_key!r} and "
                            f"{len(expected)} arrays, not key {key!r}")
  results = {}
  for name, (shape, dtype, digest) in sorted(expected.items()):
    where = os.path.join(directory, name)
    try:
      store = ts.open(_spec(where)).result()
      found = (tuple(store.shape), str(store.dtype.numpy_dtype))
      if found != (shape, dtype):
        raise DamagedCacheError(
            f"{where} holds {found[1]}{list(found[0])}, {MANIFEST} records "
            f"{dtype}{list(shape)}")
      values = np.asarray(store.read().result())
    except ValueError as e:     # TensorStore: unreadable metadata or chunk
      raise DamagedCacheError(f"{where} cannot be read ({e})") from None
    if _sha256(values) != digest:
      raise DamagedCacheError(
          f"the values in {where} have SHA-256 {_sha256(values)[:16]}..., "
          f"{MANIFEST} records {str(digest)[:16]}... (a chunk was altered, "
          "truncated or removed)")
    results[name] = values
  return results


def _write(cache_dir: str, key: str, results: Mapping[str, np.ndarray]
           ) -> None:
  """Writes the arrays and MANIFEST to cache_dir/key, atomically.

  They go into a temporary directory renamed onto cache_dir/key (replacing
  a damaged cache there).
  """
  directory = os.path.join(cache_dir, key)
  os.makedirs(cache_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir)
  damaged = staging + ".damaged"
  try:
    for name, values in results.items():
      store = ts.open(_spec(os.path.join(staging, name)), create=True,
                      dtype=ts.float32, shape=values.shape).result()
      store.write(values).result()
    recorded = {"key": key, "arrays": {name: _record(values)
                                       for name, values in results.items()}}
    with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(recorded, f, indent=1, sort_keys=True)
    if os.path.lexists(directory):     # a damaged cache: move it aside
      os.replace(directory, damaged)
    os.replace(staging, directory)
  except BaseException as e:
    shutil.rmtree(staging, ignore_errors=True)
    fault = fileio.as_write_error(directory, e)   # a full disk, say
    if fault is not None:
      raise fault from e
    # Another OSError with a cache in place: a concurrent run wrote it.
    if not isinstance(e, OSError) or not os.path.isfile(
        os.path.join(directory, MANIFEST)):
      raise
  finally:
    shutil.rmtree(damaged, ignore_errors=True)


def load_or_compute(cache_dir: str, key: str,
                    compute_fn: Callable[[], dict[str, np.ndarray]],
                    remove_stale: bool = False) -> dict[str, np.ndarray]:
  """Reads cache_dir/key if present and intact, else computes and stores.

  A cache whose arrays disagree with its MANIFEST file (a truncated,
  altered or removed chunk, another shape or dtype, a missing or garbled
  MANIFEST) is reported in one warning line naming the file and what was
  wrong, computed again and replaced.

  Args:
    cache_dir: the folder of caches (<workdir>/ref_cache by default).
    key: the cache's fingerprint (cache_key of its inputs).
    compute_fn: returns the float32 arrays by name, called only when the
      cache is absent or damaged.
    remove_stale: delete the caches of other keys in `cache_dir` (a run's
      own folder); otherwise they are listed in one log line.

  Returns:
    The arrays by name, float32.
  """
  directory = os.path.join(cache_dir, key)
  results = None
  if os.path.lexists(directory):
    try:
      results = _read_checked(directory, key)
    except DamagedCacheError as e:
      logging.warning("Reference log-probs: the cache %s is damaged (%s); "
                      "computing it again.", directory,
                      str(e).replace("\n", " "))
    else:
      logging.info("Reference log-probs: reusing cache %s", directory)
  if results is None:
    results = {name: np.asarray(values, np.float32)
               for name, values in compute_fn().items()}
    _write(cache_dir, key, results)
    logging.info("Reference log-probs: cached in %s", directory)
  _stale_caches(cache_dir, key, remove_stale)
  return results


def _stale_caches(cache_dir: str, key: str, remove: bool) -> None:
  """Removes (or lists) the caches in `cache_dir` other than `key`'s."""
  stale = sorted(name for name in os.listdir(cache_dir)
                 if name != key and _KEY.fullmatch(name)
                 and os.path.isdir(os.path.join(cache_dir, name)))
  if not stale:
    return
  if not remove:
    logging.info("Reference log-probs: %s also holds the caches %s of "
                 "other data, parameters or models.", cache_dir, stale)
    return
  for name in stale:
    shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
  logging.warning("Reference log-probs: removed %d stale caches from %s "
                  "(keys %s).", len(stale), cache_dir, stale)
