"""Sharding: mesh parsing, and 8 simulated CPU devices matching one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dro_fast.training import sharding

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


@pytest.mark.slow
def test_eight_devices_match_one_within_1e5():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "training",
                                    "sharded_steps.py")],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(out["single"]) == 5
  np.testing.assert_allclose(out["sharded"], out["single"], rtol=1e-5,
                             atol=1e-5)
  assert "fsdp" in out["spec"]            # parameters really are split


@pytest.mark.parametrize("spec, devices, expected", [
    ("data:4,fsdp:2", 8, {"data": 4, "fsdp": 2, "model": 1}),
    ("fsdp:8", 8, {"data": 1, "fsdp": 8, "model": 1}),
    ("", 2, {"data": 2, "fsdp": 1, "model": 1}),
])
def test_parse_mesh(spec, devices, expected):
  assert sharding.parse_mesh(spec, devices) == expected


@pytest.mark.parametrize("spec, message", [
    ("data:4,fsdp:3", "has 12 devices but 8"),
    ("tensor:8", "is not AXIS:SIZE"),
    ("data:x", "is not AXIS:SIZE"),
    ("data:4,data:2", "twice"),
])
def test_parse_mesh_errors(spec, message):
  with pytest.raises(ValueError, match=message):
    sharding.parse_mesh(spec, 8)


def test_global_batch_and_to_host_in_one_process():
  mesh = sharding.make_mesh(sharding.parse_mesh(""))
  batch = {"inputs": np.arange(12, dtype=np.int32).reshape(4, 3),
           "target_mask": np.array([True, False, True, True])}
  placed = sharding.global_batch(batch, sharding.batch_sharding(mesh))
  assert placed["inputs"].sharding == sharding.batch_sharding(mesh)
  host = sharding.to_host(placed)
  for name, array in batch.items():
    np.testing.assert_array_equal(host[name], array)
    assert host[name].dtype == array.dtype
  sharding.check_same_on_every_process("anything", "data")   # one process
  with sharding.primary_first("unused"):                      # no barrier
    pass
