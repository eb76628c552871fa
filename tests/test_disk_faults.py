"""A full disk while the trainer writes: one clear line, exit 2, the previous
state intact, and a rerun after space is freed resumes exactly.

Where the sandbox lets the tests mount a tmpfs (root with CAP_SYS_ADMIN),
each writer meets a real full file system of 8 MB (ENOSPC): the layer
tests fill it with a ballast file, the end-to-end test fills it under a
running trainer. Elsewhere the layer tests meet the file size limit
instead (RLIMIT_FSIZE: the OS fails the write with EFBIG, also a
user-fixable fault) and the end-to-end test is skipped, saying why.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import resource
import signal
import subprocess
import uuid

import numpy as np
import pytest

from dro_fast import fileio
from dro_fast.training import checkpointing
from dro_fast.training import metrics as metrics_lib
from dro_fast.training import reference

_SIZE = "8m"
# TensorStore's report of ENOSPC, as Orbax raises it (seen on a full tmpfs).
_TENSORSTORE_ENOSPC = ('RESOURCE_EXHAUSTED: Error writing "w/0.0": Failed to '
                       'write 2641265 bytes to file 15: No space left on '
                       "device [os_error_code='28']")


def _mount_tmpfs(path: pathlib.Path) -> str | None:
  """Mounts a tmpfs at `path`; returns why not, or None once mounted."""
  if os.geteuid() != 0:
    return "mounting a tmpfs needs root"
  path.mkdir(parents=True, exist_ok=True)
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_SIZE}",
                           "tmpfs", str(path)], capture_output=True,
                          text=True, check=False)
  return None if result.returncode == 0 else (
      f"mount -t tmpfs failed: {result.stderr.strip()}")


class Disk:
  """A small file system that can be filled and freed: a real tmpfs
  (ENOSPC), or, where none can be mounted, this process's file size limit
  (EFBIG)."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.why_not_real = _mount_tmpfs(root)
    self.real = self.why_not_real is None
    self.errno = errno.ENOSPC if self.real else errno.EFBIG
    if not self.real:
      root.mkdir(parents=True, exist_ok=True)
    self._ballast = root / "ballast"
    self._limit = None

  def fill(self, leave_bytes: int = 0) -> None:
    """Leaves about `leave_bytes` free (real), or lets no file grow past
    `leave_bytes`."""
    if self.real:
      stat = os.statvfs(self.root)
      size = max(stat.f_bavail * stat.f_frsize - leave_bytes, 0)
      with open(self._ballast, "wb") as f:
        try:
          f.write(b"\0" * size)
          f.flush()
        except OSError as e:
          assert e.errno == errno.ENOSPC
      return
    # SIGXFSZ would kill the process; ignored, the write fails with EFBIG.
    self._limit = (resource.getrlimit(resource.RLIMIT_FSIZE),
                   signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (leave_bytes, self._limit[0][1]))

  def free(self) -> None:
    if self.real:
      self._ballast.unlink(missing_ok=True)
    elif self._limit is not None:
      resource.setrlimit(resource.RLIMIT_FSIZE, self._limit[0])
      signal.signal(signal.SIGXFSZ, self._limit[1])
      self._limit = None

  def close(self) -> None:
    self.free()
    if self.real:
      subprocess.run(["umount", str(self.root)], check=False)


@pytest.fixture
def disk(tmp_path):
  found = Disk(tmp_path / "small")
  yield found
  found.close()


def _tree_digest(directory: pathlib.Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(directory.rglob("*")):
    if path.is_file():
      digest.update(str(path.relative_to(directory)).encode())
      digest.update(path.read_bytes())
  return digest.hexdigest()


def _check_fault(error: fileio.WriteError, path, disk: Disk) -> None:
  assert error.errno == disk.errno and error.exit_code == 2
  message = str(error)
  assert message.startswith(
      f"cannot write {path}: {os.strerror(disk.errno)}")
  assert "rerun the same command" in message and "\n" not in message


def test_a_full_disk_keeps_the_previous_json_file(disk):
  path = disk.root / "summary.json"
  fileio.atomic_write_json(path, {"step": 1})
  disk.fill()
  with pytest.raises(fileio.WriteError) as caught:
    fileio.atomic_write_json(path, {"step": 2, "pad": "x" * 100_000})
  _check_fault(caught.value, path, disk)
  assert json.loads(path.read_text()) == {"step": 1}
  assert sorted(p.name for p in disk.root.iterdir()) == sorted(
      ["summary.json"] + (["ballast"] if disk.real else []))
  disk.free()
  fileio.atomic_write_json(path, {"step": 2})
  assert json.loads(path.read_text()) == {"step": 2}


def test_a_full_disk_leaves_metrics_ending_with_a_whole_line(disk):
  with metrics_lib.MetricsWriter(str(disk.root)) as writer:
    writer.write(1, {"loss": 1.0})
    disk.fill()
    with pytest.raises(fileio.WriteError) as caught:
      writer.write(2, {f"m{i}": float(i) for i in range(20_000)})
    _check_fault(caught.value, disk.root / "metrics.jsonl", disk)
    assert (disk.root / "metrics.jsonl").read_text() == (
        '{"step": 1, "loss": 1.0}\n')
    disk.free()
    writer.write(2, {"loss": 0.5})
  assert [r["step"] for r in metrics_lib.read_metrics(
      str(disk.root / "metrics.jsonl"))] == [1, 2]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_keeps_the_previous_checkpoint_and_frees_the_partial(
    disk, async_save):
  rng = np.random.default_rng(0)
  state = lambda n: {"w": rng.normal(size=(n, 256)).astype(np.float32)}
  directory = disk.root / "checkpoints"
  with checkpointing.Checkpointer(str(directory), ("state",),
                                  async_save=async_save) as ckpt:
    ckpt.save(1, {"state": state(8)}, {"data": {}})
    ckpt.wait()
    before = _tree_digest(directory / "1")
    disk.fill(leave_bytes=64 << 10)
    with pytest.raises(fileio.WriteError) as caught:
      ckpt.save(2, {"state": state(2048)}, {"data": {}})   # 2 MiB
      ckpt.wait()       # where a background save reports its fault
    # A background save's fault names the checkpoints, not its step.
    _check_fault(caught.value, directory if async_save else directory / "2",
                 disk)
    assert ckpt.all_steps() == [1]
    assert _tree_digest(directory / "1") == before
    assert sorted(os.listdir(directory)) == ["1"]   # the partial is gone
    disk.free()
    ckpt.save(2, {"state": state(8)}, {"data": {}})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2]


def test_a_full_disk_while_caching_reference_logprobs_leaves_no_cache(disk):
  cache_dir = disk.root / "ref_cache"
  key = reference.cache_key("data", "tokenizer", "params")
  values = {"ref_logprobs": np.random.default_rng(0).normal(
      size=1 << 20).astype(np.float32)}                       # 4 MiB
  disk.fill(leave_bytes=64 << 10)
  with pytest.raises(fileio.WriteError) as caught:
    reference.load_or_compute(str(cache_dir), key, lambda: values)
  _check_fault(caught.value, cache_dir / key, disk)
  assert not list(cache_dir.iterdir())           # no cache, no staging
  disk.free()
  got = reference.load_or_compute(str(cache_dir), key, lambda: values)
  np.testing.assert_array_equal(got["ref_logprobs"], values["ref_logprobs"])


def test_a_full_disk_while_saving_the_tokenizer(disk):
  from dro_fast.data import prepare  # pylint: disable=g-import-not-at-top
  from dro_fast.data import synthetic  # pylint: disable=g-import-not-at-top
  from dro_fast.data.config import DataConfig  # pylint: disable=g-import-not-at-top
  workdir = disk.root / "run"
  workdir.mkdir()
  synthetic.write_jsonl(workdir / "train.jsonl",
                        synthetic.make_triplets(64, seed=0))
  config = DataConfig(train_data=str(workdir / "train.jsonl"),
                      tokenizer_vocab_size=48)
  dataset = prepare.load_dataset(str(workdir), config, "dro_v", 0)
  disk.fill()
  with pytest.raises(fileio.WriteError) as caught:
    prepare.save_inputs(str(workdir), dataset)
  assert caught.value.filename.startswith(str(workdir / prepare.TOKENIZER))
  _check_fault(caught.value, caught.value.filename, disk)
  assert not (workdir / prepare.TOKENIZER).exists()
  disk.free()
  prepare.save_inputs(str(workdir), dataset)
  prepare.check_tokenizer_digest(str(workdir))


def test_write_faults_are_told_apart_from_other_errors():
  path = "/somewhere/x"
  assert fileio.as_write_error(path, ValueError(_TENSORSTORE_ENOSPC)).errno == (
      errno.ENOSPC)
  assert fileio.as_write_error(path, OSError(errno.EIO, "EIO")).exit_code == 1
  assert fileio.as_write_error(path, OSError(errno.ENOENT, "gone")) is None
  assert fileio.as_write_error(path, ValueError("a shape error")) is None


@pytest.mark.slow
def test_the_trainer_stops_on_a_full_disk_and_resumes_once_freed(
    disk, tmp_path):
  """The trainer's workdir on a tmpfs that fills up under it."""
  from tests import test_kill_resume as runs  # pylint: disable=g-import-not-at-top
  from dro_fast.data import synthetic  # pylint: disable=g-import-not-at-top
  if not disk.real:
    pytest.skip(f"needs a real small file system: {disk.why_not_real}")
  data = tmp_path / "train.jsonl"
  synthetic.write_jsonl(data, synthetic.make_triplets(96, seed=0))
  flags = runs.trainer_flags(str(data), 8)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))
  straight = tmp_path / "straight"
  runs.Trainer(straight, flags, env).finish()

  workdir = disk.root / f"run-{uuid.uuid4().hex[:6]}"
  # Synchronous saves (the CPU's default; background saves' faults are
  # tested above); the log off the tmpfs.
  trainer = runs.Trainer(workdir, flags, env, log_dir=tmp_path)
  trainer.wait_for(lambda: 3 in runs.logged_steps(workdir)
                   and 2 in runs.committed_steps(workdir),
                   "step 3 and the checkpoint of step 2")
  before = _tree_digest(workdir / "checkpoints" / "2")
  disk.fill()
  returncode = trainer.process.wait(timeout=300)
  output = trainer.output()
  assert returncode == 2, output[-3000:]
  error_lines = [l for l in output.splitlines() if l.startswith("error: ")]
  # One error line. Orbax's and TensorStore's threads may print tracebacks
  # of their own (docs/LONG_RUNS.md); none has a frame of ours.
  assert len(error_lines) == 1, output[-3000:]
  assert "/dro_fast/" not in output
  assert f"cannot write {workdir / 'checkpoints'}" in error_lines[0]
  assert "No space left on device" in error_lines[0]
  assert _tree_digest(workdir / "checkpoints" / "2") == before
  assert not (workdir / "summary.json").exists()

  disk.free()
  output = runs.Trainer(workdir, flags, env, log_dir=tmp_path).finish()
  assert "Resumed from step" in output
  assert (runs.summary(workdir)["policy_params_sha256"]
          == runs.summary(straight)["policy_params_sha256"])
  assert (runs.metrics_without_timing(workdir)
          == runs.metrics_without_timing(straight))
