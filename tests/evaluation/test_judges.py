"""Tests for dro_fast.evaluation.judges; HTTP only to a stub server on 127.0.0.1."""

from __future__ import annotations

import email.utils
import math
import os
import socket
import sys
import time
import traceback

import pytest

from dro_fast.evaluation import judges
from dro_fast.data import synthetic
from tests.evaluation import conftest
from tests.evaluation.stub_judge import Reply as _Reply
from tests.evaluation.stub_judge import answer as _answer

_KEY_ENV = conftest.KEY_ENV
_SECRET = "sk-test-7f3a9c1e"
_MODEL = "test-judge-model"


def _fast_judge(url: str, **kwargs) -> judges.HttpJudge:
  options = dict(model=_MODEL, timeout_s=2.0, retries=2, backoff_s=0.01)
  options.update(kwargs)
  return judges.HttpJudge(url, **options)


def _closed_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


# RewardJudge and make_judge("reward:...").


def test_reward_judge_prefers_higher_reward_and_ties_equal():
  judge = judges.RewardJudge(lambda prompt, response: len(response))
  assert judge.judge("p", "long answer", "short") == 1.0
  assert judge.judge("p", "short", "long answer") == 0.0
  assert judge.judge("p", "same", "size") == 0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_reward_judge_rejects_non_finite_reward(bad):
  def nonfinite_reward(prompt, response):
    del prompt
    return bad if response == "bad" else 0.0

  judge = judges.RewardJudge(nonfinite_reward)
  with pytest.raises(judges.JudgeError, match="nonfinite_reward.*finite"):
    judge.judge("p", "good", "bad")


def test_reward_judge_wraps_exceptions_naming_the_function():
  def broken_reward(prompt, response):
    raise KeyError(prompt + response)

  with pytest.raises(judges.JudgeError, match="broken_reward.*KeyError"):
    judges.RewardJudge(broken_reward).judge("p", "a", "b")


def test_make_judge_reward_uses_synthetic_reward():
  judge = judges.make_judge("reward:dro_fast.data.synthetic:reward")
  assert isinstance(judge, judges.RewardJudge)
  assert judge.name == "reward:dro_fast.data.synthetic:reward"
  prompt = "repeat: fox red"
  assert synthetic.reward(prompt, "fox red") > synthetic.reward(prompt,
                                                                "owl cat")
  assert judge.judge(prompt, "fox red", "owl cat") == 1.0
  assert judge.judge(prompt, "owl cat", "fox red") == 0.0
  assert judge.judge(prompt, "fox red", "red fox") == 0.5


@pytest.mark.parametrize("spec, message", [
    ("reward:no_such_module_for_judges:f", "no module named"),
    ("reward:dro_fast.data.synthetic:no_such_function", "has no"),
    ("reward:dro_fast.data.synthetic:WORDS", "not callable"),
    ("reward:dro_fast.data.synthetic", "needs a module or file and a "
     "function"),
    ("reward:", "unknown judge spec"),
    ("http:", "unknown judge spec"),
    ("gpt4", "reward:MODULE:FUNCTION.*http:URL"),
    ("", "unknown judge spec"),
])
def test_make_judge_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    judges.make_judge(spec)


_JUDGE_SOURCE = """
import dataclasses

@dataclasses.dataclass
class Verdict:    # needs its module in sys.modules
  words: int

def score(prompt, response):
  return Verdict(len(response.split())).words

LIMIT = 3
"""


def test_make_judge_reward_from_a_file_relative_or_absolute(tmp_path,
                                                            monkeypatch):
  (tmp_path / "judges").mkdir()
  path = tmp_path / "judges" / "json.py"   # named like the standard module
  path.write_text(_JUDGE_SOURCE)
  monkeypatch.chdir(tmp_path)
  relative = judges.make_judge("reward:judges/json.py:score")
  absolute = judges.make_judge(f"reward:{path}:score")
  # Named by the absolute path, so that pairs.jsonl keys name the file.
  assert relative.name == absolute.name == f"reward:{path}:score"
  assert relative.judge("p", "two words", "one") == 1.0
  import json  # pylint: disable=g-import-not-at-top
  assert sys.modules["json"] is json and hasattr(json, "dumps")


def test_make_judge_reward_finds_a_module_in_the_current_directory(
    tmp_path, monkeypatch):
  (tmp_path / "cwd_judge_for_tests.py").write_text(_JUDGE_SOURCE)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (
      "", os.curdir, str(tmp_path))])
  monkeypatch.delitem(sys.modules, "cwd_judge_for_tests", raising=False)
  path_before = list(sys.path)
  judge = judges.make_judge("reward:cwd_judge_for_tests:score")
  assert judge.name == "reward:cwd_judge_for_tests:score"
  assert judge.judge("p", "a", "b c") == 0.0
  assert sys.path == path_before   # the directory was searched, not added
  monkeypatch.delitem(sys.modules, "cwd_judge_for_tests")


@pytest.mark.parametrize("source, spec, error, message", [
    (None, "reward:absent.py:score", ValueError, r"no file .*absent\.py"),
    (_JUDGE_SOURCE, "reward:j.py:reward", ValueError,
     r"j\.py has no 'reward'"),
    (_JUDGE_SOURCE, "reward:j.py:LIMIT", ValueError,
     r"LIMIT in .*j\.py is not callable \(type int\)"),
    ("def score(:\n", "reward:j.py:score", judges.JudgeError,
     r"importing .*j\.py failed: SyntaxError"),
    ("import no_such_module_for_judges\n", "reward:j.py:score",
     judges.JudgeError, r"importing .*j\.py failed: ModuleNotFoundError"),
    ("raise RuntimeError('no GPU')\n", "reward:j.py:score",
     judges.JudgeError, r"importing .*j\.py failed: RuntimeError: no GPU"),
    ("import no_such_module_for_judges\n", "reward:j:score",
     judges.JudgeError, "importing j failed: No module named "
     "'no_such_module_for_judges'"),
])
def test_make_judge_reward_file_and_module_errors_in_one_line(
    tmp_path, monkeypatch, source, spec, error, message):
  if source is not None:
    (tmp_path / "j.py").write_text(source)
  monkeypatch.chdir(tmp_path)
  monkeypatch.delitem(sys.modules, "j", raising=False)
  with pytest.raises(error, match=message) as raised:
    judges.make_judge(spec)
  assert "\n" not in str(raised.value)
  monkeypatch.delitem(sys.modules, "j", raising=False)


# build_prompt and HttpJudge.


def test_build_prompt_follows_the_paper():
  prompt = judges.build_prompt("summarise X", "first reply", "second reply")
  assert prompt.startswith(
      "In this task, you will be provided with an instruction and two "
      "responses. Your job is to assess the helpfulness and fulfillment of "
      "two responses A and B.")
  assert "Instruction: summarise X\n" in prompt
  assert "response A (left): first reply\n" in prompt
  assert "response B (right): second reply\n" in prompt
  assert prompt.index("first reply") < prompt.index("second reply")
  assert prompt.splitlines()[-1].endswith(
      "Answer with a single letter, A or B.")


@pytest.mark.parametrize("answer, score", [
    ("A", 1.0), ("B", 0.0), ("Response A", 1.0), ("**B**", 0.0),
    ("B.", 0.0), ("a", 1.0), ("response b", 0.0), ("(A)", 1.0),
    ("B is a clearer answer.", 0.0), ("Better: Response A.\n", 1.0),
])
def test_http_judge_parses_answer_formats(stub, answer, score):
  stub.replies = [_answer(answer)]
  assert _fast_judge(stub.url).judge("p", "x", "y") == score
  assert len(stub.requests) == 1


def test_http_judge_sends_prompt_model_and_key(stub, monkeypatch):
  monkeypatch.setenv(_KEY_ENV, _SECRET)
  judge = _fast_judge(stub.url, model="my-judge-model", temperature=0.25)
  judge.judge("repeat: owl", "owl owl", "bee")
  (request,) = stub.requests
  assert request.path == "/v1/chat/completions"
  assert request.headers["Authorization"] == f"Bearer {_SECRET}"
  assert request.body["model"] == "my-judge-model"
  assert request.body["temperature"] == 0.25
  (message,) = request.body["messages"]
  assert message["role"] == "user"
  assert message["content"] == judges.build_prompt("repeat: owl", "owl owl",
                                                   "bee")
  assert judge.name == f"http:{stub.url} model=my-judge-model"


def test_http_judge_sends_no_authorization_without_key(stub):
  _fast_judge(stub.url).judge("p", "x", "y")
  assert "Authorization" not in stub.requests[0].headers


def test_http_judge_401_fails_at_once_without_leaking_key(stub, monkeypatch):
  monkeypatch.setenv(_KEY_ENV, _SECRET)
  stub.replies = [_Reply(401, '{"error": "invalid api key"}')]
  judge = _fast_judge(stub.url, retries=3)
  with pytest.raises(judges.JudgeError) as info:
    judge.judge("p", "x", "y")
  message = "".join(traceback.format_exception(info.value))
  assert "HTTP 401" in message and "invalid api key" in message
  assert _KEY_ENV in message
  assert len(stub.requests) == 1
  for text in (message, repr(judge), judge.name, str(vars(judge))):
    assert _SECRET not in text


def test_http_judge_redacts_key_echoed_by_server(stub, monkeypatch, caplog):
  monkeypatch.setenv(_KEY_ENV, _SECRET)
  stub.replies = [_Reply(502, f"bad gateway for Bearer {_SECRET}")]
  with pytest.raises(judges.JudgeError, match="Bearer <redacted>") as info:
    _fast_judge(stub.url, retries=1).judge("p", "x", "y")
  assert _SECRET not in "".join(traceback.format_exception(info.value))
  assert "Bearer <redacted>" in caplog.text and _SECRET not in caplog.text


def test_http_judge_400_fails_without_retry(stub):
  body = "unknown model " + "z" * 500
  stub.replies = [_Reply(400, body)]
  with pytest.raises(judges.JudgeError, match="HTTP 400: 'unknown model") as e:
    _fast_judge(stub.url, retries=3).judge("p", "x", "y")
  assert repr(body[:200] + "...") in str(e.value)
  assert len(stub.requests) == 1


def test_http_judge_retries_500_and_429_with_backoff(stub, monkeypatch,
                                                     caplog):
  monkeypatch.setenv(_KEY_ENV, _SECRET)
  sleeps = []
  monkeypatch.setattr(judges.time, "sleep", sleeps.append)
  stub.replies = [_Reply(500, "overloaded"), _Reply(429, "slow down"),
                  _answer("B")]
  judge = _fast_judge(stub.url, retries=3, backoff_s=0.5)
  assert judge.judge("p", "x", "y") == 0.0
  assert len(stub.requests) == 3
  assert sleeps == [0.5, 1.0]
  assert "HTTP 500" in caplog.text and "HTTP 429" in caplog.text
  assert _SECRET not in caplog.text


def test_http_judge_persistent_500_reports_attempts(stub):
  stub.replies = [_Reply(503, "down")]
  with pytest.raises(judges.JudgeError,
                     match="cannot reach judge at .* after 3 attempts: "
                     "HTTP 503"):
    _fast_judge(stub.url, retries=2).judge("p", "x", "y")
  assert len(stub.requests) == 3


@pytest.mark.parametrize("answer", ["Both are good.", "A and B", "",
                                    "x" * 500])
def test_http_judge_unparseable_answer_raises_after_retries(stub, answer):
  stub.replies = [_answer(answer)]
  with pytest.raises(judges.JudgeError,
                     match="naming exactly one of A and B after 3 attempts"
                     ) as info:
    _fast_judge(stub.url, retries=2).judge("p", "x", "y")
  quoted = repr(answer) if len(answer) <= 200 else repr(answer[:200] + "...")
  assert f"last answer: {quoted}" in str(info.value)
  assert len(stub.requests) == 3


def test_http_judge_unparseable_then_valid_answer_succeeds(stub):
  stub.replies = [_answer("hmm"), _answer("A")]
  assert _fast_judge(stub.url).judge("p", "x", "y") == 1.0
  assert len(stub.requests) == 2


def test_http_judge_rejects_non_chat_completions_json(stub):
  stub.replies = [_Reply(200, '{"result": "A"}')]
  with pytest.raises(judges.JudgeError, match="chat-completions route"):
    _fast_judge(stub.url).judge("p", "x", "y")
  assert len(stub.requests) == 1


def test_http_judge_unreachable_port_fails_fast():
  url = f"http://127.0.0.1:{_closed_port()}/v1/chat/completions"
  start = time.monotonic()
  with pytest.raises(judges.JudgeError,
                     match=f"cannot reach judge at {url} after 3 attempts: "
                     ".*check the URL and that the server is running"):
    _fast_judge(url, timeout_s=0.5, retries=2).judge("p", "x", "y")
  assert time.monotonic() - start < 2.0


def test_http_judge_times_out(stub):
  stub.replies = [_Reply(delay_s=0.2, body=_answer("A").body)]
  start = time.monotonic()
  with pytest.raises(judges.JudgeError,
                     match="cannot reach judge .* after 2 attempts: .*timed "
                     "out"):
    _fast_judge(stub.url, timeout_s=0.1, retries=1).judge("p", "x", "y")
  assert time.monotonic() - start < 1.0
  assert len(stub.requests) == 2


def test_make_judge_http_keeps_colons_in_url(stub):
  judge = judges.make_judge(f"http:{stub.url}", model=_MODEL)
  assert isinstance(judge, judges.HttpJudge)
  assert judge.url == stub.url
  assert judge.name == f"http:{stub.url} model={_MODEL}"
  assert judge.judge("p", "x", "y") == 1.0


def _model_checking(expected: str):
  """A stub reply function: 400 unless the request names `expected`."""
  def respond(request):
    if request.body.get("model") != expected:
      return _Reply(400, f"model {request.body.get('model')!r} not found")
    return _answer("A")
  return respond


def test_make_judge_http_sends_the_model_and_options(stub):
  stub.respond = _model_checking("served-model")
  judge = judges.make_judge(f"http:{stub.url}", model="served-model",
                            timeout_s=5.0, retries=0)
  assert judge.judge("p", "x", "y") == 1.0
  assert [r.body["model"] for r in stub.requests] == ["served-model"]
  wrong = judges.make_judge(f"http:{stub.url}", model="other", retries=3)
  with pytest.raises(judges.JudgeError, match="HTTP 400.*'other' not found"):
    wrong.judge("p", "x", "y")
  assert len(stub.requests) == 2  # A 400 is not retried.


@pytest.mark.parametrize("spec, model, message", [
    ("http:http://127.0.0.1:1/v1/chat/completions", None, "`judge_model`"),
    ("http:http://127.0.0.1:1/v1/chat/completions", "", "`judge_model`"),
    ("reward:dro_fast.data.synthetic:reward", "m", "http: judges only"),
])
def test_make_judge_model_is_required_for_http_only(spec, model, message):
  with pytest.raises(ValueError, match=message):
    judges.make_judge(spec, model=model)


# Retry-After.


@pytest.mark.parametrize("status", [429, 503])
def test_http_judge_waits_as_retry_after_asks(stub, monkeypatch, status):
  sleeps = []
  monkeypatch.setattr(judges.time, "sleep", sleeps.append)
  stub.replies = [_Reply(status, "busy", headers=(("Retry-After", "7"),)),
                  _Reply(status, "busy", headers=(("Retry-After", "0"),)),
                  _Reply(500, "no header"), _answer("A")]
  judge = _fast_judge(stub.url, retries=3, backoff_s=0.5)
  assert judge.judge("p", "x", "y") == 1.0
  # Retry-After 7 s and 0 s, then the backoff of a third retry (0.5 * 2**2).
  assert sleeps == [7.0, 0.0, 2.0]
  assert len(stub.requests) == 4


def test_http_judge_caps_retry_after(stub, monkeypatch):
  sleeps = []
  monkeypatch.setattr(judges.time, "sleep", sleeps.append)
  stub.replies = [_Reply(429, "later", headers=(("Retry-After", "3600"),)),
                  _answer("B")]
  judge = _fast_judge(stub.url, retries=1, max_retry_after_s=12.5)
  assert judge.judge("p", "x", "y") == 0.0
  assert sleeps == [12.5]


def test_http_judge_really_waits_for_retry_after(stub):
  stub.replies = [_Reply(429, "later", headers=(("Retry-After", "1"),)),
                  _answer("A")]
  start = time.monotonic()
  assert _fast_judge(stub.url, backoff_s=0.0).judge("p", "x", "y") == 1.0
  assert time.monotonic() - start >= 0.95


def test_http_judge_gives_up_on_retry_after_naming_url_and_status(
    stub, monkeypatch):
  monkeypatch.setattr(judges.time, "sleep", lambda seconds: None)
  stub.replies = [_Reply(429, "quota", headers=(("Retry-After", "1"),))]
  with pytest.raises(judges.JudgeError,
                     match=f"judge at {stub.url} after 3 attempts: HTTP 429"):
    _fast_judge(stub.url, retries=2).judge("p", "x", "y")
  assert len(stub.requests) == 3


@pytest.mark.parametrize("value, seconds", [
    (None, None), ("5", 5.0), (" 1.5 ", 1.5), ("0", 0.0), ("-3", None),
    ("soon", None), ("", None),
    (email.utils.formatdate(1_000_030.0, usegmt=True), 30.0),
    (email.utils.formatdate(999_000.0, usegmt=True), 0.0),
])
def test_parse_retry_after(value, seconds):
  assert judges.parse_retry_after(value, now=1_000_000.0) == seconds


@pytest.mark.parametrize("url, kwargs, message", [
    ("127.0.0.1:8000/v1/chat/completions", {}, "must start with http"),
    ("http://127.0.0.1:1/", {"timeout_s": 0.0}, "timeout_s"),
    ("http://127.0.0.1:1/", {"retries": -1}, "retries"),
    ("http://127.0.0.1:1/", {"backoff_s": -1.0}, "backoff_s"),
    ("http://127.0.0.1:1/", {"max_retry_after_s": -1.0}, "max_retry_after"),
    ("http://127.0.0.1:1/", {"model": ""}, "model must be the name"),
])
def test_http_judge_validates_arguments(url, kwargs, message):
  with pytest.raises(ValueError, match=message):
    judges.HttpJudge(url, **dict(dict(model=_MODEL), **kwargs))


# judge_swapped.


class _AlwaysA:
  name = "always-a"

  def judge(self, prompt, response_a, response_b):
    del prompt, response_a, response_b
    return 1.0


def test_judge_swapped_cancels_position_bias():
  assert judges.judge_swapped(_AlwaysA(), "p", "x", "y") == 0.5


def test_judge_swapped_consistent_judge():
  judge = judges.RewardJudge(lambda prompt, response: len(response))
  assert judges.judge_swapped(judge, "p", "longer", "short") == 1.0
  assert judges.judge_swapped(judge, "p", "short", "longer") == 0.0
  assert judges.judge_swapped(judge, "p", "same", "size") == 0.5


def test_judge_swapped_with_http_judge_judges_both_orders(stub):
  stub.replies = [_answer("A"), _answer("B")]
  assert judges.judge_swapped(_fast_judge(stub.url), "p", "x", "y") == 1.0
  contents = [r.content for r in stub.requests]
  assert contents == [judges.build_prompt("p", "x", "y"),
                      judges.build_prompt("p", "y", "x")]


def test_judge_swapped_rejects_out_of_range_scores():
  class _Broken:
    name = "broken"

    def judge(self, prompt, response_a, response_b):
      del prompt, response_a, response_b
      return 2.0

  with pytest.raises(judges.JudgeError, match="broken returned 2.0"):
    judges.judge_swapped(_Broken(), "p", "x", "y")
