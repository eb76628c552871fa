"""benchmarks.cpu_forms at a tiny shape, in a process of its own.

Its flag defaults are the measurement's own.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_times_every_form_against_its_removal(tmp_path):
  out = tmp_path / "forms.jsonl"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.cpu_forms", "--size=tiny",
       "--batch_size=2", "--input_length=8", "--target_length=4",
       "--repeats=2", f"--json_out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  records = {r["variant"]: r for r in map(json.loads,
                                          out.read_text().splitlines())}
  assert list(records) == ["all", "no_dense_vjp", "no_adafactor_gemv"]
  assert (records["all"]["platform"], records["all"]["reduce_with_dots"]) == (
      "cpu", True)
  assert records["no_dense_vjp"]["platform"] == "gpu"
  assert records["no_adafactor_gemv"]["reduce_with_dots"] is False
  assert records["all"]["paired_speedup_of_form"] == 1.0
  for r in records.values():
    assert len(r["round_step_s"]) == 2 and r["speedup_of_form"] > 0, r
    assert (r["batch_size"], r["input_length"], r["dtype"],
            r["scan_layers"]) == (2, 8, "float32", False)
  # A form changes how the step computes, not what: after as many steps
  # from the same parameters and batches, the losses agree.
  losses = [r["loss"] for r in records.values()]
  np.testing.assert_allclose(losses, losses[0], rtol=1e-4)
  assert "no_dense_vjp" in result.stdout and "paired" in result.stdout


def test_refuses_an_unknown_form():
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.cpu_forms", "--forms=gelu_vjp"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  assert "--forms: unknown ['gelu_vjp']" in result.stderr
