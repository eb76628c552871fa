"""Pairwise preference losses (paper §2) for comparison with DRO.

z = β · ((log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)))
DPO: log(1 + e^(−z));  SLiC: max(0, 1 − z);  IPO: (z − 1)².
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAIRWISE_KINDS = {
    "dpo": lambda z: jax.nn.softplus(-z),
    "slic": lambda z: jax.nn.relu(1.0 - z),
    "ipo": lambda z: jnp.square(z - 1.0),
}


def pairwise_loss(chosen_logprobs: jax.Array, rejected_logprobs: jax.Array,
                  chosen_ref_logprobs: jax.Array,
                  rejected_ref_logprobs: jax.Array, *, beta: float,
                  kind: str = "dpo"
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean f(z) over [B] preference pairs.

  Args:
    chosen_logprobs: [B] log π(y_w|x).
    rejected_logprobs: [B] log π(y_l|x).
    chosen_ref_logprobs: [B] log π_ref(y_w|x) (constant).
    rejected_ref_logprobs: [B] log π_ref(y_l|x) (constant).
    beta: β.
    kind: "dpo", "ipo" or "slic".

  Returns:
    (loss scalar, metrics dict).
  """
  if kind not in PAIRWISE_KINDS:
    raise ValueError(f"Unknown pairwise loss kind {kind!r}; choose one of "
                     f"{sorted(PAIRWISE_KINDS)}.")
  sg = jax.lax.stop_gradient
  margin = ((chosen_logprobs - sg(chosen_ref_logprobs))
            - (rejected_logprobs - sg(rejected_ref_logprobs)))
  z = beta * margin
  loss = jnp.mean(PAIRWISE_KINDS[kind](z))
  return loss, {"loss": loss, "accuracy": jnp.mean((z > 0).astype(
      jnp.float32)), "margin_mean": jnp.mean(margin)}
