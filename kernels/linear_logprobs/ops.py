"""Public op: sequence log-probabilities from hidden states and a projection.

The [B, T, V] logits are never materialised.

Glossary: B batch, T target length, D hidden width, V vocabulary, N = B·T.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dro_fast.kernels import config
from dro_fast.kernels import registry
from dro_fast.kernels import validation
from dro_fast.kernels.sequence_logprobs import ops as sequence_ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows_custom_vjp(static: config.CallConfig, hidden, weight, targets):
  impl = registry.get(static.implementation)
  logprobs, _ = impl.linear_token_logprobs(hidden, weight, targets,
                                           static.block_sizes,
                                           static.interpret)
  return logprobs


def _rows_fwd(static, hidden, weight, targets):
  impl = registry.get(static.implementation)
  logprobs, lse = impl.linear_token_logprobs(hidden, weight, targets,
                                             static.block_sizes,
                                             static.interpret)
  return logprobs, (hidden, weight, targets, lse)


def _rows_bwd(static, residuals, g):
  hidden, weight, targets, lse = residuals
  impl = registry.get(static.implementation)
  dhidden, dweight = impl.linear_token_logprobs_bwd(
      hidden, weight, targets, lse, g.astype(jnp.float32), static.block_sizes,
      static.interpret)
  return dhidden, dweight, None


_rows_custom_vjp.defvjp(_rows_fwd, _rows_bwd)


def linear_token_logprobs(hidden: jax.Array, weight: jax.Array,
                          targets: jax.Array, *,
                          implementation: str | None = None,
                          block_sizes: config.BlockSizes | None = None,
                          interpret: Any = None) -> jax.Array:
  """log_softmax(hidden @ weight)[..., targets] per position, float32.

  Args:
    hidden: [..., D] float32 or bfloat16.
    weight: [D, V] the output projection.
    targets: [...] integer ids in [0, V).
    implementation, block_sizes, interpret: as for sequence_logprobs.

  Returns:
    [...] float32, differentiable w.r.t. hidden and weight.
  """
  validation.check_floating("hidden", hidden)
  validation.check_floating("weight", weight)
  if weight.ndim != 2 or weight.shape[0] != hidden.shape[-1]:
    raise ValueError(f"weight must be [D, V] with D = hidden.shape[-1] = "
                     f"{hidden.shape[-1]}; got {tuple(weight.shape)}.")
  if tuple(targets.shape) != tuple(hidden.shape[:-1]):
    raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])}; "
                     f"got {tuple(targets.shape)}.")
  impl = registry.get(implementation)
  rows = hidden.reshape(-1, hidden.shape[-1])                     # [N, D]
  flat_targets = targets.reshape(-1).astype(jnp.int32)
  if impl.autodiff:
    logprobs, _ = impl.linear_token_logprobs(rows, weight, flat_targets,
                                             block_sizes, interpret)
  else:
    logprobs = _rows_custom_vjp(
        config.CallConfig(impl.name, block_sizes, interpret), rows, weight,
        flat_targets)
  return logprobs.reshape(targets.shape)


def linear_sequence_logprobs(hidden: jax.Array, weight: jax.Array,
                             targets: jax.Array, mask: jax.Array, *,
                             implementation: str | None = None,
                             block_sizes: config.BlockSizes | None = None,
                             interpret: Any = None) -> jax.Array:
  """sequence_logprobs(hidden @ weight, targets, mask) without the logits.

  Args:
    hidden: [B, T, D] final decoder states (after any output scaling).
    weight: [D, V] output projection.
    targets: [B, T] token ids.
    mask: [B, T] bool or 0/1.
    implementation, block_sizes, interpret: as for sequence_logprobs.

  Returns:
    [B] float32, differentiable w.r.t. hidden and weight.
  """
  if hidden.ndim != 3:
    raise ValueError(f"hidden must be [B, T, D], got shape {hidden.shape}.")
  validation.check_targets_mask(targets, mask, tuple(hidden.shape[:2]),
                                "hidden [B, T, D]")
  per_token = linear_token_logprobs(hidden, weight, targets,
                                    implementation=implementation,
                                    block_sizes=block_sizes,
                                    interpret=interpret)
  return sequence_ops.masked_sum(per_token, mask)
