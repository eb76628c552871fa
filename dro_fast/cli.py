"""What the two command lines share: errors in their flags' terms, one line.

The library names config fields in backquotes (`batch_size must be >= 1`
reads "`batch_size` must be >= 1"); each CLI rewrites a field that is one of
its flags as the flag (`--batch_size`), through a table of the fields whose
flag has another name. File-system refusals (a read-only workdir, a
permission, a missing input) become one line naming the path and the cause.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import sys
from typing import Container, Mapping, NoReturn

# A config field as library messages name it: `name` or `item.name`.
_FIELD = re.compile(r"`([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)`")

# What a file-system refusal means for a run, and what to do about it.
_REFUSALS = {
    errno.EACCES: "this user may not write or read there: choose a path you "
                  "own, or change its permissions",
    errno.EPERM: "the operation is not permitted there: choose another path",
    errno.EROFS: "the file system is read-only: choose a workdir on a "
                 "writable one, or remount it read-write",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENOTDIR: "a file stands where a folder is needed: name a folder, "
                   "or move the file away",
    errno.EEXIST: "a file stands where a folder is needed: name a folder, "
                  "or move the file away",
    errno.EISDIR: "a folder stands where a file is needed: name the file",
}


def flag_terms(message: str, flag_names: Container[str],
               renames: Mapping[str, str] | None = None) -> str:
  """`message` with each `field` that is a flag (after `renames`) as --flag.

  A dotted field (`policy_optimizer.learning_rate`) is looked up whole in
  `renames`, then by its last part; backquoted text that names no flag is
  left as it is.
  """
  renames = renames or {}

  def flag(match: re.Match) -> str:
    field = match[1]
    name = renames.get(field, renames.get(field.rsplit(".", 1)[-1],
                                          field.rsplit(".", 1)[-1]))
    return f"--{name}" if name in flag_names else match[0]

  return _FIELD.sub(flag, message)


class FlagTermsInLogs(logging.Filter):
  """Rewrites the fields named in log records as flags (see flag_terms)."""

  def __init__(self, flag_names: Container[str],
               renames: Mapping[str, str] | None = None):
    super().__init__()
    self._flag_names, self._renames = flag_names, renames

  def filter(self, record: logging.LogRecord) -> bool:
    if isinstance(record.msg, str):
      record.msg = flag_terms(record.msg, self._flag_names, self._renames)
    return True


def speak_in_flags(flag_names: Container[str],
                   renames: Mapping[str, str] | None = None) -> None:
  """Makes the library's warnings (absl's logger) name fields as flags.

  For a CLI's main(): the filter stays on absl's logger for the process.
  """
  logging.getLogger("absl").addFilter(FlagTermsInLogs(flag_names, renames))


def refusal(error: OSError, what_was_done: str) -> str | None:
  """One line for a file-system refusal (path, cause, remedy), else None."""
  remedy = _REFUSALS.get(error.errno)
  if remedy is None or not error.filename:
    return None
  return (f"cannot use {os.fsdecode(error.filename)}: {error.strerror}; "
          f"{remedy}. {what_was_done}")


def user_error(message: str, code: int = 2) -> NoReturn:
  """Prints `message` as the CLI's one error line and exits with `code`."""
  print(f"error: {message}", file=sys.stderr)
  # Orbax's and TensorStore's event loops may hold reads that never finish
  # once an error stops the run; their garbage at exit (abandoned
  # coroutines, tasks' errors never retrieved) says nothing more.
  sys.unraisablehook = _quiet_unraisable
  logging.getLogger("asyncio").disabled = True
  sys.exit(code)


def _quiet_unraisable(unraisable) -> None:
  """sys.unraisablehook without abandoned coroutines and closed loops."""
  error = unraisable.exc_value
  if asyncio.iscoroutine(unraisable.object) or (
      isinstance(error, RuntimeError) and "Event loop is closed" in str(error)):
    return
  sys.__unraisablehook__(unraisable)
