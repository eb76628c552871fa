"""Paths and atomic file writes.

Paths: every path dro_fast reads may be a local path, a file:// URL or a
URL that etils.epath serves (gs://, s3://; gs:// needs gcsfs installed).
`as_path` turns any of them into an epath.Path; `require_local` is for what
needs a POSIX file system (atomic renames, flock), as a workdir does.

Atomic writes: readers see the old file or the whole new one. Every file
dro_fast writes in a workdir goes through here: a temporary file in the same
directory, fsync, os.replace, then an fsync of the directory so that the
rename itself survives a crash.

Write faults: a full disk, an exhausted quota, a read-only or failing file
system while writing become a WriteError that names the path, the error and
what to do (as_write_error also recognises them in the errors of Orbax and
TensorStore, which report the OS error code in their message). Whoever
raises it has left the previous file, checkpoint or cache in place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from typing import IO, Any, Callable

from etils import epath

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)

# Write faults the user can fix (free space, raise the quota, remount).
_USER_FIXABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_WRITE_FAULTS = _USER_FIXABLE | {errno.EIO}
# How TensorStore (under Orbax) reports the OS error in its messages.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class WriteError(OSError):
  """Writing `filename` failed for a reason of its storage.

  exit_code: 2 where the user can fix it (a full disk, a quota, a read-only
  file system, a file size limit), 1 for an I/O error of the device.
  """

  def __init__(self, path: str | os.PathLike, code: int):
    fixable = code in _USER_FIXABLE
    advice = ("Free space there (or use another `workdir`), then rerun "
              "the same command: the run resumes from its newest "
              "checkpoint." if fixable else "Check the storage device.")
    super().__init__(code, f"cannot write {os.fspath(path)}: "
                     f"{os.strerror(code)}. {advice}", os.fspath(path))
    self.exit_code = 2 if fixable else 1

  def __str__(self) -> str:
    return self.strerror


def as_write_error(path: str | os.PathLike,
                   error: BaseException) -> WriteError | None:
  """`error` as a WriteError naming `path`, or None for any other error."""
  if isinstance(error, WriteError):
    return error
  code = getattr(error, "errno", None) if isinstance(error, OSError) else None
  if code is None and not isinstance(error, OSError):
    found = _OS_ERROR_CODE.search(str(error))
    code = int(found.group(1)) if found else None
  return WriteError(path, code) if code in _WRITE_FAULTS else None


def url_scheme(path: str | os.PathLike) -> str | None:
  """"gs" for gs://bucket/x, "file" for file:///x; None for a plain path."""
  match = _URL.fullmatch(os.fspath(path))
  return match[1].lower() if match else None


def _file_url_path(url: str) -> str:
  """file:///x or file://localhost/x -> /x (RFC 8089's local forms)."""
  rest = _URL.fullmatch(url)[2]
  host, slash, local = rest.partition("/")
  if host not in ("", "localhost"):
    raise ValueError(f"{url}: a file:// URL naming the host {host!r} is not "
                     "supported; pass a local path or file:///absolute/path.")
  return slash + local


def as_path(location: str | os.PathLike) -> epath.Path:
  """An epath.Path for a local path, a file:// URL or a remote URL.

  file:// URLs become local paths (epath does not parse them), so that
  local and file:// locations take the same code. Other URLs go to epath,
  which reads gs:// through gcsfs.
  """
  location = os.fspath(location)
  if url_scheme(location) == "file":
    location = _file_url_path(location)
  return epath.Path(location)


def absolute(location: str | os.PathLike | None) -> str | None:
  """A local path made absolute; other URLs unchanged; None stays None.

  file:// URLs become local paths. For flags that take either.
  """
  if location is None or not os.fspath(location):
    return location
  location = os.fspath(location)
  scheme = url_scheme(location)
  if scheme == "file":
    return os.path.abspath(_file_url_path(location))
  return location if scheme else os.path.abspath(location)


def require_local(location: str | os.PathLike, what: str) -> str:
  """The local path of `location`, for places that need a POSIX file system.

  Args:
    location: a local path or a file:// URL.
    what: what the path is, for the message: a flag ("--workdir") or a role.

  Returns:
    The local path (a file:// URL's path; a plain path as given).

  Raises:
    ValueError: `location` is another URL (gs://, s3://...): dro_fast's
      atomic renames and flock need a local or mounted POSIX file system.
  """
  location = os.fspath(location)
  scheme = url_scheme(location)
  if scheme is None:
    return location
  if scheme == "file":
    return _file_url_path(location)
  raise ValueError(
      f"{what}: {location} is a {scheme}:// URL, but it needs atomic renames "
      "and file locks, which only a local (or mounted POSIX) file system "
      "gives: pass a local path or a file:// URL.")


def atomic_write(path: str | os.PathLike,
                 write: Callable[[IO[bytes]], None]) -> None:
  """Calls write(f) on a temporary file, then moves it to `path`.

  Raises:
    ValueError: `path` is a URL other than file:// (see require_local).
    WriteError: a write fault (the previous file at `path` is intact,
      unless the fault is the directory's fsync after the rename).
  """
  path = require_local(path, "an atomically written file")
  directory = os.path.dirname(os.path.abspath(path))
  try:
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
  except OSError as e:
    fault = as_write_error(path, e)
    if fault is None:
      raise
    raise fault from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True)
                            + "\n").encode())


def atomic_write_lines(path: str | os.PathLike, rows: list[Any]) -> None:
  """JSON Lines: one json.dumps(row) per line."""
  atomic_write_bytes(path, "".join(json.dumps(r) + "\n"
                                   for r in rows).encode())
