"""The initial policy and value parameters of a run: one function for all.

The trainer, runs.load_initial_policy (the evaluator's WORKDIR:init) and the
benchmarks build parameters here, so the three agree. The run's key is split
as the trainer always has:

  rng = jax.random.PRNGKey(seed)
  policy_rng, value_rng, train_rng = jax.random.split(rng, 3)

policy_rng initialises a random policy (and, folded with 1, the SFT warm
start's dropout); value_rng the value network; train_rng is the train
state's key (see `split`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dro_fast import models
from dro_fast.models import value
from dro_fast.training.steps import AlgorithmConfig


class Keys(NamedTuple):
  """The three keys split from a run's key."""
  policy: jax.Array
  value: jax.Array
  train: jax.Array


def split(rng: jax.Array) -> Keys:
  """The run's key split into (policy, value, train) keys."""
  return Keys(*jax.random.split(rng, 3))


def init_params(model_config: models.T5Config,
                algorithm: AlgorithmConfig | None, rng: jax.Array,
                tokens: jax.Array | None = None,
                policy_params: Any = None) -> tuple[Any, Any]:
  """The initial (policy_params, value_params) of a run.

  Args:
    model_config: the policy's (and the separate value encoder's) config.
    algorithm: decides the value network (none unless algorithm.has_value);
      None: the policy alone.
    rng: the run's key, jax.random.PRNGKey(seed); split as `split` does.
    tokens: int32 [B, S] example tokens to trace the networks with
      (parameter shapes do not depend on them); default [1, 2] ones.
    policy_params: a policy to start from (a pretrained checkpoint, an SFT
      warm start); None: random, from the policy key.

  Returns:
    (policy_params, value_params). value_params is {} without a value
    network; the "separate" value network's encoder is a copy of the
    policy's (value.init_from_policy), its head drawn from the value key.
  """
  keys = split(rng)
  if tokens is None:
    tokens = jnp.ones((1, 2), jnp.int32)
  if policy_params is None:
    policy_params = models.t5(model_config).init(keys.policy, tokens, tokens)
  if algorithm is None or not algorithm.has_value:
    return policy_params, {}
  encoded = jnp.zeros(tokens.shape + (model_config.d_model,))
  value_params = value.value_network(model_config, algorithm.value_net).init(
      keys.value, tokens, encoded)
  if algorithm.value_net == "separate":
    value_params = value.init_from_policy(value_params, policy_params)
  return policy_params, value_params
