"""JSON-lines records: the machine every record names, and where they go.

Records are appended to the raw files benchmarks/RESULTS.md cites.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import jax

from benchmarks.lib import timing


def machine() -> dict[str, Any]:
  """The fields that name where a record was measured."""
  return {"device": timing.device_description(), "jax": jax.__version__,
          "threads": len(os.sched_getaffinity(0))}


def append(path: str | None, records: Iterable[dict[str, Any]]) -> None:
  """Appends one JSON line per record to `path` (nothing when None)."""
  if path is None:
    return
  with open(path, "a") as out:
    out.writelines(json.dumps(r) + "\n" for r in records)


def emit(path: str | None, records: Iterable[dict[str, Any]]) -> None:
  """Appends the records to `path` (as `append`) and prints each as a JSON
  line."""
  records = list(records)
  append(path, records)
  for record in records:
    print(json.dumps(record), flush=True)
