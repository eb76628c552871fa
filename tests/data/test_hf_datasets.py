"""Parquet shards exported from a Hugging Face dataset (docs/DATA.md's
recipe) read through the trainer's reader: TRL's unpaired conversational
rows and its conversational preference pairs."""

import numpy as np
import pytest

from dro_fast import data
from dro_fast import tokenizer as tokenizer_lib
from dro_fast.data import prepare
from dro_fast.data.config import DataConfig

datasets = pytest.importorskip("datasets")


def _message(role, content):
  return {"role": role, "content": content}


def _unpaired_rows(n):
  """TRL's unpaired preference rows, conversational, as the KTO docs."""
  return [{"prompt": [_message("system", "answer in words"),
                      _message("user", f"what is {i} plus one")],
           "completion": [_message("assistant", f"{i + 1} is my guess")],
           "label": i % 3 != 0} for i in range(n)]


def _export(dataset, folder, num_shards):
  """docs/DATA.md's recipe, as written there."""
  for i in range(num_shards):
    dataset.shard(num_shards, i).to_parquet(
        f"{folder}/train-{i:05d}-of-{num_shards:05d}.parquet")


@pytest.fixture(autouse=True)
def _quiet():
  datasets.disable_progress_bars()
  yield
  datasets.enable_progress_bars()


def test_unpaired_conversational_shards(tmp_path):
  rows = _unpaired_rows(10)
  _export(datasets.Dataset.from_list(rows), tmp_path, 3)
  paths = data.data_files(tmp_path)
  assert [p.rsplit("/", 1)[1] for p in paths] == [
      f"train-{i:05d}-of-00003.parquet" for i in range(3)]
  triplets = data.read_dataset(tmp_path, "unpaired",
                               **DataConfig().reader_kwargs("unpaired"))
  assert [(t.prompt, t.completion, t.reward) for t in triplets] == [
      (tuple(rows[i]["prompt"]), tuple(rows[i]["completion"]),
       0.0 if i % 3 == 0 else 1.0) for i in range(10)]
  assert [(tokenizer_lib.as_text(t.prompt),
           tokenizer_lib.as_text(t.completion, completion=True))
          for t in triplets] == [
              (f"system: answer in words\nuser: what is {i} plus one",
               f"{i + 1} is my guess") for i in range(10)]
  # Contiguous shards of 4, 3 and 3 rows: each row names its shard.
  assert [t.source for t in triplets][3:5] == [f"{paths[0]}:4",
                                               f"{paths[1]}:1"]

  # Through the run's data preparation: labels become rewards 1 / 0,
  # normalised over all shards.
  spm = tmp_path / "spiece.model"
  tokenizer_lib.train_sentencepiece(
      [t for x in triplets for t in (
          tokenizer_lib.as_text(x.prompt),
          tokenizer_lib.as_text(x.completion, completion=True))], 40, spm)
  config = DataConfig(train_data=str(tmp_path), data_format="unpaired",
                      tokenizer=str(spm), max_input_length=24,
                      max_target_length=12)
  dataset = prepare.load_dataset(str(tmp_path / "run"), config, "kto", 0)
  stats = dataset.reward_stats
  assert (stats.count, stats.mean) == (10, pytest.approx(0.6))
  np.testing.assert_allclose(dataset.arrays["rewards"],
                             stats.normalise([t.reward for t in triplets]))
  assert dataset.arrays["mismatched_targets"].shape == (10, 12)


def test_preference_conversational_shards(tmp_path):
  rows = [{"prompt": [_message("user", f"pick {i}")],
           "chosen": [_message("assistant", f"yes {i}")],
           "rejected": [_message("assistant", f"no {i}")]} for i in range(5)]
  _export(datasets.Dataset.from_list(rows), tmp_path, 2)
  pairs = data.read_dataset(f"{tmp_path}/*.parquet", "pairwise")
  assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
      tuple(tuple(v) for v in rows[i].values()) for i in range(5)]
