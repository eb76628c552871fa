"""Checks an installed wheel: `python check_wheel.py SITE_DIR WHEEL_DIR`.

Run from outside the repository with SITE_DIR on PYTHONPATH (make
check-install): dro_fast.kernels must import from the wheel's files, and the
wheel must hold no top-level `kernels` package. The packaged flagfiles
resolve by bare name from here (`--flagfile=xl.flags` names the XL size's),
and the console scripts run.
"""

import glob
import os
import subprocess
import sys
import zipfile


def _run(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run(argv, capture_output=True, text=True, timeout=300,
                        check=False)


def main(site_dir: str, wheel_dir: str) -> None:
  (wheel,) = glob.glob(os.path.join(wheel_dir, "dro_fast-*.whl"))
  tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
  assert "kernels" not in tops, f"{wheel} installs a top-level kernels: {tops}"

  import dro_fast.kernels  # pylint: disable=g-import-not-at-top
  import dro_fast.losses  # pylint: disable=g-import-not-at-top,unused-import
  location = os.path.realpath(dro_fast.kernels.__file__)
  assert location.startswith(os.path.realpath(site_dir)), (
      f"dro_fast.kernels came from {location}, not the wheel in {site_dir}")
  assert {"xla", "chunked_xla", "pallas_tpu", "pallas_gpu"} <= set(
      dro_fast.kernels.IMPLEMENTATIONS)
  from dro_fast.kernels.flash_attention import ops as flash_ops  # pylint: disable=g-import-not-at-top
  assert set(flash_ops.IMPLEMENTATIONS) == {"xla", "pallas_tpu"}, (
      "the wheel's flash_attention op folder is incomplete")

  assert not os.path.exists("xl.flags")          # resolved from the package
  done = _run(sys.executable, "-m", "dro_fast.train", "--flagfile=xl.flags",
              "--helpfull")
  # absl ends --helpfull with exit code 1 (app.HelpfullFlag).
  assert done.returncode == 1 and "--init_checkpoint" in done.stdout, (
      done.returncode, done.stderr[-2000:])
  # xl.flags is read (--model=flan-t5-xl): without a checkpoint it refuses.
  done = _run(os.path.join(site_dir, "bin", "dro-fast-train"),
              "--flagfile=xl.flags")
  assert done.returncode == 2 and "--model=flan-t5-xl is meant to start " \
      "from its SFT checkpoint" in done.stderr, done.stderr[-2000:]
  done = _run(sys.executable, "-m", "dro_fast.train", "--flagfile=nope.flags")
  assert done.returncode == 2 and done.stderr.count("\n") == 1 and (
      "packaged: base.flags" in done.stderr), done.stderr
  done = _run(os.path.join(site_dir, "bin", "dro-fast-evaluate"),
              "--helpfull")
  assert done.returncode == 1 and "--judge" in done.stdout, (
      done.returncode, done.stderr[-2000:])
  # A decoder-only LLM's flagfile: its shape needs its checkpoint too.
  done = _run(os.path.join(site_dir, "bin", "dro-fast-train"),
              "--flagfile=qwen3-8b.flags")
  assert done.returncode == 2 and "--model=qwen3-8b is meant to start " \
      "from its SFT checkpoint" in done.stderr, done.stderr[-2000:]
  done = _run(os.path.join(site_dir, "bin", "dro-fast-export"), "--helpfull")
  assert done.returncode == 1 and "--max_shard_bytes" in done.stdout, (
      done.returncode, done.stderr[-2000:])
  print(f"wheel OK: {os.path.basename(wheel)} -> {location}; flagfiles and "
        "console scripts work")


if __name__ == "__main__":
  main(*sys.argv[1:])
