"""The byte model of a train step (benchmarks/lib/byte_model.py) against its
terms written out by hand for small meshes."""

from __future__ import annotations

import pytest

from benchmarks.lib import byte_model
from dro_fast import models


def _decoder(**changes):
  return models.decoder_preset("tiny_decoder", **changes)


def test_an_fsdp_mesh_moves_the_weights_and_gradients_over_ici():
  config = _decoder()
  policy, trained, value = byte_model.parameter_counts(config, None,
                                                       "shared")
  assert trained == policy and value == config.hidden_size + 1
  counted = byte_model.step_bytes(config, None, "shared", 8, 6, 4,
                                  byte_model.Mesh(data=2, fsdp=4))
  params = policy + value
  # Gathers twice in bf16, the gradients' reduce-scatter over fsdp and
  # all-reduce over data in float32; no model axis, no activation traffic.
  want = (2 * 3 / 4 * params * 2 + 3 / 4 * params * 4
          + 2 * 1 / 2 * params / 4 * 4)
  assert counted["ici_bytes"] == pytest.approx(want)


def test_a_model_axis_adds_two_all_reduces_per_layer_and_pass():
  config = _decoder()
  mesh = byte_model.Mesh(data=1, fsdp=1, model=2)
  counted = byte_model.step_bytes(config, None, "shared", 4, 6, 4, mesh)
  # fsdp 1, data 1: no weight traffic; per layer the attention and MLP
  # outputs [4 rows, 10 tokens, D] bf16, in the forward, the recompute and
  # the backward, each all-reduced (a ring sends 2 (M-1)/M of it).
  block = 4 * 10 * config.hidden_size * 2
  want = config.num_layers * 2 * 3 * 2 * (1 / 2) * block
  assert counted["ici_bytes"] == pytest.approx(want)
  # Without remat: no recompute, two passes communicate.
  plain = byte_model.step_bytes(config, None, "shared", 4, 6, 4, mesh,
                                remat="none")
  assert plain["ici_bytes"] == pytest.approx(want * 2 / 3)


def test_hbm_counts_weights_gradients_optimizer_and_activations():
  config = _decoder()
  mesh = byte_model.Mesh(fsdp=2)
  counted = byte_model.step_bytes(config, None, "shared", 4, 6, 4, mesh)
  policy, _, value = byte_model.parameter_counts(config, None, "shared")
  attention, mlp = byte_model.layer_io(config, 1)
  d, q, kv, f = 64, 64, 32, 192
  assert attention == 9 * d + 2 * (q + 2 * kv) + 2 * q
  assert mlp == 8 * d + 6 * f
  weights = sum(p * 2 * 5 + 2 * p * 4 + 3 * p / 2 * 4
                for p in (policy, value))
  activations = config.num_layers * 2 * 10 * (
      4 * (attention + mlp) + 2 * d) * 2
  assert counted["hbm_bytes"] == pytest.approx(weights + activations)


def test_lora_trains_only_the_adapters_and_its_gradients_shrink():
  full = _decoder()
  adapted = _decoder(lora=models.LoraConfig(rank=2))
  policy, trained, _ = byte_model.parameter_counts(adapted, None, "shared")
  assert trained < policy / 10
  mesh = byte_model.Mesh(fsdp=4)
  assert (byte_model.step_bytes(adapted, None, "shared", 4, 6, 4, mesh)
          ["ici_bytes"] < byte_model.step_bytes(
              full, None, "shared", 4, 6, 4, mesh)["ici_bytes"])


def test_bounds_name_the_largest_time_and_refuse_an_indivisible_batch():
  config = models.preset("tiny", dropout_rate=0.0)
  result = byte_model.bounds(config, None, "separate", 8, 12, 6,
                             byte_model.Mesh(fsdp=4), "TPU v5 lite", 819e9,
                             xla_bytes=1e9)
  times = {k: result[f"{k}_s"] for k in ("compute", "hbm", "ici")}
  assert result["bound_by"] == max(times, key=times.get)
  assert result["bound_s"] == max(times.values())
  assert result["xla_hbm_s"] == pytest.approx(1e9 / 819e9)
  with pytest.raises(ValueError, match="not a multiple of data x fsdp"):
    byte_model.step_bytes(config, None, "separate", 6, 12, 6,
                          byte_model.Mesh(fsdp=4))
