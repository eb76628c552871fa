r"""DRO-V on a small decoder-only transformer written with Flax NNX.

  pip install flax   # (the `examples` extra)
  python examples/flax_nnx_decoder_only.py

The same model, data and loss as plain_jax_decoder_only.py (read its
docstring for the decoder-only convention), with the modules, the optimizer
and jit from `flax.nnx`: dro_fast's kernels and losses take arrays, so any
framework that can hand over the final hidden states and the output
projection's [D, V] kernel can use them.

In brief: s = [x; y] is one sequence; the model reads s[:-1] and predicts
s[1:]; the mask keeps the completion's targets (t ≥ P − 1), so the kernel's
masked sum is log π(y|x). V(x) is a linear head on the hidden state at the
last prompt token, sharing the trunk (no stop_gradient: the paper's "single
net"). log π_ref is computed once, with the initial model, before the
optimizer first changes it (for fresh batches later on, keep a frozen copy:
`ref_model = nnx.clone(model)` before training).

Shapes: B batch, P prompt length, C completion length, T = P + C − 1 model
positions, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
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
  """[B, P + C] random sequences and [B] rewards.

  A reward is the fraction of completion tokens found in the prompt,
  normalised to mean 0, variance 1.
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
  mask = jnp.broadcast_to(jnp.arange(targets.shape[1]) >= prompt_len - 1,
                          targets.shape)
  return inputs, targets, mask


class Block(nnx.Module):
  """Pre-norm causal self-attention and MLP."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.attention_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        cfg.heads, cfg.width, use_bias=False, decode=False, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
    self.mlp_in = nnx.Linear(cfg.width, 4 * cfg.width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * cfg.width, cfg.width, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class Decoder(nnx.Module):
  """Decoder-only policy with a value head on the last prompt token."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    positions = cfg.prompt_len + cfg.completion_len - 1
    self.prompt_len = cfg.prompt_len                  # static: a Python int
    self.embedding = nnx.Embed(cfg.vocab, cfg.width, rngs=rngs)
    self.position = nnx.Param(
        0.1 * jax.random.normal(rngs.params(), (positions, cfg.width)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
    self.final_norm = nnx.RMSNorm(cfg.width, rngs=rngs)
    self.unembed = nnx.Linear(cfg.width, cfg.vocab, use_bias=False,
                              rngs=rngs)                          # [D, V]
    self.value_head = nnx.Linear(cfg.width, 1,
                                 kernel_init=nnx.initializers.zeros,
                                 rngs=rngs)

  def hidden(self, inputs: jax.Array) -> jax.Array:
    """[B, T] input tokens -> [B, T, D] final (normalised) hidden states."""
    x = self.embedding(inputs) + self.position[:inputs.shape[1]]
    mask = nnx.make_causal_mask(inputs)                     # [B, 1, T, T]
    for block in self.blocks:
      x = block(x, mask)
    return self.final_norm(x)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, P + C] sequences -> [B] log π(y|x) (no logits) and [B] V(x)."""
    inputs, targets, mask = decoder_inputs(tokens, self.prompt_len)
    hidden = self.hidden(inputs)                             # [B, T, D]
    logprobs = kernels.linear_sequence_logprobs(
        hidden, self.unembed.kernel[...], targets, mask)
    values = self.value_head(hidden[:, self.prompt_len - 1])[:, 0]
    return logprobs, values


@nnx.jit(static_argnames="tau")
def update(model: Decoder, optimizer: nnx.Optimizer, tokens: jax.Array,
           ref_logprobs: jax.Array, rewards: jax.Array, *, tau: float
           ) -> dict[str, jax.Array]:
  """One DRO-V step, in place on model and optimizer; returns metrics."""

  def loss_fn(model):
    logprobs, values = model(tokens)
    return losses.dro_v_loss(logprobs, ref_logprobs, values, rewards,
                             tau=tau, rescale_policy_grad=True)

  (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return metrics


def main(cfg: Config = Config()) -> dict[str, list[float]]:
  """Trains for cfg.steps full-batch steps; returns each step's metrics.

  A step's metrics are computed before its update.
  """
  tokens, rewards = make_data(np.random.default_rng(cfg.seed), cfg)
  model = Decoder(cfg, rngs=nnx.Rngs(cfg.seed))
  ref_logprobs, _ = nnx.jit(lambda m, t: m(t))(model, tokens)   # π_ref, once
  optimizer = nnx.Optimizer(model, optax.adam(cfg.learning_rate),
                            wrt=nnx.Param)
  history: dict[str, list[float]] = {}
  for step in range(cfg.steps):
    metrics = update(model, optimizer, tokens, ref_logprobs, rewards,
                     tau=cfg.tau)
    for name, value in metrics.items():
      history.setdefault(name, []).append(float(value))
    print(f"step {step}  loss {history['loss'][-1]:.4f}  "
          f"log_ratio_mean {history['log_ratio_mean'][-1]:+.4f}")
  return history


if __name__ == "__main__":
  runtime.hide_absent_tpu()   # quiet libtpu's warnings on a host with no TPU
  main()
