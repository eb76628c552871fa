"""The online log-sum-exp state shared by the tiled implementations.

A state (m, l, t) per row: the running max m, the running sum l of
exp(x − m) over the entries seen so far, and the target's logit t (0 until
the target's column is seen). log-sum-exp = m + log l; log-prob = t − lse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dro_fast.kernels import config


def update(state, x, cols, valid, target_col, keepdims: bool = False):
  """Folds one float32 tile x [N, c] into the online log-sum-exp state.

  Args:
    state: (m, l, t), each [N] (or [N, 1] with keepdims).
    x: [N, c] float32 tile.
    cols: vocabulary index of each entry, broadcastable to [N, c].
    valid: which entries belong to this tile (the rest are padding or were
      counted by an earlier tile), broadcastable to [N, c].
    target_col: [N, 1] target ids.
    keepdims: keep the state as [N, 1] columns (the Mosaic layout).

  Returns:
    The new state. All accumulation is float32.
  """
  m, l, t = state
  x = jnp.where(valid, x, config.NEG_LARGE)
  m_new = jnp.maximum(m, jnp.max(x, axis=1, keepdims=keepdims))
  m_col = m_new if keepdims else m_new[:, None]
  l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_col), axis=1,
                                        keepdims=keepdims)
  t = t + jnp.sum(jnp.where(valid & (cols == target_col), x, 0.0), axis=1,
                  keepdims=keepdims)
  return m_new, l, t


def init_state(*shape: int):
  """The empty state: m = NEG_LARGE, l = 0, t = 0, each of `shape`."""
  return (jnp.full(shape, config.NEG_LARGE, jnp.float32),
          jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


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
  """The vocab_splits to use, clamped to [1, vocab_tiles].

  `requested`, or for 0 enough slices that about `target_programs`
  programs run.
  """
  splits = requested or -(-target_programs // row_tiles)
  return max(1, min(splits, vocab_tiles))
