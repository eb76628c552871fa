"""Fixtures of the evaluation tests: a stub judge server, no proxy, no key."""

from __future__ import annotations

import pytest

from tests.evaluation import stub_judge

KEY_ENV = "DRO_FAST_JUDGE_API_KEY"
_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
               "all_proxy", "ALL_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy_no_key(monkeypatch):
  """Requests to the stub go straight to 127.0.0.1, without a key."""
  for name in _PROXY_VARS + (KEY_ENV,):
    monkeypatch.delenv(name, raising=False)


@pytest.fixture
def stub():
  """A running stub judge server (stub_judge.StubState)."""
  yield from stub_judge.serve()
