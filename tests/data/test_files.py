"""Tests for datasets in several files: data.data_files and read_dataset over
shards, and what the run derives from them (prepare.load_dataset)."""

import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dro_fast import data
from dro_fast import tokenizer as tokenizer_lib
from dro_fast.data import prepare
from dro_fast.data.config import DataConfig


def _rows(start, stop):
  return [{"prompt": f"say {i}", "completion": f"{i} {i}", "reward": i % 3}
          for i in range(start, stop)]


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows),
                  encoding="utf-8")
  return str(path)


def _parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), path)
  return str(path)


@pytest.fixture
def shards(tmp_path):
  """A folder of shards named out of order, with files that are skipped."""
  folder = tmp_path / "shards"
  folder.mkdir()
  paths = [_parquet(folder / "part-2.parquet", _rows(4, 6)),
           _jsonl(folder / "part-0.jsonl", _rows(0, 2)),
           _parquet(folder / "part-1.parquet", _rows(2, 4))]
  for name in ("_SUCCESS", ".part-0.jsonl.crc", "README.md"):
    (folder / name).write_text("not data")
  (folder / "sub").mkdir()
  _jsonl(folder / "sub" / "nested.jsonl", _rows(9, 10))
  return folder, sorted(paths)


def test_folder_reads_its_data_files_in_sorted_order(shards):
  folder, paths = shards
  assert data.data_files(folder) == paths
  triplets = data.read_dataset(folder, "triplets")
  assert [t.prompt for t in triplets] == [f"say {i}" for i in range(6)]
  assert [t.source for t in triplets] == [
      f"{paths[0]}:1", f"{paths[0]}:2", f"{paths[1]}:1", f"{paths[1]}:2",
      f"{paths[2]}:1", f"{paths[2]}:2"]


def test_glob_and_comma_list_are_sorted(shards):
  folder, paths = shards
  assert data.data_files(f"{folder}/part-*") == paths
  assert data.data_files(f"{folder}/**/*.jsonl") == sorted(
      [paths[0], str(folder / "sub" / "nested.jsonl")])
  # Any order, spaces after the commas, a glob among files.
  assert data.data_files(f"{paths[2]}, {folder}/part-0.*,{paths[1]}") == paths
  assert data.read_dataset(",".join(reversed(paths)), "triplets") == (
      data.read_dataset(folder, "triplets"))


def test_a_path_with_a_comma_is_one_file(tmp_path):
  path = _jsonl(tmp_path / "a,b.jsonl", _rows(0, 2))
  assert data.data_files(path) == [path]
  assert len(data.read_dataset(path, "triplets")) == 2


def test_a_single_file_keeps_its_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _jsonl(tmp_path / "t.jsonl", _rows(0, 2))
  assert data.data_files("./t.jsonl") == ["./t.jsonl"]
  assert data.read_dataset("./t.jsonl", "triplets")[1].source == (
      "./t.jsonl:2")


def test_a_bad_row_names_its_shard(shards):
  folder, paths = shards
  _parquet(paths[1], _rows(2, 3) + [{"prompt": "p", "completion": "c",
                                     "reward": None}])
  with pytest.raises(data.DataError,
                     match=re.escape(f"{paths[1]} row 2, field 'reward': is "
                                     "null")):
    data.read_dataset(folder, "triplets")
  _parquet(paths[2], [{"prompt": "p", "response": "c", "reward": 1.0}])
  with pytest.raises(data.DataError, match=re.escape(
      f"{paths[2]} has no column 'completion'")):
    data.read_dataset(folder, "triplets", skip_bad_rows=True)


def test_a_shard_without_rows_is_skipped_with_a_warning(shards, caplog):
  folder, paths = shards
  _jsonl(folder / "part-3.jsonl", [])
  with caplog.at_level(logging.WARNING):
    assert len(data.read_dataset(folder, "triplets")) == 6
  assert any(f"skipped 1 of the 4 files of {str(folder)!r}" in r.getMessage()
             and f"{folder}/part-3.jsonl has no usable rows" in r.getMessage()
             for r in caplog.records)
  for path in paths:
    os.remove(path)
    _jsonl(folder / (os.path.splitext(os.path.basename(path))[0] + ".jsonl"),
           [])
  with pytest.raises(data.DataError, match=re.escape(
      f"none of the 4 files of {str(folder)!r} has a usable row; the first: "
      f"{paths[0]} has no usable rows")):
    data.read_dataset(folder, "triplets")


def test_data_file_errors(tmp_path, shards):
  folder, paths = shards
  with pytest.raises(data.DataError, match="have an empty entry"):
    data.data_files(f"{paths[0]},,{paths[1]}")
  with pytest.raises(data.DataError, match=re.escape(
      f"the glob '{folder}/*.csv' (in '{folder}/*.csv') matches no files")):
    data.data_files(f"{folder}/*.csv")
  with pytest.raises(data.DataError, match=re.escape(
      f"{paths[0]} is named twice in '{paths[0]},{folder}'; each file is "
      "read once")):
    data.data_files(f"{paths[0]},{folder}")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("")
  with pytest.raises(data.DataError, match=re.escape(
      f"the folder {empty} (in '{empty}') holds no data files (.jsonl, .json "
      "or .parquet; it holds notes.txt)")):
    data.data_files(empty)
  saved = tmp_path / "saved"
  saved.mkdir()
  for name in ("data-00000-of-00001.arrow", "dataset_info.json",
               "state.json"):
    (saved / name).write_text("{}")
  with pytest.raises(data.DataError, match="looks like a datasets."
                     "save_to_disk folder.*to_parquet"):
    data.data_files(saved)
  # A missing file is named as missing before its format is guessed.
  for missing in (f"{tmp_path}/missing.jsonl", f"{tmp_path}/missing"):
    with pytest.raises(data.DataError, match=re.escape(
        f"the data file {missing} (in '{paths[0]},{missing}') does not "
        "exist")):
      data.read_dataset(f"{paths[0]},{missing}", "triplets")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "spiece.model"
  texts = [t for r in _rows(0, 40) for t in (r["prompt"], r["completion"])]
  tokenizer_lib.train_sentencepiece(texts, 24, path)
  return str(path)


def _load(workdir, train_data, spm):
  config = DataConfig(train_data=str(train_data), tokenizer=spm,
                      max_input_length=6, max_target_length=6)
  return prepare.load_dataset(str(workdir), config, "dro_v", seed=0)


def test_fingerprints_cover_every_shard(tmp_path, spm):
  """The tokenised data's fingerprint (keys the reference log-prob cache)
  and the reward statistics' follow every shard, not the first or the
  argument: resharding the same rows changes neither, a changed or added
  shard changes both."""
  whole = _jsonl(tmp_path / "whole.jsonl", _rows(0, 12))
  folder = tmp_path / "shards"
  folder.mkdir()
  for i in range(3):
    _parquet(folder / f"train-{i:05d}-of-00003.parquet",
             _rows(4 * i, 4 * i + 4))
  one = _load(tmp_path / "a", whole, spm)
  sharded = _load(tmp_path / "b", folder, spm)
  assert data.fingerprint(sharded.arrays) == data.fingerprint(one.arrays)
  assert sharded.reward_stats == one.reward_stats

  changed = _rows(8, 12)
  changed[3]["reward"] = 7
  _parquet(folder / "train-00002-of-00003.parquet", changed)
  edited = _load(tmp_path / "c", folder, spm)
  assert data.fingerprint(edited.arrays) != data.fingerprint(one.arrays)
  assert edited.reward_stats.fingerprint != one.reward_stats.fingerprint

  # A workdir whose reward statistics were fitted on the three shards
  # refuses a fourth.
  prepare.save_inputs(str(tmp_path / "c"), edited)
  _jsonl(folder / "train-extra.jsonl", _rows(12, 14))
  with pytest.raises(data.DataError, match=re.escape(
      f"holds the reward statistics of other data (12 rewards; {folder} now "
      "gives 14)")):
    _load(tmp_path / "c", folder, spm)
