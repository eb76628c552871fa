"""Reading records: the record types, and the row reading every reader shares.

A data file is JSON Lines (.jsonl or .json, one object per line, blank lines
ignored) or Parquet (.parquet). This module holds what a reader returns
(Triplet, Pair), what it raises (DataError), the row reader and field checks
that every reader builds on (RowReader, BadValue, text_field, number_field),
and the three flat readers:
  read_triplets  one {"prompt", "completion", "reward"} object per row, the
                 paper's single-trajectory data (Richemond et al. 2024);
  read_unpaired  one {"prompt", "completion", "label"} object per row with a
                 boolean label, TRL's unpaired preference format (the
                 paper's thumbs-up/down): reward 1.0 for true, 0.0 for false;
  read_pairwise  one {"prompt", "chosen", "rejected"} object per row, for
                 the pairwise baselines.
The UltraFeedback reader is dro_fast.data.ultrafeedback; choosing a reader
by format name, and reading several files, is dro_fast.data.formats.

Conversational rows. The flat readers also take TRL's conversational form:
a prompt may be a list of {"role", "content"} messages, written as text as
"<role>: <content>" per message joined by `message_separator` (a newline by
default); a completion (chosen, rejected) may be a list of exactly one
{"role": "assistant", "content"} message, read as its content. Other keys of
a message (e.g. "name") are ignored.

The first bad row raises a DataError naming the file, the row, the field,
what was wrong and what to do. With skip_bad_rows=True bad rows are dropped
instead and one warning counts them by reason. JSONL lines and Parquet rows
are numbered from 1; a record's `source` is "path:number", or
"path:number#k" for completion k (from 0) of a row that holds several.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
import dataclasses
import json
import math
import numbers
import os
from typing import Any, Callable

from absl import logging

JSONL_EXTENSIONS = (".jsonl", ".json")
PARQUET_EXTENSIONS = (".parquet",)
_PARQUET_BATCH_ROWS = 1024


class DataError(ValueError):
  """Data that cannot be used; the message says where, what and what to do."""


class NoRowsError(DataError):
  """A readable file without a usable row (formats.read_dataset reads a
  shard set that has some, skipping such files with a warning)."""


@dataclasses.dataclass(frozen=True)
class Triplet:
  """One single-trajectory example (x, y, r).

  Attributes:
    prompt: x, the prompt text.
    completion: y, the completion text.
    reward: r, a finite number, not normalised.
    source: where it was read, "path:number" or "path:number#completion".
  """
  prompt: str
  completion: str
  reward: float
  source: str


@dataclasses.dataclass(frozen=True)
class Pair:
  """One preference pair: `chosen` is preferred to `rejected` for `prompt`.

  Attributes:
    prompt: the prompt text.
    chosen: the preferred completion.
    rejected: the other completion.
    source: where it was read, "path:number".
  """
  prompt: str
  chosen: str
  rejected: str
  source: str


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
class _Location:
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
  """"an array", "a string": the JSON name of a value's type with its
  article, for messages."""
  json_type = _json_type(value)
  return f"an {json_type}" if json_type[0] in "aeiou" else f"a {json_type}"


def _plural(count: int, noun: str) -> str:
  return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class RowReader:
  """Iterates over one file's rows; raises on bad rows or counts them.

  Whole-file problems (no such file, unknown extension, a Parquet file
  without a needed column) always raise. A bad row raises unless
  `skip_bad_rows`, in which case `finish` logs the counts per reason.
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

  def __iter__(self) -> Iterator[tuple[_Location, dict[str, Any]]]:
    """Yields (location, row) for each row that is a mapping of fields."""
    rows = self._parquet_rows() if self._parquet else self._jsonl_rows()
    for location, row in rows:
      self._rows_seen += 1
      if isinstance(row, BadValue):
        self.reject(location, row)
      else:
        yield location, row

  def _jsonl_rows(self) -> Iterator[tuple[_Location, Any]]:
    with open(self.path, "rb") as f:
      for number, raw in enumerate(f, start=1):
        location = _Location(self.path, "line", number)
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

  def _parquet_rows(self) -> Iterator[tuple[_Location, Any]]:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    number = 0
    with pq.ParquetFile(self.path) as parquet_file:
      for batch in parquet_file.iter_batches(
          batch_size=_PARQUET_BATCH_ROWS, columns=list(self._columns)):
        for row in batch.to_pylist():
          number += 1
          yield _Location(self.path, "row", number), row

  def reject(self, location: _Location, bad: BadValue) -> None:
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
          "skip_bad_rows=True (the trainer's --skip_bad_rows) to drop bad "
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

  def finish(self, records: list[Any]) -> list[Any]:
    """Logs what was skipped and checks that something was read.

    Args:
      records: the records read from the file.

    Returns:
      `records`.

    Raises:
      DataError: `records` is empty.
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
                    "is the right file and that its fields are named as the "
                    "reader expects.")


def _present(row: dict[str, Any], key: str, field: str,
             argument: str | None, hint: str | None = None) -> Any:
  """row[key], which must be present and not null.

  Args:
    row: the row or completion.
    key: the field to read.
    field: the field as messages name it.
    argument: the reader argument that names this field, for the hint when
      the field is missing; None if no argument does.
    hint: what else to say when the field is missing.

  Returns:
    The value.

  Raises:
    BadValue: the field is missing or null.
  """
  if key not in row:
    detail = (f"is missing (the fields present are "
              f"{', '.join(map(repr, row)) or 'none'})")
    if argument is not None:
      detail += (f"; if the field has another name, pass {argument}=<name>"
                 f" (the trainer's --{argument})")
    if hint is not None:
      detail += f"; {hint}"
    raise BadValue(field, f"missing {key}", detail)
  value = row[key]
  if value is None:
    raise BadValue(field, f"missing {key}", "is null")
  return value


def text_field(row: dict[str, Any], key: str, *, field: str | None = None,
               argument: str | None = None, hint: str | None = None,
               messages: str | None = None, separator: str = "\n") -> str:
  """row[key] as a non-blank string: unchanged, or from TRL messages.

  Args:
    row: the row or completion.
    key: the field to read; also names the reason a bad row is counted by.
    field: the field as messages name it; defaults to `key`.
    argument: the reader argument that names this field, if any.
    hint: what else to say when the field is missing.
    messages: None: the value must be a string; "prompt": a list of
      {"role", "content"} messages is also taken, as "<role>: <content>"
      per message joined by `separator`; "completion": a list of one
      assistant message is also taken, as its content.
    separator: joins a prompt's messages.

  Returns:
    The string.

  Raises:
    BadValue: the field is missing, null, neither a string nor (when
      `messages`) a well-formed list of messages, or blank.
  """
  field = key if field is None else field
  value = _present(row, key, field, argument, hint)
  # A list without any object (e.g. of words) is no conversation: say so.
  if (messages is not None and isinstance(value, (list, tuple))
      and (not value or any(isinstance(item, dict) for item in value))):
    return _messages_text(value, key, field, messages, separator)
  if not isinstance(value, str):
    also = "" if messages is None else (
        " or a list of {'role', 'content'} messages")
    raise BadValue(field, f"{key} not a string",
                   f"is {a_json_type(value)}, not a string{also}")
  if not value.strip():
    raise BadValue(field, f"empty {key}",
                   "is empty or only whitespace; every text must be "
                   "non-blank")
  return value


def _messages_text(value: list[Any] | tuple[Any, ...], key: str, field: str,
                   kind: str, separator: str) -> str:
  """A prompt's or completion's list of TRL messages as text (text_field).

  Raises:
    BadValue: the list is empty, a message is not an object or lacks a
      non-blank string "role" or "content", or a completion is not exactly
      one assistant message.
  """
  one_assistant = ("a conversational completion is a list of exactly one "
                   "{'role': 'assistant', 'content': ...} message; earlier "
                   "turns belong in the prompt")
  if not value:
    raise BadValue(field, f"empty {key}", "is an empty list of messages"
                   + ("" if kind == "prompt" else f"; {one_assistant}"))
  if kind == "completion" and len(value) != 1:
    raise BadValue(field, f"{key} not one message",
                   f"holds {len(value)} messages; {one_assistant}")
  lines = []
  for index, message in enumerate(value):
    at = f"{field}[{index}]"
    if not isinstance(message, dict):
      raise BadValue(at, f"{key} message not an object",
                     f"is {a_json_type(message)}, not a message object "
                     "with 'role' and 'content'")
    role = text_field(message, "role", field=f"{at}.role")
    content = text_field(message, "content", field=f"{at}.content")
    if kind == "completion" and role != "assistant":
      raise BadValue(f"{at}.role", f"{key} role not assistant",
                     f"is {role!r}; {one_assistant}")
    lines.append(content if kind == "completion" else f"{role}: {content}")
  return separator.join(lines)


def number_field(row: dict[str, Any], key: str, *, field: str | None = None,
                 argument: str | None = None,
                 boolean_hint: str | None = None) -> float:
  """row[key] as a finite float; bools and numeric strings are refused.

  Args:
    row: the row or completion.
    key: the field to read; also names the reason a bad row is counted by.
    field: the field as messages name it; defaults to `key`.
    argument: the reader argument that names this field, if any.
    boolean_hint: what else to say when the value is a boolean.

  Returns:
    The value as a float.

  Raises:
    BadValue: the field is missing, null, a bool, a string, not a real
      number, or not finite.
  """
  field = key if field is None else field
  value = _present(row, key, field, argument)
  if isinstance(value, bool):
    raise BadValue(field, f"{key} not a number",
                   f"is {json.dumps(value)} (a boolean), not a number"
                   + ("" if boolean_hint is None else f"; {boolean_hint}"))
  if isinstance(value, str):
    try:
      float(value)
    except ValueError:
      raise BadValue(field, f"{key} not a number",
                     f"is the string {value!r}, not a number") from None
    raise BadValue(field, f"{key} not a number",
                   f"is the string {value!r}, not a number; write it as a "
                   f"JSON number ({value.strip()}, without quotes)")
  if not isinstance(value, numbers.Real):
    raise BadValue(field, f"{key} not a number",
                   f"is {a_json_type(value)}, not a number")
  try:
    number = float(value)
  except OverflowError:
    number = math.inf
  if not math.isfinite(number):
    raise BadValue(field, f"{key} not finite",
                   f"is {value!r}; it must be a finite number")
  return number


def _boolean_field(row: dict[str, Any], key: str, *,
                   argument: str | None = None) -> bool:
  """row[key], which must be a boolean (JSON true/false, a Parquet bool).

  Raises:
    BadValue: the field is missing, null or not a boolean.
  """
  value = _present(row, key, key, argument)
  if isinstance(value, bool):
    return value
  detail = f"is {a_json_type(value)}, not true or false"
  if isinstance(value, str):
    detail = f"is the string {value!r}, not true or false"
    if value.strip().lower() in ("true", "false"):
      detail += ("; write it as a JSON boolean "
                 f"({value.strip().lower()}, without quotes)")
  elif isinstance(value, numbers.Real):
    detail = (f"is {value!r} (a number), not true or false; for numeric "
              "rewards use read_triplets (the trainer's "
              "--data_format=triplets)")
  raise BadValue(key, f"{key} not a boolean", detail)


def read_triplets(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  completion_field: str = "completion",
                  reward_field: str = "reward",
                  message_separator: str = "\n",
                  skip_bad_rows: bool = False) -> list[Triplet]:
  """Reads (prompt, completion, reward) rows from JSON Lines or Parquet.

  Args:
    path: a .jsonl/.json (one object per line) or .parquet file.
    prompt_field: the field holding the prompt: text, or a list of
      messages (see the module docstring).
    completion_field: the field holding the completion: text, or a list of
      one assistant message.
    reward_field: the field holding the reward, a finite number.
    message_separator: joins the messages of a conversational prompt.
    skip_bad_rows: drop bad rows, logging one warning with counts per
      reason, instead of raising on the first.

  Returns:
    The triplets in file order.

  Raises:
    DataError: the file is missing, has an unknown extension, lacks a column
      (Parquet), has a bad row (unless `skip_bad_rows`), or has no usable
      rows (NoRowsError).
  """
  return _read_scored(
      path, prompt_field, completion_field, ("reward_field", reward_field),
      lambda row: (
          number_field(row, reward_field, argument="reward_field",
                       boolean_hint="for thumbs-up/down labels use "
                       "read_unpaired (the trainer's --data_format=unpaired)")),
      message_separator, skip_bad_rows)


def _read_scored(path: str | os.PathLike, prompt_field: str,
                 completion_field: str, score_field: tuple[str, str],
                 score: Callable[[dict[str, Any]], float],
                 message_separator: str,
                 skip_bad_rows: bool) -> list[Triplet]:
  """Triplets of the rows' prompt, completion and score(row) (read_triplets,
  read_unpaired). score_field: (the argument's name, the field); score
  raises BadValue for a bad row."""
  argument, field = score_field
  reader = RowReader(
      path, (prompt_field, completion_field, field), skip_bad_rows,
      "Name the right columns with prompt_field=, completion_field= and "
      f"{argument}= (the trainer's --prompt_field, --completion_field and "
      f"--{argument}).")
  triplets = []
  for location, row in reader:
    try:
      prompt, completion = _prompt_completion(
          row, prompt_field, completion_field, message_separator)
      value = score(row)
    except BadValue as bad:
      reader.reject(location, bad)
      continue
    triplets.append(Triplet(prompt, completion, value, location.source))
  return reader.finish(triplets)


def _prompt_completion(row: dict[str, Any], prompt_field: str,
                       completion_field: str,
                       separator: str) -> tuple[str, str]:
  """The row's prompt and completion texts (text or messages)."""
  return (text_field(row, prompt_field, argument="prompt_field",
                     messages="prompt", separator=separator),
          text_field(row, completion_field, argument="completion_field",
                     messages="completion"))


def read_unpaired(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  completion_field: str = "completion",
                  label_field: str = "label",
                  message_separator: str = "\n",
                  skip_bad_rows: bool = False) -> list[Triplet]:
  """Reads TRL's unpaired preference rows (prompt, completion, label).

  The label is a boolean, the paper's thumbs-up (true) or thumbs-down
  (false); it becomes the reward 1.0 or 0.0, which training then normalises
  over the dataset like any reward (data.RewardStats).

  Args:
    path: a .jsonl/.json (one object per line) or .parquet file.
    prompt_field: the field holding the prompt: text, or a list of
      messages (see the module docstring).
    completion_field: the field holding the completion: text, or a list of
      one assistant message.
    label_field: the field holding the label, JSON true or false (a Parquet
      bool).
    message_separator: joins the messages of a conversational prompt.
    skip_bad_rows: drop bad rows, logging one warning with counts per
      reason, instead of raising on the first.

  Returns:
    The triplets in file order, rewards 1.0 and 0.0.

  Raises:
    DataError: as `read_triplets`; a label that is not a boolean is bad.
  """
  return _read_scored(
      path, prompt_field, completion_field, ("label_field", label_field),
      lambda row: float(_boolean_field(row, label_field,
                                       argument="label_field")),
      message_separator, skip_bad_rows)


def read_pairwise(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  chosen_field: str = "chosen",
                  rejected_field: str = "rejected",
                  message_separator: str = "\n",
                  skip_bad_rows: bool = False) -> list[Pair]:
  """Reads (prompt, chosen, rejected) rows from JSON Lines or Parquet.

  Args:
    path: a .jsonl/.json (one object per line) or .parquet file.
    prompt_field: the field holding the prompt: text, or a list of
      messages (see the module docstring).
    chosen_field: the field holding the preferred completion: text, or a
      list of one assistant message.
    rejected_field: the field holding the other completion, likewise.
    message_separator: joins the messages of a conversational prompt.
    skip_bad_rows: drop bad rows, logging one warning with counts per
      reason, instead of raising on the first.

  Returns:
    The pairs in file order.

  Raises:
    DataError: as `read_triplets`.
  """
  reader = RowReader(
      path, (prompt_field, chosen_field, rejected_field), skip_bad_rows,
      "Name the right columns with prompt_field=, chosen_field= and "
      "rejected_field= (the trainer's --prompt_field, --chosen_field and "
      "--rejected_field).")
  pairs = []
  for location, row in reader:
    try:
      pair = Pair(text_field(row, prompt_field, argument="prompt_field",
                             messages="prompt", separator=message_separator),
                  text_field(row, chosen_field, argument="chosen_field",
                             messages="completion"),
                  text_field(row, rejected_field, argument="rejected_field",
                             messages="completion"),
                  location.source)
    except BadValue as bad:
      reader.reject(location, bad)
      continue
    pairs.append(pair)
  return reader.finish(pairs)
