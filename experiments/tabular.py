r"""Theorem 1 of the paper checked on a finite contextual bandit.

A problem has K prompts and M responses. Prompts are drawn uniformly,
responses from a behaviour policy μ(y|x); the reference policy π_ref(y|x) and
μ are different random softmax tables with full support, so the theorem's
uniqueness condition (supp μ = supp π_ref) holds. Rewards r(x, y) are a
per-prompt offset plus per-response noise, standardised to mean 0 and
variance 1 under the data distribution (paper §4), so prompts differ in their
optimal value and one value for all prompts is wrong.

Theorem 1 (paper §3): the unique minimiser of
½ E[(r − V(x) − τ log(π(y|x) / π_ref(y|x)))²] is
  π*(y|x) ∝ π_ref(y|x) · exp(r(x, y) / τ),
  V*(x)   = τ · log Σ_y π_ref(y|x) · exp(r(x, y) / τ),
and its residual is zero for every (x, y).

Learners are tables: policy logits [K, M] (log-softmax over responses,
initialised at π_ref as fine-tuning starts from the SFT policy) and, for the
value learners, values [K] or one scalar, initialised at 0. Each trains on
minibatches of triplets (x ~ uniform, y ~ μ(·|x), r(x, y)) with Adam
(constant learning rate, the same for policy and value); the whole run is one
jitted lax.scan. Adam converges reliably here: the rewards are deterministic,
so every per-example residual, and every stochastic gradient, vanishes at
(π*, V*); Adam's per-entry scale also evens out the rarely drawn (x, y)
entries. Learners:
  dro_v:              dro_v_loss with per-prompt values V(x_i), policy
                      gradient rescaled by 1/τ (paper §3.3);
  dro_v_single_value: the same loss with one learned scalar value broadcast
                      over the batch (paper Figure 5, "single value");
  kto:                kto_loss as the paper runs it: desirable when the
                      reward is above the minibatch mean, z0 from the
                      mismatched pairs of mismatched_indices, β = τ.
Each is scored by the mean over prompts of KL(π* || π) and, for the value
learners, max_x |V(x) − V*(x)|.

run()'s defaults (K = 6, M = 5, τ = 1, 2,000 steps of batch 32, Adam 0.02,
seed 0) produce the table in docs/EXPERIMENTS.md (Theorem 1): DRO-V reaches
π* and V* to float32 precision, the single value stops at its population
optimum, and KTO moves away from π*. A larger Adam step (0.05) makes DRO-V's
KL spike after it has converged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
from matplotlib import figure
from matplotlib.backends import backend_agg
import numpy as np
import optax

from dro_fast import losses

LEARNERS = ("dro_v", "dro_v_single_value", "kto")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A finite contextual bandit; all tables float64, [K, M] unless stated.

  Attributes:
    log_ref: log π_ref(y|x).
    log_behaviour: log μ(y|x), the policy that generated the data.
    rewards: r(x, y).
    tau: regularisation strength τ > 0.
  """
  log_ref: np.ndarray
  log_behaviour: np.ndarray
  rewards: np.ndarray
  tau: float

  def __post_init__(self):
    shapes = {a.shape for a in (self.log_ref, self.log_behaviour,
                                self.rewards)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
      raise ValueError("log_ref, log_behaviour and rewards must be [K, M] "
                       f"tables of one shape; got {shapes}.")
    if self.tau <= 0:
      raise ValueError(f"tau must be > 0; got {self.tau}.")

  def optimal_values(self) -> np.ndarray:
    """[K] V*(x) = τ · log Σ_y π_ref(y|x) · exp(r(x, y) / τ)."""
    return self.tau * _logsumexp(self.log_ref + self.rewards / self.tau)

  def optimal_log_policy(self) -> np.ndarray:
    """[K, M] log π*(y|x) = log π_ref + (r − V*(x)) / τ."""
    return (self.log_ref
            + (self.rewards - self.optimal_values()[:, None]) / self.tau)


def _logsumexp(a: np.ndarray) -> np.ndarray:
  peak = a.max(axis=-1)
  return peak + np.log(np.exp(a - peak[..., None]).sum(axis=-1))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  return logits - _logsumexp(logits)[..., None]


def make_problem(num_prompts: int = 6, num_responses: int = 5,
                 tau: float = 1.0, seed: int = 0,
                 prompt_offset_scale: float = 1.0) -> Problem:
  """A random problem (float64, reproducible from `seed`).

  Args:
    num_prompts: K.
    num_responses: M.
    tau: τ.
    seed: numpy seed.
    prompt_offset_scale: standard deviation of the per-prompt reward offset
      relative to the per-response noise (1.0: as large as the noise).

  Returns:
    The problem, rewards standardised under uniform prompts and μ.
  """
  rng = np.random.default_rng(seed)
  shape = (num_prompts, num_responses)
  log_ref = _log_softmax(rng.normal(size=shape))
  log_behaviour = _log_softmax(rng.normal(size=shape))
  rewards = (prompt_offset_scale * rng.normal(size=(num_prompts, 1))
             + rng.normal(size=shape))
  weights = np.exp(log_behaviour) / num_prompts          # data distribution
  mean = np.sum(weights * rewards)
  std = np.sqrt(np.sum(weights * (rewards - mean) ** 2))
  return Problem(log_ref=log_ref, log_behaviour=log_behaviour,
                 rewards=(rewards - mean) / std, tau=tau)


def kl_to_optimum(problem: Problem, log_policy: np.ndarray) -> np.ndarray:
  """Mean over prompts of KL(π* || π), in float64.

  Args:
    problem: the bandit.
    log_policy: [..., K, M] log π.

  Returns:
    [...] the KL (a 0-d array for one table).
  """
  log_opt = problem.optimal_log_policy()
  kl = np.sum(np.exp(log_opt) * (log_opt - log_policy), axis=-1)   # [..., K]
  return np.mean(kl, axis=-1)


def _loss_fn(learner: str, problem: Problem):
  """(params, x [B], y [B]) -> (loss, metrics) for one learner."""
  log_ref = jnp.asarray(problem.log_ref, jnp.float32)
  rewards = jnp.asarray(problem.rewards, jnp.float32)
  tau = problem.tau

  def loss_fn(params, x, y):
    log_policy = jax.nn.log_softmax(params["logits"], axis=-1)   # [K, M]
    logprobs = log_policy[x, y]                                  # [B]
    ref_logprobs = log_ref[x, y]
    r = rewards[x, y]
    if learner == "kto":
      y_mis = y[losses.mismatched_indices(x.shape[0])]  # y_{i+1} under x_i
      return losses.kto_loss(logprobs, ref_logprobs, r, log_policy[x, y_mis],
                             log_ref[x, y_mis], beta=tau)
    if learner == "dro_v":
      values = params["values"][x]                               # [B]
    else:
      values = jnp.broadcast_to(params["values"], x.shape)       # [B]
    return losses.dro_v_loss(logprobs, ref_logprobs, values, r, tau=tau,
                             rescale_policy_grad=True)

  return loss_fn


def train(learner: str, problem: Problem, *, steps: int, batch_size: int,
          learning_rate: float, seed: int
          ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Trains one learner; returns (final params, [steps] KL(π*||π) history).

  Args:
    learner: one of LEARNERS.
    problem: the bandit.
    steps: optimiser steps.
    batch_size: triplets per minibatch (≥ 2, for KTO's mismatched pairs).
    learning_rate: Adam's step size, policy and value alike.
    seed: jax PRNG seed for the minibatches (the same for every learner).

  Returns:
    Params as float32 numpy ("logits" [K, M]; "values" [K] or [] for the
    value learners) and the KL after each step, computed in float64 from the
    float32 logits.
  """
  if learner not in LEARNERS:
    raise ValueError(f"unknown learner {learner!r}; expected one of "
                     f"{LEARNERS}.")
  num_prompts, _ = problem.log_ref.shape
  params = {"logits": jnp.asarray(problem.log_ref, jnp.float32)}
  if learner == "dro_v":
    params["values"] = jnp.zeros((num_prompts,), jnp.float32)
  elif learner == "dro_v_single_value":
    params["values"] = jnp.zeros((), jnp.float32)
  optimiser = optax.adam(learning_rate)
  loss_fn = _loss_fn(learner, problem)
  log_behaviour = jnp.asarray(problem.log_behaviour, jnp.float32)

  def step(carry, key):
    params, opt_state = carry
    x_key, y_key = jax.random.split(key)
    x = jax.random.randint(x_key, (batch_size,), 0, num_prompts)   # uniform
    y = jax.random.categorical(y_key, log_behaviour[x])            # y ~ μ(.|x)
    grads, _ = jax.grad(loss_fn, has_aux=True)(params, x, y)
    updates, opt_state = optimiser.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), params["logits"]

  @jax.jit
  def run_all(params):
    keys = jax.random.split(jax.random.key(seed), steps)
    (params, _), logits = jax.lax.scan(
        step, (params, optimiser.init(params)), keys)       # [steps, K, M]
    return params, logits

  params, logits = run_all(params)
  # KL from float64 log-softmax: a float32 sum of π*·(log π* − log π) has a
  # rounding floor near 1e-8, far above DRO-V's converged KL.
  kls = kl_to_optimum(problem, _log_softmax(np.asarray(logits, np.float64)))
  return jax.tree.map(np.asarray, params), kls


def run(num_prompts: int = 6, num_responses: int = 5, tau: float = 1.0,
        steps: int = 2000, batch_size: int = 32, learning_rate: float = 0.02,
        seed: int = 0, learners: Sequence[str] = LEARNERS
        ) -> dict[str, dict]:
  """Trains every learner on one random problem and scores it.

  Args:
    num_prompts: K.
    num_responses: M.
    tau: τ (and KTO's β).
    steps: optimiser steps per learner.
    batch_size: triplets per minibatch.
    learning_rate: Adam's step size.
    seed: seed of the problem and of the minibatch stream.
    learners: which of LEARNERS to train.

  Returns:
    {learner: {"kl": mean_x KL(π*||π), "max_value_error": max_x |V − V*|
    (None for KTO), "kl_history": [steps] list of the KL after each step}}.
  """
  problem = make_problem(num_prompts, num_responses, tau, seed)
  optimal_values = problem.optimal_values()
  results = {}
  for learner in learners:
    params, kls = train(learner, problem, steps=steps, batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed)
    value_error = None
    if "values" in params:
      values = np.broadcast_to(params["values"], optimal_values.shape)
      value_error = float(np.max(np.abs(values - optimal_values)))
    results[learner] = {"kl": float(kls[-1]),
                        "max_value_error": value_error,
                        "kl_history": kls.tolist()}
  return results


def table(results: Mapping[str, Mapping]) -> str:
  """A plain-text table of the final KL and value error per learner."""
  lines = [f"{'learner':<20s} {'KL(pi*||pi)':>12s} {'max|V-V*|':>10s}"]
  for learner, result in results.items():
    error = result["max_value_error"]
    error = "n/a" if error is None else f"{error:.3g}"
    lines.append(f"{learner:<20s} {result['kl']:>12.3g} {error:>10s}")
  return "\n".join(lines)


def plot(history: Mapping[str, Sequence[float]], png_path: str) -> None:
  """Writes KL(π*||π) over training steps per learner to a PNG, atomically.

  Args:
    history: {learner: KL after each step}, e.g. each result's "kl_history".
    png_path: destination; written to a temporary file in the same folder,
      then renamed over it.
  """
  fig = figure.Figure(figsize=(6, 4))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for learner, kls in history.items():
    ax.semilogy(np.arange(1, len(kls) + 1), kls, label=learner)
  ax.set_xlabel("step")
  ax.set_ylabel("mean over prompts of KL(π* || π)")
  ax.set_title("Theorem 1 on a tabular bandit")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  folder = os.path.dirname(os.path.abspath(png_path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(suffix=".png", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      fig.savefig(f, format="png", dpi=120)
    os.replace(tmp_path, png_path)
  except BaseException:
    os.remove(tmp_path)
    raise
