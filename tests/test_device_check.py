"""benchmarks/device_check.sh, the one prepared GPU run, on the CPU.

A device call is scarce (minutes per task, and not every task gets one), so
the script's own plumbing is checked here rather than discovered on the
GPU: its dry run (DRY_RUN=1: every default command line parsed by its
script, the profile's trace and summary on a small function, at most 8
files back, the memory cap in the records), a tiny real run (slow), the
wheel command, and the guard that keeps SITE off the checkout.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks/device_check.sh"
H200_MIB = 143771


def _run(tmp_path, timeout=300, args=(), **env):
  """Runs the script with a fake nvidia-smi that reports an H200."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  fake = bin_dir / "nvidia-smi"
  fake.write_text(f"#!/bin/sh\necho {H200_MIB}\n")
  fake.chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "OUT": str(tmp_path / "out"), "SITE": str(tmp_path / "site"),
         "PY": sys.executable, "JAX_PLATFORMS": "cpu", "BUDGET_S": "300",
         **env}
  result = subprocess.run(["bash", str(SCRIPT), *args], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  return result


def _records(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_dry_run_parses_every_default_command(tmp_path):
  _run(tmp_path, DRY_RUN="1")
  out = tmp_path / "out"
  files = sorted(p.name for p in out.iterdir())
  assert files == ["device_check.log", "kernels.jsonl", "numerics.jsonl",
                   "optimizer_time.jsonl", "profile.jsonl",
                   "profile.xplane.pb", "step_time.jsonl"]
  assert len(files) <= 8         # what a device call brings back
  log = (out / "device_check.log").read_text()
  assert "Traceback" not in log and "skipped" not in log, log[-3000:]
  assert log.rstrip().endswith("done")
  for script in ("gpu_numerics", "optimizer_time", "kernel_time"):
    assert f"flags parse: benchmarks.{script}" in log
  assert "tests collected" in log

  # The default STEP_RUNS, one record each, at the H100's memory: 77,481
  # MiB of the (fake) H200's 143,771.
  steps = _records(out / "step_time.jsonl")
  assert [r["args"][:3] for r in steps] == [
      ["--size=large", "--remat=dots", "--attention=xla,cudnn"],
      ["--size=xl", "--remat=dots_except_mlp_hidden", "--attention=cudnn"],
      ["--size=xl", "--remat=dots_except_mlp_hidden", "--attention=xla"],
      ["--size=large", "--remat=none", "--attention=cudnn"]]
  cap = {"memory_fraction": 0.539, "memory_cap_mib": 77481,
         "device_memory_mib": H200_MIB}
  for record in steps:
    assert record["dry_run"] and record.items() >= cap.items(), record
    assert record["script"] == "benchmarks.step_time", record

  [profile] = _records(out / "profile.jsonl")
  assert profile.items() >= cap.items()
  assert (profile["size"], profile["remat"], profile["attention"],
          profile["batch_size"], profile["dtype"]) == (
              "large", "dots", "cudnn", 32, "bfloat16")
  assert profile["dry_run"] and len(profile["step_s"]) == 2
  assert profile["top_ops"] and profile["by_category"]
  assert profile["trace_file"] == "profile.xplane.pb"
  assert (out / "profile.xplane.pb").stat().st_size == profile["trace_bytes"]


def test_dry_run_reports_a_bad_command_line(tmp_path):
  _run(tmp_path, DRY_RUN="1", CHECKS="steps kernels",
       STEP_RUNS="large:bogus:xla", BENCH_FLAGS="--bogus=1")
  log = (tmp_path / "out/device_check.log").read_text()
  assert "--remat: unknown ['bogus']" in log       # the script's check_flags
  assert "Unknown command line flag 'bogus'" in log  # absl's parse
  assert not (tmp_path / "out/step_time.jsonl").exists()
  assert not (tmp_path / "out/kernels.jsonl").exists()


def test_wheels_command_lists_the_missing_pins(tmp_path):
  result = _run(tmp_path, args=["--wheels"], DRY_RUN="1")
  constraints = (REPO / "requirements/constraints.txt").read_text().split()
  pins = [p for p in constraints
          if p.split("==")[0].lower() in ("dm-haiku", "jmp", "tensorboardx")]
  assert len(pins) == 3
  command = result.stdout.strip().splitlines()[-1].split()
  assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
  assert command[-3:] == pins and "-d" in command
  assert not (tmp_path / "out").exists()     # nothing else ran


@pytest.mark.slow
def test_tiny_run_lands_as_records(tmp_path):
  _run(tmp_path, timeout=600, CHECKS="profile steps",
       STEP_RUNS="tiny:full",          # attention left to its default
       STEP_FLAGS=("--batch_size=2 --input_length=8 --target_length=4 "
                   "--steps=1 --repeats=1 --dtype=float32"),
       PROFILE_FLAGS=("--size=tiny --remat=dots --attention=xla "
                      "--batch_size=2 --input_length=8 --target_length=4 "
                      "--dtype=float32 --warmup=1 --steps=1"))
  out = tmp_path / "out"
  records = _records(out / "step_time.jsonl")
  [record] = records
  assert (record["size"], record["remat"], record["attention"]) == (
      "tiny", "full", "xla")
  assert record["steps_per_s"] > 0 and record["memory_fraction"] == 0.539
  [profile] = _records(out / "profile.jsonl")
  assert not profile["dry_run"] and profile["size"] == "tiny"
  assert profile["device_ms_per_step"] > 0 and profile["top_ops"]
  assert any(op["scope"] for op in profile["top_ops"])   # joined with HLO
  log = (out / "device_check.log").read_text()
  assert "step_time tiny remat=full attention=xla" in log
  assert "skipped" not in log and "Traceback" not in log
  assert log.rstrip().endswith("done")


@pytest.mark.parametrize("site", [".", "..", "inside"])
def test_refuses_a_site_that_would_remove_the_checkout(tmp_path, site):
  # A copy of the script in a stand-in checkout, so that a failure of the
  # guard removes nothing of ours.
  checkout = tmp_path / "repo"
  (checkout / "benchmarks").mkdir(parents=True)
  script = checkout / "benchmarks/device_check.sh"
  script.write_text(SCRIPT.read_text())
  keep = checkout / "keep.txt"
  keep.write_text("x")
  env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable,
         "JAX_PLATFORMS": "cpu",
         "SITE": str(checkout / site if site != "inside"
                     else checkout / "benchmarks/site")}
  result = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "refusing SITE=" in result.stdout
  assert keep.read_text() == "x"
