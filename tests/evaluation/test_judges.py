"""Tests for dro_fast.evaluation.judges; HTTP only to a stub server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import http.server
import json
import math
import socket
import threading
import time
import traceback

import pytest

from dro_fast.evaluation import judges
from dro_fast.data import synthetic

_KEY_ENV = "DRO_FAST_JUDGE_API_KEY"
_SECRET = "sk-test-7f3a9c1e"
_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
               "all_proxy", "ALL_PROXY")


@dataclasses.dataclass(frozen=True)
class _Reply:
  """What the stub answers: an HTTP status, a body, after a delay."""
  status: int = 200
  body: str = ""
  delay_s: float = 0.0


def _answer(content: str) -> _Reply:
  """A chat-completions reply whose message content is `content`."""
  return _Reply(body=json.dumps(
      {"choices": [{"message": {"role": "assistant", "content": content}}]}))


@dataclasses.dataclass
class _Received:
  path: str
  headers: dict[str, str]
  body: dict


class _StubState:
  """Scripted replies (the last one repeats) and the requests received."""

  def __init__(self):
    self.lock = threading.Lock()
    self.replies: list[_Reply] = [_answer("A")]
    self.requests: list[_Received] = []


class _Handler(http.server.BaseHTTPRequestHandler):

  def do_POST(self):  # pylint: disable=invalid-name
    state: _StubState = self.server.stub_state
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with state.lock:
      state.requests.append(_Received(self.path, dict(self.headers), body))
      reply = (state.replies.pop(0) if len(state.replies) > 1
               else state.replies[0])
    if reply.delay_s:
      time.sleep(reply.delay_s)
    try:
      payload = reply.body.encode("utf-8")
      self.send_response(reply.status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      self.end_headers()
      self.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
      pass  # The client timed out and left.

  def log_message(self, *args):
    del args  # Keep test output quiet.


@pytest.fixture(autouse=True)
def _no_proxy_no_key(monkeypatch):
  for name in _PROXY_VARS + (_KEY_ENV,):
    monkeypatch.delenv(name, raising=False)


@pytest.fixture
def stub():
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  server.stub_state = _StubState()
  thread = threading.Thread(target=server.serve_forever,
                            kwargs={"poll_interval": 0.01}, daemon=True)
  thread.start()
  state = server.stub_state
  state.url = (f"http://127.0.0.1:{server.server_address[1]}"
               "/v1/chat/completions")
  yield state
  server.shutdown()
  server.server_close()
  thread.join(timeout=5)


def _fast_judge(url: str, **kwargs) -> judges.HttpJudge:
  options = dict(timeout_s=2.0, retries=2, backoff_s=0.01)
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
    ("reward:dro_fast.data.synthetic:WORDS", "not a callable"),
    ("reward:dro_fast.data.synthetic", "needs a module and a function"),
    ("reward:", "unknown judge spec"),
    ("http:", "unknown judge spec"),
    ("gpt4", "reward:MODULE:FUNCTION.*http:URL"),
    ("", "unknown judge spec"),
])
def test_make_judge_rejects_bad_specs(spec, message):
  with pytest.raises(ValueError, match=message):
    judges.make_judge(spec)


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
  assert judge.name == f"http:{stub.url}"


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
  judge = judges.make_judge(f"http:{stub.url}")
  assert isinstance(judge, judges.HttpJudge)
  assert judge.url == stub.url
  assert judge.name == f"http:{stub.url}"
  assert judge.judge("p", "x", "y") == 1.0


@pytest.mark.parametrize("url, kwargs, message", [
    ("127.0.0.1:8000/v1/chat/completions", {}, "must start with http"),
    ("http://127.0.0.1:1/", {"timeout_s": 0.0}, "timeout_s"),
    ("http://127.0.0.1:1/", {"retries": -1}, "retries"),
    ("http://127.0.0.1:1/", {"backoff_s": -1.0}, "backoff_s"),
])
def test_http_judge_validates_arguments(url, kwargs, message):
  with pytest.raises(ValueError, match=message):
    judges.HttpJudge(url, **kwargs)


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
  contents = [r.body["messages"][0]["content"] for r in stub.requests]
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
