r"""What fingerprinting a run's tokenised data costs at its start.

  python -m benchmarks.data_fingerprint [--rows=1000000] \
      [--input_length=512] [--target_length=128] [--repeats=5]

Every start hashes the tokenised rows once (data.prepare.fingerprints: the
record a workdir keeps in data_fingerprint.json, the reference cache's key
and the multi-process consistency check). Times, interleaved
(benchmarks/lib/timing.py), data.pipeline.fingerprint over --rows rows of
int32 prompt and completion ids and masks and float32 rewards against one
SHA-256 stream over the same bytes on one thread (the least a single-thread
hash costs), and reports medians, the paired ratio and GB/s. Claim:
benchmarks/RESULTS.md#data-fingerprints.
"""

from __future__ import annotations

import hashlib

from absl import app
from absl import flags
import numpy as np

from benchmarks.lib import records
from benchmarks.lib import timing
from dro_fast.data import pipeline

_ROWS = flags.DEFINE_integer("rows", 1_000_000, "Training rows.")
_INPUT = flags.DEFINE_integer("input_length", 512, "Prompt tokens S.")
_TARGET = flags.DEFINE_integer("target_length", 128, "Completion tokens T.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append a JSON record.")


def tokenised_rows(rows: int, input_length: int, target_length: int,
                   seed: int = 0) -> dict[str, np.ndarray]:
  """Arrays shaped as data.pipeline.tokenize_triplets returns them."""
  rng = np.random.default_rng(seed)
  return {
      "inputs": rng.integers(0, 32128, (rows, input_length), np.int32),
      "input_mask": np.ones((rows, input_length), np.int32),
      "targets": rng.integers(0, 32128, (rows, target_length), np.int32),
      "target_mask": np.ones((rows, target_length), np.int32),
      "rewards": rng.standard_normal(rows).astype(np.float32)}


def one_stream(arrays: dict[str, np.ndarray]) -> str:
  digest = hashlib.sha256()
  for key in sorted(arrays):
    digest.update(np.ascontiguousarray(arrays[key]).data)
  return digest.hexdigest()


def main(argv):
  del argv
  timing.quiet_backend_probe()
  arrays = tokenised_rows(_ROWS.value, _INPUT.value, _TARGET.value)
  gigabytes = sum(a.nbytes for a in arrays.values()) / 1e9
  seconds = timing.interleaved_seconds(
      {"one_stream": lambda: one_stream(arrays),
       "fingerprint": lambda: pipeline.fingerprint(arrays)},
      steps_per_round=1, rounds=_REPEATS.value, warmup=1)
  ratio, paired = timing.speedup(seconds["one_stream"],
                                 seconds["fingerprint"])
  record = dict(records.machine(), rows=_ROWS.value,
                input_length=_INPUT.value, target_length=_TARGET.value,
                gigabytes=round(gigabytes, 3),
                median_s={k: round(sorted(v)[len(v) // 2], 3)
                          for k, v in seconds.items()},
                speedup=round(ratio, 3), paired_speedup=round(paired, 3))
  for name, values in seconds.items():
    median = sorted(values)[len(values) // 2]
    print(f"{name:12s} {median:7.3f} s  {gigabytes / median:5.2f} GB/s")
  print(f"fingerprint vs one stream: {ratio:.2f}x (paired {paired:.2f}x) "
        f"over {gigabytes:.2f} GB, {_ROWS.value} rows of "
        f"{_INPUT.value} + {_TARGET.value} tokens")
  records.append(_JSON_OUT.value, [record])


if __name__ == "__main__":
  app.run(main)
