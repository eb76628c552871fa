"""Reading a training run back: its configuration and its policies.

The trainer writes <workdir>/run_config.json; from it, any checkpoint's
policy parameters (or the initial, SFT policy) can be restored without the
flags that started the run.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from dro_fast.models import pretrained
from dro_fast import models
from dro_fast.models import value
from dro_fast.tokenizer import Tokenizer
from dro_fast.training import checkpointing
from dro_fast.training import optim
from dro_fast.training import steps


class RunError(ValueError):
  """A workdir that cannot be read as a training run."""


def read_run_config(workdir: str) -> dict:
  path = os.path.join(workdir, "run_config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise RunError(f"{workdir}: no run_config.json; is this the --workdir of "
                   f"a dro_fast.train run?") from None
  except json.JSONDecodeError as e:
    raise RunError(f"{path}: invalid JSON ({e}).") from None


def model_config(run: dict) -> models.T5Config:
  """The run's T5Config, with attention "xla" whatever the run trained with:
  cuDNN's fused attention is a choice of the training machine (a CUDA GPU,
  even lengths), and generation attends through the cache anyway."""
  return models.T5Config(**run["model"]).replace(attention="xla")


def tokenizer(run: dict) -> Tokenizer:
  return Tokenizer.load(run["tokenizer"])


def _abstract_state(run: dict) -> steps.TrainState:
  """Shapes and dtypes of the run's TrainState, allocating nothing."""
  algorithm = steps.AlgorithmConfig(**run["algorithm"])
  config = model_config(run)
  trainer = steps.make_trainer(
      algorithm, config, optim.make_optimizer(**run["policy_optimizer"]),
      optim.make_optimizer(**run["value_optimizer"]))
  tokens = jnp.ones((1, 2), jnp.int32)
  policy = jax.eval_shape(models.t5(config).init, jax.random.key(0), tokens,
                          tokens)
  values = {}
  if algorithm.has_value:
    net = value.value_network(config, algorithm.value_net)
    values = (jax.eval_shape(net.init, jax.random.key(0), tokens)
              if algorithm.value_net == "separate" else
              jax.eval_shape(net.init, jax.random.key(0),
                             jnp.zeros((1, 2, config.d_model)), tokens))
  return jax.eval_shape(trainer.init, policy, values, jax.random.PRNGKey(0))


def checkpoint_steps(workdir: str) -> list[int]:
  return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")
                                    ).all_steps()


def load_policy(workdir: str, step: int | None = None):
  """Policy parameters of checkpoint `step` (None: the newest)."""
  run = read_run_config(workdir)
  checkpointer = checkpointing.Checkpointer(os.path.join(workdir,
                                                         "checkpoints"))
  state, _, step = checkpointer.restore(_abstract_state(run), step)
  return state.policy_params, step


def load_initial_policy(workdir: str):
  """The run's initial (SFT) policy: its --init_checkpoint, its SFT warm
  start, or its seeded random initialisation."""
  run = read_run_config(workdir)
  config = model_config(run)
  init = run["init"]
  tokens = jnp.ones((1, 2), jnp.int32)
  if init["kind"] == "checkpoint":
    _, params = pretrained.load(init["path"])
    return pretrained.stack_layers(params, config)
  if init["kind"] == "sft_init":
    template = jax.eval_shape(models.t5(config).init, jax.random.key(0),
                              tokens, tokens)
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir,
                                                           "sft_init"))
    return checkpointer.restore({"params": template})[0]["params"]
  # As the trainer: the first of three keys split from the seed.
  rng = jax.random.split(jax.random.PRNGKey(init["seed"]), 3)[0]
  return models.t5(config).init(rng, tokens, tokens)
