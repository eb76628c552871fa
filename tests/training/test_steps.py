"""The update step of every algorithm on a tiny T5, and the DRO-V gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_fast import kernels
from dro_fast import models
from dro_fast.models import value
from dro_fast.training import optim
from dro_fast.training import steps

CONFIG = models.preset("tiny", dropout_rate=0.0)
B, S, T = 4, 7, 5


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = lambda n: jnp.asarray(rng.integers(2, 256, (B, n)), jnp.int32)
  mask = jnp.asarray(rng.random((B, T)) < 0.8).at[:, 0].set(True)
  return {
      "inputs": tokens(S), "targets": tokens(T), "target_mask": mask,
      "mismatched_targets": tokens(T), "mismatched_mask": mask[::-1],
      "chosen": tokens(T), "chosen_mask": mask, "rejected": tokens(T),
      "rejected_mask": mask[::-1],
      **{k: jnp.asarray(rng.normal(size=B), jnp.float32) for k in (
          "rewards", "ref_logprobs", "mismatched_ref_logprobs",
          "chosen_ref_logprobs", "rejected_ref_logprobs")},
  }


@pytest.fixture(scope="module")
def policy_params():
  batch = _batch()
  return models.t5(CONFIG).init(jax.random.key(0), batch["inputs"],
                                batch["targets"])


def _value_params(policy_params, kind):
  net = value.value_network(CONFIG, kind)
  if kind == "separate":
    return value.init_from_policy(
        net.init(jax.random.key(1), _batch()["inputs"], None), policy_params)
  return net.init(jax.random.key(1), jnp.ones((1, 2), jnp.int32),
                  jnp.zeros((1, 2, CONFIG.d_model)))


@pytest.mark.parametrize("algo, value_net, granularity", [
    ("dro_v", "separate", "per_example"), ("dro_v", "shared", "per_batch"),
    ("kto", "separate", "per_example"), ("sft", "separate", "per_example"),
    ("dpo", "separate", "per_example"), ("ipo", "separate", "per_example"),
    ("slic", "separate", "per_example")])
def test_two_updates_change_what_they_should(policy_params, algo, value_net,
                                             granularity):
  algorithm = steps.AlgorithmConfig(algo=algo, value_net=value_net,
                                    value_granularity=granularity, beta=0.5)
  trainer = steps.build_trainer(algorithm, CONFIG,
                                optim.make_optimizer(1e-2, warmup_steps=0),
                                optim.make_optimizer(1e-2, warmup_steps=0))
  state = trainer.init(policy_params, _value_params(policy_params, value_net),
                       jax.random.PRNGKey(0))
  update = jax.jit(trainer.update)
  state1, metrics1 = update(state, _batch(1))
  state2, metrics2 = update(state1, _batch(2))
  assert int(state2.step) == 2
  for m in (metrics1, metrics2):
    assert np.isfinite(float(m["loss"])) and float(m["policy_grad_norm"]) > 0
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                       state2.policy_params, policy_params)
  assert all(jax.tree.leaves(moved))
  if algo == "dro_v":
    assert float(metrics1["value_grad_norm"]) > 0
    assert not np.array_equal(state2.value_params["value_head"]["w"],
                              state.value_params["value_head"]["w"])
  else:
    assert state2.value_params == {} and float(metrics1["value_grad_norm"]) == 0


def test_every_algorithm_has_a_loss_and_dro_v_a_value_optimizer():
  assert set(steps.LOSSES) == set(steps.ALGORITHMS)
  with pytest.raises(ValueError, match="value_optimizer must not be None"):
    steps.build_trainer(steps.AlgorithmConfig(algo="dro_v"), CONFIG,
                        optax.sgd(0.1), None)


def test_dro_v_gradients_are_eq7_and_eq8(policy_params):
  """With SGD (no adaptive scaling) one step moves the parameters by exactly
  lr · mean δ ∇log π (policy, rescaled by 1/τ) and lr · mean δ ∇V (value)."""
  tau, lr = 0.5, 0.1
  algorithm = steps.AlgorithmConfig(algo="dro_v", tau=tau,
                                    implementation="xla")
  trainer = steps.build_trainer(algorithm, CONFIG, optax.sgd(lr),
                                optax.sgd(lr))
  value_params = _value_params(policy_params, "separate")
  value_params["value_head"]["w"] = jnp.full_like(
      value_params["value_head"]["w"], 0.05)
  state = trainer.init(policy_params, value_params, jax.random.PRNGKey(0))
  batch = _batch(3)
  new_state, _ = jax.jit(trainer.update)(state, batch)

  policy = models.t5(CONFIG)
  net = value.value_network(CONFIG, "separate")
  logp_fn = lambda p: kernels.sequence_logprobs(
      policy.apply.logits(p, None, batch["inputs"], batch["targets"]),
      batch["targets"], batch["target_mask"], implementation="xla")
  v_fn = lambda p: net.apply(p, None, batch["inputs"], None)
  logp, v = logp_fn(policy_params), v_fn(value_params)
  delta = batch["rewards"] - v - tau * (logp - batch["ref_logprobs"])
  # Eq. 8 with DRO-V's 1/τ: ∇θ = −mean δ ∇log π; Eq. 7: ∇φ = −mean δ ∇V.
  policy_grad = jax.grad(lambda p: -jnp.mean(delta * logp_fn(p)))(
      policy_params)
  value_grad = jax.grad(lambda p: -jnp.mean(delta * v_fn(p)))(value_params)
  for new, old, grad in ((new_state.policy_params, policy_params,
                          policy_grad),
                         (new_state.value_params, value_params, value_grad)):
    jax.tree.map(lambda n, o, g: np.testing.assert_allclose(
        n, o - lr * g, rtol=1e-4, atol=1e-6), new, old, grad)


def test_algorithm_config_errors():
  with pytest.raises(ValueError, match="`algo` must be one of"):
    steps.AlgorithmConfig(algo="ppo")
  with pytest.raises(ValueError, match="`value_net` must be one of"):
    steps.AlgorithmConfig(value_net="double")
  with pytest.raises(ValueError, match="`tau` must be > 0"):
    steps.AlgorithmConfig(tau=0.0)
  with pytest.raises(ValueError, match="`beta` must be > 0"):
    steps.AlgorithmConfig(beta=-1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19, None])
def test_sum_of_squares_is_the_norm_and_the_non_finite_check(bad):
  rng = np.random.default_rng(7)
  tree = {"a": rng.normal(size=(5, 3)), "b": [rng.normal(size=(4,)),
                                              rng.normal(size=(2, 2, 2))]}
  if bad is not None:
    tree["b"][1][1, 0, 1] = bad
  got = steps.sum_of_squares(jax.tree.map(jnp.float32, tree))
  with np.errstate(over="ignore"):
    want = sum(np.sum(np.square(x.astype(np.float64)))
               for x in jax.tree.leaves(tree))
  if bad is None:
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
  else:      # 3e19 is finite, but its square overflows float32: not finite.
    assert not np.isfinite(float(got))
  assert float(steps.sum_of_squares({})) == 0.0


@pytest.mark.parametrize("spread", ["one element", "whole matrix"])
def test_gradients_the_guard_passes_keep_parameters_finite(spread):
  """The guard checks the loss and Σg², not the updated parameters. That is
  enough for the paper's Adafactor: the largest gradients whose Σg² is
  still finite in float32 leave parameters and states finite, update after
  update (Adafactor clips each update's RMS to 1 and scales it by the
  parameter's RMS)."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(128, 256)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
  limit = 0.9 * np.sqrt(np.finfo(np.float32).max)          # 1.66e19
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
  if spread == "one element":
    grads["w"][5, 7] = limit
  else:
    grads["w"] = np.full((128, 256), limit / np.sqrt(128 * 256))
  grads = jax.tree.map(jnp.float32, grads)
  assert np.isfinite(float(steps.sum_of_squares(grads)))    # passes the guard
  optimizer = optim.make_optimizer(1e-2, warmup_steps=0)
  opt_state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  for _ in range(3):
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves((params, opt_state)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert np.all(np.isfinite(np.asarray(leaf)))
  # And the update did move the parameters (a zero update would pass too).
  assert float(jnp.max(jnp.abs(params["w"] - jnp.asarray(
      np.random.default_rng(3).normal(size=(128, 256)), jnp.float32)))) > 0


def test_non_finite_updates_are_skipped_and_counted(policy_params):
  algorithm = steps.AlgorithmConfig(algo="dro_v")
  trainer = steps.build_trainer(algorithm, CONFIG,
                                optim.make_optimizer(1e-2, warmup_steps=0),
                                optim.make_optimizer(1e-2, warmup_steps=0))
  state = trainer.init(policy_params, _value_params(policy_params,
                                                    "separate"),
                       jax.random.PRNGKey(0))
  update = jax.jit(trainer.update)
  bad = dict(_batch(4), rewards=jnp.full((B,), jnp.nan))
  state1, metrics = update(state, bad)
  assert float(metrics["skipped_update"]) == 1.0
  assert int(state1.bad_steps) == 1 and int(state1.step) == 1
  jax.tree.map(np.testing.assert_array_equal,
               (state1.policy_params, state1.value_params,
                state1.policy_opt_state),
               (state.policy_params, state.value_params,
                state.policy_opt_state))
  state2, _ = update(state1, bad)
  assert int(state2.bad_steps) == 2
  state3, metrics = update(state2, _batch(5))
  assert float(metrics["skipped_update"]) == 0.0
  assert int(state3.bad_steps) == 0
  assert not np.array_equal(
      state3.policy_params["decoder/logits_dense"]["kernel"],
      state.policy_params["decoder/logits_dense"]["kernel"])


def test_an_update_that_would_make_a_parameter_non_finite_is_skipped(
    policy_params):
  """Finite loss and gradients, but a learning rate that throws the
  parameters so far (about 1e30) that their sum of squares overflows
  float32: the update is skipped like a non-finite one."""
  algorithm = steps.AlgorithmConfig(algo="dro_v")
  absurd = optim.make_optimizer(1e30, warmup_steps=0)
  trainer = steps.build_trainer(algorithm, CONFIG, absurd,
                                optim.make_optimizer(1e-2, warmup_steps=0))
  state = trainer.init(policy_params, _value_params(policy_params,
                                                    "separate"),
                       jax.random.PRNGKey(0))
  # Without the guard the parameters would leave float32's range.
  grads = jax.tree.map(jnp.ones_like, state.policy_params)
  updates, _ = absurd.update(grads, state.policy_opt_state,
                             state.policy_params)
  moved = optax.apply_updates(state.policy_params, updates)
  assert not np.isfinite(float(steps.sum_of_squares(moved)))
  new_state, metrics = jax.jit(trainer.update)(state, _batch(4))
  assert np.isfinite(float(metrics["loss"]))
  assert np.isfinite(float(metrics["policy_grad_norm"]))
  assert float(metrics["skipped_update"]) == 1.0
  assert int(new_state.bad_steps) == 1 and int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal,
               (new_state.policy_params, new_state.value_params,
                new_state.policy_opt_state, new_state.value_opt_state),
               (state.policy_params, state.value_params,
                state.policy_opt_state, state.value_opt_state))
