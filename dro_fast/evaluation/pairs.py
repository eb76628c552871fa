"""Judging every pair of responses: concurrently, and resumably.

`side_by_side` judges each (prompt, response_a, response_b) with the
positions swapped (`judges.judge_swapped`), `concurrency` pairs at a time,
and appends each verdict to a JSON Lines journal (pairs.jsonl) as it
arrives, flushed, so that a run stopped partway (a judge that keeps
failing, a kill) keeps every verdict it got. A rerun reads the journal and
asks the judge only for the pairs it lacks.

A verdict is reused only for the same pair: its row's index, fold and key
must match, where the key hashes the judge's name, the prompt and both
responses; a changed prompt set, policy, sampling or judge re-asks. Rows
that do not match, and a last line cut short by a kill, are dropped when
the journal is rewritten at the start. When every pair is judged the
journal is rewritten atomically in index order; the order and the scores
never depend on the order in which concurrent verdicts arrive.

Row fields: index (position in the prompt list), fold (index //
fold_size), key, prompt, response_a, response_b, score_a (the score of
response_a in [0, 1]; 0.5 a tie).
"""

from __future__ import annotations

from collections.abc import Sequence
import concurrent.futures
import hashlib
import json
import math

from absl import logging
from tqdm import tqdm

from dro_fast import fileio
from dro_fast.evaluation import judges

PAIRS_FILE = "pairs.jsonl"


def pair_key(judge_name: str, prompt: str, response_a: str,
             response_b: str) -> str:
  """A hash of what a verdict depends on: the judge, prompt and responses."""
  text = json.dumps([judge_name, prompt, response_a, response_b])
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _row(index: int, fold_size: int, key: str, prompt: str, response_a: str,
         response_b: str, score_a: float) -> dict:
  return {"index": index, "fold": index // fold_size, "key": key,
          "prompt": prompt, "response_a": response_a,
          "response_b": response_b, "score_a": score_a}


def read_verdicts(path: str, keys: Sequence[str],
                  fold_size: int) -> tuple[dict[int, dict], int]:
  """The journal's verdicts that still hold, by index.

  Args:
    path: the journal; a missing file holds no verdicts.
    keys: keys[i] is the `pair_key` of pair i now.
    fold_size: pairs per fold.

  Returns:
    (verdicts, dropped): index -> row for every row whose index, fold and
    key match and whose score is in [0, 1]; and how many non-empty lines
    were not reused (stale, malformed, or a line cut short).
  """
  verdicts, dropped = {}, 0
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = f.readlines()
  except FileNotFoundError:
    return verdicts, dropped
  for line in lines:
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      index, score = row["index"], row["score_a"]
      valid = (isinstance(index, int) and 0 <= index < len(keys) and
               row["key"] == keys[index] and
               row["fold"] == index // fold_size and
               isinstance(score, (int, float)) and math.isfinite(score) and
               0.0 <= score <= 1.0)
    except (ValueError, KeyError, TypeError):
      valid = False
    if valid:
      verdicts[index] = row
    else:
      dropped += 1
  return verdicts, dropped


def side_by_side(judge: judges.Judge, prompts: Sequence[str],
                 responses_a: Sequence[str], responses_b: Sequence[str], *,
                 path: str, fold_size: int, concurrency: int = 1
                 ) -> list[dict]:
  """Judges every pair, resuming from and appending to the journal at path.

  Args:
    judge: the judge; with concurrency > 1 it is called from several
      threads at once.
    prompts: the prompts, in order.
    responses_a: policy A's response to each prompt.
    responses_b: policy B's response to each prompt.
    path: the journal (pairs.jsonl); its directory must exist.
    fold_size: pairs per fold (a row's fold is index // fold_size).
    concurrency: pairs judged at once, >= 1.

  Returns:
    One row per prompt, in prompt order (the module docstring lists the
    fields); the journal then holds exactly these rows, in this order.

  Raises:
    ValueError: concurrency < 1, or sequences of different lengths.
    judges.JudgeError: the judge failed on a pair (the first failure is
      re-raised, whatever its type). Pairs already asked are finished and
      kept in the journal; no new pair is started.
  """
  if concurrency < 1:
    raise ValueError(f"concurrency must be >= 1, got {concurrency}.")
  if not len(prompts) == len(responses_a) == len(responses_b):
    raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} and "
                     f"{len(responses_b)} responses; need one each.")
  keys = [pair_key(judge.name, *pair)
          for pair in zip(prompts, responses_a, responses_b)]
  verdicts, dropped = read_verdicts(path, keys, fold_size)
  if verdicts or dropped:
    logging.warning("%s: reusing %d verdicts, %d pairs left to judge%s.",
                    path, len(verdicts), len(keys) - len(verdicts),
                    f"; dropped {dropped} stale or malformed lines"
                    if dropped else "")
  # Starts the journal over with the verdicts kept: a line cut short by a
  # kill is gone, and no appended line can run into it.
  fileio.atomic_write_lines(path, [verdicts[i] for i in sorted(verdicts)])
  missing = iter([i for i in range(len(keys)) if i not in verdicts])
  error = None
  with (open(path, "a", encoding="utf-8") as journal,
        concurrent.futures.ThreadPoolExecutor(
            concurrency, thread_name_prefix="judge") as pool,
        tqdm(total=len(keys), initial=len(verdicts), desc="judge",
             disable=None, leave=False) as progress):
    in_flight = {}

    def start_next():
      index = next(missing, None)
      if index is not None:
        future = pool.submit(judges.judge_swapped, judge, prompts[index],
                             responses_a[index], responses_b[index])
        in_flight[future] = index

    for _ in range(concurrency):
      start_next()
    # At most `concurrency` pairs are in flight; after a failure none is
    # started, and those in flight are awaited and kept.
    while in_flight:
      finished, _ = concurrent.futures.wait(
          in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in finished:
        index = in_flight.pop(future)
        try:
          score = future.result()
        except Exception as err:  # pylint: disable=broad-except
          error = error or err
          continue
        row = _row(index, fold_size, keys[index], prompts[index],
                   responses_a[index], responses_b[index], score)
        journal.write(json.dumps(row) + "\n")
        journal.flush()
        verdicts[index] = row
        progress.update()
        if error is None:
          start_next()
  if error is not None:
    logging.warning("%s keeps %d of %d verdicts; rerun to judge the rest.",
                    path, len(verdicts), len(keys))
    raise error
  rows = [verdicts[i] for i in range(len(keys))]
  fileio.atomic_write_lines(path, rows)
  return rows
