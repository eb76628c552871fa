"""Reading OpenBMB UltraFeedback rows (Cui et al. 2023) as triplets.

One triplet per completion, the reward taken from the completion's
annotations (see read_ultrafeedback). Files, bad rows and DataError messages
follow dro_fast.data.rows; a triplet's `source` is "path:number#k" for
completion k (from 0) of the row.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from typing import Any, Callable

from dro_fast.data.config import ULTRAFEEDBACK_ASPECTS
from dro_fast.data.config import ULTRAFEEDBACK_REWARDS
from dro_fast.data.fields import number_field
from dro_fast.data.fields import text_field
from dro_fast.data.records import Triplet
from dro_fast.data.rows import a_json_type
from dro_fast.data.rows import BadValue
from dro_fast.data.rows import Location
from dro_fast.data.rows import RowReader

_NOT_APPLICABLE = "N/A"
_NOT_ULTRAFEEDBACK = ("is this an UltraFeedback file? Read other triplet data "
                      "with read_triplets (the trainer's "
                      "`data_format`=triplets)")


def _aspect_rating(annotations: dict[str, Any], aspect: str,
                   prefix: str) -> float | None:
  """One aspect's "Rating" as a float; None when "N/A", null or absent.

  Raises:
    BadValue: the aspect is not an object, or its rating is neither a
      number nor "N/A".
  """
  field = f"{prefix}.annotations.{aspect}"
  annotation = annotations.get(aspect)
  if annotation is None:
    return None
  if not isinstance(annotation, dict):
    raise BadValue(field, "annotation not an object",
                   f"is {a_json_type(annotation)}, not an object with a "
                   "'Rating'")
  rating = annotation.get("Rating")
  if rating is None or (isinstance(rating, str)
                        and rating.strip().upper() == _NOT_APPLICABLE):
    return None
  field += ".Rating"
  if isinstance(rating, str):
    try:
      value = float(rating)
    except ValueError:
      raise BadValue(field, "rating not a number",
                     f"is {rating!r}, neither a number nor "
                     f"{_NOT_APPLICABLE!r}") from None
  elif isinstance(rating, numbers.Real) and not isinstance(rating, bool):
    value = float(rating)
  else:
    raise BadValue(field, "rating not a number",
                   f"is {a_json_type(rating)}, neither a number nor "
                   f"{_NOT_APPLICABLE!r}")
  if not math.isfinite(value):
    raise BadValue(field, "rating not finite",
                   f"is {rating!r}; it must be a finite number")
  return value


def _completion_reward(completion: dict[str, Any], prefix: str, reward: str,
                       threshold: float | None) -> float:
  """The reward of one UltraFeedback completion (see read_ultrafeedback)."""
  if reward == "overall_score":
    return number_field(completion, "overall_score",
                        field=f"{prefix}.overall_score")
  annotations = completion.get("annotations")
  if not isinstance(annotations, dict):
    raise BadValue(f"{prefix}.annotations", "annotations not an object",
                   f"is {a_json_type(annotations)}, not an object of "
                   "aspect ratings")
  if reward in ULTRAFEEDBACK_ASPECTS:
    rating = _aspect_rating(annotations, reward, prefix)
    if rating is None:
      raise BadValue(f"{prefix}.annotations.{reward}.Rating",
                     f"{reward} rating N/A",
                     f"is {_NOT_APPLICABLE!r} or absent, so the "
                     f"{reward} reward is undefined")
    return rating
  ratings = [_aspect_rating(annotations, aspect, prefix)
             for aspect in ULTRAFEEDBACK_ASPECTS]
  numeric = [rating for rating in ratings if rating is not None]
  if not numeric:
    raise BadValue(f"{prefix}.annotations", "no numeric rating",
                   "has no numeric aspect 'Rating' (all of "
                   f"{', '.join(ULTRAFEEDBACK_ASPECTS)} are "
                   f"{_NOT_APPLICABLE!r} or absent)")
  mean = sum(numeric) / len(numeric)
  if reward == "binary":
    return 1.0 if mean >= threshold else 0.0
  return mean


def read_ultrafeedback(path: str | os.PathLike, *,
                       reward: str = "mean_rating",
                       threshold: float | None = None,
                       skip_bad_rows: bool = False) -> list[Triplet]:
  """Reads OpenBMB UltraFeedback rows as one triplet per completion.

  Each row holds an "instruction" (the prompt) and "completions", each with
  a "response" (the completion) and "annotations" of four aspects
  (instruction_following, honesty, truthfulness, helpfulness) whose
  "Rating" is a string: a number or "N/A".

  Args:
    path: a .jsonl/.json (one object per line) or .parquet file.
    reward: how a completion's reward is computed:
      "mean_rating" (default, the paper's and the safer choice): the mean of
        the aspect ratings that are numbers, "N/A" and absent ones ignored;
      "overall_score": the completion's "overall_score" (some are wrong in
        the released data);
      an aspect name, e.g. "helpfulness": that aspect's rating;
      "binary": 1.0 if the mean rating is >= `threshold`, else 0.0.
    threshold: the mean rating at or above which a completion is good;
      required by, and only allowed with, reward="binary".
    skip_bad_rows: drop bad rows and bad completions, logging one warning
      with counts per reason, instead of raising on the first.

  Returns:
    The triplets in file order, each completion's `source` being
    "path:number#k" for completion k (from 0) of the row.

  Raises:
    ValueError: `reward` is unknown, or `threshold` is missing for
      reward="binary", given for another mode, or not a finite number.
    DataError: as records.read_triplets; a completion whose reward is
      undefined (e.g. every rating "N/A") is bad.
  """
  if reward not in ULTRAFEEDBACK_REWARDS:
    raise ValueError(f"reward={reward!r} is not an UltraFeedback reward; "
                     f"choose one of {', '.join(ULTRAFEEDBACK_REWARDS)}.")
  if reward == "binary":
    if threshold is None:
      raise ValueError(
          "reward='binary' needs threshold=<mean rating>: completions whose "
          "mean aspect rating is >= threshold get reward 1.0, the others "
          "0.0 (ratings run from 1 to 5).")
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
        or not math.isfinite(threshold)):
      raise ValueError(f"threshold must be a finite number, got "
                       f"{threshold!r}.")
  elif threshold is not None:
    raise ValueError(f"threshold={threshold!r} applies only to "
                     f"reward='binary', not reward={reward!r}; drop it or "
                     "use reward='binary'.")
  reader = RowReader(
      path, ("instruction", "completions"), skip_bad_rows,
      "UltraFeedback rows need 'instruction' and 'completions'; "
      f"{_NOT_ULTRAFEEDBACK}.")
  return reader.read(functools.partial(
      _row_triplets, reject=reader.reject, reward=reward,
      threshold=threshold))


def _row_triplets(row: dict[str, Any], location: Location, *,
                  reject: Callable[[Location, BadValue], None],
                  reward: str, threshold: float | None) -> list[Triplet]:
  """The triplets of one row's good completions; `reject`s the bad ones.

  Raises:
    BadValue: the row has no instruction or no list of completions.
  """
  instruction = text_field(row, "instruction", hint=_NOT_ULTRAFEEDBACK)
  completions = row.get("completions")
  if not isinstance(completions, (list, tuple)):
    raise BadValue("completions", "completions not a list",
                   f"is {a_json_type(completions)}, not a list of "
                   "completions")
  triplets = []
  for index, completion in enumerate(completions):
    at = dataclasses.replace(location, completion=index)
    prefix = f"completions[{index}]"
    try:
      if not isinstance(completion, dict):
        raise BadValue(prefix, "completion not an object",
                       f"is {a_json_type(completion)}, not an object")
      response = text_field(completion, "response",
                            field=f"{prefix}.response")
      value = _completion_reward(completion, prefix, reward, threshold)
    except BadValue as bad:
      reject(at, bad)
      continue
    triplets.append(Triplet(instruction, response, value, at.source))
  return triplets
