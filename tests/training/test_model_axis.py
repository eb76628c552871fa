"""The model (tensor-parallel) mesh axis: logical axis names, the rules'
shardings, the bad-input messages, and 8 simulated CPU devices on
data:2,fsdp:2,model:2 matching one device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
from jax.sharding import AbstractMesh
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.lib import step as bench_step
from benchmarks.lib import tpu
from dro_fast import models
from dro_fast.models import partitioning
from dro_fast.training import init
from dro_fast.training import optim
from dro_fast.training import sharding
from dro_fast.training import steps
from tests.test_bad_input import leftovers
from tests.test_train import SMALL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
MESH = AbstractMesh((2, 2, 2), sharding.AXES)
T5 = models.preset("tiny")
DECODER = models.decoder_preset("tiny_decoder", vocab_size=64)


@pytest.mark.slow
def test_data_fsdp_model_mesh_matches_one_device_within_1e5():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "training",
                                    "model_axis_steps.py")],
      env=env, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name in ("t5", "decoder", "decoder_splash", "decoder_lora"):
    single, sharded = out[name]["single"], out[name]["sharded"]
    assert len(single["metrics"]) == 2
    for one, eight in zip(single["metrics"], sharded["metrics"]):
      keys = sorted(k for k in one if np.isfinite(one[k]))
      assert "loss" in keys and "policy_grad_norm" in keys
      np.testing.assert_allclose([eight[k] for k in keys],
                                 [one[k] for k in keys], rtol=1e-5,
                                 atol=1e-5, err_msg=name)
    # Gradients reach 60 here: float32 sums in another order move an entry
    # by up to ~1e-6 of its array's largest, so the absolute tolerance is
    # 1e-5 of that (per array).
    for one, eight in zip(single["gradients"], sharded["gradients"]):
      assert max(np.max(np.abs(g)) for g in one) > 1.0     # real gradients
      for g1, g8 in zip(one, eight):
        scale = max(1.0, float(np.max(np.abs(g1))))
        np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=name)
    for p1, p8 in zip(single["params"], sharded["params"]):
      np.testing.assert_allclose(p8, p1, rtol=1e-5, atol=1e-5, err_msg=name)
  # Query and MLP kernels really are split over model (and fsdp).
  assert out["t5"]["sharded"]["specs"] == ["P('fsdp', 'model')"] * 2
  assert out["decoder"]["sharded"]["specs"] == ["P('fsdp', 'model')",
                                                "P('model', 'fsdp')"]
  # A q_proj adapter: lora_a on the kernel's input axis, lora_b on its
  # output axis.
  assert out["decoder_lora"]["sharded"]["specs"] == ["P('fsdp', None)",
                                                     "P('fsdp', 'model')"]


@pytest.mark.parametrize("spec, expected", [
    ("data:2,fsdp:2,model:2", {"data": 2, "fsdp": 2, "model": 2}),
    ("model:8", {"data": 1, "fsdp": 1, "model": 8}),
    ("data:4,fsdp:2", {"data": 4, "fsdp": 2, "model": 1}),
])
def test_parse_mesh_with_a_model_axis(spec, expected):
  assert sharding.parse_mesh(spec, 8) == expected


def _specs(tree, mesh=MESH):
  return jax.tree.map(lambda s: tuple(s.spec),
                      sharding.tree_shardings(tree, mesh))


def _shapes(config):
  policy, value = jax.eval_shape(
      lambda: init.init_params(config, steps.AlgorithmConfig(),
                               jax.random.PRNGKey(0)))
  return policy, value


@pytest.mark.parametrize("scan", [False, True])
def test_every_t5_and_decoder_parameter_has_logical_axes(scan):
  for config in (T5, DECODER):
    policy, value = _shapes(config.replace(scan_layers=scan))
    for tree in (policy, value):
      for module, params in tree.items():
        for name, x in params.items():
          axes = partitioning.logical_axes(f"{module}/{name}", x.ndim)
          assert axes is not None, (module, name, x.shape)
          assert (axes[0] == "layers") == ("/layers/" in f"{module}/"), (
              module, axes)


def test_rules_split_heads_mlp_and_vocab_over_model():
  policy, _ = _shapes(DECODER)
  specs = _specs(policy)
  layer = "model/layers_0"
  assert specs[f"{layer}/self_attn/q_proj"]["kernel"] == ("fsdp", "model")
  assert specs[f"{layer}/self_attn/k_proj"]["kernel"] == ("fsdp", "model")
  assert specs[f"{layer}/self_attn/o_proj"]["kernel"] == ("model", "fsdp")
  assert specs[f"{layer}/mlp/gate_proj"]["kernel"] == ("fsdp", "model")
  assert specs[f"{layer}/mlp/down_proj"]["kernel"] == ("model", "fsdp")
  assert specs["model/embed_tokens"]["embedding"] == ("model", "fsdp")
  assert specs["lm_head"]["kernel"] == ("fsdp", "model")
  # A norm no rule splits still goes over fsdp (FSDP spreads every array).
  assert specs[f"{layer}/input_layernorm"]["scale"] == ("fsdp",)
  scanned, _ = _shapes(T5.replace(scan_layers=True))
  specs = _specs(scanned)
  assert specs["encoder/layers/attention/out"]["kernel"] == (
      None, "model", "fsdp")
  assert specs["decoder/layers/mlp/wi_1"]["kernel"] == (None, "fsdp",
                                                        "model")
  assert specs["decoder/logits_dense"]["kernel"] == ("fsdp", "model")
  assert specs["encoder/relpos_bias"]["rel_embedding"] == ("model", "fsdp")


def test_optimizer_states_follow_their_parameters():
  # Large enough for Adafactor to factor its second moments: v_row drops
  # the largest dimension (mlp), v_col the second largest (embed).
  params = {"encoder/layers_0/mlp/wi_0": {"kernel": jnp.zeros((128, 256))},
            "encoder/layers_0/attention/query": {"kernel": jnp.zeros(
                (16, 8))}}
  state = steps.TrainState(
      step=jnp.zeros([], jnp.int32), policy_params=params, value_params={},
      policy_opt_state=optim.make_optimizer(1e-3).init(params),
      value_opt_state=(), rng=jax.random.PRNGKey(0),
      bad_steps=jnp.zeros([], jnp.int32))
  factored = state.policy_opt_state[0]
  axes = sharding.tree_axes(state)
  mlp = "encoder/layers_0/mlp/wi_0"
  assert axes.policy_opt_state[0].v_row[mlp]["kernel"] == ("embed",)
  assert axes.policy_opt_state[0].v_col[mlp]["kernel"] == ("mlp",)
  query = "encoder/layers_0/attention/query"
  assert axes.policy_opt_state[0].v[query]["kernel"] == ("embed", "heads")
  specs = _specs(state)
  assert specs.policy_opt_state[0].v_row[mlp]["kernel"] == ("fsdp",)
  assert specs.policy_opt_state[0].v_col[mlp]["kernel"] == ("model",)
  assert specs.policy_opt_state[0].v[query]["kernel"] == ("fsdp", "model")
  assert factored.v_col[mlp]["kernel"].shape == (256,)


def test_batch_is_split_over_data_and_fsdp_only():
  assert tuple(sharding.batch_sharding(MESH).spec) == (("data", "fsdp"),)
  sharding.check_batch_size(4, MESH)
  with pytest.raises(ValueError, match=r"data x fsdp devices \(4\)"):
    sharding.check_batch_size(6, MESH)


@pytest.mark.parametrize("sizes, configs, message", [
    ({"data": 1, "fsdp": 1, "model": 3},
     [("policy", models.preset("tiny", num_heads=8))],
     "`mesh`=data:1,fsdp:1,model:3: model 3 does not divide num_heads 8 "
     "of the policy; model sizes that divide every split dimension: 1, 2, "
     "4, 8."),
    ({"data": 1, "fsdp": 2, "model": 4}, [("policy", DECODER)],
     "`mesh`=data:1,fsdp:2,model:4: model 4 does not divide num_kv_heads 2 "
     "of the policy; model sizes that divide every split dimension: 1, 2."),
    ({"data": 1, "fsdp": 1, "model": 2},
     [("policy", DECODER), ("value network", DECODER.replace(
         intermediate_size=96, vocab_size=65))],
     "model 2 does not divide vocab_size 65 of the value network; model "
     "sizes that divide every split dimension: 1."),
    ({"data": 1, "fsdp": 1, "model": 16},
     [("policy", models.preset("tiny", num_heads=16, d_ff=40))],
     "does not divide d_ff 40 of the policy; model sizes that divide every "
     "split dimension: 1, 2, 4, 8."),
])
def test_a_model_axis_that_does_not_divide_names_the_sizes(sizes, configs,
                                                          message):
  mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
  with pytest.raises(ValueError) as error:
    sharding.check_model_axis(mesh, configs)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_the_trainer_refuses_a_model_axis_that_does_not_divide(tmp_path):
  # The check runs once the tokenizer (the vocabulary) is known, before
  # anything but the demo data is written.
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "dro_fast.train", f"--workdir={workdir}",
       *SMALL, "--mesh=model:3", "--batch_size=6"], cwd=REPO,
      env=dict(os.environ,
               XLA_FLAGS="--xla_force_host_platform_device_count=3"),
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert ("--mesh=data:1,fsdp:1,model:3: model 3 does not divide num_heads "
          "4 of the policy; model sizes that divide every split dimension: "
          "1, 2, 4.") in result.stderr
  assert leftovers(workdir) == []


def test_a_model_axis_that_divides_passes():
  sharding.check_model_axis(MESH, [("policy", T5), ("value network",
                                                    DECODER)])


def test_tree_shardings_names_an_indivisible_parameter():
  params = {"model/layers_0/self_attn/q_proj": {"kernel": jnp.zeros(
      (4, 6))}}
  mesh = AbstractMesh((1, 1, 4), sharding.AXES)
  with pytest.raises(ValueError, match=r"q_proj.*kernel.*size 6 .*'heads'"
                     r".*model axis of size 4"):
    sharding.tree_shardings(params, mesh)


def test_every_logical_name_has_a_rule():
  named = {a for _, axes in partitioning.PARAM_AXES for a in axes} - {None}
  assert named <= set(dict(partitioning.RULES)), named


@pytest.mark.slow
def test_flash_attention_and_logprob_kernels_compile_for_v5e_on_a_model_axis():
  # Deviceless (libtpu, as tests/benchmarks/test_tpu_compile.py): Mosaic
  # lowers the Pallas kernels per device under shard_map on rows split
  # over data x fsdp and replicated over model.
  tpu.require_libtpu()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "model": 2},
                            tpu.devices("v5e:2x2"))
  config = bench_step.config_for("tiny", "bfloat16", remat="dots",
                                 attention="flash", scan_layers=True,
                                 platform="tpu")
  batch = bench_step.random_batch(config, 8, 24, 16,
                                  np.random.default_rng(0))
  step = bench_step.JaxStep(config, steps.AlgorithmConfig(algo="dro_v"),
                            [batch], abstract=True, mesh=mesh)
  text = step.compiled.as_text()
  assert "tpu_custom_call" in text and "all-reduce" in text
