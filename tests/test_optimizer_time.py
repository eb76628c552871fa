"""benchmarks.optimizer_time on the tiny preset, in processes of its own.

Its flags would clash with step_time's in this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _run(args, code=None):
  command = ([sys.executable, "-c", code, *args] if code else
             [sys.executable, "-m", "benchmarks.optimizer_time", *args])
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=600, check=False, env=ENV)


def test_cli_times_every_variant_and_checks_it_against_optax(tmp_path):
  out = tmp_path / "opt.jsonl"
  result = _run(["--size=tiny", "--repeats=2", f"--json_out={out}"])
  assert result.returncode == 0, result.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["variant"] for r in records] == ["optax", "fused",
                                             "fused_reductions"]
  for r in records:
    assert r["max_rel_diff"] < 1e-5 and len(r["seconds"]) == 2
    assert r["parameters"] > 0 and r["ms_per_update"] > 0
  assert records[0]["paired_vs_optax"] == 1.0
  assert "ms/update" in result.stdout


def test_cli_refuses_variants_without_the_optax_baseline():
  result = _run(["--size=tiny", "--variants=fused"])
  assert result.returncode == 1
  assert "--variants must start with optax" in result.stderr
  result = _run(["--size=tiny", "--variants=optax,adam"])
  assert result.returncode == 1
  assert "unknown 'adam'" in result.stderr


def test_an_update_that_differs_from_optax_fails_the_run():
  # "fused" replaced by an update twice too large: the check must catch it.
  code = """
import sys
import jax
import optax
from absl import app
from benchmarks import optimizer_time as bench
made = bench.make_variant
def wrong(name):
  t = made(name)
  if name != "fused":
    return t
  def update(grads, state, params=None):
    updates, state = t.update(grads, state, params)
    return jax.tree.map(lambda u: 2 * u, updates), state
  return optax.GradientTransformation(t.init, update)
bench.make_variant = wrong
sys.argv = ["optimizer_time", *sys.argv[1:]]
app.run(bench.main)
"""
  result = _run(["--size=tiny", "--repeats=1", "--variants=optax,fused"],
                code=code)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "differs from optax's" in result.stderr
