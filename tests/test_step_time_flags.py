"""benchmarks/step_time.py refuses flag values it cannot run, before any
JAX or PyTorch work (absl usage error: exit 1, the flag named)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value", ["same,bogus", "keep,keep", ""])
def test_torch_host_memory_takes_same_keep_system_once_each(value):
  result = subprocess.run(
      [sys.executable, "benchmarks/step_time.py", "--compare_torch",
       f"--torch_host_memory={value}"], cwd=REPO, capture_output=True,
      text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  assert ("--torch_host_memory: got" in result.stderr
          and "give each of same, keep, system at most once"
          in result.stderr), result.stderr[-3000:]


@pytest.mark.parametrize("value, message", [
    ("flash", "--attention: unknown ['flash']"),
    ("xla,cudnn", "--attention=cudnn runs cuDNN's fused attention: it needs "
                  "a CUDA GPU (JAX's backend here is 'cpu'; without one, "
                  "--memory_only --accelerator_paths plans its memory)"),
])
def test_attention_takes_known_implementations_it_can_run(value, message):
  result = subprocess.run(
      [sys.executable, "benchmarks/step_time.py", f"--attention={value}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  assert message in result.stderr, result.stderr[-3000:]


def test_accelerator_paths_needs_memory_only():
  result = subprocess.run(
      [sys.executable, "benchmarks/step_time.py", "--accelerator_paths"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  assert "--accelerator_paths plans the memory of an accelerator's program: " \
      "pass --memory_only too." in result.stderr, result.stderr[-3000:]


def test_cudnn_plans_refuse_odd_lengths():
  result = subprocess.run(
      [sys.executable, "benchmarks/step_time.py", "--attention=cudnn",
       "--memory_only", "--accelerator_paths", "--dtype=bfloat16",
       "--input_length=9", "--target_length=4,7"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1, result.stderr[-3000:]
  assert ("refuses odd lengths in its backward pass; got --input_length=9, "
          "--target_length=7.") in result.stderr, result.stderr[-3000:]
