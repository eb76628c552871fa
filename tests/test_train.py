"""End-to-end runs of `python -m dro_fast.train` on the synthetic task."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--demo_examples=128", "--batch_size=8", "--max_input_length=12",
         "--max_target_length=8", "--log_every=2", "--checkpoint_every=4",
         "--tokenizer_vocab_size=48", "--sft_steps=0"]
TIMING = ("examples_per_s", "tokens_per_s")


def train(workdir, *flags, check=True):
  result = subprocess.run(
      [sys.executable, "-m", "dro_fast.train", f"--workdir={workdir}",
       *SMALL, *flags], cwd=REPO, capture_output=True, text=True,
      timeout=600, check=False)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_demo_run_writes_every_output(tmp_path):
  workdir = tmp_path / "run"
  train(workdir, "--train_steps=8", "--sft_steps=10")
  assert summary(workdir)["final_step"] == 8
  assert [m["step"] for m in metrics(workdir)] == [2, 4, 6, 8]
  assert {"loss", "residual_mean", "residual_std", "value_mean",
          "log_ratio_mean", "policy_grad_norm", "value_grad_norm",
          "policy_lr", "value_lr"} <= set(metrics(workdir)[-1])
  assert sorted(os.listdir(workdir / "checkpoints"))[:2] == ["4", "8"]
  with open(workdir / "training_curves.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(workdir / "tensorboard")
  stats = json.loads((workdir / "reward_stats.json").read_text())
  assert stats["std"] > 0
  assert len(summary(workdir)["policy_params_sha256"]) == 64
  rewards = summary(workdir)["demo_reward"]
  assert set(rewards) == {"behaviour_policy", "initial_policy",
                          "final_policy"}
  assert all(-1.0 <= v <= 1.0 for v in rewards.values())
  assert os.path.isdir(workdir / "sft_init")      # the demo's SFT warm start
  # run_config.json is the RunConfig the trainer ran, read back equal.
  from dro_fast.training import runs  # pylint: disable=g-import-not-at-top
  run = runs.read_run_config(str(workdir))
  assert (run.workdir, run.train_steps, run.sft_steps) == (str(workdir), 8,
                                                           10)
  assert run.model.vocab_size == 48 and run.data.synthetic_task


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_and_is_deterministic(tmp_path):
  straight, again, resumed = (tmp_path / n for n in ("a", "b", "c"))
  train(straight, "--train_steps=8")
  train(again, "--train_steps=8")
  train(resumed, "--train_steps=4")
  assert summary(resumed)["final_step"] == 4
  result = train(resumed, "--train_steps=8")
  assert "Resumed from step 4" in result.stdout + result.stderr
  digest = summary(straight)["policy_params_sha256"]
  assert summary(again)["policy_params_sha256"] == digest
  assert summary(resumed)["policy_params_sha256"] == digest
  assert metrics(again) == metrics(straight)
  assert metrics(resumed) == metrics(straight)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["kto", "sft", "dpo"])
def test_baselines_run(tmp_path, algo):
  workdir = tmp_path / algo
  train(workdir, f"--algo={algo}", "--train_steps=4", "--beta=0.5")
  assert summary(workdir)["algo"] == algo
  assert len(metrics(workdir)) == 2


@pytest.mark.slow
def test_reference_logprobs_are_cached_and_reused(tmp_path):
  cache = tmp_path / "cache"
  train(tmp_path / "a", "--train_steps=2", f"--ref_cache_dir={cache}")
  (entry,) = os.listdir(cache)
  stamp = os.path.getmtime(cache / entry / "manifest.json")
  train(tmp_path / "b", "--train_steps=2", f"--ref_cache_dir={cache}")
  assert os.listdir(cache) == [entry]
  assert os.path.getmtime(cache / entry / "manifest.json") == stamp
  # Online reference log-probs give the same training.
  train(tmp_path / "c", "--train_steps=2", "--ref_logprobs=online")
  assert metrics(tmp_path / "c") == metrics(tmp_path / "a")


@pytest.mark.slow
def test_diverging_run_stops_at_max_bad_steps_with_finite_checkpoints(
    tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "diverged"
  # An absurd learning rate: every update would throw the parameters far
  # out (about 1e30, their squares past float32), so the guard skips each
  # one and the parameters never leave their finite start.
  result = train(workdir, "--train_steps=20", "--policy_lr=1e30",
                 "--warmup_steps=0", "--log_every=1", "--checkpoint_every=1",
                 "--max_bad_steps=3", check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "--max_bad_steps=3" in result.stderr
  assert "Lower --policy_lr" in result.stderr
  assert not (workdir / "summary.json").exists()
  logged = metrics(workdir)
  # The run stops at the third skipped update in a row.
  assert [m["consecutive_bad_steps"] for m in logged[-3:]] == [1.0, 2.0, 3.0]
  assert [m["skipped_update"] for m in logged[-3:]] == [1.0, 1.0, 1.0]
  # Every update was skipped, from the first: the losses stay finite.
  assert len(logged) == 3 and np.isfinite([m["loss"] for m in logged]).all()
  assert f"stopping at step {len(logged)}" in result.stderr
  steps_saved = sorted(int(n) for n in os.listdir(workdir / "checkpoints")
                       if n.isdigit())
  assert steps_saved[-1] == len(logged) - 1
  for step, item in itertools.product(steps_saved,
                                      ("policy", "train_state")):
    state = ocp.StandardCheckpointer().restore(
        workdir / "checkpoints" / str(step) / item)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.isfinite(leaf).all(), (step, jax.tree_util.keystr(path))


@pytest.mark.slow
def test_init_checkpoint_and_tokenizer_vocabulary(tmp_path):
  from tests.models import hf_reference  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  for vocab, name in ((97, "fits"), (40, "small")):
    torch.manual_seed(0)
    config = transformers.T5Config(**dict(hf_reference.HF_KWARGS,
                                          vocab_size=vocab),
                                   **hf_reference.VARIANTS["v1_1"])
    transformers.T5ForConditionalGeneration(config).save_pretrained(
        tmp_path / name)
  train(tmp_path / "run", "--train_steps=2",
        f"--init_checkpoint={tmp_path / 'fits'}")
  assert summary(tmp_path / "run")["model"]["vocab_size"] == 97
  assert summary(tmp_path / "run")["model"]["num_decoder_layers"] == 3
  result = train(tmp_path / "run2", "--train_steps=2",
                 f"--init_checkpoint={tmp_path / 'small'}", check=False)
  assert result.returncode == 2
  assert "embeds only 40" in result.stderr


def test_second_trainer_on_a_workdir_is_refused(tmp_path):
  import fcntl  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "busy"
  workdir.mkdir()
  with open(workdir / ".lock", "a+") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    result = train(workdir, "--train_steps=2", check=False)
  assert result.returncode == 2
  assert "is in use by another trainer" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (workdir / "checkpoints").exists()


@pytest.mark.slow
def test_dropout_with_a_cached_reference_warns_and_progress_lines_print(
    tmp_path):
  """Dropout 0 (the default): log π − log π_ref is 0 on the trainer's first
  batch; with dropout it is not, and a warning gives the measured value.
  stdout is not a terminal here: each logged step prints a progress line."""
  plain = train(tmp_path / "a", "--train_steps=2", "--log_every=1")
  assert metrics(tmp_path / "a")[0]["log_ratio_mean"] == 0.0
  assert "log π − log π_ref" not in plain.stderr
  assert re.search(r"^step 1/2  loss -?\d+\.\d{4}  \d+\.\d examples/s  \d+ "
                   r"tokens/s  elapsed \d\d:\d\d:\d\d  ETA \d\d:\d\d:\d\d$",
                   plain.stdout, re.M), plain.stdout
  dropped = train(tmp_path / "b", "--train_steps=2", "--log_every=1",
                  "--dropout_rate=0.1")
  first = metrics(tmp_path / "b")[0]["log_ratio_mean"]
  assert first != 0
  assert (f"--dropout_rate=0.1 with reference log-probs computed without "
          f"dropout: on the first batch, mean log π − log π_ref = "
          f"{first:.4g}") in dropped.stderr, dropped.stderr[-2000:]
