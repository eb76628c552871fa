"""The DRO-V loss (paper §3, Eq. 4, 7, 8).

δ_i = r_i − V(x_i) − τ · (log π(y_i|x_i) − log π_ref(y_i|x_i)),
L = ½ · mean_i δ_i².

Its gradients are Eq. 7 and Eq. 8 of the paper:
  ∂L/∂V_i       = −δ_i / B                    (value, Eq. 7)
  ∂L/∂log π_i   = −τ · δ_i / B                (policy, Eq. 8)
DRO-V rescales the policy gradient by 1/τ (§3.3, "policy learning rate
rescaling"), giving −δ_i / B. Algorithm 1 prints the regulariser as
½∇(log π/π_ref)², which agrees with Eq. 8 only at τ = 1; we follow Eq. 8
with the rescale, keeping the loss value unchanged and scaling only the
gradient that flows into log π.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity in the forward pass; multiplies the cotangent by `scale`."""
  del scale
  return x


def _scale_gradient_fwd(x, scale):
  return x, scale


def _scale_gradient_bwd(scale, g):
  return g * scale, jnp.zeros_like(scale)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def _check_shapes(**arrays):
  shapes = {name: jnp.shape(x) for name, x in arrays.items()}
  first = next(iter(shapes.values()))
  if len(first) != 1 or any(s != first for s in shapes.values()):
    raise ValueError(f"expected matching [B] arrays; got shapes {shapes}.")


def dro_v_loss(logprobs: jax.Array, ref_logprobs: jax.Array,
               values: jax.Array, rewards: jax.Array, *,
               tau: float | jax.Array,
               rescale_policy_grad: bool = True
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """½ · mean δ² with the DRO-V gradients.

  Args:
    logprobs: [B] log π_θ(y|x), summed over the completion.
    ref_logprobs: [B] log π_ref(y|x); treated as a constant.
    values: [B] V_φ(x). A single value per batch (the paper's Figure 5
      variant) is a [B] broadcast of one scalar.
    rewards: [B] normalised rewards.
    tau: regularisation strength τ > 0.
    rescale_policy_grad: scale the gradient into logprobs by 1/τ (DRO-V).

  Returns:
    (loss scalar, metrics dict of scalars).
  """
  _check_shapes(logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
                rewards=rewards)
  logprobs = logprobs.astype(jnp.float32)
  if rescale_policy_grad:
    logprobs = scale_gradient(logprobs, 1.0 / jnp.asarray(tau, jnp.float32))
  log_ratio = logprobs - jax.lax.stop_gradient(
      ref_logprobs.astype(jnp.float32))
  residual = (rewards.astype(jnp.float32) - values.astype(jnp.float32)
              - tau * log_ratio)                                 # [B]
  loss = 0.5 * jnp.mean(jnp.square(residual))
  metrics = {
      "loss": loss,
      "residual_mean": jnp.mean(residual),
      "residual_std": jnp.std(residual),
      "value_mean": jnp.mean(values),
      "reward_mean": jnp.mean(rewards),
      "log_ratio_mean": jnp.mean(log_ratio),
      "log_ratio_std": jnp.std(log_ratio),
  }
  return loss, metrics
