"""Stopping a run at a step boundary on request: preemption and Ctrl-C.

A preempted TPU VM or spot GPU node gets SIGTERM some 30 s before it goes.
Inside `StopRequests` (a context manager around the step loop) SIGTERM and a
first SIGINT ask the trainer to stop: it finishes the step in flight, saves
a checkpoint at that step and exits 0 (training.loop). A SIGINT after a
request raises KeyboardInterrupt at once; Orbax commits a checkpoint by renaming its
temporary folder, so the newest complete checkpoint stays the restore point
(training.checkpointing).

Before the step loop (data, reference cache, SFT warm start: the start-up),
`stop_during_startup` turns SIGTERM into StartupStopped, so that a run
preempted before its first step ends with one line and exit 0 (the CLI's),
with nothing trained to save; every file written meanwhile is written
atomically, and the reference cache into a folder renamed into place.

On several processes every process must stop, and save, at the same step.
jax.distributed.initialize starts jax's preemption service: a SIGTERM to any
process is propagated to all, and multihost_utils.reached_preemption_sync_
point(step) answers True on every process at one agreed step. There the
service handles SIGTERM itself (no Python handler is installed for it, which
would replace the service's), and SIGINT keeps Python's default: a Ctrl-C
to one process of a multi-process run is not a coordinated stop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils


class StartupStopped(BaseException):
  """SIGTERM arrived before the first step; nothing was trained to save.

  A BaseException, as KeyboardInterrupt is: the start-up's handlers of
  ordinary errors must not catch it.
  """


def _raise_startup_stopped(signum: int, frame) -> None:
  del signum, frame
  raise StartupStopped


@contextlib.contextmanager
def stop_during_startup() -> Iterator[None]:
  """SIGTERM raises StartupStopped meanwhile (one process, main thread).

  On several processes jax's preemption service handles SIGTERM, and a
  notice during the start-up is answered at the first step (register_start).
  """
  if (jax.process_count() > 1
      or threading.current_thread() is not threading.main_thread()):
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_startup_stopped)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


class StopRequests:
  """Records SIGTERM / a first SIGINT; `stop_after(step)` says when to stop.

  Attributes:
    signal_name: "SIGTERM" or "SIGINT" once one arrived (on several
      processes: "SIGTERM" once the preemption service agreed on a step).
    received_at: time.monotonic() when it arrived (or was agreed).
  """

  def __init__(self):
    self.signal_name: str | None = None
    self.received_at: float | None = None
    self._previous: dict[int, object] = {}
    self._several = jax.process_count() > 1
    self._told = False

  def __enter__(self) -> StopRequests:
    if threading.current_thread() is not threading.main_thread():
      return self                      # signal.signal needs the main thread
    handled = () if self._several else (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    # Records only: a handler that wrote to a stream could interrupt a
    # write to the same stream.
    del frame
    if signum == signal.SIGINT and self.signal_name is not None:
      raise KeyboardInterrupt          # a Ctrl-C after a request: at once
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
      self.received_at = time.monotonic()

  def stop_after(self, step: int) -> bool:
    """Whether to stop after `step` steps; the same answer on every process.

    On several processes, call it after every step from the same start
    (the preemption service's contract).
    """
    if not self._several:
      stopping = self.signal_name is not None
    else:
      stopping = _preemption_sync_point(step)
      if stopping and self.signal_name is None:
        self.signal_name, self.received_at = "SIGTERM", time.monotonic()
    if stopping and not self._told:
      self._told = True
      logging.warning("%s: stopping after step %d, with a checkpoint (a "
                      "Ctrl-C now stops at once).", self.signal_name, step)
    return stopping


def register_start(step: int) -> None:
  """Tells jax's preemption service the step a run starts from.

  Called before the start-up, on several processes only.

  The service counts the steps it is told of from 0 and, on a notice,
  chooses the step after the highest one any process has reported. A
  resumed run that reports nothing before its loop would have a notice
  received during start-up answered at step 1, which it never reaches.
  """
  if jax.process_count() > 1:
    _preemption_sync_point(step)


def _preemption_sync_point(step: int) -> bool:
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:                 # the preemption service is disabled
    return False
