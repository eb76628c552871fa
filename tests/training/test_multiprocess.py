"""Two processes joined by jax.distributed (CPU, gloo) train like one.

Each process runs `python -m dro_fast.train` with one CPU device and the
multi-process flags; the global mesh is fsdp:2, so every step all-gathers
parameters and reduce-scatters gradients between the processes, and the
checkpoints (Orbax) are written and read by both. The same run in one
process with two CPU devices is the reference.

One device per process: with two or more CPU devices per process, XLA's CPU
collectives (jax 0.10.2) deadlock once several cross-process computations are
in flight (see docs/SCALING.md).

Bitwise equality is expected, not a tolerance: each collective here has two
participants, and a two-term float sum is the same in either order, so the
cross-process reductions add the same numbers as the in-process ones. With
more participants the summation order may differ and a comparison would need
a tolerance.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from dro_fast.data import synthetic
from tests import test_kill_resume
from tests.test_train import metrics
from tests.test_train import summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
FLAGS = ["--batch_size=8", "--max_input_length=16", "--max_target_length=12",
         "--tokenizer_vocab_size=48", "--policy_lr=1e-3", "--value_lr=1e-3",
         "--warmup_steps=2", "--log_every=1", "--checkpoint_every=2",
         "--scan_layers", "--sft_steps=2", "--mesh=fsdp:2"]
TIMEOUT_S = 900
TRAIN_STEPS = 8


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(workdir, processes: int, devices_per_process: int, *flags
          ) -> tuple[list[subprocess.Popen], list[str]]:
  """Starts the trainer as `processes` processes; returns them and their
  log files."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices_per_process}"))
  command = [sys.executable, "-m", "dro_fast.train", f"--workdir={workdir}",
             *FLAGS, *flags]
  if processes > 1:
    port = free_port()
    commands = [command + [f"--coordinator_address=127.0.0.1:{port}",
                           f"--num_processes={processes}",
                           f"--process_id={i}"] for i in range(processes)]
  else:
    commands = [command]
  logs = [os.path.join(os.path.dirname(workdir),
                       f"{os.path.basename(workdir)}.{i}.log")
          for i in range(processes)]
  running = []
  for cmd, log in zip(commands, logs):
    with open(log, "w") as out:
      running.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                      stderr=subprocess.STDOUT))
  return running, logs


def train(workdir, processes: int, devices_per_process: int, *flags) -> str:
  """Runs the trainer as `processes` processes; returns process 0's output."""
  running, logs = start(workdir, processes, devices_per_process, *flags)
  deadline = time.monotonic() + TIMEOUT_S
  # A process that fails leaves the others waiting in a collective: stop
  # them all at the first failure (SIGKILL: JAX catches SIGTERM).
  while any(p.poll() is None for p in running):
    failed = any(p.returncode not in (None, 0) for p in running)
    if failed or time.monotonic() > deadline:
      for p in running:
        if p.poll() is None:
          p.send_signal(signal.SIGKILL)
      break
    time.sleep(0.5)
  for p in running:
    p.wait()
  outputs = []
  for log in logs:
    with open(log) as f:
      outputs.append(f.read())
  codes = [p.returncode for p in running]
  assert codes == [0] * processes, "\n\n".join(
      f"process {i} exited {c}:\n{o[-3000:]}"
      for i, (c, o) in enumerate(zip(codes, outputs)))
  return outputs[0]


def wait_for_step(workdir, step: int, running, logs) -> None:
  """Polls metrics.jsonl until `step` is logged; fails if a process exits."""
  deadline = time.monotonic() + TIMEOUT_S
  while step not in test_kill_resume.logged_steps(workdir):
    assert all(p.poll() is None for p in running), [
        open(log).read()[-2000:] for log in logs]
    assert time.monotonic() < deadline, f"step {step} never logged"
    time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_stop_on_one_sigterm_and_resume_like_one(tmp_path):
  """One SIGTERM, to one process (a preempted host): jax's preemption
  service stops both at the same step, with a checkpoint, exit code 0 and
  the resume line on each; the rerun resumes there and ends like the run
  in one process."""
  data = tmp_path / "train.jsonl"
  synthetic.write_jsonl(data, synthetic.make_triplets(64, seed=0))
  single, multi = tmp_path / "single", tmp_path / "multi"
  steps = f"--train_steps={TRAIN_STEPS}"
  train(single, 1, 2, f"--train_data={data}", steps)

  running, logs = start(multi, 2, 1, f"--train_data={data}", steps)
  wait_for_step(multi, 2, running, logs)
  sent = time.monotonic()
  running[1].send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=TIMEOUT_S) for p in running]
  seconds = time.monotonic() - sent
  outputs = [open(log).read() for log in logs]
  assert codes == [0, 0], [o[-3000:] for o in outputs]
  stopped = [re.search(r"SIGTERM: stopped at step (\d+) of ", o)
             for o in outputs]
  assert all(stopped), [o[-3000:] for o in outputs]
  step = int(stopped[0].group(1))
  assert int(stopped[1].group(1)) == step and 2 < step < TRAIN_STEPS
  assert test_kill_resume.committed_steps(multi)[-1] == step
  assert not (multi / "summary.json").exists()
  print(f"SIGTERM to one of two processes: both stopped at step {step}, "
        f"{seconds:.1f} s from the signal to both exits")

  output = train(multi, 2, 1, f"--train_data={data}", steps)
  assert f"Resumed from step {step}" in output
  assert summary(multi)["final_step"] == TRAIN_STEPS
  assert [m["step"] for m in metrics(multi)] == list(
      range(1, TRAIN_STEPS + 1))
  assert metrics(multi) == metrics(single)
  assert (summary(multi)["policy_params_sha256"] ==
          summary(single)["policy_params_sha256"])
  assert {".lock", ".lock.1"} <= set(os.listdir(multi))   # one per process
