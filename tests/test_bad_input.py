"""Bad inputs to `python -m dro_fast.train`: each stops with a clear error.

Every case runs the trainer as a subprocess on a fresh workdir and checks
that it
  * exits with status 2 (a user error, not a crash: status 1 or a signal);
  * prints no Python traceback;
  * prints a message naming where the problem is (the file and line, the
    field, the tensor or the flag) and what to do about it;
  * leaves nothing half-written in the workdir (see `leftovers`): no
    checkpoints/, no summary.json, metrics.jsonl or run_config.json, no
    temporary files, not even the tokenizer or reward statistics that a
    later run with fixed inputs would silently reuse.

The errors fire before training starts, so each case takes a few seconds
(mostly the trainer's imports).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import pathlib
import shutil

import pytest

from tests.test_train import train

# What a run that stopped on a user error may leave in its workdir: the lock
# file (empty, harmless) and the demo task's generated data (deterministic
# in --demo_examples and --seed, an input rather than an output).
ALLOWED_LEFTOVERS = frozenset({".lock", "demo_train.jsonl", "demo_pairs.jsonl"})

_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta",
          "theta", "iota", "kappa", "lambda")
_ASPECTS = ("instruction_following", "honesty", "truthfulness",
            "helpfulness")


def leftovers(workdir: pathlib.Path) -> list[str]:
  """Everything under `workdir` that a failed run must not have written.

  Args:
    workdir: the run's folder (it may not exist).

  Returns:
    The sorted relative paths of the files and folders in `workdir`, at any
    depth, other than ALLOWED_LEFTOVERS.
  """
  found = []
  for root, folders, files in os.walk(workdir):
    for name in folders + files:
      found.append(os.path.relpath(os.path.join(root, name), workdir))
  return sorted(set(found) - ALLOWED_LEFTOVERS)


def test_leftovers_lists_what_a_run_writes(tmp_path):
  for name in (".lock", "demo_train.jsonl", "summary.json",
               "checkpoints/4.orbax-checkpoint-tmp-1/state",
               ".run_config.json.x1y2"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("")
  assert leftovers(tmp_path) == [
      ".run_config.json.x1y2", "checkpoints",
      "checkpoints/4.orbax-checkpoint-tmp-1",
      "checkpoints/4.orbax-checkpoint-tmp-1/state", "summary.json"]
  assert leftovers(tmp_path / "absent") == []


# ---------------------------------------------------------------------------
# Inputs.


def _good_rows(count: int = 16) -> list[dict]:
  """Triplets with varied words and rewards."""
  return [{"prompt": f"say {_WORDS[i % 11]} {_WORDS[(3 * i) % 11]}",
           "completion": f"{_WORDS[i % 11]} {_WORDS[(3 * i) % 11]}",
           "reward": float(i % 4)} for i in range(count)]


def _write_jsonl(path: pathlib.Path, rows: list) -> str:
  """One line per row: a dict as JSON, a string as is."""
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                          for r in rows))
  return str(path)


def _with_bad_line(tmp: pathlib.Path, line) -> str:
  """Good rows with `line` as line 3 of train.jsonl."""
  rows = _good_rows()
  rows.insert(2, line)
  return _write_jsonl(tmp / "train.jsonl", rows)


def _ultrafeedback_row(instruction: str, ratings: list[list[str]]) -> dict:
  """A row with one completion per entry of `ratings` (4 aspect ratings)."""
  return {"instruction": instruction, "completions": [
      {"response": f"{_WORDS[k]} answer to {instruction}",
       "annotations": {aspect: {"Rating": rating, "Rationale": "..."}
                       for aspect, rating in zip(_ASPECTS, row)}}
      for k, row in enumerate(ratings)]}


def _ultrafeedback_file(tmp: pathlib.Path, bad_ratings: list[str]) -> str:
  """UltraFeedback rows, completion 1 of line 2 rated `bad_ratings`."""
  rows = [_ultrafeedback_row(f"question {w}", [["5", "4", "3", "4"],
                                               ["2", "1", "3", "2"]])
          for w in _WORDS]
  rows[1]["completions"][1]["annotations"] = {
      aspect: {"Rating": rating} for aspect, rating in zip(_ASPECTS,
                                                           bad_ratings)}
  return _write_jsonl(tmp / "uf.jsonl", rows)


def _parquet(path: pathlib.Path, columns: dict[str, list]) -> str:
  import pyarrow  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet  # pylint: disable=g-import-not-at-top
  pyarrow.parquet.write_table(pyarrow.table(columns), path)
  return str(path)


@pytest.fixture(scope="session")
def hf_checkpoint_dir(tmp_path_factory) -> pathlib.Path:
  """A tiny random Hugging Face T5 v1.1 (vocab 97) written by transformers."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tests.models import hf_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.T5Config(**hf_reference.HF_KWARGS,
                                 **hf_reference.VARIANTS["v1_1"])
  path = tmp_path_factory.mktemp("hf") / "t5"
  transformers.T5ForConditionalGeneration(config).save_pretrained(path)
  return path


@dataclasses.dataclass
class Inputs:
  """What a case builds its bad inputs from.

  Attributes:
    tmp: a folder for the case's files (not the workdir).
    request: pytest's request, to get the session's checkpoint lazily.
  """
  tmp: pathlib.Path
  request: pytest.FixtureRequest

  def checkpoint(self, edit_tensors: Callable[[dict], None] | None = None,
                 edit_config: Callable[[dict], None] | None = None) -> str:
    """A copy of the tiny Hugging Face checkpoint, edited.

    Args:
      edit_tensors: changes the dict of name -> numpy array in place.
      edit_config: changes the config.json dict in place.

    Returns:
      The copy's directory.
    """
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    source = self.request.getfixturevalue("hf_checkpoint_dir")
    path = self.tmp / "checkpoint"
    shutil.copytree(source, path)
    if edit_tensors is not None:
      tensors = safetensors_numpy.load_file(path / "model.safetensors")
      edit_tensors(tensors)
      safetensors_numpy.save_file(tensors, path / "model.safetensors")
    if edit_config is not None:
      config = json.loads((path / "config.json").read_text())
      edit_config(config)
      (path / "config.json").write_text(json.dumps(config))
    return str(path)


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input.

  Attributes:
    build: makes the case's files; returns (trainer flags, substrings that
      stderr must contain: where the problem is and what to do).
  """
  build: Callable[[Inputs], tuple[list[str], list[str]]]


CASES: dict[str, Case] = {}


def case(function: Callable[[Inputs], tuple[list[str], list[str]]]):
  """Registers a case under its function's name (without the `_`)."""
  CASES[function.__name__.lstrip("_")] = Case(function)
  return function


# ---------------------------------------------------------------------------
# Data files (--train_data, --data_format and the field flags).

_FIX_LINE = "Fix or remove the line"


@case
def _data_invalid_json(inputs):
  path = _with_bad_line(inputs.tmp, '{"prompt": "say hi", "completion": ')
  return [f"--train_data={path}"], [f"{path} line 3", "not valid JSON",
                                    _FIX_LINE, "--skip_bad_rows"]


@case
def _data_missing_field(inputs):
  path = _with_bad_line(inputs.tmp, {"prompt": "say hi", "completion": "hi"})
  return [f"--train_data={path}"], [f"{path} line 3", "field 'reward'",
                                    "is missing", "--reward_field"]


@case
def _data_field_flag_names_an_absent_field(inputs):
  path = _write_jsonl(inputs.tmp / "train.jsonl", _good_rows())
  return ([f"--train_data={path}", "--completion_field=response"],
          [f"{path} line 1", "field 'response'", "is missing",
           "'completion'", "--completion_field"])


@case
def _data_mistyped_field(inputs):
  path = _with_bad_line(inputs.tmp, {"prompt": ["say", "hi"],
                                     "completion": "hi", "reward": 1.0})
  return [f"--train_data={path}"], [f"{path} line 3", "field 'prompt'",
                                    "is an array, not a string", _FIX_LINE]


@case
def _data_nan_reward(inputs):
  path = _with_bad_line(
      inputs.tmp, '{"prompt": "say hi", "completion": "hi", "reward": NaN}')
  return [f"--train_data={path}"], [f"{path} line 3", "field 'reward'",
                                    "finite number", _FIX_LINE]


@case
def _data_inf_reward(inputs):
  path = _with_bad_line(
      inputs.tmp,
      '{"prompt": "say hi", "completion": "hi", "reward": Infinity}')
  return [f"--train_data={path}"], [f"{path} line 3", "field 'reward'",
                                    "finite number", _FIX_LINE]


@case
def _data_string_reward(inputs):
  path = _with_bad_line(inputs.tmp, {"prompt": "say hi", "completion": "hi",
                                     "reward": "good"})
  return [f"--train_data={path}"], [f"{path} line 3", "field 'reward'",
                                    "is the string 'good', not a number",
                                    _FIX_LINE]


@case
def _data_empty_prompt(inputs):
  path = _with_bad_line(inputs.tmp, {"prompt": "", "completion": "hi",
                                     "reward": 1.0})
  return [f"--train_data={path}"], [f"{path} line 3", "field 'prompt'",
                                    "empty", _FIX_LINE]


@case
def _data_empty_completion(inputs):
  path = _with_bad_line(inputs.tmp, {"prompt": "say hi",
                                     "completion": " \t ", "reward": 1.0})
  return [f"--train_data={path}"], [f"{path} line 3", "field 'completion'",
                                    "empty", _FIX_LINE]


@case
def _data_ultrafeedback_all_ratings_not_applicable(inputs):
  path = _ultrafeedback_file(inputs.tmp, ["N/A"] * 4)
  return ([f"--train_data={path}", "--data_format=ultrafeedback"],
          [f"{path} line 2, completion 1", "completions[1].annotations",
           "N/A", "Fix or remove the completion", "--skip_bad_rows"])


@case
def _data_ultrafeedback_aspect_reward_not_applicable(inputs):
  path = _ultrafeedback_file(inputs.tmp, ["4", "4", "3", "N/A"])
  return ([f"--train_data={path}", "--data_format=ultrafeedback",
           "--ultrafeedback_reward=helpfulness"],
          [f"{path} line 2, completion 1",
           "completions[1].annotations.helpfulness.Rating", "N/A",
           "Fix or remove the completion"])


@case
def _data_triplets_read_as_ultrafeedback(inputs):
  path = _write_jsonl(inputs.tmp / "train.jsonl", _good_rows())
  return ([f"--train_data={path}", "--data_format=ultrafeedback"],
          [f"{path} line 1", "field 'instruction'", "is missing",
           "--data_format"])


@case
def _data_row_over_the_length_limit(inputs):
  rows = _good_rows()
  rows[5]["completion"] = " ".join(_WORDS * 3)
  path = _write_jsonl(inputs.tmp / "train.jsonl", rows)
  return ([f"--train_data={path}", "--long_rows=error"],
          [f"{path}:6", "completion", "--max_target_length=8",
           "--long_rows=truncate"])


@case
def _data_every_row_over_the_length_limit_when_skipping(inputs):
  rows = [dict(row, completion=" ".join(_WORDS)) for row in _good_rows()]
  path = _write_jsonl(inputs.tmp / "train.jsonl", rows)
  return ([f"--train_data={path}", "--long_rows=skip"],
          ["--long_rows=skip dropped all 16 rows", f"{path}:1",
           "Raise --max_input_length and --max_target_length"])


@case
def _data_no_rows(inputs):
  path = inputs.tmp / "train.jsonl"
  path.write_text("\n\n")
  return [f"--train_data={path}"], [f"{path} has no usable rows",
                                    "holds no rows", "right file"]


@case
def _data_every_reward_equal(inputs):
  rows = [dict(row, reward=3.0) for row in _good_rows()]
  path = _write_jsonl(inputs.tmp / "train.jsonl", rows)
  return [f"--train_data={path}"], [f"every reward in {path} equals 3.0",
                                    "variance", "Check the reward field"]


@case
def _data_parquet_without_a_column(inputs):
  rows = _good_rows()
  path = _parquet(inputs.tmp / "train.parquet", {
      "prompt": [r["prompt"] for r in rows],
      "response": [r["completion"] for r in rows],
      "reward": [r["reward"] for r in rows]})
  return [f"--train_data={path}"], [f"{path} has no column 'completion'",
                                    "'response'", "--completion_field"]


@case
def _data_parquet_column_of_the_wrong_type(inputs):
  rows = _good_rows()
  path = _parquet(inputs.tmp / "train.parquet", {
      "prompt": [r["prompt"] for r in rows],
      "completion": [r["completion"] for r in rows],
      "reward": [f"{r['reward']} stars" for r in rows]})
  return [f"--train_data={path}"], [f"{path} row 1", "field 'reward'",
                                    "not a number", "Fix or remove the row"]


@case
def _data_not_parquet(inputs):
  path = _write_jsonl(inputs.tmp / "train.parquet", _good_rows())
  return [f"--train_data={path}"], [f"{path} is not a readable Parquet file",
                                    "rename it"]


@case
def _data_missing_file(inputs):
  path = inputs.tmp / "absent" / "train.jsonl"
  return [f"--train_data={path}"], [f"the data file {path} (in '{path}') "
                                    "does not exist", "Check the path"]


# ---------------------------------------------------------------------------
# Flags (the demo task's data, SMALL flags).


@case
def _flag_unknown(inputs):
  del inputs
  return ["--train_stpes=4"], ["train_stpes", "--helpfull"]


@case
def _flag_positional_argument(inputs):
  path = _write_jsonl(inputs.tmp / "train.jsonl", _good_rows())
  return [path], ["unexpected arguments", path, "--train_data=FILE"]


@case
def _flag_not_a_number(inputs):
  del inputs
  return ["--batch_size=eight"], ["--batch_size", "eight", "--helpfull"]


@case
def _flag_cudnn_attention_in_float32(inputs):
  # T5Config's validation: each constraint of cuDNN is checked in one place
  # (the even lengths in RunConfig's: tests/training/test_run_config.py).
  del inputs
  return (["--attention=cudnn", "--dropout_rate=0.1"],
          ["T5Config.attention='cudnn'", "bfloat16", "attention='xla'"])


@case
def _flag_cudnn_attention_without_a_gpu(inputs):
  del inputs
  return (["--attention=cudnn", "--dtype=bfloat16"],
          ["--attention=cudnn runs cuDNN's fused attention, which needs a "
           "CUDA GPU; the run compiles for 'cpu'", "use --attention=xla."])


@case
def _flag_missing_flagfile(inputs):
  path = inputs.tmp / "absent.flags"
  return [f"--flagfile={path}"], [
      f"--flagfile={path}: no such file, and no packaged config",
      "packaged: base.flags"]


@case
def _flag_batch_size_zero(inputs):
  del inputs
  return ["--batch_size=0"], ["--batch_size must be >= 1, got 0"]


@case
def _flag_negative_learning_rate(inputs):
  del inputs
  return ["--policy_lr=-1"], ["--policy_lr must be > 0, got -1"]


@case
def _flag_dropout_rate_out_of_range(inputs):
  del inputs
  return ["--dropout_rate=1.5"], ["--dropout_rate must be in [0, 1)",
                                  "got 1.5"]


@case
def _flag_max_bad_steps_zero(inputs):
  del inputs
  return ["--max_bad_steps=0"], ["--max_bad_steps must be >= 1, got 0"]


@case
def _flag_negative_seed(inputs):
  del inputs
  return ["--seed=-3"], ["--seed must be >= 0, got -3"]


@case
def _flag_tokenizer_vocab_size_too_small(inputs):
  del inputs
  return ["--tokenizer_vocab_size=3"], ["--tokenizer_vocab_size",
                                        "got 3", ">= 4"]


@case
def _flag_unknown_kernel_implementation(inputs):
  del inputs
  return ["--kernel_implementation=cuda"], [
      "--kernel_implementation must be one of", "chunked_xla",
      "or unset to pick by backend, got 'cuda'"]


@case
def _flag_mesh_larger_than_the_devices(inputs):
  del inputs
  return ["--mesh=data:3"], ["has 3 devices but 1 are available"]


@case
def _flag_batch_larger_than_the_data(inputs):
  del inputs
  return ["--batch_size=200"], ["--batch_size=200 exceeds the 128 training "
                                "examples"]


@case
def _flag_conflict_pairwise_algo_on_triplets(inputs):
  path = _write_jsonl(inputs.tmp / "train.jsonl", _good_rows())
  return ["--algo=dpo", f"--train_data={path}"], [
      "--algo=dpo needs --data_format=pairwise", "--data_format=triplets"]


@case
def _flag_unknown_ultrafeedback_reward(inputs):
  path = _ultrafeedback_file(inputs.tmp, ["1", "2", "3", "4"])
  return ([f"--train_data={path}", "--data_format=ultrafeedback",
           "--ultrafeedback_reward=stars"],
          ["--ultrafeedback_reward=stars", "mean_rating", "--helpfull"])


@case
def _flag_conflict_threshold_without_binary_reward(inputs):
  path = _ultrafeedback_file(inputs.tmp, ["1", "2", "3", "4"])
  return ([f"--train_data={path}", "--data_format=ultrafeedback",
           "--binary_threshold=3.5"],
          ["--binary_threshold", "--ultrafeedback_reward=binary",
           "drop --binary_threshold"])


@case
def _flag_conflict_binary_reward_without_threshold(inputs):
  path = _ultrafeedback_file(inputs.tmp, ["1", "2", "3", "4"])
  return ([f"--train_data={path}", "--data_format=ultrafeedback",
           "--ultrafeedback_reward=binary"],
          ["--ultrafeedback_reward=binary needs --binary_threshold"])


@case
def _flag_conflict_sft_steps_with_init_checkpoint(inputs):
  return ["--sft_steps=5", f"--init_checkpoint={inputs.checkpoint()}"], [
      "--sft_steps=5", "--init_checkpoint", "leave --sft_steps at 0"]


# ---------------------------------------------------------------------------
# --init_checkpoint.


def _resize(name: str, rows: int):
  def edit(tensors):
    tensors[name] = tensors[name][:rows].copy()
  return edit


@case
def _checkpoint_tensor_of_the_wrong_shape(inputs):
  name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
  path = inputs.checkpoint(edit_tensors=_resize(name, 40))
  # The file stores the tensor as [d_model, d_ff] = (48, 80).
  return [f"--init_checkpoint={path}"], [
      f"--init_checkpoint: {path}", name, "has shape (40, 80)",
      "expected (48, 80)", "config.json"]


@case
def _checkpoint_vocabulary_disagrees_with_its_config(inputs):
  path = inputs.checkpoint(edit_tensors=_resize("shared.weight", 90))
  return [f"--init_checkpoint={path}"], [
      path, "'shared.weight' has shape (90, 48)", "expected (97, 48)",
      "config.json"]


@case
def _checkpoint_vocabulary_smaller_than_the_tokenizer(inputs):
  path = inputs.checkpoint(
      edit_tensors=_resize("shared.weight", 40),
      edit_config=lambda config: config.update(vocab_size=40))
  return [f"--init_checkpoint={path}"], [
      "the tokenizer trained on the data (--tokenizer_vocab_size=48) has",
      f"checkpoint {path} embeds only 40",
      "pass the checkpoint's own spiece.model as --tokenizer"]


@case
def _checkpoint_missing_tensor(inputs):
  name = "decoder.block.2.layer.1.EncDecAttention.k.weight"
  path = inputs.checkpoint(edit_tensors=lambda tensors: tensors.pop(name))
  return [f"--init_checkpoint={path}"], [path, f"missing tensor {name!r}",
                                         "config.json"]


@case
def _checkpoint_truncated_weights(inputs):
  path = inputs.checkpoint()
  weights = os.path.join(path, "model.safetensors")
  os.truncate(weights, os.path.getsize(weights) // 2)
  return [f"--init_checkpoint={path}"], [
      weights, "not a readable safetensors file", "copy it again"]


@case
def _checkpoint_directory_is_not_a_checkpoint(inputs):
  path = inputs.tmp / "notes"
  path.mkdir()
  (path / "README.md").write_text("not a checkpoint\n")
  return [f"--init_checkpoint={path}"], [
      f"--init_checkpoint: {path}", "checkpoint_<step>", "save_pretrained"]


@case
def _checkpoint_missing_directory(inputs):
  path = inputs.tmp / "absent"
  return [f"--init_checkpoint={path}"], [
      f"--init_checkpoint: {path} does not exist", "Check the path"]


@case
def _pretrained_size_without_a_checkpoint(inputs):
  del inputs
  return ["--model=flan-t5-large"], [
      "--model=flan-t5-large is meant to start from its SFT checkpoint",
      "--init_checkpoint=DIR", "--random_init"]


# ---------------------------------------------------------------------------
# --tokenizer.


@case
def _tokenizer_not_sentencepiece(inputs):
  path = inputs.tmp / "spiece.model"
  path.write_text("▁hello -1.5\n▁world -2.0\n")  # a .vocab file, say
  return [f"--tokenizer={path}"], [
      f"--tokenizer: {str(path)!r} is not a valid SentencePiece model",
      "Pass a .model file"]


@case
def _tokenizer_missing_file(inputs):
  path = inputs.tmp / "spiece.model"
  return [f"--tokenizer={path}"], [
      f"--tokenizer: SentencePiece model {str(path)!r} does not exist",
      "Pass the path to a .model file"]


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_stops_with_a_clear_error(tmp_path, request, name):
  inputs_dir = tmp_path / "inputs"
  inputs_dir.mkdir()
  flags, expected = CASES[name].build(Inputs(inputs_dir, request))
  workdir = tmp_path / "run"
  result = train(workdir, "--train_steps=4", *flags, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.count("error: ") == 1, result.stderr[-3000:]
  for text in expected:
    assert text in result.stderr, (text, result.stderr[-3000:])
  assert leftovers(workdir) == []


def test_there_are_enough_cases():
  assert len(CASES) >= 25


def test_reward_statistics_of_other_data_are_not_reused(tmp_path):
  """A workdir's reward_stats.json, fitted on other rewards (a run with other
  data that stopped before its first checkpoint, say), stops the run
  instead of normalising these rewards with it."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  stats_path = workdir / "reward_stats.json"
  from dro_fast import data  # pylint: disable=g-import-not-at-top
  data.RewardStats.fit([0.0, 5.0, 1.0], "old.jsonl").save(stats_path)
  before = stats_path.read_text()
  rows = _write_jsonl(tmp_path / "train.jsonl", _good_rows())
  result = train(workdir, "--train_steps=4", f"--train_data={rows}",
                 check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  for text in (f"{stats_path} holds the reward statistics of other data",
               "(3 rewards;", "gives 16)", "new --workdir"):
    assert text in result.stderr, (text, result.stderr[-3000:])
  assert stats_path.read_text() == before
  assert leftovers(workdir) == ["reward_stats.json"]


@pytest.mark.parametrize("damage", ["garbled", "no_fingerprint", "nan_std"])
def test_a_reward_statistics_file_that_cannot_be_trusted_stops_the_run(
    tmp_path, damage):
  """A workdir's reward_stats.json that is garbled, written before reward
  fingerprints, or holds a non-finite std stops the run; the error names it
  and says to delete it."""
  from dro_fast import data  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  workdir.mkdir()
  rows = _write_jsonl(tmp_path / "train.jsonl", _good_rows())
  stored = dataclasses.asdict(data.RewardStats.fit(
      [row["reward"] for row in _good_rows()], rows))
  text = {"garbled": json.dumps(stored)[:20],
          "no_fingerprint": json.dumps(
              {k: v for k, v in stored.items() if k != "fingerprint"}),
          "nan_std": json.dumps(dict(stored, std=float("nan")))}[damage]
  stats_path = workdir / "reward_stats.json"
  stats_path.write_text(text)
  result = train(workdir, "--train_steps=4", f"--train_data={rows}",
                 check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.count("error: ") == 1, result.stderr[-3000:]
  for expected in (str(stats_path), f"--workdir={workdir}: delete it to fit "
                   f"the statistics again on {rows}, or use a new --workdir"):
    assert expected in result.stderr, (expected, result.stderr[-3000:])
  assert stats_path.read_text() == text
  assert leftovers(workdir) == ["reward_stats.json"]


def test_an_altered_workdir_tokenizer_stops_the_run(tmp_path):
  """The workdir's spiece.model is checked against the SHA-256 its first run
  recorded in spiece.model.sha256: a truncated model stops the run."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from dro_fast import tokenizer  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  workdir.mkdir()
  rows = _write_jsonl(tmp_path / "train.jsonl", _good_rows())
  model = tokenizer.train_sentencepiece(
      [t for row in _good_rows() for t in (row["prompt"], row["completion"])],
      24, None).serialized_model()
  (workdir / "spiece.model.sha256").write_text(
      f"{hashlib.sha256(model).hexdigest()}  spiece.model\n")
  (workdir / "spiece.model").write_bytes(model[:-7])
  result = train(workdir, "--train_steps=4", f"--train_data={rows}",
                 check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.count("error: ") == 1, result.stderr[-3000:]
  for expected in (f"{workdir / 'spiece.model'} was altered or truncated",
                   "Restore the original file", "new --workdir"):
    assert expected in result.stderr, (expected, result.stderr[-3000:])
  assert leftovers(workdir) == ["spiece.model", "spiece.model.sha256"]
