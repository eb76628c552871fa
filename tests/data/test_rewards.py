"""Tests for dro_fast.data.rewards.RewardStats."""

import json
import os
import re

import numpy as np
import pytest

from dro_fast import data

_REWARDS = [1.0, 2.0, 3.0, 6.0, -0.5]


def test_fit_matches_numpy():
  stats = data.RewardStats.fit(_REWARDS, "train.jsonl")
  assert (stats.mean, stats.std, stats.count) == (
      float(np.mean(_REWARDS)), float(np.std(_REWARDS)), 5)
  assert stats.fitted_on(_REWARDS)


def test_normalise_gives_mean_0_variance_1():
  rewards = np.random.default_rng(0).gamma(2.0, 3.0, size=101) + 7.0
  stats = data.RewardStats.fit(rewards, "train.jsonl")
  normalised = stats.normalise(rewards)
  assert normalised.dtype == np.float32
  assert normalised.shape == (101,)
  np.testing.assert_allclose(np.mean(normalised, dtype=np.float64), 0.0,
                             atol=1e-6)
  np.testing.assert_allclose(np.var(normalised, dtype=np.float64), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(normalised, (rewards - rewards.mean())
                             / rewards.std(), rtol=1e-6)


@pytest.mark.parametrize("rewards", [[2.0, 2.0, 2.0], [2.0]])
def test_zero_variance_is_an_error(rewards):
  with pytest.raises(data.DataError,
                     match=r"every reward in uf\.jsonl equals 2\.0: the "
                     "rewards cannot be normalised to variance 1"):
    data.RewardStats.fit(rewards, "uf.jsonl")


def test_no_rewards_or_non_finite_rewards():
  with pytest.raises(data.DataError, match=r"x\.jsonl has no rewards"):
    data.RewardStats.fit([], "x.jsonl")
  with pytest.raises(data.DataError,
                     match=r"reward 1 of x\.jsonl is nan \(2 rewards"):
    data.RewardStats.fit([1.0, np.nan, np.inf], "x.jsonl")


def test_save_load_round_trip(tmp_path):
  stats = data.RewardStats.fit(np.linspace(-1.3, 7.1, 13) ** 2, "train")
  path = tmp_path / "run" / "reward_stats.json"
  stats.save(path)
  assert data.RewardStats.load(path) == stats
  assert os.listdir(path.parent) == ["reward_stats.json"]
  assert json.loads(path.read_text()) == {
      "mean": stats.mean, "std": stats.std, "count": 13,
      "fingerprint": stats.fingerprint}
  newer = data.RewardStats(mean=1.0, std=2.0, count=4)
  newer.save(path)
  assert data.RewardStats.load(path) == newer
  assert os.listdir(path.parent) == ["reward_stats.json"]


def test_load_errors_name_the_file(tmp_path):
  missing = tmp_path / "absent.json"
  with pytest.raises(data.DataError,
                     match=re.escape(f"{missing} does not exist")):
    data.RewardStats.load(missing)
  broken = tmp_path / "broken.json"
  broken.write_text("{mean: 1")
  with pytest.raises(data.DataError,
                     match=re.escape(f"{broken} is not valid JSON")):
    data.RewardStats.load(broken)
  zero_std = tmp_path / "zero.json"
  zero_std.write_text(json.dumps({"mean": 1.0, "std": 0.0, "count": 3}))
  with pytest.raises(data.DataError,
                     match=re.escape(f"{zero_std}: 'std' is 0.0, not a finite "
                                     "positive number")):
    data.RewardStats.load(zero_std)
  no_count = tmp_path / "no_count.json"
  no_count.write_text(json.dumps({"mean": 1.0, "std": 1.0}))
  with pytest.raises(data.DataError, match=r"'count' is None"):
    data.RewardStats.load(no_count)


def test_statistics_know_which_rewards_they_were_fitted_on(tmp_path):
  rewards = np.linspace(-1.3, 7.1, 13) ** 2
  stats = data.RewardStats.fit(rewards, "train")
  assert stats.fitted_on(rewards) is True
  assert stats.fitted_on(list(rewards)) is True
  assert stats.fitted_on(rewards[::-1]) is False       # same values, reordered
  changed = rewards.copy()
  changed[4] += 1e-9
  assert stats.fitted_on(changed) is False
  assert stats.fitted_on(rewards[:-1]) is False
  # A file written before fingerprints were recorded: unknown, not a match.
  path = tmp_path / "reward_stats.json"
  path.write_text(json.dumps({"mean": 1.0, "std": 2.0, "count": 4}))
  legacy = data.RewardStats.load(path)
  assert legacy.fingerprint == "" and legacy.fitted_on(rewards) is None


def test_load_rejects_a_fingerprint_that_is_not_a_string(tmp_path):
  path = tmp_path / "reward_stats.json"
  path.write_text(json.dumps({"mean": 1.0, "std": 2.0, "count": 4,
                              "fingerprint": 7}))
  with pytest.raises(data.DataError, match="'fingerprint' is 7, not a string"):
    data.RewardStats.load(path)
