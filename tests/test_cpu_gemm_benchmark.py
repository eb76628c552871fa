"""benchmarks.cpu_gemm on a tiny GEMM (its own process: its flags)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(*args):
  return subprocess.run(
      [sys.executable, "-m", "benchmarks.cpu_gemm", *args], cwd=REPO,
      capture_output=True, text=True, timeout=600, check=False, env=ENV)


def test_rates_every_form_and_their_fraction_of_a_given_peak():
  result = _run("--shapes=128x64x96", "--repeats=2", "--rounds=2",
                "--peak_gflops=100")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert "128x64x96" in lines
  rows = {}
  for line in lines:
    found = re.match(r"\s+(\S+(?: \S+)?)\s+([\d.]+)\s+([\d.]+)% of peak", line)
    if found:
      rows[found[1]] = (float(found[2]), float(found[3]))
  assert set(rows) == {"f32", "bf16->f32", "bf16->bf16", "bf16 NT",
                       "bf16 b.T", "torch f32", "torch bf16", "numpy f32"}
  for rate, percent in rows.values():
    assert rate > 0
    assert abs(percent - rate) <= 0.1 + 1e-3 * rate   # peak 100 GFLOP/s


def test_a_bad_shape_is_refused():
  result = _run("--shapes=16x8")
  assert result.returncode != 0
  assert "--shapes: '16x8' is not MxKxN" in result.stderr
