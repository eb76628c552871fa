"""Deviceless TPU compilation of the trainer's update (benchmarks/lib/tpu.py,
the code path of benchmarks/tpu_compile.py).

libtpu (the `tpu` extra, which `make` installs) compiles for a v5e slice
that this host does not have, with XLA:TPU and Mosaic. Without libtpu the
test fails and says how to install it: it does not skip.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks.lib import tpu

_REPO = pathlib.Path(__file__).resolve().parents[2]


def _own_process(test):
  """Runs `test` in a fresh interpreter when another benchmark CLI has
  defined its absl flags in this one (they are process-wide, and
  benchmarks.tpu_compile and benchmarks.step_time both define --remat)."""
  @functools.wraps(test)
  def wrapper(*args, **kwargs):
    if ("benchmarks.step_time" not in sys.modules
        or os.environ.get("DRO_FAST_OWN_PROCESS")):
      return test(*args, **kwargs)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::{test.__name__}"], cwd=_REPO, capture_output=True,
        text=True, env=dict(os.environ, DRO_FAST_OWN_PROCESS="1"),
        timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
  return wrapper


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


def test_tiny_update_compiles_for_v5e_with_a_model_axis():
  tpu.require_libtpu()
  # 4 chips, 2 on model: the batch of 4 over data x fsdp = 2.
  record = tpu.compile_update(
      "tiny", "v5e:2x2", batch_size=4, input_length=24, target_length=16,
      remat="dots", fsdp=1, model=2, scan_layers=False)
  assert record["mesh"] == "data:2,fsdp:1,model:2" and record["model"] == 2
  assert record["fits"] and 0 < record["total_gib"] < record["hbm_gib"]
  # The vocabulary-parallel log-probs' Mosaic kernel, per shard.
  assert "tpu_custom_call" in record["custom_calls"]
  # "xla" attention's scores, found with the heads split over model.
  assert record["encoder_score_arrays"] > 0


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
  # With 2 of the 4 chips on model, batches are multiples of data x fsdp = 2.
  tried.clear()
  assert tpu.largest_batch("large", "v5e:4x4", 6, model=2)[0] == 44
  assert tried == [6, 12, 24, 48, 36, 42, 44, 46]
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



def test_mesh_sizes_put_the_batch_over_the_chips_off_the_model_axis():
  # A model axis of 1 is left out: the data x fsdp mesh of before.
  assert tpu.mesh_sizes(64, 32) == {"data": 2, "fsdp": 32}
  assert tpu.mesh_sizes(64, 32, 2) == {"data": 1, "fsdp": 32, "model": 2}
  assert tpu.mesh_sizes(64, 4, 4) == {"data": 4, "fsdp": 4, "model": 4}
  for fsdp, model in ((32, 4), (3, 1), (1, 0), (0, 2)):
    with pytest.raises(ValueError, match=f"--fsdp={fsdp} x --model={model} "
                       "does not divide 64 chips"):
      tpu.mesh_sizes(64, fsdp, model)


@_own_process
def test_variants_cross_fsdp_with_the_model_axis(monkeypatch):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from benchmarks import tpu_compile  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  common = dict(remat=["full"], attention=["xla"], implementation=["default"],
                value_net=["separate"])
  with flagsaver.flagsaver(fsdp=["1", "all"], **common):
    # The default, no model axis: every variant as before.
    assert [(v["fsdp"], v["model"]) for v in
            tpu_compile.variants("xxl", 64)] == [(1, 1), (64, 1)]
  with flagsaver.flagsaver(fsdp=["32", "all"], model=["1", "2"], **common):
    # "all": every chip off the model axis.
    assert [(v["fsdp"], v["model"]) for v in
            tpu_compile.variants("xxl", 64)] == [(32, 1), (64, 1), (32, 2)]
  with flagsaver.flagsaver(fsdp=["32"], model=["4"], **common):
    with pytest.raises(app.UsageError, match="--fsdp=32 x --model=4"):
      tpu_compile.variants("xxl", 64)


def test_runs_name_a_policy_and_optionally_a_decoder_value_network():
  assert tpu.parse_run("large@v5e:4x4") == ("large", None, "v5e:4x4")
  assert tpu.parse_run("llama-3.1-8b+llama-3.2-1b@v5e:4x4") == (
      "llama-3.1-8b", "llama-3.2-1b", "v5e:4x4")
  for bad in ("large", "huge@v5e:4x4", "large+tiny_decoder@v5e:2x2",
              "tiny_decoder+large@v5e:2x2", "tiny_decoder@"):
    with pytest.raises(ValueError, match="--runs"):
      tpu.parse_run(bad)


def test_logits_per_chip_are_the_float32_logits_and_gradient_of_a_share():
  # Llama 3's vocabulary, batch 32 over 16 chips, 512 completion tokens.
  assert tpu.logits_bytes_per_chip(32, 512, 128256, 16) == (
      2 * 2 * 512 * 128256 * 4)


@_own_process
def test_savings_pair_the_fused_and_the_materialised_compile():
  from benchmarks import tpu_compile  # pylint: disable=g-import-not-at-top
  same = {"size": "llama-3.1-8b", "value_size": "llama-3.2-1b",
          "topology": "v5e:4x4", "batch_size": 32, "input_length": 1024,
          "target_length": 512, "remat": "full", "mesh": "data:1,fsdp:16",
          "attention": "xla", "value_net": "separate", "scan_layers": True,
          "logits_and_grad_gib_per_chip": 0.98}
  fused = dict(same, implementation="pallas_tpu", total_gib=9.0,
               temp_gib=5.0)
  xla = dict(same, implementation="xla", total_gib=11.5, temp_gib=7.5)
  other_batch = dict(xla, batch_size=64)
  lines = tpu_compile.savings([fused, xla, other_batch])
  assert len(lines) == 1
  assert "pallas_tpu saves 2.50 GiB/chip" in lines[0]
  assert "0.98 GiB/chip" in lines[0]


@pytest.mark.slow
def test_tiny_decoder_dro_v_with_its_own_value_network_compiles_for_v5e():
  tpu.require_libtpu()
  record = tpu.compile_update(
      "tiny_decoder", "v5e:2x2", batch_size=8, input_length=24,
      target_length=16, remat="full", fsdp=4, value_size="tiny_decoder")
  assert record["mesh"] == "data:1,fsdp:4"
  assert record["value_size"] == "tiny_decoder"
  # What backend.resolve picks for TPU: the fused Pallas log-probs, through
  # Mosaic.
  assert record["implementation"] == "pallas_tpu"
  assert "tpu_custom_call" in record["custom_calls"]
  assert record["fits"] and 0 < record["total_gib"] < record["hbm_gib"]
  # "xla" attention over the whole prompt + completion sequence.
  assert record["encoder_score_arrays"] > 0
  assert record["logits_and_grad_gib_per_chip"] == pytest.approx(
      2 * 2 * 16 * 256 * 4 / tpu.GIB)


def test_a_lora_update_compiles_for_v5e_and_holds_less_state():
  """LoRA on a tiny decoder over a model axis: the frozen bfloat16 base and
  the adapters' optimizer states are smaller arguments than the whole
  model's float32 parameters and states."""
  tpu.require_libtpu()
  common = dict(batch_size=4, input_length=24, target_length=16,
                remat="full", fsdp=1, model=2, value_net="shared")
  full = tpu.compile_update("tiny_decoder", "v5e:2x2", **common)
  adapted = tpu.compile_update("tiny_decoder", "v5e:2x2", lora_rank=4,
                               **common)
  assert adapted["lora_rank"] == 4 and full["lora_rank"] == 0
  assert adapted["fits"] and "tpu_custom_call" in adapted["custom_calls"]
  assert adapted["argument_gib"] < 0.6 * full["argument_gib"]
  assert adapted["model_flops_per_chip"] < full["model_flops_per_chip"]

