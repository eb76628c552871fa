"""Optimisers: the paper's Adafactor (decay rate 0.8) with linear warm-up."""

from __future__ import annotations

import optax


def learning_rate_schedule(learning_rate: float,
                           warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to learning_rate over warmup_steps, then constant."""
  if warmup_steps <= 0:
    return optax.constant_schedule(learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps),
       optax.constant_schedule(learning_rate)], [warmup_steps])


def make_optimizer(learning_rate: float, warmup_steps: int = 150,
                   decay_rate: float = 0.8,
                   clip_norm: float | None = None
                   ) -> optax.GradientTransformation:
  """Adafactor as the paper trains (decay rate 0.8, warm-up, optional clip).

  Args:
    learning_rate: the peak learning rate (paper: 1e-4).
    warmup_steps: linear warm-up steps (paper: 150).
    decay_rate: Adafactor's second-moment decay exponent (paper: 0.8).
    clip_norm: clip gradients to this global norm first; None: no clipping.

  Returns:
    An optax transformation.
  """
  adafactor = optax.adafactor(
      learning_rate=learning_rate_schedule(learning_rate, warmup_steps),
      decay_rate=decay_rate)
  if clip_norm:
    return optax.chain(optax.clip_by_global_norm(clip_norm), adafactor)
  return adafactor
