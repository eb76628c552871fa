"""benchmarks/step_time.py measures the variants that fit when one does not."""

from __future__ import annotations

import sys

from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
import pytest

from benchmarks import step_time

FLAGS = flags.FLAGS


@pytest.fixture(name="tiny_flags")
def _tiny_flags():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(size=["tiny"], batch_size=["2"], input_length=8,
                           target_length=["4"], steps=1, repeats=1,
                           dtype="float32", remat=["none"],
                           attention=["xla"], scan_layers=False, compare_torch=False,
                           memory_only=False):
    yield


def test_a_variant_out_of_memory_is_recorded_and_the_others_are_timed(
    tiny_flags, monkeypatch):
  del tiny_flags
  real_step = step_time.JaxStep

  class OutOfMemoryOnChunked(real_step):
    """chunked_xla fails at its first step as an 80 GB GPU would."""

    def __call__(self):
      if self.implementation == "chunked_xla":
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
            "56.21GiB with allocator GPU_0_bfc on device 0.\nmore detail")
      super().__call__()

  def build(config, implementation, batches, abstract):
    step = OutOfMemoryOnChunked(config, implementation, batches, abstract)
    step.implementation = implementation
    return step

  monkeypatch.setattr(step_time, "JaxStep", build)
  records = step_time.measure_point("tiny", 2, 4, ["xla", "chunked_xla"],
                                    "system")
  by_variant = {r["variant"]: r for r in records}
  assert set(by_variant) == {"xla", "chunked_xla"}
  failed = by_variant["chunked_xla"]
  assert failed["error"] == (
      "out of memory: RESOURCE_EXHAUSTED: Out of memory while trying to "
      "allocate 56.21GiB with allocator GPU_0_bfc on device 0.")
  assert "median_step_s" not in failed
  timed = by_variant["xla"]
  assert "error" not in timed and timed["median_step_s"] > 0
  assert len(timed["round_step_s"]) == 1


def test_errors_other_than_out_of_memory_propagate(tiny_flags, monkeypatch):
  del tiny_flags

  def build(config, implementation, batches, abstract):
    del config, implementation, batches, abstract
    raise jax.errors.JaxRuntimeError("INTERNAL: a real bug")

  monkeypatch.setattr(step_time, "JaxStep", build)
  with pytest.raises(jax.errors.JaxRuntimeError, match="a real bug"):
    step_time.measure_point("tiny", 2, 4, ["xla"], "system")


def test_memory_only_plans_from_shapes_the_same_as_from_arrays(tiny_flags):
  del tiny_flags
  config = step_time.config_for("tiny", "none")
  batches = [step_time.random_batch(config, 2, 8, 4,
                                    np.random.default_rng(0))]
  concrete = step_time.JaxStep(config, "xla", batches)
  abstract = step_time.JaxStep(config, "xla", batches, abstract=True)
  assert abstract.memory == concrete.memory
  assert abstract.memory["peak_bytes"] > 0
  with pytest.raises(RuntimeError, match="abstract"):
    abstract()


def test_main_writes_every_record_then_exits_naming_what_could_not_run(
    tiny_flags, monkeypatch, tmp_path):
  del tiny_flags
  out = tmp_path / "records.jsonl"
  failed = {"size": "tiny", "batch_size": 2, "target_length": 4,
            "variant": "chunked_xla", "error": "out of memory: RESOURCE_EX"}
  monkeypatch.setattr(step_time, "measure_point",
                      lambda *args: [dict(failed)])
  monkeypatch.setattr(step_time, "print_point", lambda point: None)
  with flagsaver.flagsaver(json_out=str(out), host_memory="system"):
    with pytest.raises(SystemExit) as exit_info:
      step_time.main(["step_time.py"])
  assert str(exit_info.value) == (
      "1 variant(s) could not run: tiny B=2 T=4 chunked_xla: out of memory: "
      "RESOURCE_EX")
  assert out.read_text().count('"error"') == 1


def test_attention_variants_are_named_and_recorded(tiny_flags, monkeypatch):
  del tiny_flags
  # cuDNN's call through jax's XLA implementation: no GPU here.
  monkeypatch.setattr(sys.modules["dro_fast.models.t5"], "_FUSED_ATTENTION",
                      {"cudnn": "xla"})
  with flagsaver.flagsaver(attention=["xla", "cudnn"], dtype="bfloat16",
                           memory_only=True):
    records = step_time.measure_point("tiny", 2, 4, ["xla"], "system")
  assert {(r["variant"], r["attention"]) for r in records} == {
      ("xla/xla", "xla"), ("xla/cudnn", "cudnn")}
  assert all(r["planned_peak_bytes"] > 0 for r in records)


def test_cudnn_memory_is_planned_with_the_stand_in_without_a_gpu(tiny_flags):
  del tiny_flags
  # No remat: the "xla" variant keeps every layer's [B, H, S, S] softmax for
  # the backward, the stand-in (as cuDNN) only outputs and log-sum-exps.
  with flagsaver.flagsaver(attention=["xla", "cudnn"], dtype="bfloat16",
                           input_length=128, memory_only=True,
                           accelerator_paths=True):
    step_time.check_flags(["xla"])
    records = step_time.measure_point("tiny", 4, 8, ["xla"], "system")
  by_attention = {r["attention"]: r for r in records}
  assert "error" not in by_attention["cudnn"], by_attention["cudnn"]
  assert by_attention["cudnn"]["attention_stand_in"] is True
  assert "attention_stand_in" not in by_attention["xla"]
  # No GEMM goes through cpu_gemm's upcast on the accelerator's paths.
  assert all(r["cpu_bf16_gemm"] is None and r["accelerator_paths"]
             for r in records), records
  assert (by_attention["cudnn"]["planned_peak_bytes"]
          < by_attention["xla"]["planned_peak_bytes"]), by_attention
  # Traced within the context only.
  assert sys.modules["dro_fast.models.t5"]._FUSED_ATTENTION == {  # pylint: disable=protected-access
      "cudnn": "cudnn"}


def test_a_failing_stand_in_is_our_bug_and_propagates(tiny_flags,
                                                      monkeypatch):
  del tiny_flags

  def build(config, implementation, batches, abstract):
    del implementation, batches, abstract
    assert config.attention == "cudnn"
    raise ValueError("a bug in the stand-in")

  monkeypatch.setattr(step_time, "JaxStep", build)
  with flagsaver.flagsaver(attention=["cudnn"], dtype="bfloat16",
                           memory_only=True, accelerator_paths=True):
    with pytest.raises(ValueError, match="a bug in the stand-in"):
      step_time.measure_point("tiny", 2, 4, ["xla"], "system")


def test_a_cudnn_attention_variant_that_fails_is_recorded(tiny_flags,
                                                          monkeypatch):
  del tiny_flags
  real_step = step_time.JaxStep

  def build(config, implementation, batches, abstract):
    if config.attention == "cudnn":
      raise RuntimeError("cuDNN is not detected.\nmore")
    return real_step(config, implementation, batches, abstract)

  monkeypatch.setattr(step_time, "JaxStep", build)
  with flagsaver.flagsaver(attention=["xla", "cudnn"], dtype="bfloat16",
                           memory_only=True):
    records = step_time.measure_point("tiny", 2, 4, ["xla"], "system")
  by_variant = {r["variant"]: r for r in records}
  assert by_variant["xla/cudnn"]["error"] == (
      "attention=cudnn variant failed: RuntimeError: cuDNN is not "
      "detected.")
  assert "error" not in by_variant["xla/xla"]
