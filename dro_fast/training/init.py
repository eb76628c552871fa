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
from dro_fast.models import hf_decoder
from dro_fast.models import lora
from dro_fast.models import pretrained
from dro_fast.models import value
from dro_fast.training import steps
from dro_fast.training.steps import AlgorithmConfig


def pretrained_params(params: Any,
                      config: models.T5Config | models.DecoderConfig) -> Any:
  """A loaded checkpoint's per-layer parameters in `config`'s layout.

  models.pretrained.load returns layers one by one; a config with
  scan_layers takes them stacked [L, ...].
  """
  if isinstance(config, models.DecoderConfig):
    return hf_decoder.stack_layers(params) if config.scan_layers else params
  return pretrained.stack_layers(params, config)


class Keys(NamedTuple):
  """The three keys split from a run's key."""
  policy: jax.Array
  value: jax.Array
  train: jax.Array


def split(rng: jax.Array) -> Keys:
  """The run's key split into (policy, value, train) keys."""
  return Keys(*jax.random.split(rng, 3))


def init_params(model_config: models.T5Config | models.DecoderConfig,
                algorithm: AlgorithmConfig | None, rng: jax.Array,
                tokens: jax.Array | None = None,
                policy_params: Any = None, *,
                value_config: models.DecoderConfig | None = None,
                value_trunk: Any = None) -> tuple[Any, Any]:
  """The initial (policy_params, value_params) of a run.

  Args:
    model_config: the policy's config, T5Config or DecoderConfig (and the
      separate value network's unless value_config is given).
    algorithm: decides the value network (none unless algorithm.has_value);
      None: the policy alone.
    rng: the run's key, jax.random.PRNGKey(seed); split as `split` does.
    tokens: int32 [B, S] example tokens to trace the networks with
      (parameter shapes do not depend on them); default [1, 2] ones.
    policy_params: a policy to start from (a pretrained checkpoint, an SFT
      warm start); None: random, from the policy key.
    value_config: a separate value network's own DecoderConfig
      (RunConfig.value_model); None: the policy's.
    value_trunk: that value network's pretrained parameters
      (--value_init_checkpoint), its head still drawn from the value key.

  With model_config.lora the policy's base parameters (all but the
  adapters) are in lora.base_dtype and its adapters are drawn from the
  policy key (lora_b zero: the policy equals its base); policy_params
  without adapters (a pretrained checkpoint, an SFT warm start) get them
  added, and ones with adapters are taken as they are.

  Returns:
    (policy_params, value_params). value_params is {} without a value
    network; the "separate" value network's encoder (T5) or trunk
    (decoder-only) is a copy of the policy's (value.init_from_policy), or
    value_trunk where given, or drawn from the value key for a
    value_config of another shape without value_trunk; its head is drawn
    from the value key.
  """
  keys = split(rng)
  if tokens is None:
    tokens = jnp.ones((1, 2), jnp.int32)
  network = steps.policy_network(model_config)
  if policy_params is None:
    policy_params = network.init(keys.policy, tokens, tokens)
    if model_config.lora is not None:
      policy_params = lora.with_adapters(policy_params, policy_params,
                                         model_config.lora)
  elif model_config.lora is not None and not lora.has_adapters(
      policy_params):
    # Only the adapters are kept, so XLA drops the rest of the draw.
    fresh = jax.jit(lambda key: lora.split(
        network.init(key, tokens, tokens))[0])(keys.policy)
    policy_params = lora.with_adapters(policy_params, fresh,
                                       model_config.lora)
  if algorithm is None or not algorithm.has_value:
    return policy_params, {}
  # What the policy hands a shared value head: T5's encoder output
  # [B, S, D], a decoder's state at the last prompt token [B, D].
  encoded = jax.eval_shape(
      lambda: network.apply.decode(policy_params, None, tokens, tokens)
      ).encoded
  encoded = jnp.zeros(encoded.shape, encoded.dtype)
  value_params = value.value_network(
      value_config or model_config, algorithm.value_net).init(
          keys.value, tokens, encoded)
  if algorithm.value_net == "separate" and value_trunk is not None:
    value_params = value.init_from_policy(value_params, value_trunk)
  elif algorithm.value_net == "separate" and value_config in (None,
                                                              model_config):
    value_params = value.init_from_policy(value_params, policy_params)
  # Else a value network of its own shape without a value_trunk: the
  # policy's trunk does not fit it, so it keeps its random trunk.
  return policy_params, value_params
