"""benchmarks/device_check.sh, the one prepared GPU run, dry-run on the CPU.

A device call is scarce (minutes per task, and not every task gets one), so
the script's own plumbing (STEP_RUNS parsing, the installed layout, where
figures land) is checked here with a tiny model rather than discovered on
the GPU.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_runs_land_as_records(tmp_path):
  out = tmp_path / "out"
  env = {
      **os.environ,
      "OUT": str(out), "SITE": str(tmp_path / "site"), "PY": sys.executable,
      "CHECKS": "steps",
      # Two items: the first names two remat policies and an attention, the
      # second leaves the attention to its default.
      "STEP_RUNS": "tiny:none,dots_except_mlp_hidden:xla tiny:full",
      "STEP_FLAGS": ("--batch_size=2 --input_length=8 --target_length=4 "
                     "--steps=1 --repeats=1 --dtype=float32"),
      "BUDGET_S": "300",
  }
  result = subprocess.run(["bash", str(REPO / "benchmarks/device_check.sh")],
                          env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  records = [json.loads(line) for line in
             (out / "step_time.jsonl").read_text().splitlines()]
  assert sorted((r["remat"], r["attention"]) for r in records) == [
      ("dots_except_mlp_hidden", "xla"), ("full", "xla"), ("none", "xla")]
  for record in records:
    assert record["size"] == "tiny" and record["batch_size"] == 2
    assert record["steps_per_s"] > 0, record
  log = (out / "device_check.log").read_text()
  assert "step_time tiny remat=full attention=xla" in log
  assert "skipped" not in log
  assert log.rstrip().endswith("done")


@pytest.mark.parametrize("site", [".", "..", "inside"])
def test_refuses_a_site_that_would_remove_the_checkout(tmp_path, site):
  # A copy of the script in a stand-in checkout, so that a failure of the
  # guard removes nothing of ours.
  checkout = tmp_path / "repo"
  (checkout / "benchmarks").mkdir(parents=True)
  script = checkout / "benchmarks/device_check.sh"
  script.write_text((REPO / "benchmarks/device_check.sh").read_text())
  keep = checkout / "keep.txt"
  keep.write_text("x")
  env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable,
         "SITE": str(checkout / site if site != "inside"
                     else checkout / "benchmarks/site")}
  result = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  assert "refusing SITE=" in result.stdout
  assert keep.read_text() == "x"
