r"""What length buckets save on a skewed-length dataset (no model involved).

  python -m benchmarks.length_buckets
  python -m benchmarks.length_buckets --rows=20000 --buckets=64,128,256

Draws prompt and completion lengths from log-normal distributions (medians
--prompt_median / --completion_median tokens, the long tails that chat
data has), caps them at --max_input_length / --max_target_length, lays the
rows out as the decoder-only trainer does (right-padded with -1) and counts,
with data.pipeline.bucket_report over one epoch of batches, the id slots
the model processes when every batch is padded to the maximum lengths and
when each is cut to its bucket (--length_buckets=b: the smallest of b, 2b,
4b, ... holding its longest row). Prints one JSON line per bucket size.
Claim: benchmarks/RESULTS.md#length-buckets.
"""

from __future__ import annotations

import json

from absl import app
from absl import flags
import numpy as np

from dro_fast.data import pipeline

_ROWS = flags.DEFINE_integer("rows", 10000, "Rows of the dataset.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_MAX_INPUT = flags.DEFINE_integer("max_input_length", 1024, "S.")
_MAX_TARGET = flags.DEFINE_integer("max_target_length", 512, "T.")
_PROMPT_MEDIAN = flags.DEFINE_float("prompt_median", 150.0,
                                    "Median prompt tokens.")
_COMPLETION_MEDIAN = flags.DEFINE_float("completion_median", 120.0,
                                        "Median completion tokens.")
_SIGMA = flags.DEFINE_float("sigma", 0.8, "Log-normal sigma of both.")
_BUCKETS = flags.DEFINE_list("buckets", ["64", "128", "256"],
                             "--length_buckets values to report.")


def skewed_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Rows of log-normal lengths in the decoder-only layout (-1 padding)."""
  def ids(median: float, cap: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.clip(np.rint(rng.lognormal(np.log(median), _SIGMA.value,
                                            _ROWS.value)), 1, cap)
    mask = np.arange(cap)[None, :] < lengths[:, None]
    return np.where(mask, 7, -1).astype(np.int32), mask

  inputs, _ = ids(_PROMPT_MEDIAN.value, _MAX_INPUT.value)
  targets, target_mask = ids(_COMPLETION_MEDIAN.value, _MAX_TARGET.value)
  return {"inputs": inputs, "targets": targets, "target_mask": target_mask,
          "rewards": np.zeros(_ROWS.value, np.float32)}


def main(argv):
  del argv
  arrays = skewed_arrays(np.random.default_rng(0))
  for bucket in (int(b) for b in _BUCKETS.value):
    report = pipeline.bucket_report(arrays, _BATCH.value, seed=0,
                                    length_buckets=bucket, pad_id=-1)
    print(json.dumps({
        "length_buckets": bucket, "rows": _ROWS.value,
        "batch_size": _BATCH.value,
        "max_lengths": [_MAX_INPUT.value, _MAX_TARGET.value],
        "medians": [_PROMPT_MEDIAN.value, _COMPLETION_MEDIAN.value],
        "real_tokens": report["tokens"],
        "slots_padded_to_max": report["padded_slots"],
        "slots_bucketed": report["bucketed_slots"],
        "saved": round(report["saved"], 4),
        "shapes": len(report["shapes"]),
        "most_frequent_shapes": report["shapes"][:4]}))


if __name__ == "__main__":
  app.run(main)
