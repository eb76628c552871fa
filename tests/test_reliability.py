"""The trainer seen from outside when its data, disk or process misbehave.

Each case runs `python -m dro_fast.train` as a subprocess on real files and
checks what a user sees: one line naming the path or what changed and what
to do, the exit status, no traceback, and nothing new left behind.

  * changed training data (a completion's text, a length setting) never
    resumes: the data fingerprints recorded at the first start refuse it;
  * a read-only file system (a real tmpfs mounted read-only, where the host
    lets the tests mount one) and a permission refusal (a process without
    CAP_DAC_OVERRIDE, through setpriv) give one line and exit 2;
  * a workdir that names a regular file, a data file that does not exist,
    an invalid mesh: one line, exit 2, no workdir created;
  * a second Ctrl-C during a checkpoint save stops at once, without a
    traceback; the save it cut short is removed at the next start;
  * no readable checkpoint: one error line, no TensorStore or asyncio noise,
    and the way to start afresh;
  * SIGTERM during the start-up: one line, exit 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.test_train import REPO
from tests.test_train import SMALL

_TRAIN_STEPS = ["--train_steps=4"]


def _run(workdir, *flags, env=None, user: list[str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
      [*(user or []), sys.executable, "-m", "dro_fast.train",
       f"--workdir={workdir}", *SMALL, *flags], cwd=REPO,
      capture_output=True, text=True, timeout=timeout, check=False,
      env=env)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
  return [line for line in result.stderr.splitlines()
          if line.startswith("error:")]


def _assert_one_line_error(result: subprocess.CompletedProcess,
                           *fragments: str, code: int = 2) -> str:
  """The run failed with `code`, one error line holding every fragment,
  and no traceback; returns that line."""
  output = result.stdout + result.stderr
  assert result.returncode == code, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  lines = _error_lines(result)
  assert len(lines) == 1, output[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """A workdir trained for 4 steps (checkpoints at 4); copied per test."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  result = _run(workdir, *_TRAIN_STEPS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _copy(trained: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


# ---------------------------------------------------------------------------
# Changed data never resumes.


@pytest.mark.slow
def test_a_changed_completion_refuses_to_resume(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  record = json.loads((workdir / "data_fingerprint.json").read_text())
  assert set(record) == {"data", "rows", "tokenizer", "settings"}
  caches = sorted(os.listdir(workdir / "ref_cache"))
  data = workdir / "demo_train.jsonl"
  rows = [json.loads(line) for line in data.read_text().splitlines()]
  rows[1]["completion"] += " extra"        # the text only: rewards unchanged
  data.write_text("".join(json.dumps(row) + "\n" for row in rows))
  result = _run(workdir, "--train_steps=8")
  _assert_one_line_error(result, "trained on other data",
                         "the tokenised rows", "data_fingerprint.json",
                         "new workdir")
  assert "Resumed" not in result.stdout + result.stderr
  # Nothing new: no second reference cache, the same checkpoints.
  assert sorted(os.listdir(workdir / "ref_cache")) == caches
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]


@pytest.mark.slow
def test_a_changed_length_setting_is_named(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  result = _run(workdir, "--train_steps=8", "--max_target_length=9")
  _assert_one_line_error(result, "max_target_length 8 -> 9")


@pytest.mark.slow
def test_an_unchanged_rerun_resumes(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  result = _run(workdir, "--train_steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from step 4" in result.stdout + result.stderr
  assert len(os.listdir(workdir / "ref_cache")) == 1


# ---------------------------------------------------------------------------
# File-system refusals: one line, exit 2, nothing created.


def _mount_read_only_tmpfs(path: pathlib.Path) -> str | None:
  """Mounts an empty read-only tmpfs at `path`; returns why not, or None."""
  if os.geteuid() != 0:
    return "mounting a tmpfs needs root"
  path.mkdir(parents=True)
  (path / "inside").mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro",
                           "tmpfs", str(path / "inside")],
                          capture_output=True, text=True, check=False)
  return None if result.returncode == 0 else (
      f"mount -t tmpfs failed: {result.stderr.strip()}")


def test_a_read_only_file_system_is_one_line(tmp_path):
  root = tmp_path / "ro"
  why_not = _mount_read_only_tmpfs(root)
  if why_not is not None:
    pytest.skip(why_not)
  try:
    for workdir in (root / "inside" / "new", root / "inside"):
      result = _run(workdir, *_TRAIN_STEPS)
      _assert_one_line_error(result, "Read-only file system", str(workdir),
                             "writable")
    assert os.listdir(root / "inside") == []
  finally:
    subprocess.run(["umount", str(root / "inside")], check=False)


def _setpriv() -> list[str] | None:
  """A command prefix that runs as `nobody` without capabilities, or None."""
  setpriv = shutil.which("setpriv")
  if setpriv is None or os.geteuid() != 0:
    return None
  return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
          "--inh-caps=-all"]


def test_a_permission_refusal_is_one_line(tmp_path):
  prefix = _setpriv()
  if prefix is None:
    pytest.skip("needs root and setpriv to run the trainer as a user "
                "without CAP_DAC_OVERRIDE")
  # The user must reach the workdir's parent (pytest's tmp_path is root's
  # alone); the parent is root's and not writable by others.
  parent = pathlib.Path(tempfile.mkdtemp(prefix="root_only_"))
  os.chmod(parent, 0o755)
  workdir = parent / "run"
  env = dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path),
             JAX_COMPILATION_CACHE_DIR="", TMPDIR="/tmp")
  try:
    result = _run(workdir, *_TRAIN_STEPS, env=env, user=prefix)
    if "Permission denied" not in result.stderr and result.returncode != 2:
      pytest.skip(f"the unprivileged trainer could not start here: "
                  f"{result.stderr[-500:]}")
    _assert_one_line_error(result, "Permission denied", str(workdir),
                           "permissions")
    assert os.listdir(parent) == []
  finally:
    shutil.rmtree(parent, ignore_errors=True)


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  workdir = tmp_path / "file"
  workdir.write_text("not a folder")
  result = _run(workdir, *_TRAIN_STEPS)
  _assert_one_line_error(result, str(workdir), "is not a folder")
  assert workdir.read_text() == "not a folder"


def test_missing_data_is_reported_before_its_format(tmp_path):
  workdir = tmp_path / "run"
  result = _run(workdir, "--train_data=/nonexistent", *_TRAIN_STEPS)
  line = _assert_one_line_error(result, "/nonexistent", "does not exist")
  assert "extension" not in line
  assert not workdir.exists()


def test_an_invalid_mesh_creates_no_workdir(tmp_path):
  workdir = tmp_path / "run"
  result = _run(workdir, "--mesh=data:3,model:2", *_TRAIN_STEPS)
  _assert_one_line_error(result, "--mesh")
  assert not workdir.exists()


def test_a_bad_row_leaves_no_lock(tmp_path):
  data = tmp_path / "train.jsonl"
  data.write_text('{"prompt": "a", "completion": "b", "reward": "x"}\n')
  workdir = tmp_path / "run"
  result = _run(workdir, f"--train_data={data}", *_TRAIN_STEPS)
  _assert_one_line_error(result, str(data))
  assert not workdir.exists()


# ---------------------------------------------------------------------------
# Interrupts and damaged checkpoints.


def _wait_for(process: subprocess.Popen, condition, what: str,
              log: pathlib.Path, limit_s: float = 600) -> None:
  deadline = time.monotonic() + limit_s
  while not condition():
    assert process.poll() is None, (
        f"the trainer exited ({process.returncode}) before {what}:\n"
        f"{log.read_text()[-3000:]}")
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.001)


def _start(workdir: pathlib.Path, log: pathlib.Path,
           *flags: str) -> subprocess.Popen:
  with open(log, "w") as out:
    return subprocess.Popen(
        [sys.executable, "-m", "dro_fast.train", f"--workdir={workdir}",
         *SMALL, *flags], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_second_ctrl_c_during_a_save_stops_at_once(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / "checkpoints"
  log = tmp_path / "interrupted.log"
  # Saves every step from 5 on. The first Ctrl-C, during step 5's save,
  # asks for a stop (answered with step 6's save); the second, as that
  # save starts, stops at once. (Sent together, the two could reach Python
  # as one.)
  process = _start(workdir, log, "--train_steps=40", "--checkpoint_every=1",
                   "--keep_checkpoints=40")
  writing = lambda step: lambda: any(
      name.startswith(f"{step}.orbax-checkpoint-tmp")
      for name in os.listdir(checkpoints))
  _wait_for(process, writing(5), "the save of step 5 starts", log)
  process.send_signal(signal.SIGINT)
  _wait_for(process, writing(6), "the save of step 6 starts", log)
  process.send_signal(signal.SIGINT)
  assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
  output = log.read_text()
  assert "Traceback" not in output, output[-3000:]
  assert "KeyboardInterrupt" not in output, output[-3000:]
  assert "Interrupted: stopped at once" in output
  # Whether or not the save was cut short, the next start leaves no
  # unfinished folder behind (an earlier one is planted to be sure) and
  # resumes from the newest complete step.
  planted = checkpoints / "39.orbax-checkpoint-tmp-1234"
  planted.mkdir()
  (planted / "policy").write_text("half")
  newest = max(int(name) for name in os.listdir(checkpoints)
               if name.isdigit())
  result = _run(workdir, f"--train_steps={newest + 1}",
                "--checkpoint_every=1", "--keep_checkpoints=40")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from step {newest}" in result.stdout + result.stderr
  assert not [n for n in os.listdir(checkpoints) if "-tmp" in n]


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_line_without_noise(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for chunk in (workdir / "checkpoints").rglob("*"):
    if chunk.is_file() and chunk.parent.name == "d":
      chunk.unlink()                       # every array chunk of step 4
  result = _run(workdir, "--train_steps=8")
  line = _assert_one_line_error(result, "no readable checkpoint",
                                "start training afresh", "mv ")
  assert str(workdir / "checkpoints") in line
  output = result.stdout + result.stderr
  for noise in ("Event loop is closed", "Exception ignored",
                "never retrieved"):
    assert noise not in output, output[-3000:]
  assert len(output.splitlines()) < 10, output[-3000:]


@pytest.mark.slow
def test_sigterm_during_start_up_is_one_line_and_exit_0(tmp_path):
  workdir = tmp_path / "run"
  log = tmp_path / "startup.log"
  # Many rows, so that the start-up (tokenizer, reference log-probs) lasts.
  process = _start(workdir, log, "--demo_examples=4096", "--train_steps=4")
  _wait_for(process, lambda: (workdir / "demo_train.jsonl").exists(),
            "the start-up writes the demo data", log)
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
  output = log.read_text()
  assert "SIGTERM during start-up" in output and "nothing trained" in output
  assert "Traceback" not in output
  assert not (workdir / "checkpoints").exists()
