"""Argument checks shared by the public ops: errors name the argument."""

from __future__ import annotations

import jax.numpy as jnp


def check_floating(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point (float32 or bfloat16), "
                    f"got dtype {x.dtype}.")


def check_targets_mask(targets, mask, batch_time: tuple[int, int],
                       where: str) -> None:
  """targets [B,T] integer and mask [B,T] matching `batch_time` (B, T)."""
  if tuple(targets.shape) != batch_time:
    raise ValueError(f"targets must have shape {batch_time} to match "
                     f"{where}; got {tuple(targets.shape)}.")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise TypeError(f"targets must be integer token ids, got {targets.dtype}.")
  if tuple(mask.shape) != batch_time:
    raise ValueError(f"mask must have shape {batch_time} to match {where}; "
                     f"got {tuple(mask.shape)}.")


def check_per_example(name: str, x, batch: int) -> None:
  if tuple(jnp.shape(x)) != (batch,):
    raise ValueError(f"{name} must have shape ({batch},) (one value per "
                     f"example); got {tuple(jnp.shape(x))}.")
