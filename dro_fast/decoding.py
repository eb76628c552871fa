"""Batched greedy and sampled decoding for dro_fast.models' T5, with a cache.

The encoder runs once; each decoder layer's cross-attention keys/values are
computed once from its output; self-attention keys/values accumulate in a
[L, B, T_max, H, K] cache, so every step costs one token's worth of work.
The loop is a lax.while_loop under jit with a static maximum length; it stops
early once every sequence has emitted EOS. Sampling is deterministic for a
given rng (step i draws with fold_in(rng, i)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dro_fast import models

Params = dict


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How each next token is chosen.

  Attributes:
    temperature: 0 for greedy (argmax); otherwise logits are divided by it.
    top_k: keep only the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability
      reaches p (1.0: all).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}.")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}.")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


GREEDY = SamplingConfig()


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Temperature, top-k and top-p applied to float32 logits [B, V]."""
  logits = logits / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]        # [B, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The smallest prefix reaching top_p: a token is kept when the mass of
    # the tokens before it is still below top_p (the first always is).
    keep = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < sampling.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def generate(params: Params, encoder_tokens: jax.Array, *,
             config: models.T5Config, max_length: int,
             sampling: SamplingConfig = GREEDY,
             rng: jax.Array | None = None) -> jax.Array:
  """Decodes a batch.

  Args:
    params: the T5's parameters (per-layer or scan_layers layout, matching
      config.scan_layers).
    encoder_tokens: [B, S] int32 prompts, padded with config.pad_id.
    config: the model configuration (static).
    max_length: the most tokens to emit per sequence (static).
    sampling: greedy (default) or sampling settings (static).
    rng: a PRNG key; required when sampling.

  Returns:
    [B, max_length] int32: each sequence's tokens up to and including its
    EOS, then pad_id.
  """
  if not sampling.greedy and rng is None:
    raise ValueError("Sampling (temperature > 0) needs an rng key.")
  return _generate(params, encoder_tokens, config=config,
                   max_length=max_length, sampling=sampling, rng=rng)


@functools.partial(jax.jit, static_argnames=("config", "max_length",
                                             "sampling"))
def _generate(params, encoder_tokens, *, config, max_length, sampling, rng):
  """generate(), jitted: the config is part of the cache key."""
  model = models.t5(config).apply
  batch = encoder_tokens.shape[0]
  encoded = model.encode(params, None, encoder_tokens)
  cache = model.init_cache(params, None, encoded, max_length)
  tokens = jnp.full((batch, max_length), config.pad_id, jnp.int32)
  previous = jnp.full((batch,), config.decoder_start_id, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_length) & ~jnp.all(done)

  def body(state):
    i, tokens, previous, cache, done = state
    logits, cache = model.decode_step(params, None, previous, i, cache,
                                      encoder_tokens)
    if sampling.greedy:
      chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      chosen = jax.random.categorical(
          jax.random.fold_in(rng, i), filter_logits(logits, sampling)
      ).astype(jnp.int32)
    chosen = jnp.where(done, config.pad_id, chosen)
    tokens = tokens.at[:, i].set(chosen)
    return i + 1, tokens, chosen, cache, done | (chosen == config.eos_id)

  _, tokens, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(0, jnp.int32), tokens, previous, cache, done))
  return tokens
