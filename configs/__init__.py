"""The packaged flagfiles (installed as dro_fast.configs): one per model size,
as t5x keeps one gin file per size.

`python -m dro_fast.train --flagfile=xl.flags` (or `dro-fast-train`) takes
a bare name, or configs/NAME, from the package when no such file exists
where it runs, so `--flagfile=xl.flags` works from any directory and
from a wheel install; a path that exists is always read as given.
"""

from __future__ import annotations

import importlib.resources
import os


class FlagfileError(ValueError):
  """A --flagfile that is neither a file nor a packaged config."""


def names() -> list[str]:
  """The packaged flagfiles' names, e.g. ["base.flags", ..., "xl.flags"]."""
  return sorted(entry.name for entry in importlib.resources.files(
      __name__).iterdir() if entry.name.endswith(".flags"))


def resolve(path: str) -> str:
  """`path` if it exists, else the packaged flagfile it names (NAME or
  configs/NAME), else FlagfileError naming the packaged ones."""
  if os.path.exists(path):
    return path
  name = os.path.basename(path)
  if path in (name, os.path.join("configs", name)) and name in names():
    return str(importlib.resources.files(__name__) / name)
  raise FlagfileError(
      f"--flagfile={path}: no such file, and no packaged config of that "
      f"name (packaged: {', '.join(names())}).")


def resolve_argv(argv: list[str]) -> list[str]:
  """argv with every --flagfile=PATH / --flagfile PATH resolved."""
  out = list(argv)
  for i, arg in enumerate(out):
    for prefix in ("--flagfile=", "-flagfile="):
      if arg.startswith(prefix):
        out[i] = prefix + resolve(arg[len(prefix):])
    if arg in ("--flagfile", "-flagfile") and i + 1 < len(out):
      out[i + 1] = resolve(out[i + 1])
  return out
