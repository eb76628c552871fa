"""The KTO baseline as the paper runs it (Ethayarajh et al. 2024).

An example is desirable when its reward is above its minibatch's mean reward.
The reference point z0 is the log-ratio of mismatched pairs (completion i+1
scored under prompt i), averaged, detached and clamped at 0:
  desirable:    λ_D · (1 − σ(β · (log_ratio − z0)))
  undesirable:  λ_U · (1 − σ(β · (z0 − log_ratio)))
The loss is the batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mismatched_indices(batch_size: int) -> np.ndarray:
  """Completion index paired with each prompt for the KL estimate: i+1 mod B."""
  if batch_size < 2:
    raise ValueError("KTO's mismatched-pair KL estimate needs a batch of at "
                     f"least 2 examples; got {batch_size}.")
  return np.roll(np.arange(batch_size), -1)


def kto_loss(logprobs: jax.Array, ref_logprobs: jax.Array,
             rewards: jax.Array, mismatched_logprobs: jax.Array,
             mismatched_ref_logprobs: jax.Array, *, beta: float,
             desirable: jax.Array | None = None,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             axis_name: str | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KTO loss on single-trajectory data.

  Args:
    logprobs: [B] log π(y_i|x_i).
    ref_logprobs: [B] log π_ref(y_i|x_i).
    rewards: [B] rewards; ignored when `desirable` is given.
    mismatched_logprobs: [B] log π(y_{m(i)}|x_i), m = mismatched_indices.
    mismatched_ref_logprobs: [B] log π_ref(y_{m(i)}|x_i).
    beta: β, the KTO temperature (the paper's τ).
    desirable: optional [B] bool labels (binary thumbs-up data).
    desirable_weight: λ_D.
    undesirable_weight: λ_U.
    axis_name: a mapped axis to average the batch mean reward and z0 over
      (data parallelism under shard_map / pmap).

  Returns:
    (loss scalar, metrics dict).
  """
  pmean = (lambda x: jax.lax.pmean(x, axis_name)) if axis_name else (
      lambda x: x)
  log_ratio = logprobs - jax.lax.stop_gradient(ref_logprobs)
  if desirable is None:
    desirable = rewards > pmean(jnp.mean(rewards))
  kl = pmean(jnp.mean(mismatched_logprobs - mismatched_ref_logprobs))
  z0 = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
  losses = jnp.where(
      desirable,
      desirable_weight * (1.0 - jax.nn.sigmoid(beta * (log_ratio - z0))),
      undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - log_ratio))))
  loss = jnp.mean(losses)
  metrics = {
      "loss": loss,
      "kl_estimate": z0,
      "desirable_fraction": jnp.mean(desirable.astype(jnp.float32)),
      "log_ratio_mean": jnp.mean(log_ratio),
  }
  return loss, metrics
