"""A stub chat-completions server on 127.0.0.1 for the judge tests.

It answers with scripted replies (the last one repeats) or, when `respond`
is set, with respond(request); it records every request it receives and
the most requests it had in flight at once.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import hashlib
import http.server
import json
import re
import threading
import time


@dataclasses.dataclass(frozen=True)
class Reply:
  """What the stub answers: an HTTP status, body and headers, after a delay."""
  status: int = 200
  body: str = ""
  delay_s: float = 0.0
  headers: tuple[tuple[str, str], ...] = ()


def answer(content: str, delay_s: float = 0.0) -> Reply:
  """A chat-completions reply whose message content is `content`."""
  return Reply(body=json.dumps(
      {"choices": [{"message": {"role": "assistant", "content": content}}]}),
               delay_s=delay_s)


@dataclasses.dataclass
class Received:
  path: str
  headers: dict[str, str]
  body: dict

  @property
  def content(self) -> str:
    return self.body["messages"][0]["content"]


class StubState:
  """Scripted replies (the last one repeats) and the requests received.

  Attributes:
    url: the chat-completions URL of the running stub.
    replies: replies in order, when `respond` is None.
    respond: if set, respond(request) gives each reply (called under no
      lock: it must guard its own state).
    requests: every request received, in arrival order.
    max_in_flight: the most requests handled at once.
  """

  def __init__(self):
    self.lock = threading.Lock()
    self.url = ""
    self.replies: list[Reply] = [answer("A")]
    self.respond: Callable[[Received], Reply] | None = None
    self.requests: list[Received] = []
    self.in_flight = 0
    self.max_in_flight = 0


class _Handler(http.server.BaseHTTPRequestHandler):

  def do_POST(self):  # pylint: disable=invalid-name
    state: StubState = self.server.stub_state
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    received = Received(self.path, dict(self.headers), body)
    with state.lock:
      state.requests.append(received)
      state.in_flight += 1
      state.max_in_flight = max(state.max_in_flight, state.in_flight)
      respond = state.respond
      if respond is None:
        reply = (state.replies.pop(0) if len(state.replies) > 1
                 else state.replies[0])
    counted = [True]

    def done():
      with state.lock:
        if counted[0]:
          state.in_flight -= 1
          counted[0] = False

    try:
      if respond is not None:
        reply = respond(received)
      if reply.delay_s:
        time.sleep(reply.delay_s)
      payload = reply.body.encode("utf-8")
      self.send_response(reply.status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(payload)))
      for name, value in reply.headers:
        self.send_header(name, value)
      self.end_headers()
      # Out of flight before the client can have the answer: else its next
      # request may arrive while this handler still counts itself.
      done()
      self.wfile.write(payload)
    except (BrokenPipeError, ConnectionResetError):
      pass  # The client timed out and left.
    finally:
      done()

  def log_message(self, *args):
    del args  # Keep test output quiet.


def serve():
  """Starts a stub; yields its StubState; stops it (a fixture body)."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  server.daemon_threads = True
  server.stub_state = StubState()
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


# The two responses as judges.build_prompt shows them.
SHOWN = re.compile(r"response A \(left\): (.*)\nresponse B \(right\): (.*)\n")


def verdict(content: str) -> str:
  """A judgement by length: the longer response wins; a tie says A."""
  shown_a, shown_b = SHOWN.search(content).groups()
  return "A" if len(shown_a) >= len(shown_b) else "B"


class LengthJudging:
  """A StubState.respond that checks the model and judges by `verdict`.

  A request for another model gets a 400. With `flaky`, the first request
  of each prompt text fails transiently (500, or 429 with Retry-After: 0)
  by a hash of the text, so the faults are the same whatever the order of
  arrival. After `fail_after` requests every request gets a permanent 400.

  Attributes:
    count: requests for the model received.
    faults: transient failures sent, by status.
  """

  def __init__(self, model: str, flaky: bool = False,
               fail_after: int | None = None, delay_s: float = 0.0):
    self._model = model
    self._lock = threading.Lock()
    self._seen = set()
    self._flaky = flaky
    self._fail_after = fail_after
    self._delay_s = delay_s
    self.count = 0
    self.faults = {500: 0, 429: 0}

  def __call__(self, request: Received) -> Reply:
    if request.body.get("model") != self._model:
      return Reply(400, f"model {request.body.get('model')!r} not found")
    content = request.content
    with self._lock:
      self.count += 1
      if self._fail_after is not None and self.count > self._fail_after:
        return Reply(400, "quota exhausted")
      first = content not in self._seen
      self._seen.add(content)
    if self._flaky and first:
      fault = {0: 500, 1: 429}.get(
          hashlib.sha256(content.encode()).digest()[0] % 3)
      if fault:
        with self._lock:
          self.faults[fault] += 1
        return Reply(fault, "transient", delay_s=self._delay_s,
                     headers=(("Retry-After", "0"),) if fault == 429 else ())
    return answer(verdict(content), delay_s=self._delay_s)
