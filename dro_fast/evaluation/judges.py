"""Side-by-side judges: which of two responses to a prompt is better (§4).

The paper evaluates policies by side-by-side comparison with an LLM judge
(PaLM2). A `Judge` scores one comparison: 1.0 when response A is better, 0.0
when B is, 0.5 for a tie.

RewardJudge    compares r(prompt, response) of a reward function;
HttpJudge      asks an OpenAI-compatible chat-completions endpoint, with the
               paper's prompt (`build_prompt`); retries transient failures,
               waiting as a 429/503's Retry-After asks;
make_judge     builds either from a spec string ("reward:MODULE:FUNCTION",
               "reward:PATH/TO/FILE.py:FUNCTION", "http:URL" with a model
               name);
judge_swapped  judges both orders so that position bias cancels.
"""

from __future__ import annotations

from collections.abc import Callable
import email.utils
import hashlib
import http.client
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from types import ModuleType
from typing import Any, Protocol
import urllib.error
import urllib.request

from absl import logging

# How much of a server's answer or error body goes into a message.
_QUOTE_CHARS = 200
# Statuses worth another attempt besides 5xx: request timeout, rate limit.
_RETRYABLE_4XX = (408, 429)
# Statuses whose Retry-After header is honoured (RFC 9110 §10.2.3).
_RETRY_AFTER_STATUSES = (429, 503)
_REWARD_FORMS = ("reward:MODULE:FUNCTION (e.g. reward:dro_fast.data.synthetic:"
                 "reward) or reward:PATH/TO/FILE.py:FUNCTION")
_SPEC_FORMS = (f"{_REWARD_FORMS}, or http:URL (e.g. http:http://127.0.0.1:"
               "8000/v1/chat/completions)")
# A standalone letter A or B: "A", "Response B", "**A**", "B." but not "Bee".
_UPPER_LETTER = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")
_ANY_LETTER = re.compile(r"(?<![A-Za-z0-9])([AaBb])(?![A-Za-z0-9])")


class JudgeError(RuntimeError):
  """A judge could not give a verdict (unreachable, refused, unparseable)."""


class Judge(Protocol):
  """Decides which of two responses to a prompt is better.

  Attributes:
    name: what the judge is, safe to log (never holds a secret).
  """
  name: str

  def judge(self, prompt: str, response_a: str, response_b: str) -> float:
    """Returns 1.0 if response_a is better, 0.0 if response_b is, 0.5: tie."""
    ...


class RewardJudge:
  """Prefers the response with the higher reward r(prompt, response)."""

  def __init__(self, reward_fn: Callable[[str, str], float],
               name: str | None = None):
    """Wraps a reward function.

    Args:
      reward_fn: r(prompt, response) -> a finite float.
      name: the judge's name; by default "reward:MODULE:FUNCTION" of
        reward_fn.
    """
    if not callable(reward_fn):
      raise TypeError(f"RewardJudge needs a callable reward function, got "
                      f"{type(reward_fn).__name__}.")
    self._reward_fn = reward_fn
    self.name = name or (
        f"reward:{getattr(reward_fn, '__module__', '?')}:"
        f"{getattr(reward_fn, '__qualname__', type(reward_fn).__name__)}")

  def __repr__(self) -> str:
    return f"RewardJudge(name={self.name!r})"

  def _reward(self, prompt: str, response: str) -> float:
    try:
      value = float(self._reward_fn(prompt, response))
    except Exception as err:
      raise JudgeError(f"reward function {self.name} failed on a response: "
                       f"{type(err).__name__}: {err}") from err
    if not math.isfinite(value):
      raise JudgeError(f"reward function {self.name} returned {value} for a "
                       "response; rewards must be finite.")
    return value

  def judge(self, prompt: str, response_a: str, response_b: str) -> float:
    """Returns 1.0 if A has the higher reward, 0.0 if B has, 0.5 if equal.

    Args:
      prompt: the instruction both responses answer.
      response_a: the first response.
      response_b: the second response.

    Returns:
      The score of response_a.

    Raises:
      JudgeError: the reward function raised or returned a non-finite value.
    """
    reward_a = self._reward(prompt, response_a)
    reward_b = self._reward(prompt, response_b)
    if reward_a == reward_b:
      return 0.5
    return 1.0 if reward_a > reward_b else 0.0


def build_prompt(instruction: str, response_a: str, response_b: str) -> str:
  """The paper's side-by-side judging prompt (§4, Evaluation).

  Args:
    instruction: the prompt both responses answer.
    response_a: the response shown first ("left").
    response_b: the response shown second ("right").

  Returns:
    The prompt, ending with a line asking for a single letter, A or B.
  """
  return ("In this task, you will be provided with an instruction and two "
          "responses. Your job is to assess the helpfulness and fulfillment "
          "of two responses A and B.\n\n"
          f"Instruction: {instruction}\n"
          f"response A (left): {response_a}\n"
          f"response B (right): {response_b}\n\n"
          "Which response is better? Answer with a single letter, A or B.")


def _parse_answer(answer: str) -> str | None:
  """"A" or "B" when the answer names exactly one of them, else None.

  Upper-case letters are looked for first, so that an English article "a"
  ("B is a better answer") does not make the answer ambiguous; a lower-case
  answer ("response b") is read only when no upper-case letter stands alone.
  """
  letters = _UPPER_LETTER.findall(answer) or _ANY_LETTER.findall(answer)
  named = {letter.upper() for letter in letters}
  return named.pop() if len(named) == 1 else None


def _quote(text: str) -> str:
  if len(text) > _QUOTE_CHARS:
    text = text[:_QUOTE_CHARS] + "..."
  return repr(text)


def parse_retry_after(value: str | None,
                      now: float | None = None) -> float | None:
  """Seconds a Retry-After header value asks to wait, or None if unusable.

  Args:
    value: the header's value: delay-seconds ("120", also "1.5") or an
      HTTP-date ("Wed, 21 Oct 2015 07:28:00 GMT"); None when absent.
    now: the current time.time() (for tests); by default, the clock.

  Returns:
    The wait in seconds, >= 0 (a date in the past waits 0), or None for an
    absent, negative or unparseable value (the caller then backs off as for
    any transient failure).
  """
  if value is None:
    return None
  value = value.strip()
  if re.fullmatch(r"\d+(\.\d*)?", value):
    return float(value)
  try:
    date = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError, IndexError):
    return None
  if date is None or date.tzinfo is None:
    return None
  return max(0.0, date.timestamp() - (time.time() if now is None else now))


class _RetryableError(Exception):
  """A failure worth another attempt: no connection, timeout, 408, 429, 5xx.

  Attributes:
    retry_after_s: the wait a 429/503's Retry-After header asked for, or
      None.
  """

  def __init__(self, message: str, retry_after_s: float | None = None):
    super().__init__(message)
    self.retry_after_s = retry_after_s


class HttpJudge:
  """An LLM judge behind an OpenAI-compatible chat-completions endpoint.

  The API key is read from the environment at each request and sent only in
  the Authorization header; it is never stored on the judge, and it is
  removed from any server text quoted in an error.

  A judge holds no per-request state, so one judge may be asked from many
  threads at once (evaluation's --judge_concurrency).
  """

  def __init__(self, url: str, *, model: str,
               api_key_env: str = "DRO_FAST_JUDGE_API_KEY",
               timeout_s: float = 60.0, retries: int = 5,
               backoff_s: float = 1.0, max_retry_after_s: float = 60.0,
               temperature: float = 0.0):
    """Configures the judge; nothing is sent until `judge`.

    Args:
      url: the full URL of the chat-completions route, e.g.
        http://127.0.0.1:8000/v1/chat/completions.
      model: the "model" field of the request: a model the server serves
        (servers reject names they do not know, so there is no default).
      api_key_env: the environment variable holding the API key; when it is
        unset or empty no Authorization header is sent.
      timeout_s: seconds to wait for each request, > 0.
      retries: further attempts after a failed one, >= 0.
      backoff_s: seconds before the first retry, doubling for each next one.
      max_retry_after_s: the longest wait a 429/503's Retry-After header may
        ask for; a longer one waits this long. Without the header the wait
        is the backoff.
      temperature: the sampling temperature of the request.
    """
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"judge URL {url!r} must start with http:// or "
                       "https://, e.g. http://127.0.0.1:8000/v1/chat/"
                       "completions.")
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s}.")
    if retries < 0:
      raise ValueError(f"retries must be >= 0, got {retries}.")
    if backoff_s < 0:
      raise ValueError(f"backoff_s must be >= 0, got {backoff_s}.")
    if max_retry_after_s < 0:
      raise ValueError(f"max_retry_after_s must be >= 0, got "
                       f"{max_retry_after_s}.")
    if not isinstance(model, str) or not model:
      raise ValueError(f"model must be the name of a model the judge server "
                       f"serves, got {model!r}.")
    self.url = url
    self.model = model
    self.name = f"http:{url} model={model}"
    self._api_key_env = api_key_env
    self._timeout_s = timeout_s
    self._retries = retries
    self._backoff_s = backoff_s
    self._max_retry_after_s = max_retry_after_s
    self._temperature = temperature

  def __repr__(self) -> str:
    return (f"HttpJudge(url={self.url!r}, model={self.model!r}, "
            f"api_key_env={self._api_key_env!r})")

  def _post(self, content: str, api_key: str | None) -> str:
    """One request; returns choices[0].message.content."""
    body = json.dumps({"model": self.model,
                       "messages": [{"role": "user", "content": content}],
                       "temperature": self._temperature}).encode("utf-8")
    headers = {"Content-Type": "application/json",
               "Accept": "application/json"}
    if api_key:
      headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(self.url, data=body, headers=headers,
                                     method="POST")

    def redact(text: str) -> str:
      return text.replace(api_key, "<redacted>") if api_key else text

    try:
      with urllib.request.urlopen(request, timeout=self._timeout_s) as resp:
        raw = resp.read()
    except urllib.error.HTTPError as err:
      try:
        error_body = redact(err.read().decode("utf-8", errors="replace"))
      finally:
        err.close()
      status = f"HTTP {err.code}: {_quote(error_body)}"
      if err.code in _RETRYABLE_4XX or err.code >= 500:
        wait = (parse_retry_after(err.headers.get("Retry-After"))
                if err.code in _RETRY_AFTER_STATUSES and err.headers
                else None)
        raise _RetryableError(status, wait) from None
      hint = (f"; check the API key in ${self._api_key_env}"
              if err.code in (401, 403) else "")
      raise JudgeError(f"judge at {self.url} rejected the request with "
                       f"{status}{hint}") from None
    except urllib.error.URLError as err:
      raise _RetryableError(redact(str(err.reason))) from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as err:
      reason = str(err) or type(err).__name__
      raise _RetryableError(redact(reason)) from None
    text = redact(raw.decode("utf-8", errors="replace"))
    try:
      answer = json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
      answer = None
    if not isinstance(answer, str):
      raise JudgeError(f"judge at {self.url} answered {_quote(text)}, not "
                       "chat-completions JSON with a string "
                       "choices[0].message.content; check that the URL is "
                       "the chat-completions route.")
    return redact(answer)

  def judge(self, prompt: str, response_a: str, response_b: str) -> float:
    """Asks the endpoint which response is better.

    Args:
      prompt: the instruction both responses answer.
      response_a: the response shown as A.
      response_b: the response shown as B.

    Returns:
      1.0 if the judge names A, 0.0 if it names B.

    Raises:
      JudgeError: the server is unreachable, times out or keeps failing
        (408, 429, 5xx) after all attempts; it rejects the request (other
        4xx); its response is not chat-completions JSON; or no answer names
        exactly one of A and B.
    """
    content = build_prompt(prompt, response_a, response_b)
    api_key = os.environ.get(self._api_key_env) or None
    attempts = self._retries + 1
    unreachable, unparseable = "", None  # How the last attempt failed.
    asked_wait = None  # The last failure's Retry-After, in seconds.
    for attempt in range(attempts):
      if attempt:
        time.sleep(self._backoff_s * 2 ** (attempt - 1) if asked_wait is None
                   else min(asked_wait, self._max_retry_after_s))
      asked_wait = None
      try:
        answer = self._post(content, api_key)
      except _RetryableError as err:
        unreachable, unparseable = str(err), None
        asked_wait = err.retry_after_s
        logging.warning("Judge at %s failed (attempt %d of %d): %s", self.url,
                        attempt + 1, attempts, unreachable)
        continue
      letter = _parse_answer(answer)
      if letter is not None:
        return 1.0 if letter == "A" else 0.0
      unreachable, unparseable = None, answer
      logging.warning("Judge at %s answered %s, naming neither or both of A "
                      "and B (attempt %d of %d).", self.url, _quote(answer),
                      attempt + 1, attempts)
    if unparseable is not None:
      raise JudgeError(f"judge at {self.url} gave no answer naming exactly one "
                       f"of A and B after {attempts} attempts; last answer: "
                       f"{_quote(unparseable)}")
    raise JudgeError(f"cannot reach judge at {self.url} after {attempts} "
                     f"attempts: {unreachable}; check the URL and that the "
                     "server is running")


def _module_from_file(spec: str, location: str) -> tuple[ModuleType, str]:
  """Loads a judge's .py file as a module; returns it and its absolute path.

  The module gets a name of its own (from the path), so that a file called
  like an installed module does not replace it in sys.modules.
  """
  path = os.path.abspath(location)
  if not os.path.isfile(path):
    raise ValueError(f"judge spec {spec!r}: no file {path} (a relative path "
                     "is read from the current directory).")
  name = "dro_fast_judge_" + hashlib.sha256(path.encode()).hexdigest()[:16]
  module_spec = importlib.util.spec_from_file_location(name, path)
  if module_spec is None or module_spec.loader is None:
    raise ValueError(f"judge spec {spec!r}: {path} cannot be loaded as a "
                     "Python module.")
  module = importlib.util.module_from_spec(module_spec)
  # Registered before it runs, as an import would (dataclasses and pickle
  # look their module up there).
  sys.modules[name] = module
  try:
    module_spec.loader.exec_module(module)
  except Exception as err:
    del sys.modules[name]
    raise JudgeError(f"judge spec {spec!r}: importing {path} failed: "
                     f"{type(err).__name__}: {err}") from err
  return module, path


def _is_missing(err: ModuleNotFoundError, module_name: str) -> bool:
  """Whether `err` says module_name (or a package above it) is absent."""
  return bool(err.name) and (module_name == err.name or
                             module_name.startswith(err.name + "."))


def _import_from_cwd(module_name: str) -> ModuleType:
  """Imports module_name from sys.path, else from the current directory.

  `python -m` puts the current directory on sys.path and a console script
  does not; the directory is searched last, and only during this import.
  """
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as err:
    cwd = os.getcwd()
    if (not _is_missing(err, module_name) or
        cwd in (os.path.abspath(entry or os.curdir) for entry in sys.path)):
      raise
    sys.path.append(cwd)
    try:
      return importlib.import_module(module_name)
    finally:
      sys.path.remove(cwd)


def _module_by_name(spec: str, module_name: str) -> ModuleType:
  """Imports a judge's MODULE, naming what failed in one line."""
  try:
    return _import_from_cwd(module_name)
  except ModuleNotFoundError as err:
    if _is_missing(err, module_name):
      # A package found elsewhere first (an installed namespace package of
      # the same name) hides the current directory's.
      package = sys.modules.get(module_name.rpartition(".")[0])
      found = (f" (package {package.__name__} is "
               f"{', '.join(getattr(package, '__path__', []))})"
               if package is not None else "")
      raise ValueError(f"judge spec {spec!r}: no module named {module_name!r}"
                       f" on sys.path or in the current directory{found}; "
                       "check the module path, or give the file: "
                       "reward:PATH/TO/FILE.py:FUNCTION.") from err
    raise JudgeError(f"judge spec {spec!r}: importing {module_name} failed: "
                     f"{err}") from err
  except Exception as err:
    raise JudgeError(f"judge spec {spec!r}: importing {module_name} failed: "
                     f"{type(err).__name__}: {err}") from err


def _reward_judge_from_spec(spec: str, target: str) -> RewardJudge:
  location, _, function_name = target.rpartition(":")
  if not location or not function_name:
    raise ValueError(f"judge spec {spec!r} needs a module or file and a "
                     f"function: {_REWARD_FORMS}.")
  if location.endswith(".py"):
    module, location = _module_from_file(spec, location)
  else:
    module = _module_by_name(spec, location)
  function: Any = getattr(module, function_name, None)
  if function is None:
    raise ValueError(f"judge spec {spec!r}: {location} has no "
                     f"{function_name!r}.")
  if not callable(function):
    raise ValueError(f"judge spec {spec!r}: {function_name} in {location} is "
                     f"not callable (type {type(function).__name__}); it must "
                     "be a function r(prompt, response) -> float.")
  # A file is named by its absolute path: a verdict kept in pairs.jsonl is
  # reused only for the same judge, and a relative path read from another
  # directory names another file.
  return RewardJudge(function, name=f"reward:{location}:{function_name}")


def make_judge(spec: str, *, model: str | None = None,
               **http_options: Any) -> Judge:
  """Builds a judge from a spec string (e.g. a command-line flag).

  Args:
    spec: "reward:MODULE:FUNCTION" for a RewardJudge of MODULE.FUNCTION
      (MODULE on sys.path, else in the current directory, as `python -m`
      finds it); "reward:PATH/TO/FILE.py:FUNCTION" for one of a file's
      function (PATH absolute or relative to the current directory); or
      "http:URL" for an HttpJudge of URL (the spec is split at its first ':'
      only, so the URL keeps its own).
    model: the model an http: judge asks for; required for http:, and
      refused for reward: (it would be silently ignored).
    **http_options: further HttpJudge arguments (timeout_s, retries, ...);
      ignored by reward: judges.

  Returns:
    The judge.

  Raises:
    ValueError: an unknown form; an http: spec without a model, or a
      reward: spec with one; a file, module or function that does not
      exist, or a function that is not callable.
    JudgeError: the file or module exists but importing it failed.
  """
  kind, _, target = spec.partition(":")
  if kind == "reward" and target:
    if model:
      raise ValueError(f"judge spec {spec!r} is a reward function; a model "
                       f"name ({model!r}) applies to http: judges only.")
    return _reward_judge_from_spec(spec, target)
  if kind == "http" and target:
    if not model:
      raise ValueError(f"judge spec {spec!r} needs the name of the model "
                       "the server serves (`judge_model`=NAME, e.g. the "
                       "name its /v1/models route lists).")
    return HttpJudge(target, model=model, **http_options)
  raise ValueError(f"unknown judge spec {spec!r}; use {_SPEC_FORMS}.")


def judge_swapped(judge: Judge, prompt: str, response_1: str,
                  response_2: str) -> float:
  """Judges both orders, so that a preference for a position cancels.

  Args:
    judge: the judge.
    prompt: the instruction both responses answer.
    response_1: the response being scored.
    response_2: the response it is compared with.

  Returns:
    The score of response_1 in [0, 1]: (s1 + (1 - s2)) / 2 where s1 judges
    (response_1, response_2) as (A, B) and s2 the swapped order; verdicts
    that disagree count as a tie.

  Raises:
    JudgeError: the judge failed or returned a score outside [0, 1].
  """
  scores = (judge.judge(prompt, response_1, response_2),
            judge.judge(prompt, response_2, response_1))
  for score in scores:
    if not 0.0 <= score <= 1.0:
      raise JudgeError(f"judge {judge.name} returned {score}; scores must be "
                       "in [0, 1].")
  return (scores[0] + (1.0 - scores[1])) / 2
