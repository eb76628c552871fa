"""Reward normalisation to mean 0, variance 1 over the dataset (paper §4).

The statistics are fitted once on the training rewards and saved beside the
run, so that evaluation and a resumed run normalise exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json
import math
import numbers
import os
from typing import Any

import numpy as np

from dro_fast import fileio
from dro_fast.data.records import DataError


@dataclasses.dataclass(frozen=True)
class RewardStats:
  """Mean and population standard deviation of a dataset's rewards.

  Attributes:
    mean: the mean reward.
    std: the population standard deviation, > 0.
    count: how many rewards were fitted, >= 2.
    fingerprint: `rewards_fingerprint` of the fitted rewards, so that a
      workdir's statistics are not reused for other data ("" in files
      written before it was recorded: unknown).
  """
  mean: float
  std: float
  count: int
  fingerprint: str = ""

  @classmethod
  def fit(cls, rewards: Sequence[float] | np.ndarray,
          source: str) -> RewardStats:
    """Computes the statistics of `rewards` (in float64).

    Args:
      rewards: the dataset's raw rewards.
      source: where the rewards came from (e.g. the data file), for
        messages.

    Returns:
      The statistics.

    Raises:
      DataError: fewer than 2 rewards, a reward that is not finite, or all
        rewards equal (variance 0).
    """
    values = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if values.size == 0:
      raise DataError(f"{source} has no rewards to normalise. Check that "
                      "the data file holds rows.")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise DataError(
          f"reward {bad[0]} of {source} is {values[bad[0]]} ({bad.size} "
          "rewards are not finite); rewards must be finite numbers. Fix or "
          "drop those rows.")
    std = float(np.std(values))
    if values.size < 2 or std == 0.0:
      raise DataError(
          f"every reward in {source} equals {float(values[0])}: the rewards "
          "cannot be normalised to variance 1; DRO needs rewards that vary "
          f"across the dataset ({values.size} read). Check the reward field "
          "or reward mode (e.g. a 'binary' threshold that every completion "
          "passes), or use more data.")
    return cls(mean=float(np.mean(values)), std=std, count=int(values.size),
               fingerprint=rewards_fingerprint(values))

  def fitted_on(self, rewards: Sequence[float] | np.ndarray) -> bool | None:
    """Whether these are the statistics of exactly `rewards`.

    The same values in the same order; None when the fingerprint is unknown.
    """
    if not self.fingerprint:
      return None
    return self.fingerprint == rewards_fingerprint(rewards)

  def normalise(self, rewards: Sequence[float] | np.ndarray) -> np.ndarray:
    """(rewards - mean) / std, computed in float64.

    Args:
      rewards: raw rewards, any shape.

    Returns:
      The normalised rewards as float32, same shape.
    """
    values = np.asarray(rewards, dtype=np.float64)
    return ((values - self.mean) / self.std).astype(np.float32)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the statistics as JSON, atomically.

    The file is written beside `path` and moved into place, so a reader
    sees the old file or the whole new one. Missing parent directories are
    created.

    Args:
      path: the JSON file to write.
    """
    fileio.atomic_write_json(path, dataclasses.asdict(self))

  @classmethod
  def load(cls, path: str | os.PathLike, *,
           remedy: str = "Rewrite it with RewardStats.save.") -> RewardStats:
    """Reads statistics written by `save`.

    Args:
      path: the JSON file.
      remedy: what the error messages about the file's contents tell the
        reader to do (the trainer says to delete its workdir's file).

    Returns:
      The statistics.

    Raises:
      DataError: the file is missing, is not JSON, or does not hold a
        finite "mean", a finite positive "std" and an integer "count" >= 2.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise DataError(
          f"reward statistics file {path} does not exist or is not a file. "
          "Point to the file RewardStats.save wrote during training, or fit "
          "the statistics again with RewardStats.fit.")
    try:
      with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    except OSError as e:
      raise DataError(f"reward statistics file {path} cannot be read ({e})."
                      f" {remedy}") from e
    except ValueError as e:       # not JSON, or not UTF-8
      raise DataError(f"reward statistics file {path} is not valid JSON "
                      f"({e}). {remedy}") from e
    if not isinstance(stored, dict):
      raise DataError(f"reward statistics file {path} holds a JSON "
                      f"{type(stored).__name__}, not an object with mean, "
                      f"std and count. {remedy}")
    fingerprint = stored.get("fingerprint", "")
    if not isinstance(fingerprint, str):
      raise DataError(f"reward statistics file {path}: 'fingerprint' is "
                      f"{fingerprint!r}, not a string. {remedy}")
    return cls(mean=_stored_number(stored, "mean", path, remedy),
               std=_stored_number(stored, "std", path, remedy,
                                  positive=True),
               count=_stored_count(stored, path, remedy),
               fingerprint=fingerprint)


def rewards_fingerprint(rewards: Sequence[float] | np.ndarray) -> str:
  """SHA-256 (hex, first 32 digits) of the rewards as float64, in order."""
  values = np.ascontiguousarray(np.asarray(rewards, np.float64).reshape(-1))
  return hashlib.sha256(values.tobytes()).hexdigest()[:32]


def _stored_number(stored: dict[str, Any], key: str, path: str, remedy: str,
                   *, positive: bool = False) -> float:
  """stored[key] as a finite (and, if asked, positive) float."""
  value = stored.get(key)
  if (isinstance(value, bool) or not isinstance(value, numbers.Real)
      or not math.isfinite(value) or (positive and value <= 0)):
    kind = "finite positive number" if positive else "finite number"
    raise DataError(f"reward statistics file {path}: {key!r} is "
                    f"{value!r}, not a {kind}. {remedy}")
  return float(value)


def _stored_count(stored: dict[str, Any], path: str, remedy: str) -> int:
  """stored["count"] as an integer >= 2."""
  value = stored.get("count")
  if isinstance(value, bool) or not isinstance(value, int) or value < 2:
    raise DataError(f"reward statistics file {path}: 'count' is {value!r}, "
                    f"not an integer >= 2. {remedy}")
  return value
