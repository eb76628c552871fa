"""A row's fields as checked values: texts (or TRL messages), numbers, booleans.

Each function reads one field of a row (or of a completion inside a row) and
returns its value, or raises rows.BadValue saying what was wrong, which the
RowReader turns into a DataError or a skipped row.

Conversational rows. text_or_messages also takes TRL's conversational form:
a prompt may be a list of {"role", "content"} messages, a completion a list
of exactly one {"role": "assistant", "content"} message; they are kept as
messages (a tuple of dro_fast.chat_template.Message), for the model's
tokenizer to render (a chat template, or T5's "<role>: <content>" lines).
Other keys of a message (e.g. "name") are not kept.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from dro_fast.chat_template import Message
from dro_fast.data.rows import a_json_type
from dro_fast.data.rows import BadValue


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
                 f" (the trainer's `{argument}`)")
    if hint is not None:
      detail += f"; {hint}"
    raise BadValue(field, f"missing {key}", detail)
  value = row[key]
  if value is None:
    raise BadValue(field, f"missing {key}", "is null")
  return value


def text_field(row: dict[str, Any], key: str, *, field: str | None = None,
               argument: str | None = None, hint: str | None = None) -> str:
  """row[key] as a non-blank string.

  Args:
    row: the row or completion.
    key: the field to read; also names the reason a bad row is counted by.
    field: the field as messages name it; defaults to `key`.
    argument: the reader argument that names this field, if any.
    hint: what else to say when the field is missing.

  Returns:
    The string.

  Raises:
    BadValue: the field is missing, null, not a string, or blank.
  """
  field = key if field is None else field
  return _text(_present(row, key, field, argument, hint), key, field, "")


def text_or_messages(row: dict[str, Any], key: str, *, kind: str,
                     argument: str | None = None
                     ) -> str | tuple[Message, ...]:
  """row[key] as a non-blank string, or as TRL messages.

  Args:
    row: the row.
    key: the field to read; also names the reason a bad row is counted by
      and the field in messages.
    kind: "prompt": a list of {"role", "content"} messages is also taken;
      "completion": a list of exactly one assistant message is also taken.
    argument: the reader argument that names this field, if any.

  Returns:
    The string, or the messages as a tuple of Messages.

  Raises:
    BadValue: the field is missing, null, neither a string nor a
      well-formed list of messages, or blank.
  """
  value = _present(row, key, key, argument)
  # A list without any object (e.g. of words) is no conversation: say so.
  if (isinstance(value, (list, tuple))
      and (not value or any(isinstance(item, dict) for item in value))):
    return _messages(value, key, key, kind)
  return _text(value, key, key,
               " or a list of {'role', 'content'} messages")


def _text(value: Any, key: str, field: str, also: str) -> str:
  """`value`, which must be a non-blank string (text_field)."""
  if not isinstance(value, str):
    raise BadValue(field, f"{key} not a string",
                   f"is {a_json_type(value)}, not a string{also}")
  if not value.strip():
    raise BadValue(field, f"empty {key}",
                   "is empty or only whitespace; every text must be "
                   "non-blank")
  return value


def _messages(value: list[Any] | tuple[Any, ...], key: str, field: str,
              kind: str) -> tuple[Message, ...]:
  """A prompt's or completion's list of TRL messages, checked.

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
  found = []
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
    found.append(Message(role, content))
  return tuple(found)


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


def boolean_field(row: dict[str, Any], key: str, *,
                  argument: str | None = None,
                  number_hint: str | None = None) -> bool:
  """row[key], which must be a boolean (JSON true/false, a Parquet bool).

  Args:
    row: the row or completion.
    key: the field to read; also names the reason a bad row is counted by.
    argument: the reader argument that names this field, if any.
    number_hint: what else to say when the value is a number.

  Returns:
    The value.

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
    detail = (f"is {value!r} (a number), not true or false"
              + ("" if number_hint is None else f"; {number_hint}"))
  raise BadValue(key, f"{key} not a boolean", detail)
