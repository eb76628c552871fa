"""Independent float64 NumPy references for the kernels' forward and VJP.

benchmarks/gpu_numerics.py measures every native implementation on a device
against these; they use NumPy only, so they share no code with the kernels.
"""

from __future__ import annotations

import numpy as np


def _f64(x) -> np.ndarray:
  return np.asarray(np.asarray(x).astype(np.float32), np.float64)


def token_logprobs(logits, targets):
  """([..., V], [...]) -> (log-probs [...], softmax [..., V]) in float64."""
  x = _f64(logits)
  m = x.max(axis=-1, keepdims=True)
  e = np.exp(x - m)
  lse = m[..., 0] + np.log(e.sum(axis=-1))
  tgt = np.take_along_axis(x, np.asarray(targets)[..., None], axis=-1)[..., 0]
  return tgt - lse, e / e.sum(axis=-1, keepdims=True)


def sequence_logprobs(logits, targets, mask):
  lp, _ = token_logprobs(logits, targets)
  return (lp * (np.asarray(mask) != 0)).sum(axis=-1)


def sequence_logprobs_vjp(logits, targets, mask, g):
  """d/d logits of Σ_b g_b · sequence_logprobs_b: g·mask·(onehot − softmax)."""
  _, probs = token_logprobs(logits, targets)
  onehot = np.zeros_like(probs)
  np.put_along_axis(onehot, np.asarray(targets)[..., None], 1.0, axis=-1)
  weight = _f64(g)[:, None] * (np.asarray(mask) != 0)              # [B, T]
  return weight[..., None] * (onehot - probs)


def linear_sequence_logprobs(hidden, weight, targets, mask):
  return sequence_logprobs(_f64(hidden) @ _f64(weight), targets, mask)


def linear_sequence_logprobs_vjp(hidden, weight, targets, mask, g):
  """(d hidden [B,T,D], d weight [D,V]) of Σ_b g_b · linear_sequence_logprobs."""
  h, w = _f64(hidden), _f64(weight)
  dlogits = sequence_logprobs_vjp(h @ w, targets, mask, g)         # [B,T,V]
  return dlogits @ w.T, np.einsum("btd,btv->dv", h, dlogits)
