"""Deviceless TPU compilation of the trainer's update (benchmarks/lib/tpu.py,
the code path of benchmarks/tpu_compile.py).

libtpu (the `tpu` extra, which `make` installs) compiles for a v5e slice
that this host does not have, with XLA:TPU and Mosaic. Without libtpu the
test fails and says how to install it: it does not skip.
"""

from __future__ import annotations

import pytest

from benchmarks.lib import tpu


def test_tiny_dro_v_update_compiles_for_v5e_with_mosaic_kernels_on_a_mesh():
  tpu.require_libtpu()
  record = tpu.compile_update(
      "tiny", "v5e:2x2", batch_size=8, input_length=24, target_length=16,
      remat="dots", fsdp=2, scan_layers=False)
  assert record["chips"] == 4 and record["chip"] == "TPU v5 lite"
  assert record["mesh"] == "data:2,fsdp:2"
  assert record["fits"] and 0 < record["total_gib"] < record["hbm_gib"] == 16
  # The log-prob kernels went through Mosaic (a TPU custom call each), and
  # fsdp's gathers are in the program.
  assert "tpu_custom_call" in record["custom_calls"]
  assert "AsyncCollectiveStart" in record["custom_calls"]
  # "xla" attention materialises [B, H, S, S] scores (flash would not).
  assert record["encoder_score_arrays"] > 0
  assert record["compiled_flops_per_chip"] > 0
  # The roofline: the slower of compute at v5e's peak and memory traffic at
  # its HBM bandwidth.
  compute = max(record["compiled_flops_per_chip"],
                record["model_flops_per_chip"]) / 197e12
  memory = record["compiled_bytes_per_chip"] / 819e9
  assert record["roofline_seconds"] == pytest.approx(max(compute, memory))
  assert record["roofline_steps_per_s_upper_bound"] == pytest.approx(
      1 / record["roofline_seconds"])


def test_largest_batch_doubles_then_bisects_on_multiples_of_the_chips(
    monkeypatch):
  monkeypatch.setattr(tpu, "devices", lambda topology: (None,) * 4)
  tried = []

  def compile_update(size, topology, *, batch_size, **variant):
    del size, topology, variant
    tried.append(batch_size)
    return {"batch_size": batch_size, "fits": batch_size <= 44}

  monkeypatch.setattr(tpu, "compile_update", compile_update)
  best, records = tpu.largest_batch("large", "v5e:4x4", 8, remat="dots")
  assert best == 44
  assert tried == [8, 16, 32, 64, 48, 40, 44]
  assert all(b % 4 == 0 for b in tried) and len(records) == len(tried)
  assert tpu.largest_batch("large", "v5e:4x4", 8)[0] == 44
  monkeypatch.setattr(tpu, "compile_update", lambda *a, **k: {"fits": False})
  assert tpu.largest_batch("large", "v5e:4x4", 8)[0] is None


def test_a_memory_rejection_is_a_record_not_a_traceback():
  error = RuntimeError(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of "
      "memory in memory space hbm. Used 17.5G of 15.75G hbm. Exceeded hbm "
      "capacity by 1.8G.\n\nTotal hbm usage >= 18.2G: ...")
  assert tpu._memory_error_line(error).startswith(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of")
  assert tpu._memory_error_line(ValueError("a shape error")) is None

