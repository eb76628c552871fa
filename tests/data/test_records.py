"""Tests for dro_fast.data.records: the readers and their error messages."""

import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dro_fast import data
from dro_fast.chat_template import Message
from dro_fast.tokenizer import as_text

_GOOD = {"prompt": "say hi", "completion": "hi", "reward": 1.5}


def _write_jsonl(path, rows):
  """Writes dicts as JSON lines; strings are written as raw lines."""
  lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING]


# --------------------------------------------------------------------------
# Triplets.


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_read_triplets_jsonl(tmp_path, suffix):
  path = _write_jsonl(tmp_path / f"train{suffix}", [
      _GOOD,
      "",
      "   ",
      {"prompt": "count", "completion": "1 2 3", "reward": -2, "extra": [1]},
  ])
  triplets = data.read_triplets(path)
  assert triplets == [
      data.Triplet("say hi", "hi", 1.5, f"{path}:1"),
      data.Triplet("count", "1 2 3", -2.0, f"{path}:4"),
  ]
  assert isinstance(triplets[1].reward, float)


def test_read_triplets_parquet_custom_fields(tmp_path):
  path = _write_parquet(tmp_path / "train.parquet", [
      {"x": "a b", "y": "c", "r": 0.25, "unused": 1},
      {"x": "d", "y": "e f", "r": 3.0, "unused": 2},
  ])
  triplets = data.read_triplets(path, prompt_field="x", completion_field="y",
                                reward_field="r")
  assert triplets == [data.Triplet("a b", "c", 0.25, f"{path}:1"),
                      data.Triplet("d", "e f", 3.0, f"{path}:2")]


def test_read_triplets_jsonl_with_byte_order_mark(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_GOOD).encode() + b"\n")
  assert data.read_triplets(path)[0].prompt == "say hi"


_BAD_TRIPLET_LINES = {
    "invalid_json": ('{"prompt": "p", "completion": ', None, "not valid JSON"),
    "not_an_object": ("[1, 2]", None, "not an object"),
    "missing_reward": ('{"prompt": "p", "completion": "c"}', "reward",
                       "is missing"),
    "missing_prompt": ('{"completion": "c", "reward": 1}', "prompt",
                       "prompt_field="),
    "mistyped_prompt": ('{"prompt": 3, "completion": "c", "reward": 1}',
                        "prompt", "is a number, not a string"),
    "nan_reward": ('{"prompt": "p", "completion": "c", "reward": NaN}',
                   "reward", "finite"),
    "inf_reward": ('{"prompt": "p", "completion": "c", "reward": -Infinity}',
                   "reward", "finite"),
    "numeric_string_reward": (
        '{"prompt": "p", "completion": "c", "reward": "3.5"}', "reward",
        "write it as a JSON number"),
    "string_reward": ('{"prompt": "p", "completion": "c", "reward": "good"}',
                      "reward", "is the string 'good', not a number"),
    "bool_reward": ('{"prompt": "p", "completion": "c", "reward": true}',
                    "reward", "(a boolean), not a number; for thumbs-up/down "
                    "labels use read_unpaired (the trainer's "
                    "`data_format`=unpaired)"),
    "null_reward": ('{"prompt": "p", "completion": "c", "reward": null}',
                    "reward", "is null"),
    "empty_prompt": ('{"prompt": "", "completion": "c", "reward": 1}',
                     "prompt", "empty"),
    "blank_completion": ('{"prompt": "p", "completion": " \\t", "reward": 1}',
                         "completion", "empty"),
}


@pytest.mark.parametrize("line,field,what", _BAD_TRIPLET_LINES.values(),
                         ids=_BAD_TRIPLET_LINES.keys())
def test_bad_triplet_row_names_file_line_and_field(tmp_path, line, field,
                                                   what):
  path = _write_jsonl(tmp_path / "train.jsonl", [_GOOD, "", line, _GOOD])
  with pytest.raises(data.DataError) as error:
    data.read_triplets(path)
  message = str(error.value)
  assert f"{path} line 3" in message
  if field is not None:
    assert f"field {field!r}" in message
  assert what in message
  assert "skip_bad_rows=True" in message


def test_bad_utf8_line(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_bytes(json.dumps(_GOOD).encode() + b"\n\xff\xfe\n")
  with pytest.raises(data.DataError, match=r"line 2: the line is not valid "
                     "UTF-8"):
    data.read_triplets(path)


def test_bad_parquet_row_names_row_and_field(tmp_path):
  path = _write_parquet(tmp_path / "train.parquet", [
      {"prompt": "p", "completion": "c", "reward": 1.0},
      {"prompt": "p", "completion": "c", "reward": float("nan")},
  ])
  with pytest.raises(data.DataError) as error:
    data.read_triplets(path)
  assert f"{path} row 2, field 'reward'" in str(error.value)
  assert "finite" in str(error.value)


def test_parquet_null_prompt_is_missing(tmp_path):
  path = _write_parquet(tmp_path / "train.parquet", [
      {"prompt": None, "completion": "c", "reward": 1.0}])
  with pytest.raises(data.DataError,
                     match=r"row 1, field 'prompt': is null"):
    data.read_triplets(path)


@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_parquet_without_a_column_is_a_file_error(tmp_path, skip_bad_rows):
  path = _write_parquet(tmp_path / "train.parquet", [
      {"prompt": "p", "completion": "c", "score": 1.0}])
  with pytest.raises(data.DataError) as error:
    data.read_triplets(path, skip_bad_rows=skip_bad_rows)
  message = str(error.value)
  assert str(path) in message
  assert "no column 'reward'" in message
  assert "'prompt', 'completion', 'score'" in message
  assert "reward_field=" in message


def test_unreadable_parquet(tmp_path):
  path = tmp_path / "train.parquet"
  path.write_text(json.dumps(_GOOD))
  with pytest.raises(data.DataError,
                     match=r"not a readable Parquet file"):
    data.read_triplets(path)


def test_missing_file(tmp_path):
  path = tmp_path / "absent.jsonl"
  with pytest.raises(data.DataError,
                     match=re.escape(f"{path} does not exist")):
    data.read_triplets(path)


def test_unknown_extension(tmp_path):
  path = tmp_path / "train.csv"
  path.write_text("prompt,completion,reward\n")
  with pytest.raises(data.DataError, match=r"extension '\.csv'.*\.jsonl"):
    data.read_triplets(path)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_empty_file(tmp_path, content):
  path = tmp_path / "train.jsonl"
  path.write_text(content)
  with pytest.raises(data.DataError,
                     match=re.escape(f"{path} has no usable rows: it holds "
                                     "no rows")):
    data.read_triplets(path)


def test_empty_parquet_file(tmp_path):
  path = tmp_path / "train.parquet"
  schema = pa.schema([("prompt", pa.string()), ("completion", pa.string()),
                      ("reward", pa.float64())])
  pq.write_table(schema.empty_table(), path)
  with pytest.raises(data.DataError, match=r"has no usable rows"):
    data.read_triplets(path)


def test_skip_bad_rows_warns_once_with_counts_per_reason(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "train.jsonl", [
      _GOOD,
      '{"prompt": "p", "completion": "c", "reward": NaN}',
      '{"prompt": "p", "completion": "", "reward": 1}',
      '{"prompt": "q", "completion": "d", "reward": 2}',
      '{"prompt": "p", "completion": "c", "reward": Infinity}',
  ])
  with caplog.at_level(logging.WARNING):
    triplets = data.read_triplets(path, skip_bad_rows=True)
  assert [t.source for t in triplets] == [f"{path}:1", f"{path}:4"]
  assert _warnings(caplog) == [
      f"skipped 3 rows of {path}: 2 reward not finite, 1 empty completion"]


def test_skip_bad_rows_everything_bad(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "train.jsonl", ["{oops", "[]"])
  with caplog.at_level(logging.WARNING):
    with pytest.raises(data.DataError) as error:
      data.read_triplets(path, skip_bad_rows=True)
  assert f"{path} has no usable rows" in str(error.value)
  assert "skipped 2 rows" in str(error.value)
  assert _warnings(caplog) == [
      f"skipped 2 rows of {path}: 1 invalid JSON, 1 not a JSON object"]


def test_no_warning_without_bad_rows(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "train.jsonl", [_GOOD])
  with caplog.at_level(logging.WARNING):
    data.read_triplets(path, skip_bad_rows=True)
  assert _warnings(caplog) == []


# --------------------------------------------------------------------------
# UltraFeedback.


def _completion(response, ratings, overall_score=7.5):
  """An UltraFeedback completion; `ratings` are the four aspects' strings."""
  return {
      "model": "m",
      "response": response,
      "annotations": {
          aspect: {"Rating": rating, "Rationale": "because"}
          for aspect, rating in zip(data.ULTRAFEEDBACK_ASPECTS, ratings)
      },
      "critique": "ok",
      "overall_score": overall_score,
  }


def _uf_rows():
  return [
      {"source": "s", "instruction": "add 2 and 2", "completions": [
          _completion("4", ("5", "4", "N/A", "3"), overall_score=8.0),
          _completion("five", ("2", "1", "3", "4"), overall_score=3.0),
      ]},
      {"source": "s", "instruction": "name a colour", "completions": [
          _completion("red", ("4", "N/A", "5", "5"), overall_score=9.5),
      ]},
  ]


@pytest.mark.parametrize("reward,expected", [
    ("mean_rating", [4.0, 2.5, 14 / 3]),
    ("overall_score", [8.0, 3.0, 9.5]),
    ("instruction_following", [5.0, 2.0, 4.0]),
    ("helpfulness", [3.0, 4.0, 5.0]),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_read_ultrafeedback(tmp_path, reward, expected, suffix):
  path = tmp_path / f"uf{suffix}"
  if suffix == ".jsonl":
    _write_jsonl(path, _uf_rows())
  else:
    _write_parquet(path, _uf_rows())
  triplets = data.read_ultrafeedback(path, reward=reward)
  assert [(t.prompt, t.completion, t.source) for t in triplets] == [
      ("add 2 and 2", "4", f"{path}:1#0"),
      ("add 2 and 2", "five", f"{path}:1#1"),
      ("name a colour", "red", f"{path}:2#0"),
  ]
  assert [t.reward for t in triplets] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("threshold,expected", [
    (4.0, [1.0, 0.0, 1.0]),
    (4.5, [0.0, 0.0, 1.0]),
    (1, [1.0, 1.0, 1.0]),
])
def test_read_ultrafeedback_binary(tmp_path, threshold, expected):
  path = _write_jsonl(tmp_path / "uf.jsonl", _uf_rows())
  triplets = data.read_ultrafeedback(path, reward="binary",
                                     threshold=threshold)
  assert [t.reward for t in triplets] == expected


def test_ultrafeedback_argument_errors(tmp_path):
  path = _write_jsonl(tmp_path / "uf.jsonl", _uf_rows())
  with pytest.raises(ValueError, match=r"needs threshold="):
    data.read_ultrafeedback(path, reward="binary")
  with pytest.raises(ValueError, match=r"applies only to reward='binary'"):
    data.read_ultrafeedback(path, threshold=3.0)
  with pytest.raises(ValueError, match=r"finite number"):
    data.read_ultrafeedback(path, reward="binary", threshold=float("nan"))
  with pytest.raises(ValueError, match=r"mean_rating, overall_score, binary, "
                     "instruction_following"):
    data.read_ultrafeedback(path, reward="fine-grained_score")


def test_ultrafeedback_all_na_is_a_bad_completion(tmp_path):
  rows = _uf_rows()
  rows[1]["completions"].append(
      _completion("blue", ("N/A", "N/A", "N/A", "N/A")))
  path = _write_jsonl(tmp_path / "uf.jsonl", rows)
  with pytest.raises(data.DataError) as error:
    data.read_ultrafeedback(path)
  message = str(error.value)
  assert f"{path} line 2, completion 1" in message
  assert "field 'completions[1].annotations'" in message
  assert "no numeric aspect 'Rating'" in message


@pytest.mark.parametrize("reward,field,what", [
    ("mean_rating", "completions[0].annotations.honesty.Rating",
     "'five', neither a number nor 'N/A'"),
    ("truthfulness", "completions[0].annotations.truthfulness.Rating",
     "'N/A' or absent"),
])
def test_ultrafeedback_bad_rating(tmp_path, reward, field, what):
  rows = _uf_rows()
  rows[0]["completions"][0] = _completion("4", ("5", "five", "N/A", "3"))
  path = _write_jsonl(tmp_path / "uf.jsonl", rows)
  with pytest.raises(data.DataError) as error:
    data.read_ultrafeedback(path, reward=reward)
  assert f"{path} line 1, completion 0, field {field!r}" in str(error.value)
  assert what in str(error.value)


def test_ultrafeedback_bad_overall_score(tmp_path):
  rows = _uf_rows()
  rows[1]["completions"][0]["overall_score"] = "9"
  path = _write_jsonl(tmp_path / "uf.jsonl", rows)
  with pytest.raises(data.DataError,
                     match=r"line 2, completion 0, field "
                     r"'completions\[0\].overall_score': is the string '9'"):
    data.read_ultrafeedback(path, reward="overall_score")


def test_ultrafeedback_missing_instruction_is_a_bad_row(tmp_path):
  rows = _uf_rows()
  del rows[1]["instruction"]
  path = _write_jsonl(tmp_path / "uf.jsonl", rows)
  with pytest.raises(data.DataError,
                     match=r"line 2, field 'instruction': is missing"):
    data.read_ultrafeedback(path)


def test_ultrafeedback_skip_bad_rows(tmp_path, caplog):
  rows = _uf_rows()
  rows[0]["completions"].append(
      _completion("x", ("N/A", "N/A", "N/A", "N/A")))
  rows[0]["completions"].append(_completion("", ("1", "1", "1", "1")))
  rows.append({"instruction": "", "completions": []})
  path = _write_jsonl(tmp_path / "uf.jsonl", rows)
  with caplog.at_level(logging.WARNING):
    triplets = data.read_ultrafeedback(path, skip_bad_rows=True)
  assert [t.source for t in triplets] == [f"{path}:1#0", f"{path}:1#1",
                                          f"{path}:2#0"]
  assert _warnings(caplog) == [
      f"skipped 1 row and 2 completions of {path}: 1 no numeric rating, "
      "1 empty response, 1 empty instruction"]


def test_ultrafeedback_parquet_wrong_schema(tmp_path):
  path = _write_parquet(tmp_path / "uf.parquet", [_GOOD])
  with pytest.raises(data.DataError,
                     match=r"no column 'instruction'; its columns are "
                     r"'prompt', 'completion', 'reward'"):
    data.read_ultrafeedback(path)


# --------------------------------------------------------------------------
# Pairwise and dispatch.

_PAIR = {"prompt": "p", "chosen": "good", "rejected": "bad"}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_read_pairwise(tmp_path, suffix):
  rows = [_PAIR, {"prompt": "q", "chosen": "yes", "rejected": "no"}]
  path = tmp_path / f"pairs{suffix}"
  if suffix == ".jsonl":
    _write_jsonl(path, rows)
  else:
    _write_parquet(path, rows)
  assert data.read_pairwise(path) == [
      data.Pair("p", "good", "bad", f"{path}:1"),
      data.Pair("q", "yes", "no", f"{path}:2"),
  ]


def test_read_pairwise_custom_fields_and_bad_row(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "pairs.jsonl", [
      {"x": "p", "a": "good", "b": "bad"},
      {"x": "p", "a": "good", "b": ""},
      {"x": "p", "b": "bad"},
  ])
  fields = dict(prompt_field="x", chosen_field="a", rejected_field="b")
  with pytest.raises(data.DataError,
                     match=r"line 2, field 'b': is empty"):
    data.read_pairwise(path, **fields)
  with caplog.at_level(logging.WARNING):
    pairs = data.read_pairwise(path, skip_bad_rows=True, **fields)
  assert pairs == [data.Pair("p", "good", "bad", f"{path}:1")]
  assert _warnings(caplog) == [
      f"skipped 2 rows of {path}: 1 empty b, 1 missing a"]


def test_read_dataset_dispatches(tmp_path):
  triplets = _write_jsonl(tmp_path / "t.jsonl", [_GOOD])
  uf = _write_jsonl(tmp_path / "uf.jsonl", _uf_rows())
  pairs = _write_jsonl(tmp_path / "p.jsonl", [_PAIR])
  assert data.read_dataset(triplets, "triplets") == data.read_triplets(
      triplets)
  assert data.read_dataset(uf, "ultrafeedback", reward="helpfulness") == (
      data.read_ultrafeedback(uf, reward="helpfulness"))
  assert data.read_dataset(pairs, "pairwise") == data.read_pairwise(pairs)
  unpaired = _write_jsonl(tmp_path / "u.jsonl", [_UNPAIRED])
  assert data.read_dataset(unpaired, "unpaired") == data.read_unpaired(
      unpaired)
  with pytest.raises(ValueError,
                     match=r"'csv' is unknown; choose one of triplets, "
                     "unpaired, ultrafeedback, pairwise"):
    data.read_dataset(triplets, "csv")


# --------------------------------------------------------------------------
# Unpaired (TRL: prompt, completion, boolean label).

_UNPAIRED = {"prompt": "say hi", "completion": "hi", "label": True}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_read_unpaired(tmp_path, suffix):
  rows = [_UNPAIRED, {"prompt": "say no", "completion": "yes", "label": False},
          {"prompt": "count", "completion": "1 2", "label": True}]
  write = _write_jsonl if suffix == ".jsonl" else _write_parquet
  path = write(tmp_path / f"train{suffix}", rows)
  triplets = data.read_unpaired(path)
  assert triplets == [data.Triplet("say hi", "hi", 1.0, f"{path}:1"),
                      data.Triplet("say no", "yes", 0.0, f"{path}:2"),
                      data.Triplet("count", "1 2", 1.0, f"{path}:3")]
  assert all(isinstance(t.reward, float) for t in triplets)


def test_unpaired_rewards_normalise_like_any_reward(tmp_path):
  # 3 thumbs-up of 4: rewards 1, 1, 1, 0 -> mean 0.75, std sqrt(3) / 4.
  rows = [dict(_UNPAIRED, label=label) for label in (True, True, False, True)]
  triplets = data.read_unpaired(_write_jsonl(tmp_path / "u.jsonl", rows))
  stats = data.RewardStats.fit([t.reward for t in triplets], "u.jsonl")
  assert (stats.mean, stats.std) == pytest.approx((0.75, 3 ** 0.5 / 4))
  np.testing.assert_allclose(
      stats.normalise([1.0, 0.0]), [1 / 3 ** 0.5, -3 ** 0.5], rtol=1e-6)


def test_read_unpaired_custom_fields(tmp_path):
  path = _write_jsonl(tmp_path / "u.jsonl",
                      [{"x": "p", "y": "c", "thumbs_up": False}])
  assert data.read_unpaired(path, prompt_field="x", completion_field="y",
                            label_field="thumbs_up") == [
                                data.Triplet("p", "c", 0.0, f"{path}:1")]


_BAD_LABELS = {
    "number": (1, "is 1 (a number), not true or false; for numeric rewards "
               "use read_triplets (the trainer's `data_format`=triplets)"),
    "string_true": ("true", "is the string 'true', not true or false; write "
                    "it as a JSON boolean (true, without quotes)"),
    "string": ("good", "is the string 'good', not true or false"),
    "null": (None, "is null"),
    "array": ([True], "is an array, not true or false"),
}


@pytest.mark.parametrize("label,what", _BAD_LABELS.values(),
                         ids=_BAD_LABELS.keys())
def test_bad_label_names_file_line_and_field(tmp_path, label, what):
  path = _write_jsonl(tmp_path / "u.jsonl",
                      [_UNPAIRED, dict(_UNPAIRED, label=label)])
  with pytest.raises(data.DataError) as error:
    data.read_unpaired(path)
  assert str(error.value).startswith(f"{path} line 2, field 'label': {what}. "
                                     "Fix or remove the line")


def test_unpaired_missing_label_and_parquet_column(tmp_path, caplog):
  path = _write_jsonl(tmp_path / "u.jsonl", [
      _UNPAIRED, {"prompt": "p", "completion": "c", "reward": 1.0}])
  with pytest.raises(data.DataError, match=r"line 2, field 'label': is "
                     r"missing .*pass label_field=<name> \(the trainer's "
                     r"`label_field`\)"):
    data.read_unpaired(path)
  with caplog.at_level(logging.WARNING):
    assert len(data.read_unpaired(path, skip_bad_rows=True)) == 1
  assert _warnings(caplog) == [f"skipped 1 row of {path}: 1 missing label"]
  parquet = _write_parquet(tmp_path / "u.parquet",
                           [{"prompt": "p", "completion": "c", "reward": 1}])
  with pytest.raises(data.DataError, match=r"has no column 'label'.*"
                     "`label_field`"):
    data.read_unpaired(parquet)


# --------------------------------------------------------------------------
# Conversational rows (TRL: lists of {"role", "content"} messages).


def _user(content):
  return {"role": "user", "content": content}


def _assistant(content):
  return {"role": "assistant", "content": content}


_CONVERSATION = [{"role": "system", "content": "be brief"}, _user("say hi"),
                 _assistant("hello"), _user("again")]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_conversational_rows_stay_messages(tmp_path, suffix):
  write = _write_jsonl if suffix == ".jsonl" else _write_parquet
  unpaired = write(tmp_path / f"u{suffix}", [
      {"prompt": _CONVERSATION, "completion": [_assistant("hi")],
       "label": True},
      {"prompt": [_user("say hi")], "completion": [_assistant("no")],
       "label": False}])
  read = data.read_unpaired(unpaired)
  assert read == [
      data.Triplet(tuple(_CONVERSATION), (_assistant("hi"),), 1.0,
                   f"{unpaired}:1"),
      data.Triplet((_user("say hi"),), (_assistant("no"),), 0.0,
                   f"{unpaired}:2")]
  assert all(isinstance(m, Message) for t in read
             for m in t.prompt + t.completion)
  hash(read[0])  # Records stay hashable.
  # T5 reads them as today's text: "<role>: <content>" lines.
  assert [(as_text(t.prompt), as_text(t.completion, completion=True))
          for t in read] == [
              ("system: be brief\nuser: say hi\nassistant: hello\n"
               "user: again", "hi"), ("user: say hi", "no")]
  triplets = write(tmp_path / f"t{suffix}", [
      {"prompt": [_user("a"), _assistant("b"), _user("c")],
       "completion": [_assistant("d")], "reward": 2.5}])
  [triplet] = data.read_triplets(triplets)
  assert (as_text(triplet.prompt, "\n\n"),
          as_text(triplet.completion, "\n\n", completion=True),
          triplet.reward) == ("user: a\n\nassistant: b\n\nuser: c", "d", 2.5)
  pairs = write(tmp_path / f"p{suffix}", [
      {"prompt": [_user("q")], "chosen": [_assistant("good")],
       "rejected": [_assistant("bad")]}])
  assert data.read_pairwise(pairs) == [
      data.Pair((_user("q"),), (_assistant("good"),), (_assistant("bad"),),
                f"{pairs}:1")]


def test_conversational_and_plain_rows_mix(tmp_path):
  path = _write_jsonl(tmp_path / "t.jsonl", [
      _GOOD, {"prompt": [_user("say hi")], "completion": "hi", "reward": 1}])
  assert [(t.prompt, t.completion) for t in data.read_triplets(path)] == [
      ("say hi", "hi"), ((_user("say hi"),), "hi")]


_BAD_MESSAGES = {
    "empty_prompt": ("prompt", [], "prompt", "is an empty list of messages"),
    "message_not_object": ("prompt", [_user("a"), "b"], "prompt[1]",
                           "is a string, not a message object with 'role' "
                           "and 'content'"),
    "missing_role": ("prompt", [{"content": "a"}], "prompt[0].role",
                     "is missing (the fields present are 'content')"),
    "null_content": ("prompt", [{"role": "user", "content": None}],
                     "prompt[0].content", "is null"),
    "content_parts": ("prompt", [{"role": "user",
                                  "content": [{"type": "text"}]}],
                      "prompt[0].content", "is an array, not a string"),
    "blank_content": ("prompt", [_user(" ")], "prompt[0].content",
                      "is empty or only whitespace"),
    "completion_turns": ("completion", [_assistant("a"), _assistant("b")],
                         "completion", "holds 2 messages; a conversational "
                         "completion is a list of exactly one {'role': "
                         "'assistant', 'content': ...} message; earlier "
                         "turns belong in the prompt"),
    "completion_role": ("completion", [_user("a")], "completion[0].role",
                        "is 'user'; a conversational completion is a list "
                        "of exactly one"),
    "completion_empty": ("completion", [], "completion",
                         "is an empty list of messages; a conversational "
                         "completion"),
    "prompt_words": ("prompt", ["say", "hi"], "prompt",
                     "is an array, not a string or a list of {'role', "
                     "'content'} messages"),
    "prompt_number": ("prompt", 3, "prompt", "is a number, not a string or a "
                      "list of {'role', 'content'} messages"),
}


@pytest.mark.parametrize("key,value,field,what", _BAD_MESSAGES.values(),
                         ids=_BAD_MESSAGES.keys())
def test_bad_messages_name_file_line_and_field(tmp_path, key, value, field,
                                               what):
  row = {"prompt": [_user("p")], "completion": [_assistant("c")],
         "label": True}
  path = _write_jsonl(tmp_path / "u.jsonl", [row, dict(row, **{key: value})])
  with pytest.raises(data.DataError) as error:
    data.read_unpaired(path)
  message = str(error.value)
  assert message.startswith(f"{path} line 2, field {field!r}: {what}"), (
      message)
  assert message.endswith("Fix or remove the line, or pass "
                          "skip_bad_rows=True (the trainer's `skip_bad_rows`) "
                          "to drop bad rows with a warning.")


def test_bad_parquet_message_names_row(tmp_path):
  path = _write_parquet(tmp_path / "p.parquet", [
      {"prompt": [_user("q")], "chosen": [_assistant("a")],
       "rejected": [_assistant("b")]},
      {"prompt": [_user("q")], "chosen": [_assistant("a")],
       "rejected": [_user("b")]}])
  with pytest.raises(data.DataError, match=re.escape(
      f"{path} row 2, field 'rejected[0].role': is 'user'")):
    data.read_pairwise(path)


def test_ultrafeedback_keeps_text_only(tmp_path):
  rows = _uf_rows()
  rows[0]["instruction"] = [_user("q")]
  path = _write_jsonl(tmp_path / "uf.jsonl", rows)
  with pytest.raises(data.DataError, match="field 'instruction': is an "
                     "array, not a string"):
    data.read_ultrafeedback(path)
