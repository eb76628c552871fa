"""Killed and damaged runs of `python -m dro_fast.train` resume exactly.

The trainer is killed with SIGKILL (no cleanup, as on a preempted machine) at
moments a seeded generator picks, at least one inside a training step and
one while a checkpoint is being written (by a background save,
--async_checkpoints, as on accelerators), and rerun on the same --workdir
each time; the run that finally completes must hold the parameters, bit for
bit, and the metrics of a run that was never interrupted. Another test
damages the newest checkpoint of a finished run and checks that a longer
rerun falls back to the previous one, says so, and finishes.

Every trainer process here shares a persistent JAX compilation cache, so
only the first compiles the training step: the tests are about resuming,
and the reruns then take seconds.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import pathlib
import random
import signal
import statistics
import subprocess
import sys
import time

import pytest

from tests.test_train import REPO
from tests.test_train import TIMING

TRAIN_STEPS = 10
CHECKPOINT_EVERY = 2
BATCH_SIZE = 8
# Seeds the kill moments. When each kill lands where it aims, this one kills
# during the first checkpoint write (nothing committed yet, steps 1-2
# logged), then inside step 6, then during the write of step 6.
SEED = 20240603
_TMP_SUFFIX = ".orbax-checkpoint-tmp"   # Orbax's uncommitted step folders
_POLL_S = 0.001
_DEADLINE_S = 600.0


def trainer_flags(data: str, train_steps: int) -> list[str]:
  return [f"--train_data={data}", f"--batch_size={BATCH_SIZE}",
          "--max_input_length=12", "--max_target_length=8",
          "--tokenizer_vocab_size=48", "--policy_lr=1e-3", "--value_lr=1e-3",
          "--warmup_steps=2", "--log_every=1",
          f"--checkpoint_every={CHECKPOINT_EVERY}", "--keep_checkpoints=3",
          f"--train_steps={train_steps}"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
  """The trainers' environment, with a shared compilation cache."""
  cache = tmp_path_factory.mktemp("jax_cache")
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
  from dro_fast.data import synthetic  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("data") / "train.jsonl"
  synthetic.write_jsonl(path, synthetic.make_triplets(96, seed=0))
  return str(path)


class Trainer:
  """One trainer subprocess, its output in a log file."""

  def __init__(self, workdir: pathlib.Path, flags: list[str],
               env: dict[str, str], log_dir: pathlib.Path | None = None):
    self.log = (log_dir or workdir.parent) / (
        f"{workdir.name}.{time.time_ns()}.log")
    with open(self.log, "w") as log:
      self.process = subprocess.Popen(
          [sys.executable, "-m", "dro_fast.train", f"--workdir={workdir}",
           *flags], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

  def output(self) -> str:
    return self.log.read_text()

  def wait_for(self, condition: Callable[[], bool], what: str) -> None:
    """Polls `condition` until it holds; fails if the trainer exits first."""
    deadline = time.monotonic() + _DEADLINE_S
    while not condition():
      assert self.process.poll() is None, (
          f"the trainer exited ({self.process.returncode}) before {what}:\n"
          f"{self.output()[-3000:]}")
      assert time.monotonic() < deadline, f"timed out waiting for {what}"
      time.sleep(_POLL_S)

  def kill(self) -> None:
    self.process.send_signal(signal.SIGKILL)
    assert self.process.wait(timeout=60) == -signal.SIGKILL

  def finish(self) -> str:
    returncode = self.process.wait(timeout=_DEADLINE_S)
    assert returncode == 0, self.output()[-4000:]
    return self.output()


def logged_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of the complete lines of metrics.jsonl."""
  try:
    data = (workdir / "metrics.jsonl").read_bytes()
  except FileNotFoundError:
    return []
  return [json.loads(line)["step"] for line in data.split(b"\n")[:-1]
          if line.strip()]


def metrics_file_id(workdir: pathlib.Path) -> int | None:
  try:
    return (workdir / "metrics.jsonl").stat().st_ino
  except FileNotFoundError:
    return None


def metrics_without_timing(workdir: pathlib.Path) -> list[dict]:
  rows = [json.loads(line)
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def checkpoint_entries(workdir: pathlib.Path) -> dict[str, tuple[int, int]]:
  """Name -> (inode, ctime) of each entry of <workdir>/checkpoints."""
  found = {}
  try:
    with os.scandir(workdir / "checkpoints") as entries:
      for entry in entries:
        try:
          stat = entry.stat()
        except FileNotFoundError:      # renamed or deleted meanwhile
          continue
        found[entry.name] = (stat.st_ino, stat.st_ctime_ns)
  except FileNotFoundError:
    pass
  return found


def committed_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(n) for n in checkpoint_entries(workdir) if n.isdigit())


def summary(workdir: pathlib.Path) -> dict:
  return json.loads((workdir / "summary.json").read_text())


def straight_run(tmp_path: pathlib.Path, flags: list[str],
                 env: dict[str, str]) -> tuple[pathlib.Path, float]:
  """Runs the trainer uninterrupted; returns its workdir and one step's
  time (the median over the logged steps after the first, which compiled)."""
  straight = tmp_path / "straight"
  Trainer(straight, flags, env).finish()
  lines = (straight / "metrics.jsonl").read_text().splitlines()[1:]
  return straight, statistics.median(
      BATCH_SIZE / json.loads(line)["examples_per_s"] for line in lines)


def wait_for_write_start(trainer: Trainer, workdir: pathlib.Path,
                         step: int) -> str:
  """Waits until Orbax creates the temporary folder of `step`'s checkpoint
  (not one an earlier run left); returns the folder's name."""
  folder = f"{step}{_TMP_SUFFIX}"
  stale = checkpoint_entries(workdir).get(folder)

  def write_started() -> bool:
    found = checkpoint_entries(workdir).get(folder)
    return found is not None and found != stale

  trainer.wait_for(write_started, f"the checkpoint of step {step} starts")
  return folder


def kill_inside_step(trainer: Trainer, workdir: pathlib.Path,
                     rng: random.Random, step_s: float,
                     old_metrics: tuple[int | None, list[int]]) -> str:
  """Kills during the update of a step that ends without a checkpoint.

  With --log_every=1, step k's metrics line is written at the end of step
  k; k odd is not a checkpoint step, so between lines k and k+1 the trainer
  runs step k+1's update only. k is 3 or 5 steps past the checkpoint the
  run resumes from, so at least one new checkpoint is committed first; the
  kill lands a random fraction of a step's time after line k.

  Args:
    trainer: the trainer, just started.
    workdir: its workdir.
    rng: picks k and the delay.
    step_s: the time of one training step.
    old_metrics: metrics.jsonl's inode and logged steps before the start.

  Returns:
    "step" if the evidence afterwards (line k the last, no checkpoint
    beyond k-1) shows the kill landed inside step k+1, else "other".
  """
  resume = (committed_steps(workdir) or [0])[-1]
  k = min(resume + 1 + 2 * rng.randrange(1, 3), TRAIN_STEPS - 1)
  # Lines a killed run logged after its last checkpoint are stale: the
  # rerun must drop them (rewriting metrics.jsonl) before they count.
  old_id, old_steps = old_metrics
  must_rewrite = any(step > resume for step in old_steps)
  trainer.wait_for(
      lambda: (metrics_file_id(workdir) != old_id or not must_rewrite)
      and k in logged_steps(workdir), f"step {k} is logged")
  time.sleep(rng.uniform(0.05, 0.5) * step_s)
  trainer.kill()
  inside = (logged_steps(workdir)[-1] == k
            and (committed_steps(workdir) or [0])[-1] <= k - 1)
  return "step" if inside else "other"


def kill_during_checkpoint_write(trainer: Trainer, workdir: pathlib.Path,
                                 rng: random.Random) -> str:
  """Kills as soon as Orbax creates the temporary folder of a step.

  The step is the first or the second checkpoint after the one the run
  resumes from.

  Returns:
    "checkpoint" if the folder is still uncommitted after the kill (the
    process died before Orbax renamed it), else "other".
  """
  resume = (committed_steps(workdir) or [0])[-1]
  step = min(resume + CHECKPOINT_EVERY * rng.randrange(1, 3), TRAIN_STEPS)
  folder = wait_for_write_start(trainer, workdir, step)
  trainer.kill()
  left = checkpoint_entries(workdir)
  return "checkpoint" if folder in left and str(step) not in left else "other"


def kill_at_startup(trainer: Trainer, rng: random.Random) -> str:
  """Kills a random time into start-up (imports, data, reference cache)."""
  time.sleep(rng.uniform(0.5, 4.0))
  assert trainer.process.poll() is None, trainer.output()[-3000:]
  trainer.kill()
  return "startup"


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_parameters(
    tmp_path, env, data_file):
  flags = trainer_flags(data_file, TRAIN_STEPS)
  straight, step_s = straight_run(tmp_path, flags, env)

  rng = random.Random(SEED)
  plan = ["step", "checkpoint", rng.choice(["step", "checkpoint", "startup"])]
  rng.shuffle(plan)
  workdir = tmp_path / "killed"
  kills = []
  while plan and len(kills) < 8:
    kind = plan.pop(0)
    old_metrics = (metrics_file_id(workdir), logged_steps(workdir))
    # Saves in the background (the accelerators' default) in some runs:
    # the first kill during a checkpoint write lands in one.
    background = (not any(k[:2] == ("checkpoint", "checkpoint") and k[3]
                          for k in kills) if kind == "checkpoint"
                  else len(kills) % 2 == 1)
    trainer = Trainer(workdir, flags + [
        f"--{'' if background else 'no'}async_checkpoints"], env)
    if kind == "step":
      landed = kill_inside_step(trainer, workdir, rng, step_s, old_metrics)
    elif kind == "checkpoint":
      landed = kill_during_checkpoint_write(trainer, workdir, rng)
    else:
      landed = kill_at_startup(trainer, rng)
    kills.append((kind, landed, committed_steps(workdir), background))
    if landed != kind:
      plan.append(kind)             # it landed elsewhere: try that again
  landed = [k[1] for k in kills]
  assert len(kills) >= 3 and "step" in landed and "checkpoint" in landed, kills
  assert ("checkpoint", True) in [(k[1], k[3]) for k in kills], kills

  output = Trainer(workdir, flags, env).finish()
  assert "Resumed from step" in output, kills
  assert summary(workdir)["final_step"] == TRAIN_STEPS
  assert (summary(workdir)["policy_params_sha256"]
          == summary(straight)["policy_params_sha256"]), kills
  assert metrics_without_timing(workdir) == metrics_without_timing(straight)
  # Interrupted writes were redone: no uncommitted step folder is left.
  assert not [n for n in checkpoint_entries(workdir) if _TMP_SUFFIX in n]


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_with_a_warning(
    tmp_path, env, data_file):
  workdir = tmp_path / "run"
  Trainer(workdir, trainer_flags(data_file, 4), env).finish()
  assert committed_steps(workdir) == [2, 4]
  before = metrics_without_timing(workdir)
  # Truncate the largest array data file of the newest checkpoint.
  data_files = sorted((workdir / "checkpoints" / "4").glob(
      "*/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  assert data_files
  os.truncate(data_files[-1], data_files[-1].stat().st_size // 2)

  output = Trainer(workdir, trainer_flags(data_file, 6), env).finish()
  skipped = os.path.join(workdir, "checkpoints", "4")
  assert f"checkpoint {skipped} is unreadable" in output
  assert "falling back to the previous one" in output
  assert "Resumed from step 2" in output
  assert summary(workdir)["final_step"] == 6
  assert committed_steps(workdir) == [2, 4, 6]
  after = metrics_without_timing(workdir)
  assert [row["step"] for row in after] == [1, 2, 3, 4, 5, 6]
  # Steps 3 and 4, trained again from checkpoint 2, match the first time.
  assert after[:4] == before
