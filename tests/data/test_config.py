"""Tests for dro_fast.data.config.DataConfig: reader arguments per format."""

import pytest

from dro_fast import data
from dro_fast.data import prepare
from dro_fast.data.config import DataConfig


def test_reader_kwargs_per_format():
  config = DataConfig(prompt_field="x", completion_field="y",
                      reward_field="r", label_field="ok", chosen_field="a",
                      rejected_field="b", message_separator=" | ")
  # The separator goes to T5's tokenizer (prepare), not to the readers.
  common = {"skip_bad_rows": False, "prompt_field": "x"}
  assert config.reader_kwargs("triplets") == dict(
      common, completion_field="y", reward_field="r")
  assert config.reader_kwargs("unpaired") == dict(
      common, completion_field="y", label_field="ok")
  assert config.reader_kwargs("pairwise") == dict(
      common, chosen_field="a", rejected_field="b")
  assert config.reader_kwargs("ultrafeedback") == {
      "skip_bad_rows": False, "reward": "mean_rating", "threshold": None}


def test_defaults_read_trl_columns():
  config = DataConfig(data_format="unpaired")
  assert (config.prompt_field, config.completion_field,
          config.label_field) == ("prompt", "completion", "label")
  assert config.message_separator == "\n"
  with pytest.raises(ValueError, match="`data_format`=csv is not one of "
                     "triplets, unpaired, ultrafeedback, pairwise"):
    DataConfig(data_format="csv")


def test_unpaired_is_single_trajectory_data(tmp_path):
  config = DataConfig(train_data=str(tmp_path / "u.jsonl"),
                      data_format="unpaired")
  with pytest.raises(data.DataError, match="`algo`=dpo needs "
                     "`data_format`=pairwise, got `data_format`=unpaired"):
    prepare.load_dataset(str(tmp_path), config, "dpo", 0)
  with pytest.raises(data.DataError, match=r"`algo`=dro_v needs "
                     r"single-trajectory data \(`data_format`=triplets, "
                     r"unpaired or ultrafeedback\), got `data_format`="
                     "pairwise"):
    prepare.load_dataset(str(tmp_path),
                         config.replace(data_format="pairwise"), "dro_v", 0)
