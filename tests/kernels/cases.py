"""Shared inputs and tolerances for the kernel tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dro_fast import kernels

# Small tiles so tiny shapes still cross row and vocabulary tile boundaries:
# V = 300 leaves a 44-wide vocab tail, B·T = 10 rows a 2-row tail.
SMALL_BLOCKS = kernels.BlockSizes(rows=8, vocab=128, hidden=16,
                                  vocab_chunk=128)

IMPLEMENTATIONS = sorted(kernels.IMPLEMENTATIONS)
DTYPES = (jnp.float32, jnp.bfloat16)

# Tolerances by input dtype. Outputs are float32 sums accumulated in float32;
# gradients come back in the input dtype (bfloat16: 8 bits of mantissa).
TOLERANCES = {
    "float32": dict(value=dict(rtol=2e-5, atol=2e-4),
                    grad=dict(rtol=1e-4, atol=2e-5)),
    "bfloat16": dict(value=dict(rtol=2e-5, atol=2e-4),
                     grad=dict(rtol=2e-2, atol=4e-3)),
}


def tolerance(dtype, kind: str) -> dict:
  return TOLERANCES[jnp.dtype(dtype).name][kind]


def random_inputs(seed: int, batch: int, time: int, vocab: int, dtype,
                  scale: float = 3.0):
  """Random logits (never zeros), targets, a mask with a fully masked row."""
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.normal(size=(batch, time, vocab)) * scale, dtype)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, time)), jnp.int32)
  mask = rng.random((batch, time)) < 0.7
  mask[0, 0] = True
  if batch > 1:
    mask[-1] = False                       # an all-masked row
  cotangent = jnp.asarray(rng.normal(size=(batch,)) + 1.5, jnp.float32)
  return logits, targets, jnp.asarray(mask), cotangent


def close(actual, expected, **tol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, **tol)
