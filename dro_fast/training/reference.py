"""Reference-policy log-probabilities, computed once and cached on disk.

log π_ref(y|x) of every training example under the initial (SFT) parameters
is fixed for the whole run, so it is computed in one pass before training
and stored with TensorStore (zarr), keyed by a fingerprint of the data
arrays, the tokenizer, the parameters and the model config. A later run with
the same key reads it back instead of recomputing. Writes go to a temporary
directory that is renamed into place, so a killed run never leaves a
half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Mapping

from absl import logging
import numpy as np
import tensorstore as ts

# Which arrays feed each cached log-prob: output name -> (targets, mask).
SINGLE = {"ref_logprobs": ("targets", "target_mask")}
KTO = dict(SINGLE, mismatched_ref_logprobs=("mismatched_targets",
                                            "mismatched_mask"))
PAIRWISE = {"chosen_ref_logprobs": ("chosen", "chosen_mask"),
            "rejected_ref_logprobs": ("rejected", "rejected_mask")}


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


def load_or_compute(cache_dir: str, key: str,
                    compute_fn: Callable[[], dict[str, np.ndarray]]
                    ) -> dict[str, np.ndarray]:
  """Reads cache_dir/key if present, else computes, stores and returns."""
  directory = os.path.join(cache_dir, key)
  manifest = os.path.join(directory, "manifest.json")
  if os.path.isfile(manifest):
    with open(manifest) as f:
      names = json.load(f)["arrays"]
    logging.info("Reference log-probs: reusing cache %s", directory)
    return {name: np.asarray(ts.open(_spec(os.path.join(directory, name))
                                     ).result().read().result())
            for name in names}
  results = compute_fn()
  os.makedirs(cache_dir, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir)
  try:
    for name, values in results.items():
      store = ts.open(_spec(os.path.join(staging, name)), create=True,
                      dtype=ts.float32, shape=values.shape).result()
      store.write(values).result()
    with open(os.path.join(staging, "manifest.json"), "w") as f:
      json.dump({"arrays": sorted(results)}, f)
    os.replace(staging, directory)
  except OSError:
    shutil.rmtree(staging, ignore_errors=True)
    if not os.path.isfile(manifest):       # not written by a concurrent run
      raise
  logging.info("Reference log-probs: cached in %s", directory)
  return results
