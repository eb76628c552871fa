"""The record types (Triplet, Pair) and the readers of flat rows.

  read_triplets  one {"prompt", "completion", "reward"} object per row, the
                 paper's single-trajectory data (Richemond et al. 2024);
  read_unpaired  one {"prompt", "completion", "label"} object per row with a
                 boolean label, TRL's unpaired preference format (the
                 paper's thumbs-up/down): reward 1.0 for true, 0.0 for false;
  read_pairwise  one {"prompt", "chosen", "rejected"} object per row, for
                 the pairwise baselines.
Each also takes TRL's conversational rows: a prompt as a list of
{"role", "content"} messages, a completion (chosen, rejected) as a list of
one assistant message (dro_fast.data.fields). They stay messages (a tuple of
dro_fast.chat_template.Message) in the records: the model's tokenizer
renders them (a decoder's chat template; T5's Tokenizer joins
"<role>: <content>" lines with the run's `message_separator`). Files, bad
rows and DataError messages are dro_fast.data.rows's; DataError,
NoRowsError and the file extensions are named here too, as what these
readers raise and read. The UltraFeedback reader is
dro_fast.data.ultrafeedback; choosing a reader by format name, and reading
several files, is dro_fast.data.formats.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from dro_fast.chat_template import Message
from dro_fast.data.fields import boolean_field
from dro_fast.data.fields import number_field
from dro_fast.data.fields import text_or_messages
from dro_fast.data.rows import DataError
from dro_fast.data.rows import JSONL_EXTENSIONS
from dro_fast.data.rows import NoRowsError
from dro_fast.data.rows import PARQUET_EXTENSIONS
from dro_fast.data.rows import RowReader

__all__ = ["DataError", "JSONL_EXTENSIONS", "NoRowsError",
           "PARQUET_EXTENSIONS", "Pair", "read_pairwise", "read_triplets",
           "read_unpaired", "Text", "Triplet"]

# A prompt or completion: text, or TRL messages (a conversation).
Text = str | tuple[Message, ...]


@dataclasses.dataclass(frozen=True)
class Triplet:
  """One single-trajectory example (x, y, r).

  Attributes:
    prompt: x, the prompt: text or messages.
    completion: y, the completion: text or (one assistant) message.
    reward: r, a finite number, not normalised.
    source: where it was read, "path:number" or "path:number#completion".
  """
  prompt: Text
  completion: Text
  reward: float
  source: str


@dataclasses.dataclass(frozen=True)
class Pair:
  """One preference pair: `chosen` is preferred to `rejected` for `prompt`.

  Attributes:
    prompt: the prompt: text or messages.
    chosen: the preferred completion: text or (one assistant) message.
    rejected: the other completion, likewise.
    source: where it was read, "path:number".
  """
  prompt: Text
  chosen: Text
  rejected: Text
  source: str


def read_triplets(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  completion_field: str = "completion",
                  reward_field: str = "reward",
                  skip_bad_rows: bool = False) -> list[Triplet]:
  """Reads (prompt, completion, reward) rows from JSON Lines or Parquet.

  Args:
    path: a .jsonl/.json (one object per line) or .parquet file.
    prompt_field: the field holding the prompt: text, or a list of
      messages (see the module docstring).
    completion_field: the field holding the completion: text, or a list of
      one assistant message.
    reward_field: the field holding the reward, a finite number.
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
                       "read_unpaired (the trainer's `data_format`=unpaired)")),
      skip_bad_rows)


def _read_scored(path: str | os.PathLike, prompt_field: str,
                 completion_field: str, score_field: tuple[str, str],
                 score: Callable[[dict[str, Any]], float],
                 skip_bad_rows: bool) -> list[Triplet]:
  """Triplets of each row's prompt, completion and score(row).

  Args:
    path, prompt_field, completion_field, skip_bad_rows:
      as read_triplets.
    score_field: (the reader argument that names the score's field, the
      field), for the hint when a Parquet file lacks the column.
    score: the row's reward; raises BadValue for a bad row.

  Returns:
    The triplets in file order.
  """
  argument, field = score_field
  reader = RowReader(
      path, (prompt_field, completion_field, field), skip_bad_rows,
      "Name the right columns with prompt_field=, completion_field= and "
      f"{argument}= (the trainer's `prompt_field`, `completion_field` and "
      f"`{argument}`).")
  return reader.read(lambda row, location: (Triplet(
      _prompt(row, prompt_field),
      _completion(row, completion_field, "completion_field"),
      score(row), location.source),))


def _prompt(row: dict[str, Any], field: str) -> Text:
  """The row's prompt: text, or messages."""
  return text_or_messages(row, field, kind="prompt", argument="prompt_field")


def _completion(row: dict[str, Any], field: str, argument: str) -> Text:
  """A completion of the row: text, or one assistant message."""
  return text_or_messages(row, field, kind="completion", argument=argument)


def read_unpaired(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  completion_field: str = "completion",
                  label_field: str = "label",
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
    skip_bad_rows: drop bad rows, logging one warning with counts per
      reason, instead of raising on the first.

  Returns:
    The triplets in file order, rewards 1.0 and 0.0.

  Raises:
    DataError: as `read_triplets`; a label that is not a boolean is bad.
  """
  return _read_scored(
      path, prompt_field, completion_field, ("label_field", label_field),
      lambda row: float(boolean_field(
          row, label_field, argument="label_field",
          number_hint="for numeric rewards use read_triplets (the trainer's "
          "`data_format`=triplets)")),
      skip_bad_rows)


def read_pairwise(path: str | os.PathLike, *, prompt_field: str = "prompt",
                  chosen_field: str = "chosen",
                  rejected_field: str = "rejected",
                  skip_bad_rows: bool = False) -> list[Pair]:
  """Reads (prompt, chosen, rejected) rows from JSON Lines or Parquet.

  Args:
    path: a .jsonl/.json (one object per line) or .parquet file.
    prompt_field: the field holding the prompt: text, or a list of
      messages (see the module docstring).
    chosen_field: the field holding the preferred completion: text, or a
      list of one assistant message.
    rejected_field: the field holding the other completion, likewise.
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
      "rejected_field= (the trainer's `prompt_field`, `chosen_field` and "
      "`rejected_field`).")
  return reader.read(lambda row, location: (Pair(
      _prompt(row, prompt_field),
      _completion(row, chosen_field, "chosen_field"),
      _completion(row, rejected_field, "rejected_field"),
      location.source),))
