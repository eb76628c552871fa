"""Reading a data file's rows: the file formats, bad rows and DataError.

A data file is JSON Lines (.jsonl or .json, one object per line, blank lines
ignored) or Parquet (.parquet). RowReader yields a file's rows as mappings
of fields, with their Location; every reader (dro_fast.data.records,
dro_fast.data.ultrafeedback) turns rows into records through
RowReader.read.

The first bad row raises a DataError naming the file, the row, the field,
what was wrong and what to do. With skip_bad_rows=True bad rows are dropped
instead and one warning counts them by reason. JSONL lines and Parquet rows
are numbered from 1; a record's `source` is "path:number", or
"path:number#k" for completion k (from 0) of a row that holds several.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from collections.abc import Iterator
import dataclasses
import json
import numbers
import os
from typing import Any, Callable, TypeVar

from absl import logging

JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
_PARQUET_BATCH_ROWS = 1024

_Record = TypeVar("_Record")


class DataError(ValueError):
  """Data that cannot be used; the message says where, what and what to do."""


class NoRowsError(DataError):
  """A readable file without a usable row (a shard set may skip such files)."""


class BadValue(Exception):
  """One unusable value of a row; the reader turns it into a DataError.

  Attributes:
    field: the field as the message names it (e.g.
      "completions[2].annotations.honesty.Rating"), or None for a whole line.
    reason: a short, index-free label to count skipped rows by, e.g.
      "reward not finite".
    detail: what was wrong, as a sentence fragment.
  """

  def __init__(self, field: str | None, reason: str, detail: str):
    super().__init__(detail)
    self.field = field
    self.reason = reason
    self.detail = detail


@dataclasses.dataclass(frozen=True)
class Location:
  """A row of a file, and optionally one completion of that row."""
  path: str
  unit: str  # "line" (JSONL) or "row" (Parquet).
  number: int  # From 1.
  completion: int | None = None  # From 0.

  @property
  def source(self) -> str:
    source = f"{self.path}:{self.number}"
    return source if self.completion is None else f"{source}#{self.completion}"

  def __str__(self) -> str:
    where = f"{self.path} {self.unit} {self.number}"
    if self.completion is not None:
      where += f", completion {self.completion}"
    return where


def _json_type(value: Any) -> str:
  """The JSON name of a value's type, for messages."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, str):
    return "string"
  if isinstance(value, numbers.Real):
    return "number"
  if isinstance(value, (list, tuple)):
    return "array"
  if isinstance(value, dict):
    return "object"
  return type(value).__name__


def a_json_type(value: Any) -> str:
  """A value's JSON type with its article ("an array"), for messages."""
  json_type = _json_type(value)
  return f"an {json_type}" if json_type[0] in "aeiou" else f"a {json_type}"


def _plural(count: int, noun: str) -> str:
  return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class RowReader:
  """Reads one file's rows into records; raises on bad rows or counts them.

  Whole-file problems (no such file, unknown extension, a Parquet file
  without a needed column) always raise. A bad row raises unless
  `skip_bad_rows`, in which case `read` logs the counts per reason.
  """

  def __init__(self, path: str | os.PathLike, columns: tuple[str, ...],
               skip_bad_rows: bool, column_hint: str):
    """Checks the file and, for Parquet, its columns.

    Args:
      path: the data file.
      columns: the top-level fields every row needs.
      skip_bad_rows: drop bad rows instead of raising.
      column_hint: what to do when a Parquet file lacks one of `columns`.

    Raises:
      DataError: the extension is unknown, the file does not exist, or a
        Parquet file is unreadable or lacks one of `columns`.
    """
    self.path = os.fspath(path)
    self._columns = columns
    self._skip = skip_bad_rows
    self._reasons = collections.Counter()
    self._skipped_rows = 0
    self._skipped_completions = 0
    self._rows_seen = 0
    extension = os.path.splitext(self.path)[1].lower()
    if extension not in JSONL_EXTENSIONS + PARQUET_EXTENSIONS:
      raise DataError(
          f"{self.path}: cannot tell the format from the extension "
          f"{extension or '(none)'!r}. Use .jsonl or .json for JSON Lines "
          "(one object per line) or .parquet for Parquet.")
    if not os.path.isfile(self.path):
      raise DataError(f"{self.path} does not exist or is not a file. Check "
                      "the path (relative paths start from the working "
                      f"directory, {os.getcwd()}).")
    self._parquet = extension in PARQUET_EXTENSIONS
    if self._parquet:
      self._check_parquet_columns(column_hint)

  def _check_parquet_columns(self, column_hint: str) -> None:
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    try:
      names = pq.read_schema(self.path).names
    except pyarrow.ArrowException as e:
      raise DataError(
          f"{self.path} is not a readable Parquet file ({e}). Check that "
          "the file is complete, or rename it if it holds JSON Lines.") from e
    for column in self._columns:
      if column not in names:
        raise DataError(
            f"{self.path} has no column {column!r}; its columns are "
            f"{', '.join(map(repr, names)) or '(none)'}. {column_hint}")

  def read(self, records: Callable[[dict[str, Any], Location],
                                   Iterable[_Record]]) -> list[_Record]:
    """Reads the file's records, row after row, then logs what it skipped.

    Args:
      records: gives the records of one row (a mapping of fields) at a
        location; a BadValue it raises rejects the whole row. It may
        `reject` parts of the row itself (e.g. one completion of several).

    Returns:
      The records of every row in file order.

    Raises:
      DataError: a bad row (unless the reader skips bad rows), or no
        records (NoRowsError).
    """
    read = []
    for location, row in self._rows():
      try:
        read.extend(records(row, location))
      except BadValue as bad:
        self.reject(location, bad)
    return self._finish(read)

  def _rows(self) -> Iterator[tuple[Location, dict[str, Any]]]:
    """Yields (location, row) for each row that is a mapping of fields."""
    rows = self._parquet_rows() if self._parquet else self._jsonl_rows()
    for location, row in rows:
      self._rows_seen += 1
      if isinstance(row, BadValue):
        self.reject(location, row)
      else:
        yield location, row

  def _jsonl_rows(self) -> Iterator[tuple[Location, Any]]:
    with open(self.path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        location = Location(self.path, "line", number)
        try:
          text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
          yield location, BadValue(None, "not UTF-8",
                                   f"the line is not valid UTF-8 ({e})")
          continue
        if not text.strip():
          continue
        try:
          row = json.loads(text)
        except json.JSONDecodeError as e:
          yield location, BadValue(
              None, "invalid JSON",
              f"the line is not valid JSON ({e.msg} at column {e.colno}); "
              "each line must hold one whole JSON object")
          continue
        if not isinstance(row, dict):
          yield location, BadValue(
              None, "not a JSON object",
              f"the line holds {a_json_type(row)}, not an object; "
              "each line must hold one JSON object (a .json file holding "
              "a single array is not JSON Lines)")
          continue
        yield location, row

  def _parquet_rows(self) -> Iterator[tuple[Location, Any]]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    number = 0
    with pq.ParquetFile(self.path) as parquet_file:
      for batch in parquet_file.iter_batches(
          batch_size=_PARQUET_BATCH_ROWS, columns=list(self._columns)):
        for row in batch.to_pylist():
          number += 1
          yield Location(self.path, "row", number), row

  def reject(self, location: Location, bad: BadValue) -> None:
    """Raises a DataError for a bad row or completion, or counts it.

    Args:
      location: the row, or the completion of a row.
      bad: what was wrong.

    Raises:
      DataError: unless the reader skips bad rows.
    """
    if not self._skip:
      field = "" if bad.field is None else f", field {bad.field!r}"
      what = ("the completion" if location.completion is not None
              else f"the {location.unit}")
      raise DataError(
          f"{location}{field}: {bad.detail}. Fix or remove {what}, or pass "
          "skip_bad_rows=True (the trainer's `skip_bad_rows`) to drop bad "
          "rows with a warning.")
    self._reasons[bad.reason] += 1
    if location.completion is None:
      self._skipped_rows += 1
    else:
      self._skipped_completions += 1

  def _skipped(self) -> str:
    """E.g. "3 rows", "1 row and 2 completions"."""
    parts = []
    if self._skipped_rows:
      parts.append(_plural(self._skipped_rows, "row"))
    if self._skipped_completions:
      parts.append(_plural(self._skipped_completions, "completion"))
    return " and ".join(parts)

  def _finish(self, records: list[_Record]) -> list[_Record]:
    """Logs what was skipped and checks that something was read.

    Args:
      records: the records read from the file.

    Returns:
      `records`.

    Raises:
      NoRowsError: `records` is empty.
    """
    if self._reasons:
      reasons = ", ".join(f"{count} {reason}"
                          for reason, count in self._reasons.most_common())
      logging.warning("skipped %s of %s: %s", self._skipped(), self.path,
                      reasons)
    if records:
      return records
    if self._rows_seen == 0:
      why = "it holds no rows (blank lines are ignored)"
    elif self._reasons:
      why = (f"none of its {_plural(self._rows_seen, 'row')} is usable "
             f"(skipped {self._skipped()}; the warning gives the reasons)")
    else:
      why = f"its {_plural(self._rows_seen, 'row')} hold no completions"
    raise NoRowsError(f"{self.path} has no usable rows: {why}. Check that it "
                      "is the right file and that its fields are named as "
                      "the reader expects.")
