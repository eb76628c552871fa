"""Public ops: sequence log-probabilities and the DRO residual from logits.

Glossary: B batch, T target length, V vocabulary, N = B·T rows.

The kernels work on rows: logits [B,T,V] are viewed as [N,V] (a free reshape)
and one pass over them yields each row's log-probability of its target and
its log-sum-exp (the only saved residual). The mask and the sum over T are
O(N) work outside the kernel; autodiff through them hands the kernel's
backward the per-row cotangent g_b·mask_bt, from which it rebuilds
g·(onehot − softmax) in one more pass, never storing the softmax.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dro_fast.kernels import config
from dro_fast.kernels import registry
from dro_fast.kernels import validation


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows_custom_vjp(static: config.CallConfig, logits, targets):
  impl = registry.get(static.implementation)
  logprobs, _ = impl.token_logprobs(logits, targets, static.block_sizes,
                                    static.interpret)
  return logprobs


def _rows_fwd(static, logits, targets):
  impl = registry.get(static.implementation)
  logprobs, lse = impl.token_logprobs(logits, targets, static.block_sizes,
                                      static.interpret)
  return logprobs, (logits, targets, lse)


def _rows_bwd(static, residuals, g):
  logits, targets, lse = residuals
  impl = registry.get(static.implementation)
  dlogits = impl.token_logprobs_bwd(logits, targets, lse,
                                    g.astype(jnp.float32), static.block_sizes,
                                    static.interpret)
  return dlogits, None


_rows_custom_vjp.defvjp(_rows_fwd, _rows_bwd)


def token_logprobs(logits: jax.Array, targets: jax.Array, *,
                   implementation: str | None = None,
                   block_sizes: config.BlockSizes | None = None,
                   interpret: Any = None) -> jax.Array:
  """log_softmax(logits)[..., targets] for every position, in float32.

  Args:
    logits: [..., V] float32 or bfloat16.
    targets: [...] integer ids in [0, V).
    implementation: a key of IMPLEMENTATIONS, or None to pick by backend.
    block_sizes: tile sizes (None: the implementation's default).
    interpret: Pallas interpret mode (None: interpret unless on the native
      backend; False forces compilation, e.g. to lower for another platform).

  Returns:
    [...] float32 log-probabilities, differentiable w.r.t. logits.
  """
  validation.check_floating("logits", logits)
  if tuple(targets.shape) != tuple(logits.shape[:-1]):
    raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} "
                     f"(logits without the vocab axis); got "
                     f"{tuple(targets.shape)}.")
  impl = registry.get(implementation)
  vocab = logits.shape[-1]
  rows = logits.reshape(-1, vocab)                                # [N, V]
  flat_targets = targets.reshape(-1).astype(jnp.int32)            # [N]
  if impl.autodiff:
    logprobs, _ = impl.token_logprobs(rows, flat_targets, block_sizes,
                                      interpret)
  else:
    logprobs = _rows_custom_vjp(
        config.CallConfig(impl.name, block_sizes, interpret), rows,
        flat_targets)
  return logprobs.reshape(targets.shape)


def masked_sum(token_values: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ_t over positions where mask is nonzero.

  Masked entries are dropped (not multiplied), so garbage in padding cannot
  leak in as NaN.
  """
  return jnp.sum(jnp.where(mask != 0, token_values, 0.0), axis=-1)


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                      *, implementation: str | None = None,
                      block_sizes: config.BlockSizes | None = None,
                      interpret: Any = None) -> jax.Array:
  """Σ_t mask · log_softmax(logits[b, t])[targets[b, t]], per sequence.

  Args:
    logits: [B, T, V] float32 or bfloat16.
    targets: [B, T] integer ids in [0, V) (any value where mask is 0).
    mask: [B, T] bool or 0/1; nonzero marks completion tokens.
    implementation: a key of IMPLEMENTATIONS, or None to pick by backend.
    block_sizes: tile sizes (None: the implementation's default).
    interpret: Pallas interpret mode, see token_logprobs.

  Returns:
    [B] float32 log π(y|x), differentiable w.r.t. logits.
  """
  if logits.ndim != 3:
    raise ValueError(f"logits must be [B, T, V], got shape {logits.shape}.")
  validation.check_targets_mask(targets, mask, tuple(logits.shape[:2]),
                                "logits [B, T, V]")
  per_token = token_logprobs(logits, targets, implementation=implementation,
                             block_sizes=block_sizes, interpret=interpret)
  return masked_sum(per_token, mask)                              # [B]


def dro_residual(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                 rewards: jax.Array, values: jax.Array,
                 ref_logprobs: jax.Array, *, tau: float | jax.Array,
                 implementation: str | None = None,
                 block_sizes: config.BlockSizes | None = None,
                 interpret: Any = None) -> tuple[jax.Array, jax.Array]:
  """DRO residual δ = r − V − τ(log π − log π_ref) (paper Eq. 4's inner term).

  The logits are read in one pass (sequence_logprobs); δ is O(B) work on
  its result. Gradients flow to logits and values (and rewards and
  ref_logprobs, for callers that want them).

  Args:
    logits: [B, T, V] policy logits.
    targets: [B, T] completion token ids.
    mask: [B, T] completion mask.
    rewards: [B] normalised rewards r.
    values: [B] value estimates V(x).
    ref_logprobs: [B] log π_ref(y|x) (sums over the completion).
    tau: the KL regularisation strength τ > 0.
    implementation, block_sizes, interpret: as for sequence_logprobs.

  Returns:
    (residual [B] float32, logprobs [B] float32).
  """
  batch = logits.shape[0]
  for name, x in (("rewards", rewards), ("values", values),
                  ("ref_logprobs", ref_logprobs)):
    validation.check_per_example(name, x, batch)
  logprobs = sequence_logprobs(logits, targets, mask,
                               implementation=implementation,
                               block_sizes=block_sizes, interpret=interpret)
  residual = (rewards.astype(jnp.float32) - values.astype(jnp.float32)
              - tau * (logprobs - ref_logprobs.astype(jnp.float32)))
  return residual, logprobs
