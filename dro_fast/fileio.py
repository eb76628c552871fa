"""Atomic file writes: readers see the old file or the whole new one.

Every file dro_fast writes in a workdir goes through here: a temporary file
in the same directory, fsync, os.replace, then an fsync of the directory so
that the rename itself survives a crash.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike,
                 write: Callable[[IO[bytes]], None]) -> None:
  """Calls write(f) on a temporary file, then moves it to `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(dir=directory,
                                  prefix=f".{os.path.basename(path)}.")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True)
                            + "\n").encode())


def atomic_write_lines(path: str | os.PathLike, rows: list[Any]) -> None:
  """JSON Lines: one json.dumps(row) per line."""
  atomic_write_bytes(path, "".join(json.dumps(r) + "\n"
                                   for r in rows).encode())
