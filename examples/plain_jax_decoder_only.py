r"""DRO-V on a small decoder-only transformer in plain JAX (no Haiku, no Flax).

  python examples/plain_jax_decoder_only.py

dro_fast's trainer runs T5 (encoder-decoder, Haiku), but its kernels and
losses take plain arrays. This file trains a 2-layer decoder-only model for a
few steps on a toy task with `kernels.linear_sequence_logprobs` (final hidden
states and the output projection in, [B] log-probs out: the [B, T, V] logits
are never materialised) and `losses.dro_v_loss`.

The decoder-only convention. A prompt x (P tokens) and its completion y
(C tokens) are one sequence s = [x; y] of length P + C. The model reads
s[:-1] and position t predicts s[t + 1] (targets shifted by one). Only
targets that are completion tokens count: the mask over the P + C − 1
targets is 1 from t = P − 1 on, so the masked sum is
log π(y|x) = Σ_j log π(y_j | x, y_<j), the completion's log-probability
given the prompt, with no term for the prompt's own likelihood.

The value V(x) must see the whole prompt and nothing of y: it is a linear
head on the hidden state at the last prompt token (t = P − 1; causal
attention keeps y out of it). This is the paper's "single net" (Figure 5): the
head shares the policy's trunk and its gradient flows into it (no
stop_gradient), so the trunk learns features that predict the reward as well
as the next token. `stop_gradient(hidden)` there would train the head alone on
the policy's features, and the policy would move only by Eq. 8's term. With a
shared trunk the 1/τ rescale of the policy gradient (rescale_policy_grad)
changes the balance of the two terms, so it matters even under Adam.

π_ref is the initial policy: log π_ref(y|x) is computed once with the initial
parameters, before training, and kept as data. There is no dropout, so
log π − log π_ref is exactly 0 at step 0.

Shapes: B batch, P prompt length, C completion length, T = P + C − 1 model
positions, D width, H heads, K = D / H head width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dro_fast import kernels
from dro_fast import losses
from dro_fast import runtime


@dataclasses.dataclass(frozen=True)
class Config:
  """Model, data and training sizes; tiny so that it runs in seconds."""
  vocab: int = 16
  prompt_len: int = 4
  completion_len: int = 4
  width: int = 32
  heads: int = 2
  layers: int = 2
  examples: int = 64       # one full batch per step
  steps: int = 20
  learning_rate: float = 3e-3
  tau: float = 1.0
  seed: int = 0


def make_data(rng: np.random.Generator, cfg: Config
              ) -> tuple[jax.Array, jax.Array]:
  """Toy triplets: [B, P + C] random prompts and completions, [B] rewards.

  A reward is the fraction of completion tokens found in the prompt,
  normalised to mean 0, variance 1 (paper §4).
  """
  prompts = rng.integers(1, cfg.vocab, (cfg.examples, cfg.prompt_len))
  completions = rng.integers(1, cfg.vocab, (cfg.examples, cfg.completion_len))
  raw = (completions[:, :, None] == prompts[:, None, :]).any(-1).mean(-1)
  rewards = (raw - raw.mean()) / (raw.std() + 1e-6)
  tokens = np.concatenate([prompts, completions], axis=1)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(rewards, jnp.float32)


def decoder_inputs(tokens: jax.Array, prompt_len: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """[B, P + C] sequences -> inputs, targets (shifted by one), mask [B, T]."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  positions = jnp.arange(targets.shape[1])
  mask = jnp.broadcast_to(positions >= prompt_len - 1, targets.shape)
  return inputs, targets, mask


def init_params(rng: np.random.Generator, cfg: Config) -> dict:
  """Parameters as a dict pytree; matrices scaled by 1/√fan-in.

  Drawn with numpy: tiny, and free of the per-op compiles of eager
  jax.random.
  """
  d, h, k = cfg.width, cfg.heads, cfg.width // cfg.heads
  t = cfg.prompt_len + cfg.completion_len - 1

  def dense(*shape, fan_in):
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in),
                       jnp.float32)

  layers = [{"attention_norm": jnp.ones(d), "mlp_norm": jnp.ones(d),
             "qkv": dense(d, 3, h, k, fan_in=d),
             "attention_out": dense(h, k, d, fan_in=d),
             "mlp_in": dense(d, 4 * d, fan_in=d),
             "mlp_out": dense(4 * d, d, fan_in=4 * d)}
            for _ in range(cfg.layers)]
  return {"embedding": dense(cfg.vocab, d, fan_in=1),
          "position": 0.1 * dense(t, d, fan_in=1),
          "layers": layers, "final_norm": jnp.ones(d),
          "unembed": dense(d, cfg.vocab, fan_in=d),                 # [D, V]
          "value": {"w": jnp.zeros(d), "b": jnp.zeros(())}}


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def causal_attention(x: jax.Array, layer: dict) -> jax.Array:
  q, k, v = jnp.einsum("btd,dnhk->nbthk", x, layer["qkv"])        # [B,T,H,K]
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones(scores.shape[-2:], bool))           # [T, T]
  weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
  out = jnp.einsum("bhqs,bshk->bqhk", weights, v)
  return jnp.einsum("bqhk,hkd->bqd", out, layer["attention_out"])


def forward(params: dict, inputs: jax.Array) -> jax.Array:
  """[B, T] input tokens -> [B, T, D] final (normalised) hidden states."""
  x = params["embedding"][inputs] + params["position"][:inputs.shape[1]]
  for layer in params["layers"]:
    x = x + causal_attention(rms_norm(x, layer["attention_norm"]), layer)
    y = rms_norm(x, layer["mlp_norm"]) @ layer["mlp_in"]
    x = x + jax.nn.gelu(y) @ layer["mlp_out"]
  return rms_norm(x, params["final_norm"])


def policy_and_value(params: dict, tokens: jax.Array, prompt_len: int
                     ) -> tuple[jax.Array, jax.Array]:
  """[B] log π(y|x) (fused kernel, no logits) and [B] V(x)."""
  inputs, targets, mask = decoder_inputs(tokens, prompt_len)
  hidden = forward(params, inputs)                               # [B, T, D]
  logprobs = kernels.linear_sequence_logprobs(hidden, params["unembed"],
                                              targets, mask)
  last_prompt = hidden[:, prompt_len - 1]                         # [B, D]
  values = last_prompt @ params["value"]["w"] + params["value"]["b"]
  return logprobs, values


def loss_fn(params, tokens, ref_logprobs, rewards, *, cfg: Config):
  logprobs, values = policy_and_value(params, tokens, cfg.prompt_len)
  return losses.dro_v_loss(logprobs, ref_logprobs, values, rewards,
                           tau=cfg.tau, rescale_policy_grad=True)


def main(cfg: Config = Config()) -> dict[str, list[float]]:
  """Trains for cfg.steps full-batch steps; returns each step's metrics.

  A step's metrics are computed before its update.
  """
  rng = np.random.default_rng(cfg.seed)
  tokens, rewards = make_data(rng, cfg)
  params = init_params(rng, cfg)
  # π_ref: the initial policy, evaluated once.
  ref_logprobs, _ = jax.jit(policy_and_value, static_argnums=2)(
      params, tokens, cfg.prompt_len)
  optimizer = optax.adam(cfg.learning_rate)
  opt_state = optimizer.init(params)

  # The batch goes in as arguments, not closed over: one compiled step then
  # serves every batch of the same shape.
  @jax.jit
  def update(params, opt_state, tokens, ref_logprobs, rewards):
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg=cfg),
                                 has_aux=True)
    (_, metrics), grads = grad_fn(params, tokens, ref_logprobs, rewards)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  history: dict[str, list[float]] = {}
  for step in range(cfg.steps):
    params, opt_state, metrics = update(params, opt_state, tokens,
                                        ref_logprobs, rewards)
    for name, value in metrics.items():
      history.setdefault(name, []).append(float(value))
    print(f"step {step}  loss {history['loss'][-1]:.4f}  "
          f"log_ratio_mean {history['log_ratio_mean'][-1]:+.4f}")
  return history


if __name__ == "__main__":
  runtime.hide_absent_tpu()   # quiet libtpu's warnings on a host with no TPU
  main()
