"""Train state, each algorithm's loss (LOSSES) and the guarded update.

Batches are dicts of arrays. Single-trajectory algorithms (dro_v, kto, sft)
take inputs [B, S], targets [B, T], target_mask [B, T], rewards [B] and
ref_logprobs [B]; KTO also takes mismatched_targets / mismatched_mask (each
prompt paired with another example's completion, fixed per dataset) and
mismatched_ref_logprobs. Pairwise algorithms (dpo, ipo, slic) take inputs,
chosen, chosen_mask, rejected, rejected_mask, chosen_ref_logprobs and
rejected_ref_logprobs.

Log-probabilities come from the fused linear kernel: the decoder's final
states and the output projection go to kernels.linear_sequence_logprobs, so
the [B, T, V] logits are never materialised.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from dro_fast import kernels
from dro_fast import losses
from dro_fast import models
from dro_fast.models import lora
from dro_fast.models import partitioning
from dro_fast.models import per_device
from dro_fast.models import value
from dro_fast.training.config import AlgorithmConfig
from dro_fast.training.config import ALGORITHMS
from dro_fast.training.config import PAIRWISE

class TrainState(NamedTuple):
  """Everything a step changes; checkpointed whole.

  rng is a raw uint32[2] key (jax.random.PRNGKey), so that it checkpoints as
  a plain array. value_params / value_opt_state are empty dicts for
  algorithms without a value network. bad_steps counts the consecutive
  updates skipped for a non-finite loss, gradient or updated parameter
  (see update).

  With LoRA (the policy config's `lora`), policy_params holds only the
  adapters (what trains) and frozen_params the base (models.lora.split),
  which no gradient, optimizer state or checkpoint touches: a run rebuilds
  it and the trainer's checkpoints leave it out. None without LoRA.
  """
  step: jax.Array
  policy_params: Any
  value_params: Any
  policy_opt_state: Any
  value_opt_state: Any
  rng: jax.Array
  bad_steps: jax.Array
  frozen_params: Any = None

  @property
  def policy(self) -> Any:
    """The policy's whole parameters (a LoRA policy's base and adapters)."""
    if self.frozen_params is None:
      return self.policy_params
    return lora.combine(self.policy_params, self.frozen_params)


class Trainer(NamedTuple):
  """init and update of one training set-up, pure functions for jax.jit.

  Nothing here is jitted: the caller jits update with its own donation and
  shardings (training.loop.train, benchmarks/lib/step.py).
  """
  init: Callable[..., TrainState]
  update: Callable[[TrainState, dict], tuple[TrainState, dict]]


def logprob_kernel(implementation: str | None,
                   interpret: bool | None,
                   softcap: float | None = None) -> Callable[..., jax.Array]:
  """kernels.linear_sequence_logprobs as the trainer calls it.

  (hidden [B, T, D], weight [D, V], targets [B, T], mask [B, T]) -> [B].
  `implementation` and `interpret` are AlgorithmConfig's, which
  dro_fast.backend.resolve fills in for the platform a run compiles for
  (None: the kernels' own default). Under a mesh it runs per device
  (models.per_device): each device takes its rows of the batch and the
  whole output projection (gathered, as FSDP gathers every weight for its
  matmul). On a mesh with a `model` axis the projection is split over V
  there, and kernels.vocab_parallel computes each device's shard and
  combines them across the axis instead.

  softcap: a decoder's final_logit_softcapping (logits = c·tanh(z / c)),
  which the fused kernel cannot apply: the logits are then materialised
  and soft-capped first (no released Llama 3, Qwen or Gemma 3 sets it).
  """
  if softcap:
    def capped(hidden, weight, targets, mask):
      logits = jnp.einsum("btd,dv->btv", hidden, weight,
                          preferred_element_type=jnp.float32)
      logits = jnp.tanh(logits / softcap) * softcap
      token = jnp.take_along_axis(jax.nn.log_softmax(logits),
                                  jnp.where(mask, targets, 0)[..., None],
                                  axis=-1)[..., 0]
      return jnp.sum(jnp.where(mask, token, 0.0), axis=-1)
    return per_device.over_batch(capped, (True, False, True, True))
  native = (kernels.IMPLEMENTATIONS[implementation].native_backend
            if implementation in kernels.IMPLEMENTATIONS else None)
  mode = (None if native is None or interpret is None
          else kernels.interpret_mode(native, interpret))
  def fn(hidden, weight, targets, mask):
    return kernels.linear_sequence_logprobs(
        hidden, weight, targets, mask, implementation=implementation,
        interpret=mode)
  rows = per_device.over_batch(fn, (True, False, True, True))
  vocab = kernels.vocab_parallel(
      None, vocab_axis=partitioning.MODEL_AXIS,
      batch_axes=partitioning.BATCH_AXES, implementation=implementation,
      interpret=mode)

  def dispatch(hidden, weight, targets, mask):
    # Padding ids may be negative (decoder-only batches pad with -1); a
    # masked position's id only has to index the vocabulary.
    targets = jnp.where(mask, targets, 0)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and dict(zip(mesh.axis_names, mesh.axis_sizes)).get(
        partitioning.MODEL_AXIS, 1) > 1:
      # The projection is split over V on `model` (partitioning.RULES):
      # each device's shard, combined across the axis, never gathered.
      return vocab(hidden, weight, targets, mask)
    return rows(hidden, weight, targets, mask)
  return dispatch


def _softcap(config) -> float | None:
  return getattr(config, "final_logit_softcapping", None)


def policy_network(config: models.T5Config | models.DecoderConfig
                   ) -> hk.MultiTransformed:
  """The policy's network by its config: T5, or a decoder-only LLM.

  Both apply tuples (models.T5Apply, models.DecoderApply) share `decode`
  (-> models.DecoderStates) and `logits`, which is all the losses use.
  """
  if isinstance(config, models.DecoderConfig):
    return models.decoder(config)
  return models.t5(config)


def sequence_logprobs(policy: models.T5Apply | models.DecoderApply,
                      params: Any,
                      rng: jax.Array | None, inputs: jax.Array,
                      targets: jax.Array, mask: jax.Array, *,
                      is_training: bool,
                      kernel: Callable[..., jax.Array]) -> jax.Array:
  """log π(targets | inputs) [B] through the fused linear kernel."""
  states = policy.decode(params, rng, inputs, targets,
                         is_training=is_training)
  return kernel(states.hidden, states.weight, targets, mask)


def sum_of_squares(tree) -> jax.Array:
  """Σ g² over every element of every leaf, in float32.

  One pass over the gradients gives both the global norm (its square root)
  and the non-finite check: a NaN or ±inf anywhere makes the sum NaN or
  inf. (So does a sum past float32's range, about 3.4e38, i.e. a gradient
  norm above 1.8e19; such an update is treated as non-finite too.) A
  separate isfinite pass would make XLA:CPU write a pred array as large as
  the gradients.
  """
  return sum((jnp.sum(jnp.square(g.astype(jnp.float32)))
              for g in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


class LossContext(NamedTuple):
  """What an algorithm's loss reads besides parameters, batch and key.

  algorithm: what is optimised.
  policy: the policy's functions (policy_network(config).apply).
  value_net: the value network's apply (value.value_network), or None for
    an algorithm without one.
  kernel: the log-probability kernel (logprob_kernel).
  """
  algorithm: AlgorithmConfig
  policy: models.T5Apply | models.DecoderApply
  value_net: Callable[..., jax.Array] | None
  kernel: Callable[..., jax.Array]

  def logprobs(self, params, rng, inputs, targets, mask) -> jax.Array:
    """log π(targets | inputs) [B] with dropout (training)."""
    return sequence_logprobs(self.policy, params, rng, inputs, targets, mask,
                             is_training=True, kernel=self.kernel)


# A batch's loss: (context, policy_params, value_params, batch, rng) ->
# (loss, metrics), differentiated in both parameter sets.
LossFn = Callable[[LossContext, Any, Any, dict, jax.Array],
                  tuple[jax.Array, dict]]


def dro_v_batch_loss(context: LossContext, policy_params: Any,
                     value_params: Any, batch: dict, rng: jax.Array
                     ) -> tuple[jax.Array, dict]:
  """DRO-V (losses.dro_v_loss) with V(x) from the value network."""
  algorithm = context.algorithm
  policy_rng, value_rng = jax.random.split(rng)
  inputs, targets = batch["inputs"], batch["targets"]
  states = context.policy.decode(policy_params, policy_rng, inputs, targets,
                                 is_training=True)
  values = context.value_net(value_params, value_rng, inputs, states.encoded,
                             is_training=True)
  logp = context.kernel(states.hidden, states.weight, targets,
                        batch["target_mask"])
  if algorithm.value_granularity == "per_batch":
    values = jnp.broadcast_to(jnp.mean(values), values.shape)
  return losses.dro_v_loss(logp, batch["ref_logprobs"], values,
                           batch["rewards"], tau=algorithm.tau,
                           rescale_policy_grad=algorithm.rescale_policy_grad)


def _two_completions(context: LossContext, policy_params: Any,
                     rng: jax.Array, batch: dict, first: tuple[str, str],
                     second: tuple[str, str]) -> tuple[jax.Array, jax.Array]:
  """log π of two completions per prompt, in one forward.

  `first` and `second` name a completion's (targets, mask) in the batch.
  """
  batch_size = batch["inputs"].shape[0]
  logp = context.logprobs(
      policy_params, rng, jnp.concatenate([batch["inputs"]] * 2),
      jnp.concatenate([batch[first[0]], batch[second[0]]]),
      jnp.concatenate([batch[first[1]], batch[second[1]]]))
  return logp[:batch_size], logp[batch_size:]


def kto_batch_loss(context: LossContext, policy_params: Any,
                   value_params: Any, batch: dict, rng: jax.Array
                   ) -> tuple[jax.Array, dict]:
  """KTO (losses.kto_loss) against the batch's mismatched completions."""
  del value_params
  algorithm = context.algorithm
  # One forward for the examples and their mismatched completions.
  logp, mismatched = _two_completions(
      context, policy_params, rng, batch, ("targets", "target_mask"),
      ("mismatched_targets", "mismatched_mask"))
  return losses.kto_loss(
      logp, batch["ref_logprobs"], batch["rewards"],
      mismatched, batch["mismatched_ref_logprobs"],
      beta=algorithm.beta,
      desirable_weight=algorithm.kto_desirable_weight,
      undesirable_weight=algorithm.kto_undesirable_weight)


def sft_batch_loss(context: LossContext, policy_params: Any,
                   value_params: Any, batch: dict, rng: jax.Array
                   ) -> tuple[jax.Array, dict]:
  """Supervised fine-tuning: the negative log-likelihood per target token."""
  del value_params
  mask = batch["target_mask"]
  logp = context.logprobs(policy_params, rng, batch["inputs"],
                          batch["targets"], mask)
  loss = -jnp.sum(logp) / jnp.maximum(jnp.sum(mask), 1)
  return loss, {"loss": loss, "logprob_mean": jnp.mean(logp)}


def pairwise_batch_loss(context: LossContext, policy_params: Any,
                        value_params: Any, batch: dict, rng: jax.Array
                        ) -> tuple[jax.Array, dict]:
  """DPO, IPO or SLiC (losses.pairwise_loss, kind = the algorithm)."""
  del value_params
  algorithm = context.algorithm
  chosen, rejected = _two_completions(
      context, policy_params, rng, batch, ("chosen", "chosen_mask"),
      ("rejected", "rejected_mask"))
  return losses.pairwise_loss(
      chosen, rejected, batch["chosen_ref_logprobs"],
      batch["rejected_ref_logprobs"], beta=algorithm.beta,
      kind=algorithm.algo)


LOSSES: dict[str, LossFn] = {
    "dro_v": dro_v_batch_loss, "kto": kto_batch_loss, "sft": sft_batch_loss,
    "dpo": pairwise_batch_loss, "ipo": pairwise_batch_loss,
    "slic": pairwise_batch_loss}


def _init(policy_params, value_params, rng, *,
          policy_optimizer: optax.GradientTransformation,
          value_optimizer: optax.GradientTransformation | None,
          lora_config: models.LoraConfig | None) -> TrainState:
  """The first TrainState; value_optimizer None: no value network.

  With lora_config, policy_params are the adapted model's (adapters and
  base, init.init_params): the adapters train, the base is frozen.
  """
  has_value = value_optimizer is not None
  value_params = value_params if has_value else {}
  frozen = None
  if lora_config is not None:
    if not lora.has_adapters(policy_params):
      raise ValueError("the policy config has `lora` but its parameters "
                       "have no adapters: build them with "
                       "training.init.init_params.")
    policy_params, frozen = lora.split(policy_params)
    frozen = lora.freeze(frozen, lora_config)
  return TrainState(
      step=jnp.zeros((), jnp.int32), policy_params=policy_params,
      value_params=value_params,
      policy_opt_state=policy_optimizer.init(policy_params),
      value_opt_state=value_optimizer.init(value_params) if has_value else {},
      rng=rng, bad_steps=jnp.zeros((), jnp.int32), frozen_params=frozen)


def _update(state: TrainState, batch: dict, *,
            loss_fn: Callable[..., tuple[jax.Array, dict]],
            policy_optimizer: optax.GradientTransformation,
            value_optimizer: optax.GradientTransformation | None,
            learning_rates: Callable[[jax.Array], dict] | None
            ) -> tuple[TrainState, dict]:
  """One guarded step of loss_fn(policy_params, value_params, batch, rng).

  value_optimizer None: no value network (its parameters stay {}).
  """
  rng, step_rng = jax.random.split(state.rng)

  def loss_of(policy_params, value_params):
    # Differentiated in what trains: a LoRA policy's adapters only.
    return loss_fn(state._replace(policy_params=policy_params).policy,
                   value_params, batch, step_rng)

  (loss, metrics), (policy_grads, value_grads) = jax.value_and_grad(
      loss_of, argnums=(0, 1), has_aux=True)(
          state.policy_params, state.value_params)
  # Non-finite guard: a NaN/inf loss or gradient skips the whole update
  # (parameters and optimizer states stay as they were) and is counted,
  # and so does an update that would make a parameter non-finite (a
  # finite gradient times an absurd learning rate), or the parameters'
  # sum of squares overflow float32 (a norm above 1.8e19: diverged; see
  # sum_of_squares). lax.cond runs only the taken branch, so a good step
  # pays no select over every parameter and optimizer-state array; the
  # parameter check is one reduction.
  policy_sq, value_sq = sum_of_squares(policy_grads), sum_of_squares(
      value_grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(policy_sq + value_sq)
  operands = (state.policy_params, state.value_params,
              state.policy_opt_state, state.value_opt_state)

  def apply(operands):
    policy_params, value_params, policy_opt_state, value_opt_state = operands
    updates, policy_opt_state = policy_optimizer.update(
        policy_grads, policy_opt_state, policy_params)
    policy_params = optax.apply_updates(policy_params, updates)
    if value_optimizer is not None:
      updates, value_opt_state = value_optimizer.update(
          value_grads, value_opt_state, value_params)
      value_params = optax.apply_updates(value_params, updates)
    updated = (policy_params, value_params, policy_opt_state,
               value_opt_state)
    kept = jnp.isfinite(sum_of_squares(policy_params) +
                        sum_of_squares(value_params))
    return jax.lax.cond(kept, lambda: updated, lambda: operands), kept

  (policy_params, value_params, policy_opt_state,
   value_opt_state), applied = jax.lax.cond(
       finite, apply, lambda operands: (operands, jnp.array(False)),
       operands)
  bad_steps = jnp.where(applied, 0, state.bad_steps + 1)
  metrics = dict(metrics, policy_grad_norm=jnp.sqrt(policy_sq),
                 value_grad_norm=jnp.sqrt(value_sq),
                 skipped_update=1.0 - applied.astype(jnp.float32),
                 consecutive_bad_steps=bad_steps)
  if learning_rates is not None:
    metrics.update(learning_rates(state.step))
  new_state = TrainState(state.step + 1, policy_params, value_params,
                         policy_opt_state, value_opt_state, rng, bad_steps,
                         state.frozen_params)
  return new_state, metrics


def build_trainer(algorithm: AlgorithmConfig,
                  model_config: models.T5Config | models.DecoderConfig,
                  policy_optimizer: optax.GradientTransformation,
                  value_optimizer: optax.GradientTransformation | None,
                  learning_rates: Callable[[jax.Array], dict] | None = None,
                  mesh: Mesh | None = None,
                  value_config: models.DecoderConfig | None = None
                  ) -> Trainer:
  """The Trainer of one algorithm: its loss (LOSSES) and optimizers.

  Args:
    algorithm: what to optimise.
    model_config: the policy's config (T5Config or DecoderConfig), also
      the separate value network's unless value_config is given.
    policy_optimizer: optax transformation for the policy.
    value_optimizer: optax transformation for the value network (used only
      when algorithm.has_value; may be None otherwise).
    learning_rates: step -> {"policy_lr": ..., "value_lr": ...} for metrics.
    mesh: the devices the update is sharded over; init and update are
      traced under it (jax.sharding.use_abstract_mesh), so that custom
      kernels run per device (models.per_device). None: one device.
    value_config: a separate value network's own DecoderConfig (a smaller
      model of the same tokenizer, RunConfig.value_model); None: the
      policy's.

  With model_config.lora, init takes the adapted policy's parameters
  (training.init.init_params) and the state trains only its adapters
  (TrainState.frozen_params).

  Returns:
    Trainer(init(policy_params, value_params, rng), update(state, batch)).
  """
  if algorithm.has_value and value_optimizer is None:
    raise ValueError(f"algo {algorithm.algo!r} trains a value network: "
                     "value_optimizer must not be None.")
  value_optimizer = value_optimizer if algorithm.has_value else None
  context = LossContext(
      algorithm, policy_network(model_config).apply,
      value.value_network(value_config or model_config,
                          algorithm.value_net).apply
      if algorithm.has_value else None,
      logprob_kernel(algorithm.implementation, algorithm.interpret,
                     _softcap(model_config)))
  init = functools.partial(_init, policy_optimizer=policy_optimizer,
                           value_optimizer=value_optimizer,
                           lora_config=model_config.lora)
  update = functools.partial(
      _update, loss_fn=functools.partial(LOSSES[algorithm.algo], context),
      policy_optimizer=policy_optimizer, value_optimizer=value_optimizer,
      learning_rates=learning_rates)
  if mesh is None:
    return Trainer(init=init, update=update)
  return Trainer(init=_under_mesh(init, mesh), update=_under_mesh(update, mesh))


def _under_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """fn traced with `mesh` as the ambient (abstract) mesh."""
  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return wrapped


def reference_logprob_fn(model_config: models.T5Config | models.DecoderConfig,
                         implementation: str | None,
                         interpret: bool | None = None):
  """A jitted (params, inputs, targets, mask) -> [B] log π (no dropout).

  `implementation` and `interpret` are as for logprob_kernel.
  """
  policy = policy_network(model_config).apply
  kernel = logprob_kernel(implementation, interpret, _softcap(model_config))

  @jax.jit
  def fn(params, inputs, targets, mask):
    return sequence_logprobs(policy, params, None, inputs, targets, mask,
                             is_training=False, kernel=kernel)

  return fn
