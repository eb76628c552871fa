"""The online log-sum-exp state shared by the tiled implementations.

A state (m, l, t) per row: the running max m, the running sum l of
exp(x − m) over the entries seen so far, and the target's logit t (0 until
the target's column is seen). log-sum-exp = m + log l; log-prob = t − lse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dro_fast.kernels import config


def update(carry, x, cols, valid, targets):
  """Folds one float32 tile x [N, c] into the online log-sum-exp state.

  The state is (running max m, running sum l of exp(x − m), target logit t),
  each [N]. `cols` [N, c] holds each entry's vocabulary index and `valid`
  [N, c] says which entries belong to this tile (the rest are padding or were
  counted by an earlier tile).
  """
  m, l, t = carry
  x = jnp.where(valid, x, config.NEG_LARGE)
  m_new = jnp.maximum(m, jnp.max(x, axis=1))
  l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
  t = t + jnp.sum(jnp.where(valid & (cols == targets[:, None]), x, 0.0), axis=1)
  return m_new, l, t


def init_state(n: int):
  return (jnp.full((n,), config.NEG_LARGE, jnp.float32),
          jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))


def combine_partials(m: jax.Array, l: jax.Array, t: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """Merges S partial states [S, N] over disjoint vocabulary slices.

  Returns:
    (log-probs [N], lse [N]). A slice that saw no entry (m = NEG_LARGE,
    l = 0) contributes nothing.
  """
  m_all = jnp.max(m, axis=0)
  lse = m_all + jnp.log(jnp.sum(l * jnp.exp(m - m_all), axis=0))
  return jnp.sum(t, axis=0) - lse, lse


def auto_splits(row_tiles: int, vocab_tiles: int, requested: int,
                target_programs: int = 512) -> int:
  """vocab_splits to use: `requested`, or with 0 enough slices that about
  `target_programs` programs run, clamped to [1, vocab_tiles]."""
  splits = requested or -(-target_programs // row_tiles)
  return max(1, min(splits, vocab_tiles))
