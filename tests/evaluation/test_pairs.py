"""Tests for dro_fast.evaluation.pairs: concurrent, resumable judging.

HTTP goes only to the stub server on 127.0.0.1 (stub_judge); its request
count proves which pairs were asked.
"""

from __future__ import annotations

import json
import threading

import pytest

from dro_fast.evaluation import judges
from dro_fast.evaluation import pairs
from tests.evaluation import stub_judge
from tests.evaluation.stub_judge import SHOWN as _SHOWN

_MODEL = "stub-model"
# Ten pairs over two folds; lengths vary so that verdicts do (A, B, tie).
_PROMPTS = [f"prompt {i}" for i in range(10)]
_RESPONSES_A = ["x" * (1 + i % 4) for i in range(10)]
_RESPONSES_B = ["y" * (1 + i % 3) for i in range(10)]


def _judging(**kwargs) -> stub_judge.LengthJudging:
  return stub_judge.LengthJudging(_MODEL, **kwargs)


def _http_judge(url: str) -> judges.HttpJudge:
  return judges.HttpJudge(url, model=_MODEL, timeout_s=5.0, retries=3,
                          backoff_s=0.0)


def _judge_all(judge, path, concurrency=1, responses_a=None):
  return pairs.side_by_side(judge, _PROMPTS, responses_a or _RESPONSES_A,
                            _RESPONSES_B, path=str(path), fold_size=5,
                            concurrency=concurrency)


def _expected_score(i: int) -> float:
  a, b = _RESPONSES_A[i], _RESPONSES_B[i]
  first = 1.0 if len(a) >= len(b) else 0.0
  second = 1.0 if len(b) >= len(a) else 0.0
  return (first + 1.0 - second) / 2


def _lines(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_concurrent_verdicts_equal_sequential_ones_in_order(stub, tmp_path):
  stub.respond = flaky = _judging(flaky=True, delay_s=0.02)
  sequential = _judge_all(_http_judge(stub.url), tmp_path / "seq.jsonl")
  assert stub.max_in_flight == 1
  assert flaky.faults[500] and flaky.faults[429]  # Retried, then answered.
  stub.respond = _judging(flaky=True, delay_s=0.02)
  stub.max_in_flight = 0
  concurrent = _judge_all(_http_judge(stub.url), tmp_path / "conc.jsonl",
                          concurrency=4)
  assert 1 < stub.max_in_flight <= 4  # Pairs were asked at once, bounded.
  assert concurrent == sequential
  assert [r["score_a"] for r in sequential] == [
      _expected_score(i) for i in range(10)]
  assert {r["score_a"] for r in sequential} == {0.0, 0.5, 1.0}
  assert [r["index"] for r in concurrent] == list(range(10))
  assert [r["fold"] for r in concurrent] == [0] * 5 + [1] * 5
  # The journal ends as the rows, in index order.
  assert _lines(tmp_path / "conc.jsonl") == concurrent
  assert _lines(tmp_path / "seq.jsonl") == sequential
  # Every request named the model (a wrong one gets a 400 and fails).
  assert {r.body["model"] for r in stub.requests} == {_MODEL}


@pytest.mark.parametrize("concurrency", [1, 3])
def test_failed_run_keeps_verdicts_and_rerun_asks_only_missing(
    stub, tmp_path, concurrency):
  path = tmp_path / "pairs.jsonl"
  # Seven requests succeed: pairs 0-2 and the first order of pair 3.
  stub.respond = _judging(fail_after=7, delay_s=0.01)
  with pytest.raises(judges.JudgeError, match="HTTP 400.*quota exhausted"):
    _judge_all(_http_judge(stub.url), path, concurrency)
  kept = _lines(path)
  kept_indices = {row["index"] for row in kept}
  if concurrency == 1:
    assert [row["index"] for row in kept] == [0, 1, 2]
  assert 1 <= len(kept) <= 3
  for row in kept:
    assert row["score_a"] == _expected_score(row["index"])
  # A kill mid-write leaves a line cut short; the rerun drops it.
  with path.open("a") as f:
    f.write('{"index": 9, "fold": 1, "key": "')
  stub.respond = counter = _judging(delay_s=0.01)
  rows = _judge_all(_http_judge(stub.url), path, concurrency)
  assert counter.count == 2 * (10 - len(kept))
  asked = {_SHOWN.search(r.content).groups()
           for r in stub.requests[-counter.count:]}
  for i in kept_indices:
    assert (_RESPONSES_A[i], _RESPONSES_B[i]) not in asked
  assert [r["score_a"] for r in rows] == [_expected_score(i)
                                          for i in range(10)]
  assert _lines(path) == rows


class _CountingReward:
  """A reward judge's function that counts its calls: longer is better."""

  def __init__(self):
    self.calls = 0
    self._lock = threading.Lock()

  def __call__(self, prompt, response):
    del prompt
    with self._lock:
      self.calls += 1
    return len(response)


def test_rerun_reuses_only_verdicts_of_the_same_pair_and_judge(tmp_path):
  path = tmp_path / "pairs.jsonl"
  reward = _CountingReward()
  judge = judges.RewardJudge(reward, name="reward:counting")
  first = _judge_all(judge, path)
  assert reward.calls == 40  # 10 pairs, 2 orders, 2 responses.
  assert _judge_all(judge, path) == first
  assert reward.calls == 40  # All reused.
  # A changed response (another policy or sampling) is judged again.
  changed = list(_RESPONSES_A)
  changed[7] = "zzzzzzzz"
  rows = _judge_all(judge, path, responses_a=changed)
  assert reward.calls == 44
  assert rows[7]["response_a"] == "zzzzzzzz" and rows[7]["score_a"] == 1.0
  assert [r["key"] for r in rows[:7]] == [r["key"] for r in first[:7]]
  # Another judge reuses nothing.
  other = judges.RewardJudge(reward, name="reward:other")
  _judge_all(other, path, responses_a=changed)
  assert reward.calls == 84


def test_rows_of_an_older_format_are_judged_again(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(
      json.dumps({"prompt": p, "response_a": a, "response_b": b,
                  "score_a": 1.0, "fold": i // 5}) + "\n"
      for i, (p, a, b) in enumerate(zip(_PROMPTS, _RESPONSES_A,
                                        _RESPONSES_B))))
  reward = _CountingReward()
  rows = _judge_all(judges.RewardJudge(reward, name="reward:c"), path)
  assert reward.calls == 40
  assert [r["score_a"] for r in rows] == [_expected_score(i)
                                          for i in range(10)]


def test_side_by_side_validates_arguments(tmp_path):
  judge = judges.RewardJudge(len, name="reward:len")
  with pytest.raises(ValueError, match="concurrency"):
    _judge_all(judge, tmp_path / "p.jsonl", concurrency=0)
  with pytest.raises(ValueError, match="one each"):
    pairs.side_by_side(judge, ["p"], ["a"], [], path=str(tmp_path / "q"),
                       fold_size=1)
