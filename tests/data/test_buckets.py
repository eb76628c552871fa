"""Length buckets: batches cut to b, 2b, 4b, ... (capped) hold every row."""

import numpy as np
import pytest

from dro_fast.data import pipeline
from dro_fast.data import prepare
from dro_fast.data.config import DataConfig


def _rows(lengths, width, pad, rng):
  """[N, width] ids: row i holds lengths[i] ids >= 1, then `pad`."""
  ids = np.full((len(lengths), width), pad, np.int32)
  for row, length in enumerate(lengths):
    ids[row, :length] = rng.integers(1, 100, length)
  return ids


def _arrays(prompt_lengths, completion_lengths, s, t, pad, seed=0):
  rng = np.random.default_rng(seed)
  targets = _rows(completion_lengths, t, pad, rng)
  return {"inputs": _rows(prompt_lengths, s, pad, rng),
          "targets": targets, "target_mask": targets != pad,
          "rewards": rng.normal(size=len(prompt_lengths)).astype(np.float32)}


def test_bucket_length_doubles_from_the_bucket_up_to_the_maximum():
  assert [pipeline.bucket_length(n, 64, 512) for n in
          (0, 1, 64, 65, 128, 129, 300, 512)] == [
              64, 64, 64, 128, 128, 256, 512, 512]
  assert pipeline.bucket_length(100, 64, 100) == 100  # capped
  assert pipeline.bucket_length(10, 64, 40) == 40


@pytest.mark.parametrize("pad", [-1, 0])  # decoder and T5 layouts
def test_trim_batch_cuts_only_padding(pad):
  rng = np.random.default_rng(1)
  s_len, t_len = rng.integers(1, 40, 8), rng.integers(1, 20, 8)
  batch = _arrays(s_len, t_len, 64, 32, pad)
  batch["mismatched_targets"] = batch["targets"][::-1]
  batch["mismatched_mask"] = batch["target_mask"][::-1]
  trimmed = pipeline.trim_batch(batch, 8, pad)
  s = pipeline.bucket_length(s_len.max(), 8, 64)
  t = pipeline.bucket_length(t_len.max(), 8, 32)
  assert trimmed["inputs"].shape == (8, s)
  for key in ("targets", "target_mask", "mismatched_targets",
              "mismatched_mask"):
    assert trimmed[key].shape == (8, t)
    np.testing.assert_array_equal(trimmed[key], batch[key][:, :t])
  np.testing.assert_array_equal(trimmed["inputs"], batch["inputs"][:, :s])
  assert (batch["inputs"][:, s:] == pad).all()
  assert not batch["target_mask"][:, t:].any()
  np.testing.assert_array_equal(trimmed["rewards"], batch["rewards"])


def test_pairs_share_one_completion_length():
  rng = np.random.default_rng(2)
  chosen = _rows([3, 5], 64, -1, rng)
  rejected = _rows([20, 2], 64, -1, rng)
  batch = {"inputs": _rows([4, 9], 32, -1, rng), "chosen": chosen,
           "chosen_mask": chosen >= 0, "rejected": rejected,
           "rejected_mask": rejected >= 0}
  trimmed = pipeline.trim_batch(batch, 4, -1)
  assert trimmed["inputs"].shape == (2, 16)
  assert {trimmed[k].shape for k in ("chosen", "chosen_mask", "rejected",
                                     "rejected_mask")} == {(2, 32)}


def test_iterator_with_buckets_yields_the_same_rows_and_resumes_exactly():
  rng = np.random.default_rng(3)
  arrays = _arrays(rng.integers(1, 120, 40), rng.integers(1, 60, 40), 128,
                   64, -1)
  plain = pipeline.BatchIterator(arrays, 4, seed=7)
  bucketed = pipeline.BatchIterator(arrays, 4, seed=7, length_buckets=16,
                                    pad_id=-1)
  seen = []
  for _ in range(25):  # Across an epoch boundary.
    want, got = next(plain), next(bucketed)
    seen.append(got)
    for key, value in got.items():
      np.testing.assert_array_equal(value, want[key][:, :value.shape[1]]
                                    if value.ndim == 2 else want[key])
    assert plain.get_state() == bucketed.get_state()
  assert len({b["inputs"].shape for b in seen}) > 1
  state_at = 12
  resumed = pipeline.BatchIterator(arrays, 4, seed=7, length_buckets=16,
                                   pad_id=-1)
  replay = pipeline.BatchIterator(arrays, 4, seed=7, length_buckets=16,
                                  pad_id=-1)
  for _ in range(state_at):
    next(replay)
  resumed.set_state(replay.get_state())
  for batch in seen[state_at:]:
    got = next(resumed)
    assert got.keys() == batch.keys()
    for key in batch:
      np.testing.assert_array_equal(got[key], batch[key])
  with pytest.raises(ValueError, match="length_buckets must be >= 0"):
    pipeline.BatchIterator(arrays, 4, seed=7, length_buckets=-1)


def test_bucket_report_on_a_skewed_dataset():
  # 95% short rows, a few at the maximum: buckets save most of the padding.
  rng = np.random.default_rng(4)
  n = 200
  long_rows = rng.random(n) < 0.05
  prompts = np.where(long_rows, 512, rng.integers(5, 40, n))
  completions = np.where(long_rows, 128, rng.integers(3, 20, n))
  arrays = _arrays(prompts, completions, 512, 128, -1)
  report = pipeline.bucket_report(arrays, 8, 0, 64, -1)
  assert report["batches"] == n // 8
  assert report["padded_slots"] == report["batches"] * 8 * (512 + 128)
  kept = sorted(np.random.default_rng([0, 0]).permutation(n)[:n // 8 * 8])
  assert report["tokens"] == int(prompts[kept].sum() + completions[kept].sum())
  assert report["tokens"] <= report["bucketed_slots"] < report["padded_slots"]
  assert report["saved"] == pytest.approx(
      1 - report["bucketed_slots"] / report["padded_slots"])
  assert report["saved"] > 0.5
  shapes = report["shapes"]
  assert sum(count for *_, count in shapes) == report["batches"]
  assert {(s, t) for s, t, _ in shapes} <= {
      (s, t) for s in (64, 128, 256, 512) for t in (64, 128)}
  # Every long row forces its batch to the maximum; the rest stay at 64.
  full = sum(c for s, t, c in shapes if (s, t) == (512, 128))
  assert (64, 64) in {(s, t) for s, t, _ in shapes}
  assert 0 < full < report["batches"]


def test_length_buckets_is_a_data_setting_that_keeps_fingerprints():
  assert DataConfig().length_buckets == 0
  with pytest.raises(ValueError, match="`length_buckets` must be >= 0"):
    DataConfig(length_buckets=-1)
  arrays = _arrays([3], [2], 8, 4, 0)
  found = [prepare.fingerprints(arrays, "tok", DataConfig(length_buckets=b),
                                "dro") for b in (0, 64)]
  assert found[0] == found[1]
  assert "length_buckets" not in found[0]["settings"]
