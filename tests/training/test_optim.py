"""optim.adafactor against a float64 reference and against optax.adafactor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_fast.training import optim

EPS = 1e-30
# Every kind of leaf: factored in both orientations, rank 3 (a batch axis),
# a tie between the two largest axes, 2-D too small to factor, a vector, a
# parameter whose RMS is under min_scale, and one whose gradient has zero
# rows (ε alone in its second moments).
SHAPES = {"wide": (160, 256), "tall": (256, 160), "stacked": (3, 130, 200),
          "square": (128, 128), "small": (32, 6), "vector": (300,),
          "tiny": (140, 130), "zero_rows": (129, 200)}


def _tree(rng, scale=1.0):
  tree = {k: rng.normal(size=s) * scale for k, s in SHAPES.items()}
  tree["tiny"] = tree["tiny"] * 1e-5
  return tree


def _reference_step(params, grads, state, count, lr, decay_rate=0.8,
                    threshold=1.0, min_scale=1e-3, min_dim=128):
  """One Adafactor update in float64 numpy, from the algorithm."""
  decay = 1.0 - (count + 1.0) ** -decay_rate
  updates, new_state = {}, {}
  for k, p in params.items():
    g = grads[k]
    g2 = g * g + EPS
    axes = None
    if p.ndim >= 2:
      order = np.argsort(p.shape)
      if p.shape[order[-2]] >= min_dim:
        axes = int(order[-1]), int(order[-2])
    if axes is None:
      v = decay * state[k] + (1 - decay) * g2
      u = g / np.sqrt(v)
      new_state[k] = v
    else:
      big, small = axes
      v_row, v_col = state[k]
      v_row = decay * v_row + (1 - decay) * g2.mean(axis=big)
      v_col = decay * v_col + (1 - decay) * g2.mean(axis=small)
      small_in_row = small - 1 if small > big else small
      row = (v_row / v_row.mean(axis=small_in_row, keepdims=True)) ** -0.5
      u = g * np.expand_dims(row, big) * np.expand_dims(v_col ** -0.5, small)
      new_state[k] = (v_row, v_col)
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / threshold)
    rms = np.sqrt(np.mean(p * p))
    updates[k] = -lr * u * (min_scale if rms <= min_scale else rms)
  return updates, new_state


def _reference_init(params, min_dim=128):
  state = {}
  for k, p in params.items():
    axes = optim.factored_axes(p.shape, min_dim)
    if axes is None:
      state[k] = np.zeros(p.shape)
    else:
      big, small = axes
      state[k] = (np.zeros(np.delete(p.shape, big)),
                  np.zeros(np.delete(p.shape, small)))
  return state


def _f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _max_relative(a, b):
  """max |a - b| / max |b|, the worst leaf."""
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))
                   / np.max(np.abs(y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("with_dots", [True, False])
def test_adafactor_matches_a_float64_reference_and_optax(with_dots):
  rng = np.random.default_rng(0)
  params = _tree(rng)
  schedule = optim.learning_rate_schedule(1e-2, 2)
  ours = optim.adafactor(schedule, reduce_with_dots=with_dots)
  theirs = optax.adafactor(schedule, decay_rate=0.8)
  ours_update, theirs_update = jax.jit(ours.update), jax.jit(theirs.update)
  p32 = _f32(params)
  ours_state, theirs_state = ours.init(p32), theirs.init(p32)
  ref_state = _reference_init(params)
  for count in range(4):
    # Growing gradients: later updates have RMS above 1 and are clipped.
    grads = {k: g * (1 + 4 * count) for k, g in _tree(rng).items()}
    grads["zero_rows"][::2] = 0.0
    g32 = _f32(grads)
    lr = float(schedule(count))
    ref_updates, ref_state = _reference_step(params, grads, ref_state, count,
                                             lr)
    updates, ours_state = ours_update(g32, ours_state, p32)
    optax_updates, theirs_state = theirs_update(g32, theirs_state, p32)
    if count == 0:        # warm-up: learning rate 0
      assert all(not np.any(x) for x in jax.tree.leaves(updates))
    else:
      assert _max_relative(updates, ref_updates) < 2e-5
      assert _max_relative(optax_updates, ref_updates) < 2e-5
    for k, p in params.items():
      factored = ours_state[0].v_row[k].shape != (1,)
      ref = ref_state[k] if factored else (ref_state[k],)
      mine = ((ours_state[0].v_row[k], ours_state[0].v_col[k]) if factored
              else (ours_state[0].v[k],))
      for x, y in zip(mine, ref):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=0)
    params = {k: p + ref_updates[k] for k, p in params.items()}
    p32 = _f32(params)
  assert int(ours_state[0].count) == 4 and int(ours_state[2].count) == 4
  # The parameter scaled by min_scale moved by about lr·min_scale·RMS(u).
  assert np.isclose(np.sqrt(np.mean(np.square(updates["tiny"]))),
                    float(schedule(3)) * 1e-3, rtol=0.05)


def test_adafactor_state_is_optax_adafactors():
  rng = np.random.default_rng(1)
  params = _f32(_tree(rng))
  for lr in (1e-3, optim.learning_rate_schedule(1e-3, 5)):
    ours = optim.adafactor(lr).init(params)
    theirs = optax.adafactor(lr, decay_rate=0.8).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      assert x.shape == y.shape and x.dtype == y.dtype


def test_adafactor_continues_from_an_optax_state():
  """A state (a checkpoint) written by optax.adafactor carries on here."""
  rng = np.random.default_rng(2)
  params = _f32(_tree(rng))
  schedule = optim.learning_rate_schedule(1e-2, 1)
  theirs = optax.adafactor(schedule, decay_rate=0.8)
  state = theirs.init(params)
  for _ in range(2):
    _, state = theirs.update(_f32(_tree(rng)), state, params)
  grads = _f32(_tree(rng))
  expected, expected_state = theirs.update(grads, state, params)
  got, got_state = optim.adafactor(schedule).update(grads, state, params)
  assert _max_relative(got, jax.tree.map(np.asarray, expected)) < 2e-5
  assert jax.tree.structure(got_state) == jax.tree.structure(expected_state)
  assert int(got_state[0].count) == 3


@pytest.mark.parametrize("with_dots", [True, False])
def test_adafactor_zero_gradients_give_zero_updates(with_dots):
  params = _f32(_tree(np.random.default_rng(3)))
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt = optim.adafactor(1e-2, reduce_with_dots=with_dots)
  state = opt.init(params)
  for _ in range(2):
    updates, state = opt.update(zeros, state, params)
    for u in jax.tree.leaves(updates):
      assert np.all(np.asarray(u) == 0.0)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_adafactor_bad_use_is_named():
  with pytest.raises(ValueError, match="clipping_threshold"):
    optim.adafactor(1e-3, clipping_threshold=0.0)
  params = {"w": jnp.ones((4, 4))}
  opt = optim.adafactor(1e-3)
  with pytest.raises(ValueError, match="pass params"):
    opt.update(params, opt.init(params))


def test_make_optimizer_uses_the_fused_adafactor_with_optional_clip():
  params = _f32(_tree(np.random.default_rng(4)))
  grads = jax.tree.map(lambda x: 1e3 * x, params)
  plain = optim.make_optimizer(1e-2, warmup_steps=0)
  clipped = optim.make_optimizer(1e-2, warmup_steps=0, clip_norm=1.0)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_clip, _ = clipped.update(grads, clipped.init(params), params)
  expected, _ = optim.adafactor(1e-2).update(grads, optim.adafactor(
      1e-2).init(params), params)
  assert _max_relative(u_plain, jax.tree.map(np.asarray, expected)) < 1e-6
  # The chain clips first; Adafactor divides the gradient by its own RMS, so
  # a clipped (rescaled) gradient gives the same update while g² >> ε.
  assert isinstance(clipped.init(params)[0], optax.EmptyState)
  assert _max_relative(u_clip, jax.tree.map(np.asarray, u_plain)) < 1e-5

