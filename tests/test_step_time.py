"""benchmarks.step_time: variants that do not fit are findings.

Also: memory plans from shapes alone, cuDNN planned with its stand-in off
the GPU.
"""

from __future__ import annotations

from absl import app
from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
import pytest

from benchmarks import cudnn_stand_in
from benchmarks import step_time
from benchmarks.lib import step as bench_step
from dro_fast import models
from dro_fast.training import flops
from dro_fast.training import steps

FLAGS = flags.FLAGS


@pytest.fixture(name="tiny_flags")
def _tiny_flags():
  if not FLAGS.is_parsed():
    FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(size=["tiny"], batch_size=["2"], input_length=8,
                           target_length=["4"], steps=1, repeats=1,
                           dtype="float32", remat=["none"], attention=["xla"],
                           scan_layers=False, compare_torch=False,
                           memory_only=False, platform="auto",
                           implementation=["default"]):
    yield


def test_a_variant_out_of_memory_is_recorded_and_the_others_are_timed(
    tiny_flags, monkeypatch):
  del tiny_flags
  real_step = bench_step.JaxStep

  class OutOfMemoryOnChunked(real_step):
    """chunked_xla fails at its first step as an 80 GB GPU would."""

    def __call__(self):
      if self.implementation == "chunked_xla":
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
            "56.21GiB with allocator GPU_0_bfc on device 0.\nmore detail")
      super().__call__()

  def build(config, algorithm, batches, abstract, platform,
            value_config=None):
    step = OutOfMemoryOnChunked(config, algorithm, batches, abstract,
                                platform=platform, value_config=value_config)
    step.implementation = algorithm.implementation
    return step

  monkeypatch.setattr(bench_step, "JaxStep", build)
  with flagsaver.flagsaver(implementation=["xla", "chunked_xla"]):
    records = step_time.measure_point("tiny", 2, 4, "system")
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
  # The FLOP model counts matmuls and attention; XLA's count adds the
  # elementwise work, which at this tiny width is a large share.
  assert (timed["flops_per_step"] < timed["xla_flops_per_step"]
          < 1.5 * timed["flops_per_step"]), timed


def test_errors_other_than_out_of_memory_propagate(tiny_flags, monkeypatch):
  del tiny_flags

  def build(*args, **kwargs):
    del args, kwargs
    raise jax.errors.JaxRuntimeError("INTERNAL: a real bug")

  monkeypatch.setattr(bench_step, "JaxStep", build)
  with pytest.raises(jax.errors.JaxRuntimeError, match="a real bug"):
    step_time.measure_point("tiny", 2, 4, "system")


def test_memory_only_plans_from_shapes_the_same_as_from_arrays(tiny_flags):
  del tiny_flags
  config = step_time.config_for("tiny", "none", "xla")
  batches = [bench_step.random_batch(config, 2, 8, 4,
                                     np.random.default_rng(0))]
  algorithm = steps.AlgorithmConfig(algo="dro_v", implementation="xla")
  concrete = bench_step.JaxStep(config, algorithm, batches)
  abstract = bench_step.JaxStep(config, algorithm, batches, abstract=True)
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


def test_cudnn_memory_is_planned_with_the_stand_in_without_a_gpu(tiny_flags):
  del tiny_flags
  # No remat: the "xla" variant keeps every layer's [B, H, S, S] softmax for
  # the backward, the stand-in (as cuDNN) only outputs and log-sum-exps.
  with flagsaver.flagsaver(attention=["xla", "cudnn"], dtype="bfloat16",
                           input_length=128, memory_only=True,
                           platform="gpu", implementation=["xla"]):
    step_time.check_flags()
    records = step_time.measure_point("tiny", 4, 8, "system")
  by_attention = {r["attention"]: r for r in records}
  assert {r["variant"] for r in records} == {"xla/xla", "xla/cudnn"}
  assert "error" not in by_attention["cudnn"], by_attention["cudnn"]
  assert by_attention["cudnn"]["attention_stand_in"] is True
  assert "attention_stand_in" not in by_attention["xla"]
  assert all(r["platform"] == "gpu" and r["compute_dtype"] == "bfloat16"
             for r in records), records
  assert (by_attention["cudnn"]["planned_peak_bytes"]
          < by_attention["xla"]["planned_peak_bytes"]), by_attention


@pytest.mark.parametrize("message", ["a bug in the stand-in", None])
def test_a_failing_cudnn_variant(tiny_flags, monkeypatch, message):
  """Under the stand-in a cuDNN error is our bug; on a GPU it is recorded.

  The GPU is faked here.
  """
  del tiny_flags
  real_step = bench_step.JaxStep

  def build(config, algorithm, batches, abstract, platform,
            value_config=None):
    if config.attention in ("cudnn", cudnn_stand_in.IMPLEMENTATION):
      raise ValueError(message or "cuDNN is not detected.\nmore")
    return real_step(config, algorithm, batches, abstract, platform=platform,
                     value_config=value_config)

  monkeypatch.setattr(bench_step, "JaxStep", build)
  if message is None:
    monkeypatch.setattr(step_time, "_stand_in", lambda: False)
  with flagsaver.flagsaver(attention=["xla", "cudnn"], dtype="bfloat16",
                           memory_only=True, platform="gpu"):
    if message:
      with pytest.raises(ValueError, match=message):
        step_time.measure_point("tiny", 2, 4, "system")
      return
    records = step_time.measure_point("tiny", 2, 4, "system")
  by_variant = {r["variant"]: r for r in records}
  assert by_variant["default/cudnn"]["error"] == (
      "attention=cudnn variant failed: ValueError: cuDNN is not detected.")
  assert "error" not in by_variant["default/xla"]


@pytest.mark.slow           # two compiles and a PyTorch model: ~40 s
def test_a_decoder_is_timed_against_its_pytorch_step(tiny_flags):
  del tiny_flags
  pytest.importorskip("transformers")
  with flagsaver.flagsaver(decoder="tiny_decoder",
                           decoder_fields=["num_layers=1", "vocab_size=64"],
                           compare_torch=True, torch_host_memory=["same"],
                           implementation=["xla"]):
    step_time.check_flags()
    records = step_time.measure_point("tiny_decoder", 2, 4, "system")
  by_variant = {r["variant"]: r for r in records}
  assert set(by_variant) == {"xla", "torch"}
  for r in records:
    assert r["size"] == "tiny_decoder" and r["median_step_s"] > 0, r
    assert r["decoder_fields"] == {"num_layers": 1, "vocab_size": 64}, r
    assert np.isfinite(r["loss"]), r
  assert by_variant["torch"]["framework"] == "torch"
  # The decoder's FLOP model: prompt and completion through the policy, the
  # prompt through the value trunk.
  config = models.decoder_preset("tiny_decoder", num_layers=1, vocab_size=64)
  assert by_variant["xla"]["flops_per_step"] == flops.step_flops(
      config, "dro_v", "separate", 2, 8, 4)


def test_a_lora_plan_with_its_own_value_network(tiny_flags):
  """--lora_rank and --value_decoder reach the planned step and its FLOP
  model; the PyTorch comparison refuses them."""
  del tiny_flags
  with flagsaver.flagsaver(decoder="tiny_decoder",
                           decoder_fields=["num_layers=1", "vocab_size=64"],
                           memory_only=True, lora_rank=2,
                           value_decoder="tiny_decoder",
                           implementation=["xla"]):
    step_time.check_flags()
    (record,) = step_time.measure_point("tiny_decoder", 2, 4, "system")
    assert record["lora_rank"] == 2 and record["planned_peak_bytes"] > 0
    assert record["value_decoder"] == "tiny_decoder"
    config = step_time.config_for("tiny_decoder", "none", "xla")
    assert config.lora.rank == 2
    assert record["flops_per_step"] == flops.step_flops(
        config, "dro_v", "separate", 2, 8, 4,
        value_config=models.decoder_preset("tiny_decoder"))
    with flagsaver.flagsaver(memory_only=False, compare_torch=True):
      with pytest.raises(app.UsageError, match="no --lora_rank"):
        step_time.check_flags()
