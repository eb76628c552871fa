"""Loss values and gradients against hand-derived formulas (Eq. 7/8, KTO, DPO)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import losses

B = 6


def _arrays(seed, n=4):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=B) * 2, jnp.float32) for _ in range(n)]


@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("rescale", [True, False])
def test_dro_v_value_and_gradients(tau, rescale):
  logp, ref_logp, values, rewards = _arrays(0)
  (loss, metrics), grads = jax.value_and_grad(
      lambda lp, v, r_lp: losses.dro_v_loss(
          lp, r_lp, v, rewards, tau=tau, rescale_policy_grad=rescale),
      argnums=(0, 1, 2), has_aux=True)(logp, values, ref_logp)
  delta = (np.asarray(rewards) - np.asarray(values)
           - tau * (np.asarray(logp) - np.asarray(ref_logp)))
  np.testing.assert_allclose(loss, 0.5 * np.mean(delta**2), rtol=1e-6)
  np.testing.assert_allclose(metrics["residual_mean"], delta.mean(),
                             rtol=1e-5, atol=1e-6)
  # Eq. 7: ∇_V L = −δ / B.
  np.testing.assert_allclose(grads[1], -delta / B, rtol=1e-5, atol=1e-7)
  # Eq. 8: ∇_{log π} L = −τ δ / B, times 1/τ under DRO-V's rescale.
  expected = -delta / B if rescale else -tau * delta / B
  np.testing.assert_allclose(grads[0], expected, rtol=1e-5, atol=1e-7)
  # The reference policy is a constant.
  np.testing.assert_array_equal(grads[2], np.zeros(B))


def test_dro_v_rejects_mismatched_shapes():
  logp, ref_logp, values, rewards = _arrays(1)
  with pytest.raises(ValueError, match="matching \\[B\\] arrays"):
    losses.dro_v_loss(logp, ref_logp[:3], values, rewards, tau=1.0)


def test_scale_gradient_is_identity_forward():
  x = jnp.asarray([1.5, -2.0])
  y, vjp = jax.vjp(lambda x: losses.scale_gradient(x, 0.25), x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_allclose(vjp(jnp.ones(2))[0], [0.25, 0.25])


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_kto_value_and_gradient(beta):
  logp, ref_logp, rewards, noise = _arrays(2)
  idx = losses.mismatched_indices(B)
  np.testing.assert_array_equal(idx, [1, 2, 3, 4, 5, 0])
  mis_logp = logp[idx] + 0.3 * noise
  mis_ref = ref_logp[idx]

  loss, grad = jax.value_and_grad(
      lambda lp: losses.kto_loss(lp, ref_logp, rewards, mis_logp, mis_ref,
                                 beta=beta, desirable_weight=1.0,
                                 undesirable_weight=1.5)[0])(logp)
  lp, rlp, r = (np.asarray(a, np.float64) for a in (logp, ref_logp, rewards))
  z0 = max(0.0, float(np.mean(np.asarray(mis_logp) - np.asarray(mis_ref))))
  ratio = lp - rlp
  desirable = r > r.mean()
  per = np.where(desirable, 1 - _sigmoid(beta * (ratio - z0)),
                 1.5 * (1 - _sigmoid(beta * (z0 - ratio))))
  np.testing.assert_allclose(loss, per.mean(), rtol=1e-5)
  # d/dx (1 − σ(βx)) = −β σ(βx)(1 − σ(βx)); z0 is detached.
  s_d = _sigmoid(beta * (ratio - z0))
  s_u = _sigmoid(beta * (z0 - ratio))
  expected = np.where(desirable, -beta * s_d * (1 - s_d),
                      1.5 * beta * s_u * (1 - s_u)) / B
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_kto_clamps_the_reference_point_at_zero():
  logp, ref_logp, rewards, _ = _arrays(3)
  _, metrics = losses.kto_loss(logp, ref_logp, rewards, ref_logp - 5.0,
                               ref_logp, beta=1.0)
  assert float(metrics["kl_estimate"]) == 0.0
  with pytest.raises(ValueError, match="at least 2"):
    losses.mismatched_indices(1)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "slic"])
def test_pairwise_value_and_gradient(kind):
  cw, cl, rw, rl = _arrays(4)
  beta = 0.7
  loss, (g_w, g_l) = jax.value_and_grad(
      lambda a, b: losses.pairwise_loss(a, b, rw, rl, beta=beta,
                                        kind=kind)[0], argnums=(0, 1))(cw, cl)
  z = beta * ((np.asarray(cw) - np.asarray(rw))
              - (np.asarray(cl) - np.asarray(rl)))
  f, df = {
      "dpo": (np.log1p(np.exp(-z)), -_sigmoid(-z)),
      "slic": (np.maximum(0, 1 - z), -(z < 1).astype(float)),
      "ipo": ((z - 1) ** 2, 2 * (z - 1)),
  }[kind]
  np.testing.assert_allclose(loss, f.mean(), rtol=1e-5)
  np.testing.assert_allclose(g_w, beta * df / B, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g_l, -beta * df / B, rtol=1e-4, atol=1e-7)


def test_pairwise_unknown_kind():
  a = jnp.zeros(2)
  with pytest.raises(ValueError, match="Unknown pairwise loss kind 'orpo'"):
    losses.pairwise_loss(a, a, a, a, beta=1.0, kind="orpo")


def test_losses_compose_with_kernels():
  """A trainer's use: DRO-V on sequence_logprobs, gradients to logits."""
  from dro_fast import kernels  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(B, 4, 33)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 33, (B, 4)), jnp.int32)
  mask = jnp.ones((B, 4), bool)
  _, ref_logp, values, rewards = _arrays(5)

  def loss_fn(x):
    logp = kernels.sequence_logprobs(x, targets, mask,
                                     implementation="chunked_xla")
    return losses.dro_v_loss(logp, ref_logp, values, rewards, tau=2.0)[0]

  grad = jax.grad(loss_fn)(logits)
  logp = kernels.sequence_logprobs(logits, targets, mask,
                                   implementation="xla")
  delta = rewards - values - 2.0 * (logp - ref_logp)
  expected = jax.grad(lambda x: jnp.sum(-delta / B * kernels.sequence_logprobs(
      x, targets, mask, implementation="xla")))(logits)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
