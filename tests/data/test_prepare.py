"""What a run reuses from its workdir is checked, never trusted.

reward_stats.json is reused only when it is intact and fitted on exactly the
rewards read now; spiece.model only when its SHA-256 still equals the one
recorded beside it (spiece.model.sha256) when it was saved. Anything else
stops the run with one error naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import re

import pytest

from dro_fast import data
from dro_fast.data import prepare
from dro_fast.data.config import DataConfig

_REWARDS = [0.5, 3.0, -1.25, 2.0, 0.0, 7.5]
_DATA = "train.jsonl"


# ---------------------------------------------------------------------------
# reward_stats.json


def _stats_file(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "reward_stats.json"


def _fit_and_save(workdir: pathlib.Path) -> data.RewardStats:
  stats, unsaved = prepare.reward_stats(str(workdir), _REWARDS, _DATA)
  assert unsaved == stats
  stats.save(_stats_file(workdir))
  return stats


def test_reward_statistics_of_the_same_rewards_are_reused(tmp_path):
  saved = _fit_and_save(tmp_path)
  stats, unsaved = prepare.reward_stats(str(tmp_path), _REWARDS, _DATA)
  assert stats == saved and unsaved is None


def test_reward_statistics_of_other_rewards_are_refused(tmp_path):
  _fit_and_save(tmp_path)
  with pytest.raises(data.DataError, match=re.escape(
      f"{_stats_file(tmp_path)} holds the reward statistics of other data "
      f"(6 rewards; {_DATA} now gives 5)")):
    prepare.reward_stats(str(tmp_path), _REWARDS[:-1], _DATA)


def _edit(field, value):
  def edit(stored: dict) -> str:
    if value is None:
      del stored[field]
    else:
      stored[field] = value
    return json.dumps(stored)
  return edit


# edit of the saved JSON -> what the error says is wrong.
_BAD_STATS = {
    "no_fingerprint": (_edit("fingerprint", None),
                       "records no fingerprint of the rewards it was fitted "
                       f"on (an older version wrote it), so it cannot be "
                       f"checked against {_DATA}"),
    "garbled": (lambda stored: json.dumps(stored)[:25], "is not valid JSON"),
    "not_an_object": (lambda stored: "[1, 2]", "holds a JSON list"),
    "nan_std": (_edit("std", math.nan),
                "'std' is nan, not a finite positive number"),
    "infinite_std": (_edit("std", math.inf),
                     "'std' is inf, not a finite positive number"),
    "negative_std": (_edit("std", -1.5),
                     "'std' is -1.5, not a finite positive number"),
    "edited_mean": (_edit("mean", 0.25), "was edited: it records the "
                    f"fingerprint of the rewards of {_DATA} but mean 0.25"),
    "edited_count": (_edit("count", 9), "was edited"),
}


@pytest.mark.parametrize("name", sorted(_BAD_STATS))
def test_a_bad_reward_statistics_file_stops_with_what_to_do(tmp_path, name):
  edit, what = _BAD_STATS[name]
  _fit_and_save(tmp_path)
  path = _stats_file(tmp_path)
  path.write_text(edit(json.loads(path.read_text())))
  before = path.read_text()
  with pytest.raises(data.DataError) as error:
    prepare.reward_stats(str(tmp_path), _REWARDS, _DATA)
  message = str(error.value)
  assert "\n" not in message
  assert str(path) in message, message
  assert what in message, message
  assert message.endswith(
      f"It was written by an earlier run in `workdir`={tmp_path}: delete it "
      f"to fit the statistics again on {_DATA}, or use a new `workdir`."
  ), message
  assert path.read_text() == before
  # Doing what it says (deleting the file) fits the statistics again.
  path.unlink()
  stats, unsaved = prepare.reward_stats(str(tmp_path), _REWARDS, _DATA)
  assert stats == unsaved == data.RewardStats.fit(_REWARDS, _DATA)


# ---------------------------------------------------------------------------
# spiece.model and spiece.model.sha256


def _texts() -> list[str]:
  words = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta")
  return [f"{words[i % 7]} {words[(3 * i) % 7]} {words[(5 * i + 1) % 7]}"
          for i in range(60)]


_CONFIG = DataConfig(tokenizer_vocab_size=24)


def _first_run(workdir: pathlib.Path, texts=None) -> str:
  """Chooses (trains) and saves the workdir's tokenizer; its fingerprint."""
  tok, fingerprint = prepare.choose_tokenizer(str(workdir), _CONFIG,
                                              texts or _texts())
  assert tok.path is None
  prepare.save_inputs(str(workdir), prepare.Dataset({}, tok, fingerprint))
  return fingerprint


def _model(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "spiece.model"


def _digest(workdir: pathlib.Path) -> pathlib.Path:
  return workdir / "spiece.model.sha256"


def test_the_saved_tokenizer_is_recorded_and_reused(tmp_path):
  fingerprint = _first_run(tmp_path)
  model = _model(tmp_path).read_bytes()
  # sha256sum's format: `sha256sum -c spiece.model.sha256` checks it.
  assert _digest(tmp_path).read_text() == (
      f"{hashlib.sha256(model).hexdigest()}  spiece.model\n")
  tok, again = prepare.choose_tokenizer(str(tmp_path), _CONFIG, ["other"])
  assert tok.path == str(_model(tmp_path)) and again == fingerprint


def _append(workdir: pathlib.Path) -> None:
  with open(_model(workdir), "ab") as f:
    f.write(b"\x00")


def _truncate(workdir: pathlib.Path) -> None:
  model = _model(workdir).read_bytes()
  _model(workdir).write_bytes(model[:len(model) // 2])


def _replace(workdir: pathlib.Path) -> None:
  """Another valid model, trained on other texts."""
  other = workdir / "other"
  _first_run(other, [t.upper() for t in _texts()])
  os.replace(_model(other), _model(workdir))


@pytest.mark.parametrize("alter", [_append, _truncate, _replace])
def test_an_altered_tokenizer_stops_the_run(tmp_path, alter):
  _first_run(tmp_path)
  alter(tmp_path)
  with pytest.raises(data.DataError) as error:
    prepare.choose_tokenizer(str(tmp_path), _CONFIG, _texts())
  message = str(error.value)
  assert message.startswith(
      f"{_model(tmp_path)} was altered or truncated since the run that "
      "trained it saved it: its SHA-256 is "), message
  assert f"{_digest(tmp_path)} records " in message, message
  assert message.endswith("Restore the original file (the checkpoints and "
                          "caches in this workdir were made with it), or use "
                          "a new `workdir`."), message


def test_a_tokenizer_without_a_recorded_digest_stops_the_run(tmp_path):
  fingerprint = _first_run(tmp_path)
  _digest(tmp_path).unlink()
  with pytest.raises(data.DataError, match=re.escape(
      f"{_model(tmp_path)} has no recorded SHA-256 ({_digest(tmp_path)} is "
      "missing") + ".*record it with `sha256sum spiece.model > "
      rf"spiece.model.sha256` in {re.escape(str(tmp_path))}; otherwise pass "
      "`tokenizer` or use a new `workdir`."):
    prepare.choose_tokenizer(str(tmp_path), _CONFIG, _texts())
  # Doing what it says records the digest; the tokenizer is then reused.
  digest = hashlib.sha256(_model(tmp_path).read_bytes()).hexdigest()
  _digest(tmp_path).write_text(f"{digest}  spiece.model\n")
  assert prepare.choose_tokenizer(str(tmp_path), _CONFIG,
                                  _texts())[1] == fingerprint


@pytest.mark.parametrize("text", ["", "not a digest\n", "abc  spiece.model\n",
                                  "Z" * 64 + "  spiece.model\n"])
def test_a_garbled_digest_stops_the_run(tmp_path, text):
  _first_run(tmp_path)
  _digest(tmp_path).write_text(text)
  with pytest.raises(data.DataError, match=re.escape(
      f"{_digest(tmp_path)} is not a SHA-256 line (`<64 hex digits>  "
      "spiece.model`, as sha256sum writes): restore it, or, if "
      f"{_model(tmp_path)} is the tokenizer this workdir was trained with, "
      "rewrite it with `sha256sum spiece.model > spiece.model.sha256`")):
    prepare.choose_tokenizer(str(tmp_path), _CONFIG, _texts())


def test_a_digest_without_its_model_is_replaced(tmp_path):
  """A run stopped between the two writes (the digest goes first) leaves a
  digest alone: the next run trains and records its tokenizer again."""
  fingerprint = _first_run(tmp_path)
  _model(tmp_path).unlink()
  assert _first_run(tmp_path) == fingerprint   # training is deterministic
  digest = hashlib.sha256(_model(tmp_path).read_bytes()).hexdigest()
  assert _digest(tmp_path).read_text() == f"{digest}  spiece.model\n"


def test_a_given_tokenizer_is_not_saved_in_the_workdir(tmp_path):
  _first_run(tmp_path / "given")
  config = DataConfig(tokenizer=str(_model(tmp_path / "given")))
  tok, fingerprint = prepare.choose_tokenizer(str(tmp_path / "run"), config,
                                              _texts())
  prepare.save_inputs(str(tmp_path / "run"),
                      prepare.Dataset({}, tok, fingerprint))
  assert not (tmp_path / "run").exists()


def test_a_resumed_run_reuses_what_the_first_one_saved(tmp_path):
  """load_dataset twice on the demo task, as a run and its resumption."""
  config = DataConfig(demo_examples=48, tokenizer_vocab_size=64)
  first = prepare.load_dataset(str(tmp_path), config, "dro_v", seed=0)
  assert first.reward_stats is not None and first.tokenizer.path is None
  prepare.save_inputs(str(tmp_path), first)
  assert {"spiece.model", "spiece.model.sha256", "reward_stats.json"} <= set(
      os.listdir(tmp_path))
  again = prepare.load_dataset(str(tmp_path), config, "dro_v", seed=0)
  assert again.reward_stats is None
  assert again.tokenizer.path == str(_model(tmp_path))
  assert again.tokenizer_fingerprint == first.tokenizer_fingerprint
  assert data.fingerprint(again.arrays) == data.fingerprint(first.arrays)


# ---------------------------------------------------------------------------
# data_fingerprint.json


def test_the_first_run_records_the_data_and_a_resume_checks_it(tmp_path):
  config = DataConfig(demo_examples=48, tokenizer_vocab_size=64)
  first = prepare.load_dataset(str(tmp_path), config, "dro_v", seed=0)
  prepare.save_inputs(str(tmp_path), first)
  record = json.loads((tmp_path / prepare.FINGERPRINT).read_text())
  assert record == first.fingerprints and record["rows"] == 48
  assert record["settings"]["max_target_length"] == config.max_target_length
  # The same data resumes, with the same key for its caches.
  again = prepare.load_dataset(str(tmp_path), config, "dro_v", seed=0)
  assert again.key == first.key

  def refused(found: dict, *fragments: str) -> None:
    with pytest.raises(data.DataError) as error:
      prepare.check_fingerprints(str(tmp_path), found)
    for fragment in fragments:
      assert fragment in str(error.value)
    assert "new workdir" in str(error.value)

  refused(dict(record, data="0" * 64), "the tokenised rows (48 rows "
          "recorded, 48 now")
  refused(dict(record, tokenizer="1" * 64), "the tokenizer")
  refused(dict(record, settings=dict(record["settings"], long_rows="skip")),
          "settings long_rows 'truncate' -> 'skip'")
  (tmp_path / prepare.FINGERPRINT).write_text("{")
  refused(record, f"{tmp_path / prepare.FINGERPRINT} cannot be read")
