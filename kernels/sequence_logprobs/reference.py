"""The "xla" implementation: plain jnp, differentiated by JAX's autodiff.

This is what a user would write by hand, and the baseline every kernel is
measured against. It materialises float32 log-softmax temporaries [N, V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dro_fast.kernels import config


def token_logprobs(logits: jax.Array, targets: jax.Array,
                   block_sizes: config.BlockSizes | None = None,
                   interpret=None) -> tuple[jax.Array, jax.Array]:
  """log_softmax(logits)[n, targets[n]] and the log-sum-exp, per row.

  Args:
    logits: [N, V] float32 or bfloat16.
    targets: [N] int32 in [0, V).
    block_sizes: unused (no tiling).
    interpret: unused.

  Returns:
    (logprobs [N] float32, lse [N] float32).
  """
  del block_sizes, interpret
  x = logits.astype(jnp.float32)                              # [N, V]
  lse = jax.nn.logsumexp(x, axis=-1)                          # [N]
  target_logit = jnp.take_along_axis(x, targets[:, None], axis=-1)[:, 0]
  return target_logit - lse, lse


def token_logprobs_bwd(logits: jax.Array, targets: jax.Array, lse: jax.Array,
                       g: jax.Array, block_sizes=None,
                       interpret=None) -> jax.Array:
  """d logprobs / d logits contracted with g: g · (onehot − softmax).

  Args:
    logits: [N, V].
    targets: [N] int32.
    lse: [N] float32, the saved log-sum-exp.
    g: [N] float32 cotangent of the per-row log-probabilities.
    block_sizes: unused.
    interpret: unused.

  Returns:
    [N, V] in logits.dtype. XLA fuses this into one pass over the logits.
  """
  del block_sizes, interpret
  x = logits.astype(jnp.float32)
  probs = jnp.exp(x - lse[:, None])                           # [N, V]
  onehot = targets[:, None] == jnp.arange(x.shape[-1])[None, :]
  return (g[:, None] * (onehot - probs)).astype(logits.dtype)
