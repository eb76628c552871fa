"""`python -m dro_fast.train` on decoder-only LLMs from Hugging Face folders.

Each family's folder (tests/hf_folders.py: a tiny random transformers model,
its tokenizer and chat template) is the --init_checkpoint; the data are TRL
unpaired rows, conversational and plain, and TRL preference rows for DPO.
The trainer must detect the family, read the folder's tokenizer, train, and
resume a killed or preempted run bit for bit.

The trainers share a persistent JAX compilation cache, so reruns of a set-up
compile nothing.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.hf_folders import build_model_folder
from tests.test_kill_resume import env  # pylint: disable=unused-import
from tests.test_train import REPO

pytestmark = pytest.mark.slow

_TOPICS = ["the sky", "the sea", "a cat", "paris", "three apples"]


def _rows(conversational: bool, n: int = 24) -> list[dict]:
  rows = []
  for i in range(n):
    question = f"What about {_TOPICS[i % len(_TOPICS)]}?"
    answer = ("It is blue and warm today." if i % 2 else
              "Count one two three four.")
    if conversational:
      prompt = ([{"role": "system", "content": "Be brief."}] if i % 3 == 0
                else []) + [{"role": "user", "content": question}]
      rows.append({"prompt": prompt,
                   "completion": [{"role": "assistant", "content": answer}],
                   "label": bool(i % 2)})
    else:
      rows.append({"prompt": question, "completion": " " + answer,
                   "label": bool(i % 2)})
  return rows


def _write(path: pathlib.Path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
  folder = tmp_path_factory.mktemp("data")
  pairs = [{"prompt": r["prompt"],
            "chosen": [{"role": "assistant", "content": "Blue, warm."}],
            "rejected": [{"role": "assistant", "content": "Count one."}]}
           for r in _rows(True)]
  return {"conversational": _write(folder / "conv.jsonl", _rows(True)),
          "plain": _write(folder / "plain.jsonl", _rows(False)),
          "pairs": _write(folder / "pairs.jsonl", pairs)}


_folders: dict[str, str] = {}


@pytest.fixture
def folder(tmp_path_factory):
  def make(family: str) -> str:
    if family not in _folders:
      _folders[family] = build_model_folder(
          tmp_path_factory.mktemp(family), family)
    return _folders[family]
  return make


def _flags(init: str, data: str, workdir: pathlib.Path, **extra) -> list[str]:
  flags = {"init_checkpoint": init, "train_data": data,
           "data_format": "unpaired", "workdir": str(workdir),
           "batch_size": 4, "train_steps": 3, "max_input_length": 40,
           "max_target_length": 16, "policy_lr": 1e-3, "value_lr": 1e-3,
           "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2}
  flags.update(extra)
  return [f"--{k}={v}" for k, v in flags.items()]


def _train(flags: list[str], env) -> dict:
  done = subprocess.run([sys.executable, "-m", "dro_fast.train", *flags],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout[done.stdout.index("{"):])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_dro_v_trains_each_family_from_its_folder(family, folder, data, env,
                                                  tmp_path):
  init = folder(family)
  # Qwen 2.5: plain rows and the value head on the policy's own trunk.
  extra = {"value_net": "shared"} if family == "qwen2" else {}
  rows = "conversational" if family != "qwen2" else "plain"
  summary = _train(_flags(init, data[rows], tmp_path / "run", **extra), env)
  assert summary["final_step"] == 3
  metrics = summary["final_metrics"]
  assert metrics["skipped_update"] == 0.0
  assert metrics["policy_grad_norm"] > 0 and metrics["value_grad_norm"] > 0
  run = json.loads((tmp_path / "run" / "run_config.json").read_text())
  assert run["model"]["family"] == family
  assert run["data"]["decoder_only"] and run["data"]["tokenizer"] == init


@pytest.mark.parametrize("algo,family,rows", [
    ("kto", "qwen3", "plain"), ("dpo", "llama", "pairs")])
def test_kto_and_dpo_train_a_decoder(algo, family, rows, folder, data, env,
                                     tmp_path):
  extra = {"algo": algo}
  if algo == "dpo":
    extra["data_format"] = "pairwise"
  summary = _train(_flags(folder(family), data[rows], tmp_path / "run",
                          **extra), env)
  assert summary["final_step"] == 3
  assert summary["final_metrics"]["skipped_update"] == 0.0


def _started(workdir: pathlib.Path, step: int) -> bool:
  metrics = workdir / "metrics.jsonl"
  return metrics.exists() and any(
      json.loads(line).get("step", 0) >= step
      for line in metrics.read_text().splitlines() if line.strip())


def test_killed_and_preempted_runs_resume_bit_for_bit(folder, data, env,
                                                      tmp_path):
  """SIGKILL after the step-2 checkpoint, then SIGTERM (which saves), then
  a rerun to the end: the parameters of a run never interrupted."""
  init = folder("gemma3")
  steps = {"train_steps": 8, "checkpoint_every": 2}
  reference = _train(_flags(init, data["conversational"],
                            tmp_path / "reference", **steps), env)
  workdir = tmp_path / "interrupted"
  flags = _flags(init, data["conversational"], workdir, **steps)
  for sig, step in ((signal.SIGKILL, 3), (signal.SIGTERM, 5)):
    trainer = subprocess.Popen(
        [sys.executable, "-m", "dro_fast.train", *flags], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not _started(workdir, step) and trainer.poll() is None:
      assert time.monotonic() < deadline
      time.sleep(0.02)
    trainer.send_signal(sig)
    out, _ = trainer.communicate(timeout=600)
    if sig == signal.SIGTERM:
      assert trainer.returncode == 0, out[-2000:]
      assert "stopped at step" in out
  assert any((workdir / "checkpoints").iterdir())
  final = _train(flags, env)
  assert final["final_step"] == 8
  assert final["policy_params_sha256"] == reference["policy_params_sha256"]


def test_the_tiny_decoder_flagfile_runs_sft_then_dro_v(env, tmp_path):
  """The packaged CPU demo of a decoder-only model, shortened: SentencePiece
  trained on the synthetic task, SFT, DRO-V and the demo's reward."""
  summary = _train(["--flagfile=tiny_decoder.flags",
                    f"--workdir={tmp_path / 'run'}", "--sft_steps=20",
                    "--train_steps=4", "--log_every=2",
                    "--checkpoint_every=2", "--demo_examples=256"], env)
  assert summary["final_step"] == 4
  rewards = summary["demo_reward"]
  assert set(rewards) == {"behaviour_policy", "initial_policy",
                          "final_policy"}
  assert all(-1.0 <= r <= 1.0 for r in rewards.values())
  run = json.loads((tmp_path / "run" / "run_config.json").read_text())
  assert run["model"]["name"] == "tiny_decoder" and run["data"]["decoder_only"]


def _checkpointed_names(workdir: pathlib.Path, item: str) -> set[str]:
  """The parameter names in the newest checkpoint's `item` (Orbax's tree
  metadata), e.g. {"kernel", "lora_a", ...}."""
  newest = max((p for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()), key=lambda p: int(p.name))
  tree = json.loads((newest / item / "_METADATA").read_text())
  return {entry["key_metadata"][-1]["key"]
          for entry in tree["tree_metadata"].values()}


def test_a_lora_run_checkpoints_its_adapters_and_resumes_bit_for_bit(
    folder, data, env, tmp_path):
  """--lora_rank: the policy item holds the adapters alone; a run killed
  after its step-2 checkpoint resumes to the uninterrupted run's
  adapters."""
  init = folder("llama")
  lora = {"lora_rank": 4, "lora_targets": "attention,up_proj",
          "train_steps": 4, "value_net": "shared"}
  reference = _train(_flags(init, data["conversational"],
                            tmp_path / "reference", **lora), env)
  assert reference["final_metrics"]["skipped_update"] == 0.0
  assert _checkpointed_names(tmp_path / "reference", "policy") == {
      "lora_a", "lora_b"}
  workdir = tmp_path / "interrupted"
  flags = _flags(init, data["conversational"], workdir, **lora)
  trainer = subprocess.Popen(
      [sys.executable, "-m", "dro_fast.train", *flags], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 600
  while not _started(workdir, 3) and trainer.poll() is None:
    assert time.monotonic() < deadline
    time.sleep(0.02)
  trainer.send_signal(signal.SIGKILL)
  trainer.communicate(timeout=600)
  final = _train(flags, env)
  assert final["final_step"] == 4
  assert final["policy_params_sha256"] == reference["policy_params_sha256"]
  run = json.loads((workdir / "run_config.json").read_text())
  assert run["model"]["lora"] == {"alpha": 8.0, "base_dtype": "bfloat16",
                                  "rank": 4,
                                  "targets": ["attention", "up_proj"]}


def test_the_tiny_decoder_demo_with_lora_warm_starts_the_whole_model(
    env, tmp_path):
  """SFT trains every parameter (the base), then DRO-V the adapters."""
  workdir = tmp_path / "run"
  summary = _train(["--flagfile=tiny_decoder.flags", f"--workdir={workdir}",
                    "--sft_steps=10", "--train_steps=2", "--log_every=1",
                    "--checkpoint_every=2", "--demo_examples=128",
                    "--lora_rank=8"], env)
  assert summary["final_step"] == 2
  assert set(summary["demo_reward"]) == {"behaviour_policy",
                                         "initial_policy", "final_policy"}
  assert _checkpointed_names(workdir, "policy") == {"lora_a", "lora_b"}
  assert "kernel" in {
      entry["key_metadata"][-1]["key"] for entry in json.loads(
          next((workdir / "sft_init").glob("*/policy/_METADATA")).read_text()
          )["tree_metadata"].values()}


def test_a_lora_run_refuses_to_resume_onto_a_changed_base(folder, data, env,
                                                          tmp_path):
  """The base is not checkpointed: a changed --init_checkpoint folder is
  one line and exit status 2, the checkpoints kept."""
  import shutil  # pylint: disable=g-import-not-at-top
  base = tmp_path / "base"
  shutil.copytree(folder("llama"), base)
  workdir = tmp_path / "run"
  lora = {"lora_rank": 2, "value_net": "shared", "train_steps": 2}
  _train(_flags(str(base), data["plain"], workdir, **lora), env)
  other = build_model_folder(tmp_path / "other", "llama", seed=1)
  shutil.copyfile(pathlib.Path(other) / "model.safetensors",
                  base / "model.safetensors")
  done = subprocess.run(
      [sys.executable, "-m", "dro_fast.train",
       *_flags(str(base), data["plain"], workdir, **dict(lora,
                                                          train_steps=4))],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 2, done.stderr[-2000:]
  assert "Traceback" not in done.stderr
  assert ("adapters were trained on another base model than "
          f"--init_checkpoint={base}") in done.stderr
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2"]
