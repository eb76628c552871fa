"""RunConfig: validation, and run_config.json as its exact serialised form."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dro_fast import models
from dro_fast.data.config import DataConfig
from dro_fast.training import optim
from dro_fast.training import steps
from dro_fast.training.run_config import RunConfig
from dro_fast.training.run_config import RunConfigError


def _run(**changes) -> RunConfig:
  fields = dict(
      workdir="/tmp/run",
      data=DataConfig(train_data="t.jsonl", max_input_length=13,
                      binary_threshold=None, tokenizer="/x/spiece.model"),
      model=models.preset("tiny", dtype="bfloat16", remat="dots",
                          matmul="cpu_row_major", attention_interpret=True),
      algorithm=steps.AlgorithmConfig(algo="kto", beta=0.5,
                                      implementation="chunked_xla"),
      policy_optimizer=optim.OptimizerConfig(1e-3, 30, clip_norm=1.0,
                                             reduce_with_dots=True),
      sft_lr=2e-4, eval_flags=["--folds=1"])
  fields.update(changes)
  return RunConfig(**fields)


def test_json_round_trip_is_equal(tmp_path):
  run = _run()
  assert RunConfig.from_json(run.to_json()) == run
  path = tmp_path / "run_config.json"
  path.write_text(run.to_json())
  assert RunConfig.load(str(path)) == run
  assert run.eval_flags == ("--folds=1",)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("batch_size"), None),       # defaults fill missing
    (lambda d: d["model"].update(d_model="wide"),
     "field 'model.d_model' is 'wide', not int"),
    (lambda d: d.update(colour=1), "unknown field 'colour'"),
    (lambda d: d["data"].update(long_rows="chop"),
     "data: `long_rows`=chop is not one of"),
    (lambda d: d["policy_optimizer"].update(learning_rate=-1.0),
     "policy_optimizer: `learning_rate` must be > 0"),
    (lambda d: d.pop("workdir"), "field 'workdir' is missing"),
    (lambda d: d.update(model=[]), "model must be a JSON object"),
])
def test_bad_file_names_the_file_and_field(edit, message):
  data = json.loads(_run().to_json())
  edit(data)
  if message is None:
    assert RunConfig.from_json(json.dumps(data)).batch_size == 32
    return
  with pytest.raises(RunConfigError) as error:
    RunConfig.from_json(json.dumps(data), "/w/run_config.json")
  assert str(error.value).startswith("/w/run_config.json: ")
  assert message in str(error.value)


def test_invalid_json_names_the_file():
  with pytest.raises(RunConfigError, match="r.json: invalid JSON"):
    RunConfig.from_json("{", "r.json")


@pytest.mark.parametrize("changes, message", [
    (dict(batch_size=0), "`batch_size` must be >= 1, got 0"),
    (dict(seed=-1), "`seed` must be >= 0, got -1"),
    (dict(sft_lr=0.0), "`sft_lr` must be > 0"),
    (dict(sft_steps=5, init_checkpoint="/c"), "leave `sft_steps` at 0"),
])
def test_validation_names_the_fields(changes, message):
  with pytest.raises(ValueError, match=message):
    _run(**changes)


def test_an_unknown_kernel_implementation_is_named():
  with pytest.raises(ValueError, match=(
      "`implementation` must be one of xla, chunked_xla, pallas_tpu, "
      "pallas_gpu, or unset to pick by backend, got 'cuda'")):
    steps.AlgorithmConfig(implementation="cuda")


def test_cudnn_needs_even_lengths():
  cudnn = models.preset("tiny", dtype="bfloat16", attention="cudnn",
                        dropout_rate=0.0)
  with pytest.raises(ValueError, match=(
      "`attention`=cudnn needs even sequence lengths, not "
      "`max_input_length`=13")):
    _run(model=cudnn)
  data = DataConfig(max_input_length=14)
  assert RunConfig("/w", data=data, model=cudnn).model == cudnn


def test_sft_optimizer_takes_sft_lr_and_no_clipping():
  run = _run()
  assert run.sft_optimizer == dataclasses.replace(
      run.policy_optimizer, learning_rate=2e-4, clip_norm=None)
  assert _run(sft_lr=None).sft_optimizer.learning_rate == 1e-3


def test_a_decoder_only_run_reads_back_equal():
  """A DecoderConfig (nested tuples: RoPE scaling, layer types) and a value
  model of its own survive run_config.json, hashable."""
  from dro_fast import models  # pylint: disable=g-import-not-at-top
  run = RunConfig(workdir="/w", model=models.decoder_preset("gemma-3-4b"),
                  value_model=models.decoder_preset("llama-3.2-1b"),
                  value_init_checkpoint="/ckpt/1b")
  back = RunConfig.from_json(run.to_json())
  assert back == run
  assert isinstance(back.model, models.DecoderConfig)
  assert hash(back.model) == hash(run.model)
  assert RunConfig.from_json(_run().to_json()).value_model is None
