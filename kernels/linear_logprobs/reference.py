"""The "xla" implementation: logits = hidden @ weight, then log-softmax.

Materialises the float32 logits [N, V]; differentiated by JAX's autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dro_fast.kernels.sequence_logprobs import reference


def logits_of(hidden: jax.Array, weight: jax.Array) -> jax.Array:
  """[N, D] @ [D, V] with float32 accumulation -> [N, V] float32."""
  return jnp.dot(hidden, weight, preferred_element_type=jnp.float32)


def linear_token_logprobs(hidden, weight, targets, block_sizes=None,
                          interpret=None):
  """Row log-probabilities of targets under softmax(hidden @ weight).

  Args:
    hidden: [N, D].
    weight: [D, V].
    targets: [N] int32.
    block_sizes: unused.
    interpret: unused.

  Returns:
    (logprobs [N] float32, lse [N] float32).
  """
  return reference.token_logprobs(logits_of(hidden, weight), targets,
                                  block_sizes, interpret)


def linear_token_logprobs_bwd(hidden, weight, targets, lse, g,
                              block_sizes=None, interpret=None):
  """(d hidden, d weight) of Σ_n g_n · logprobs_n, with materialised logits."""
  del block_sizes, interpret
  dlogits = reference.token_logprobs_bwd(logits_of(hidden, weight), targets,
                                         lse, g)                  # [N, V] f32
  dhidden = jnp.dot(dlogits, weight.T.astype(jnp.float32))
  dweight = jnp.dot(hidden.T.astype(jnp.float32), dlogits)
  return dhidden.astype(hidden.dtype), dweight.astype(weight.dtype)
