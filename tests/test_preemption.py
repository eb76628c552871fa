"""SIGTERM (a preemption) and Ctrl-C stop `python -m dro_fast.train` with a
checkpoint at the step in flight; the rerun resumes exactly.

A seeded generator picks the moments: at least one SIGTERM inside a
training step and one while a checkpoint is being written. Each stopped
run must exit 0 with the line saying where it stopped and how to resume,
and the run that finally completes must hold the parameters, bit for bit,
and the metrics of a run that was never interrupted. A Ctrl-C after a
request stops at once (tested in-process below). (Two processes joined by
jax.distributed, one of them sent SIGTERM:
tests/training/test_multiprocess.py.)

The trainers share a persistent compilation cache (tests/test_kill_resume).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

import pytest

from dro_fast.training import preemption
from tests.test_kill_resume import _TMP_SUFFIX
from tests.test_kill_resume import CHECKPOINT_EVERY
from tests.test_kill_resume import checkpoint_entries
from tests.test_kill_resume import committed_steps
from tests.test_kill_resume import data_file  # pylint: disable=unused-import
from tests.test_kill_resume import env  # pylint: disable=unused-import
from tests.test_kill_resume import logged_steps
from tests.test_kill_resume import metrics_without_timing
from tests.test_kill_resume import summary
from tests.test_kill_resume import Trainer
from tests.test_kill_resume import straight_run
from tests.test_kill_resume import trainer_flags
from tests.test_kill_resume import wait_for_write_start

TRAIN_STEPS = 24
SEED = 20261206
_STOPPED = re.compile(r"SIG(TERM|INT): stopped at step (\d+) of (\d+), "
                      r"([\d.]+) s after the signal, with a checkpoint in "
                      r"(\S+)\. Rerun the same command to resume\.")


def stopped(trainer: Trainer, sent: float) -> tuple[int, float]:
  """Waits for the signalled trainer; returns (the step it stopped at,
  seconds from the signal to its exit), checking the exit code and line."""
  returncode = trainer.process.wait(timeout=300)
  seconds = time.monotonic() - sent
  output = trainer.output()
  assert returncode == 0, output[-3000:]
  found = _STOPPED.findall(output)
  assert len(found) == 1, output[-3000:]
  _, step, total, _, _ = found[0]
  assert int(total) == TRAIN_STEPS
  assert "policy_params_sha256" not in output   # no final summary printed
  return int(step), seconds


def sigterm_inside_step(trainer, workdir, rng, step_s):
  """SIGTERM a random fraction of a step after step k is logged: the
  trainer should finish step k+1 and stop there."""
  resume = (committed_steps(workdir) or [0])[-1]
  k = resume + 1 + 2 * rng.randrange(0, 2)
  # A stopped run logs nothing past its checkpoint: line k is this run's.
  trainer.wait_for(lambda: k in logged_steps(workdir), f"step {k} is logged")
  time.sleep(rng.uniform(0.05, 0.5) * step_s)
  inside = logged_steps(workdir)[-1] == k
  sent = time.monotonic()
  trainer.process.send_signal(signal.SIGTERM)
  step, seconds = stopped(trainer, sent)
  return ("step" if inside and step == k + 1 else "other"), step, seconds


def sigterm_during_checkpoint_write(trainer, workdir, rng):
  """SIGTERM as soon as Orbax creates the temporary folder of a step (the
  first or second regular checkpoint after the resume)."""
  resume = (committed_steps(workdir) or [0])[-1]
  target = (resume // CHECKPOINT_EVERY + 1 + rng.randrange(0, 2)) * (
      CHECKPOINT_EVERY)
  wait_for_write_start(trainer, workdir, target)
  sent = time.monotonic()
  trainer.process.send_signal(signal.SIGTERM)
  during = str(target) not in checkpoint_entries(workdir)
  step, seconds = stopped(trainer, sent)
  return ("checkpoint" if during else "other"), step, seconds


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_reruns_resume_exactly(
    tmp_path, env, data_file, record_property):
  flags = trainer_flags(data_file, TRAIN_STEPS)
  straight, step_s = straight_run(tmp_path, flags, env)

  rng = random.Random(SEED)
  plan = ["step", "checkpoint", rng.choice(["step", "checkpoint"])]
  rng.shuffle(plan)
  workdir = tmp_path / "stopped"
  stops = []
  while plan and len(stops) < 8:
    if (committed_steps(workdir) or [0])[-1] + 6 > TRAIN_STEPS:
      break                          # no room left for another stop
    kind = plan.pop(0)
    # Saves in the background (the accelerators' default) every other run.
    background = len(stops) % 2 == 1
    trainer = Trainer(workdir, flags + [
        f"--{'' if background else 'no'}async_checkpoints"], env)
    if kind == "step":
      landed, step, seconds = sigterm_inside_step(trainer, workdir, rng,
                                                  step_s)
    else:
      landed, step, seconds = sigterm_during_checkpoint_write(
          trainer, workdir, rng)
    # The stop step is saved and is the newest checkpoint; nothing logged
    # past it.
    assert committed_steps(workdir)[-1] == step, (kind, step)
    assert logged_steps(workdir)[-1] <= step
    assert not (workdir / "summary.json").exists()
    stops.append((kind, landed, step, round(seconds, 2), background))
    if landed != kind:
      plan.append(kind)
  landed = [s[1] for s in stops]
  assert len(stops) >= 3 and "step" in landed and "checkpoint" in landed, (
      stops)
  record_property("sigterm_to_exit_s", [s[3] for s in stops])
  print("SIGTERM to exit (s):", [s[3] for s in stops], stops)

  newest = committed_steps(workdir)[-1]
  output = Trainer(workdir, flags, env).finish()
  assert f"Resumed from step {newest}" in output
  assert summary(workdir)["final_step"] == TRAIN_STEPS
  assert (summary(workdir)["policy_params_sha256"]
          == summary(straight)["policy_params_sha256"]), stops
  assert metrics_without_timing(workdir) == metrics_without_timing(straight)
  assert not [n for n in checkpoint_entries(workdir) if _TMP_SUFFIX in n]


def test_a_ctrl_c_after_a_stop_request_stops_at_once():
  """In-process, so that the two signals arrive in a known order: the first
  Ctrl-C only records the request; the next raises KeyboardInterrupt. The
  handlers are restored on exit."""
  before = signal.getsignal(signal.SIGINT)
  with preemption.StopRequests() as stop:
    assert not stop.stop_after(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)                  # the handler runs between bytecodes
    assert stop.signal_name == "SIGINT" and stop.stop_after(2)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGINT) is before
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.signal_name == "SIGTERM" and stop.received_at is not None
  assert signal.getsignal(signal.SIGTERM) is before
