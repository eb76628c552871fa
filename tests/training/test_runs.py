"""training.runs and training.init: a run's policies, read back from disk."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.data.config import DataConfig
from dro_fast.models import value
from dro_fast.training import checkpointing
from dro_fast.training import init
from dro_fast.training import loop
from dro_fast.training import optim
from dro_fast.training import runs
from dro_fast.training import steps
from dro_fast.training.run_config import RunConfig

CONFIG = models.preset("tiny", vocab_size=64, matmul="cpu_row_major")


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_evaluation_rebuilds_a_cudnn_run_with_materialised_attention():
  # run_config.json of a run trained with --attention=cudnn on a GPU; its
  # evaluation may run anywhere.
  config = models.preset("tiny", dtype="bfloat16", remat="dots",
                         dropout_rate=0.0)
  run = RunConfig("/w", model=config.replace(attention="cudnn",
                                             attention_interpret=False))
  assert runs.model_config(run, "cpu") == config.replace(
      matmul="cpu_row_major", attention_interpret=True)
  assert runs.model_config(run, "tpu") == config.replace(
      attention_interpret=False)


@pytest.mark.parametrize("value_net", ["separate", "shared"])
def test_init_params_is_the_trainers_split(value_net):
  """init_params draws what the trainer always drew: the policy from the
  first of three keys split from the seed, the value network from the
  second, the separate value encoder a copy of the policy's."""
  rng = jax.random.PRNGKey(7)
  policy_rng, value_rng, _ = jax.random.split(rng, 3)
  tokens = jnp.ones((1, 2), jnp.int32)
  algorithm = steps.AlgorithmConfig(value_net=value_net)
  policy, values = init.init_params(CONFIG, algorithm, rng)
  _equal(policy, models.t5(CONFIG).init(policy_rng, tokens, tokens))
  net = value.value_network(CONFIG, value_net)
  if value_net == "separate":
    expected = value.init_from_policy(
        net.init(value_rng, jnp.ones((1, 9), jnp.int32), None), policy)
  else:
    expected = net.init(value_rng, tokens, jnp.zeros((1, 2, CONFIG.d_model)))
  _equal(values, expected)
  # Without a value network, or from a given policy.
  assert init.init_params(CONFIG, steps.AlgorithmConfig(algo="sft"),
                          rng)[1] == {}
  start = jax.tree.map(lambda x: x + 1, policy)
  given, values = init.init_params(CONFIG, algorithm, rng,
                                   policy_params=start)
  assert given is start
  if value_net == "separate":
    _equal({k: values[k] for k in values if k != "value_head"},
           {k: start[k] for k in values if k != "value_head"})


def _workdir(tmp_path, algo="dro_v"):
  """A run directory as the trainer leaves it: run_config.json and one
  checkpoint of policy and train state."""
  run = RunConfig(str(tmp_path), data=DataConfig(), model=CONFIG,
                  algorithm=steps.AlgorithmConfig(algo=algo), seed=3)
  with open(os.path.join(tmp_path, "run_config.json"), "w") as f:
    f.write(run.to_json())
  policy, values = init.init_params(CONFIG, run.algorithm,
                                    jax.random.PRNGKey(run.seed))
  trainer = steps.build_trainer(run.algorithm, CONFIG,
                                optim.make_optimizer(1e-3),
                                optim.make_optimizer(1e-3))
  state = trainer.init(jax.tree.map(lambda x: x * 2, policy), values,
                       jax.random.PRNGKey(0))
  checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints"),
                             runs.ITEMS).save(5, loop._items(state), {})  # pylint: disable=protected-access
  return run, policy, state


def test_policy_restores_without_optimizer_state(tmp_path, monkeypatch):
  _, _, state = _workdir(tmp_path)
  # The evaluator builds no trainer and reads no optimizer state: the
  # checkpoint's train_state item may as well be gone.
  monkeypatch.setattr(steps, "build_trainer", None)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / "checkpoints" / "5" / runs.TRAIN_STATE)
  params, step = runs.load_policy(str(tmp_path))
  assert step == 5
  _equal(params, state.policy_params)
  assert runs.checkpoint_steps(str(tmp_path)) == [5]


def test_initial_random_policy_is_the_trainers(tmp_path):
  run, policy, _ = _workdir(tmp_path, algo="kto")
  _equal(runs.load_initial_policy(str(tmp_path)), policy)
  assert runs.read_run_config(str(tmp_path)) == run


def test_unreadable_run_config_is_a_run_error(tmp_path):
  with pytest.raises(runs.RunError, match="no run_config.json"):
    runs.read_run_config(str(tmp_path))
  (tmp_path / "run_config.json").write_text('{"workdir": 3}')
  with pytest.raises(runs.RunError, match="run_config.json: field 'workdir'"):
    runs.read_run_config(str(tmp_path))
