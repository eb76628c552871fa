"""Optimisers: the paper's Adafactor (decay rate 0.8) with linear warm-up.

`adafactor` computes optax.adafactor's update with its defaults (factored
second moments, update clipping at RMS 1, scaling by the parameter's RMS,
no momentum) in fewer passes over memory, and keeps optax's state layout,
so states and checkpoints written by either restore into the other.

Why not optax.adafactor itself: the optimizer reads and writes every
parameter-sized array several times and does no arithmetic to speak of, so
its time is memory traffic (benchmarks/RESULTS.md#optimizer). optax's chain materialises the
scaled update between transformations, takes the parameter's RMS twice
(safe_root_mean_squares recomputes it after a select over the whole
parameter) and, on the CPU, reduces the large matrices' leading axes with
XLA:CPU's slow strided reduction. Here:

  - the update is one expression, which XLA fuses into the parameter's
    new value;
  - the parameter's RMS is taken once;
  - with `reduce_with_dots` (a CPU form, off by default), the
    second-moment statistics are dots with vectors (GEMVs): the row and
    column sums of g² + ε, and Σ u² = Σ (g² + ε)·r²·c² − ε·Σ r²·c² as one
    bilinear form of the already materialised g² + ε, instead of another
    pass that materialises u. XLA:CPU reduces the large matrices' leading
    axes slowly; on accelerators reductions fuse with their producers and
    the plain reductions are the right form.

`OptimizerConfig` is the frozen description of one optimizer that a
RunConfig holds; `make_optimizer(**dataclasses.asdict(config))` builds it.
"""

from __future__ import annotations

import dataclasses
import string
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dro_fast.training.config import OptimizerConfig

# One name per axis of a parameter, for einsum.
_AXES = string.ascii_lowercase


def learning_rate_schedule(learning_rate: float,
                           warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to learning_rate over warmup_steps, then constant."""
  if warmup_steps <= 0:
    return optax.constant_schedule(learning_rate)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps),
       optax.constant_schedule(learning_rate)], [warmup_steps])


def factored_axes(shape: tuple[int, ...],
                  min_dim_size_to_factor: int = 128) -> tuple[int, int] | None:
  """(largest, second-largest) axis of a factored parameter, else None.

  optax's rule, which fixes the state's shapes: a parameter of rank >= 2 is
  factored when its second-largest dimension has at least
  min_dim_size_to_factor elements; ties are broken as np.argsort orders
  them, as optax does.
  """
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-1]), int(order[-2])


class _LeafUpdate(NamedTuple):
  update: jax.Array
  v_row: jax.Array
  v_col: jax.Array
  v: jax.Array


def _sum(x: jax.Array, axis: int, with_dots: bool) -> jax.Array:
  """Σ over `axis` of x; as a GEMV (a dot with ones) when with_dots."""
  if not with_dots:
    return jnp.sum(x, axis=axis)
  names = _AXES[:x.ndim]
  return jnp.einsum(f"{names},{names[axis]}->{names.replace(names[axis], '')}",
                    x, jnp.ones((x.shape[axis],), x.dtype),
                    precision=jax.lax.Precision.HIGHEST)


def adafactor(learning_rate: float | optax.Schedule,
              decay_rate: float = 0.8,
              clipping_threshold: float = 1.0,
              min_dim_size_to_factor: int = 128,
              epsilon: float = 1e-30,
              min_scale: float = 1e-3,
              reduce_with_dots: bool = False
              ) -> optax.GradientTransformation:
  """optax.adafactor's update, fused; its state layout.

  Equal to optax.adafactor(learning_rate, decay_rate=decay_rate,
  clipping_threshold=clipping_threshold,
  min_dim_size_to_factor=min_dim_size_to_factor, eps=epsilon) up to float32
  rounding (tests/training/test_optim.py), with the same state pytree.

  Args:
    learning_rate: a float or an optax schedule of the update count.
    decay_rate: the second moments' decay exponent: their decay at update t
      (counting from 1) is 1 - t^-decay_rate.
    clipping_threshold: the update's RMS is clipped to this, per parameter.
    min_dim_size_to_factor: see factored_axes.
    epsilon: added to g² before the second moments are taken.
    min_scale: the smallest parameter RMS the update is scaled by.
    reduce_with_dots: take the statistics as dots with vectors (XLA:CPU's
      fast path) instead of reductions. An explicit choice of the caller:
      the same values, a different program.

  Returns:
    An optax.GradientTransformation.
  """
  if clipping_threshold is None or clipping_threshold <= 0:
    raise ValueError("adafactor: clipping_threshold must be a positive "
                     f"number, got {clipping_threshold!r}.")
  scheduled = callable(learning_rate)

  def init(params):
    factored = optax.scale_by_factored_rms(
        decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
        epsilon=epsilon).init(params)
    schedule_state = (optax.ScaleByScheduleState(
        count=jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState())
    # optax.adafactor's chain: factored rms, block-rms clip, learning rate,
    # parameter scale, sign flip.
    return (factored, optax.EmptyState(), schedule_state, optax.EmptyState(),
            optax.EmptyState())

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("adafactor scales updates by the parameters' RMS: "
                       "pass params to update().")
    factored, clip_state, schedule_state, scale_state, sign_state = state
    with_dots = reduce_with_dots
    t = jnp.asarray(factored.count + 1, jnp.float32)
    decay = 1.0 - t ** (-decay_rate)
    if scheduled:
      lr = learning_rate(schedule_state.count)
      schedule_state = optax.ScaleByScheduleState(
          count=optax.safe_increment(schedule_state.count))
    else:
      lr = learning_rate

    def leaf(g, v_row, v_col, v, p):
      g = g.astype(jnp.float32)
      g2 = g * g + epsilon
      axes = factored_axes(p.shape, min_dim_size_to_factor)
      if axes is None:
        v = (decay * v + (1.0 - decay) * g2).astype(v.dtype)
        u = g * jax.lax.rsqrt(v.astype(jnp.float32))
        mean_u2 = jnp.mean(u * u)
      else:
        big, small = axes
        v_row = (decay * v_row + (1.0 - decay) * _sum(
            g2, big, with_dots) / p.shape[big]).astype(v_row.dtype)
        v_col = (decay * v_col + (1.0 - decay) * _sum(
            g2, small, with_dots) / p.shape[small]).astype(v_col.dtype)
        small_in_row = small - 1 if small > big else small
        row = v_row.astype(jnp.float32)
        row2 = jnp.mean(row, axis=small_in_row, keepdims=True) / row  # r²
        col2 = 1.0 / v_col.astype(jnp.float32)                        # c²
        u = g * jnp.sqrt(jnp.expand_dims(row2, big)) * jnp.sqrt(
            jnp.expand_dims(col2, small))
        if with_dots:
          names = _AXES[:p.ndim]
          row_names = names.replace(names[big], "")
          col_names = names.replace(names[small], "")
          hi = jax.lax.Precision.HIGHEST
          total = jnp.einsum(f"{names},{row_names},{col_names}->", g2, row2,
                             col2, precision=hi) - epsilon * jnp.einsum(
                                 f"{row_names},{col_names}->", row2, col2,
                                 precision=hi)
          # Cancellation can leave a tiny negative total for gradients near
          # √ε; Σ u² is non-negative.
          mean_u2 = jnp.maximum(total, 0.0) / p.size
        else:
          mean_u2 = jnp.mean(u * u)
      clip = jnp.maximum(1.0, jnp.sqrt(mean_u2) / clipping_threshold)
      rms = jnp.sqrt(jnp.mean(jnp.square(p.astype(jnp.float32))))
      scale = jnp.where(rms <= min_scale, min_scale, rms)
      return _LeafUpdate((-(lr * scale / clip) * u).astype(p.dtype), v_row,
                         v_col, v)

    out = jax.tree.map(leaf, grads, factored.v_row, factored.v_col,
                       factored.v, params)
    field = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda x:
                                   isinstance(x, _LeafUpdate))
    factored = optax.FactoredState(
        count=optax.safe_increment(factored.count), v_row=field(1),
        v_col=field(2), v=field(3))
    return field(0), (factored, clip_state, schedule_state, scale_state,
                      sign_state)

  return optax.GradientTransformation(init, update)


def optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """The optax transformation an OptimizerConfig describes."""
  return make_optimizer(**dataclasses.asdict(config))


def schedule(config: OptimizerConfig) -> optax.Schedule:
  """The learning rate by step, for metrics."""
  return learning_rate_schedule(config.learning_rate, config.warmup_steps)


def make_optimizer(learning_rate: float, warmup_steps: int = 150,
                   decay_rate: float = 0.8,
                   clip_norm: float | None = None,
                   reduce_with_dots: bool = False
                   ) -> optax.GradientTransformation:
  """Adafactor as the paper trains (decay rate 0.8, warm-up, optional clip).

  Args:
    learning_rate: the peak learning rate (paper: 1e-4).
    warmup_steps: linear warm-up steps (paper: 150).
    decay_rate: Adafactor's second-moment decay exponent (paper: 0.8).
    clip_norm: clip gradients to this global norm first; None: no clipping.
    reduce_with_dots: Adafactor's statistics as GEMVs (see `adafactor`).

  Returns:
    An optax transformation (`adafactor` above: optax.adafactor's update
    and state layout).
  """
  transform = adafactor(learning_rate_schedule(learning_rate, warmup_steps),
                        decay_rate=decay_rate,
                        reduce_with_dots=reduce_with_dots)
  if clip_norm:
    return optax.chain(optax.clip_by_global_norm(clip_norm), transform)
  return transform
