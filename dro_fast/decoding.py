"""Batched greedy and sampled decoding with a cache, for T5 and decoder-only.

T5 (generate with a T5Config): the encoder runs once; each decoder layer's
cross-attention keys/values are computed once from its output;
self-attention keys/values accumulate in a [L, B, T_max, H, K] cache, so
every step costs one token's worth of work. It stops at EOS.

Decoder-only (generate with a DecoderConfig, or sample with any pair of
prefill / decode_step functions): the prompt [B, S], right-padded with -1,
is run once (prefill), which gives the first token's logits and the KV
cache; each further token costs one decode_step. A row stops at the first
of `stop_ids` it emits (its EOS and end-of-turn ids); the output
[B, max_new_tokens] holds each row's tokens up to and including that stop
id, then -1 (the decoder layout's padding).

Both loops are a lax.while_loop under jit, one compilation per (config,
maximum length, sampling, stop ids); they stop early once every row has
stopped. Sampling is deterministic for a given rng: the token of step i is
drawn with fold_in(rng, i).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any, Callable

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


def choose(logits: jax.Array, sampling: SamplingConfig,
           rng: jax.Array | None) -> jax.Array:
  """The next token [B] int32 of float32 logits [B, V]: argmax or a draw."""
  if sampling.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(
      rng, filter_logits(logits, sampling)).astype(jnp.int32)


def generate(params: Params, encoder_tokens: jax.Array, *,
             config: models.T5Config | Any, max_length: int,
             sampling: SamplingConfig = GREEDY,
             rng: jax.Array | None = None,
             stop_ids: Sequence[int] = ()) -> jax.Array:
  """Decodes a batch with a T5 or a decoder-only model.

  Args:
    params: the model's parameters (per-layer or scan_layers layout,
      matching config.scan_layers).
    encoder_tokens: [B, S] int32 prompts: for T5 padded with config.pad_id;
      for a decoder-only model right-padded with -1.
    config: a T5Config or a DecoderConfig (static).
    max_length: the most tokens to emit per sequence (static).
    sampling: greedy (default) or sampling settings (static).
    rng: a PRNG key; required when sampling.
    stop_ids: decoder-only: the ids that end a row (the tokenizer's EOS and
      end-of-turn ids); empty: rows run to max_length. T5 stops at
      config.eos_id and takes none.

  Returns:
    [B, max_length] int32: each sequence's tokens up to and including its
    EOS (T5) or stop id (decoder-only), then padding: T5's pad_id, or -1.
  """
  if not sampling.greedy and rng is None:
    raise ValueError("Sampling (temperature > 0) needs an rng key.")
  if isinstance(config, models.T5Config):
    if stop_ids:
      raise ValueError("stop_ids is for decoder-only models; T5 stops at "
                       "config.eos_id.")
    return _generate(params, encoder_tokens, config=config,
                     max_length=max_length, sampling=sampling, rng=rng)
  return _generate_decoder(params, encoder_tokens, config=config,
                           max_length=max_length, sampling=sampling,
                           stop_ids=tuple(sorted({int(i) for i in stop_ids})),
                           rng=rng)


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


@functools.partial(jax.jit, static_argnames=("config", "max_length",
                                             "sampling", "stop_ids"))
def _generate_decoder(params, inputs, *, config, max_length, sampling,
                      stop_ids, rng):
  """generate() for a DecoderConfig, jitted: one compilation per key."""
  model = models.decoder(config).apply
  tokens, _ = sample(
      functools.partial(model.prefill, params, None),
      functools.partial(model.decode_step, params, None), inputs,
      max_new_tokens=max_length, sampling=sampling, stop_ids=stop_ids,
      rng=rng)
  return tokens


def sample(prefill: Callable[[jax.Array, int], Any],
           decode_step: Callable[[jax.Array, Any], Any], inputs: jax.Array,
           *, max_new_tokens: int, sampling: SamplingConfig = GREEDY,
           stop_ids: Sequence[int] = (), rng: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
  """The decoder-only sampling loop over a model's cache functions.

  Traceable (generate jits it around models.decoder's functions).

  Args:
    prefill: (inputs [B, S], max_new_tokens) -> DecodeStep(logits [B, V]
      float32 of the first new token, cache).
    decode_step: (token [B], cache) -> DecodeStep of the token after it.
    inputs: [B, S] int32 prompts, right-padded with -1.
    max_new_tokens: the most tokens to emit per row (static).
    sampling: greedy or sampling settings (static).
    stop_ids: the ids that end a row (static).
    rng: a PRNG key; required when sampling.

  Returns:
    (tokens, steps): tokens [B, max_new_tokens] int32, each row's tokens up
    to and including its first stop id, then -1; steps, the int32 number
    of tokens the loop chose (< max_new_tokens when every row stopped
    early; decode_step ran steps - 1 times).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  stop = jnp.asarray(tuple(stop_ids) or (-2,), jnp.int32)   # -2: no id
  batch = inputs.shape[0]

  def pick(logits, i, done):
    key = None if sampling.greedy else jax.random.fold_in(rng, i)
    chosen = choose(logits, sampling, key)
    chosen = jnp.where(done, models.PAD, chosen)
    return chosen, done | jnp.any(chosen[:, None] == stop[None, :], axis=-1)

  first = prefill(inputs, max_new_tokens)
  chosen, done = pick(first.logits, 0, jnp.zeros((batch,), bool))
  tokens = jnp.full((batch, max_new_tokens), models.PAD, jnp.int32)
  tokens = tokens.at[:, 0].set(chosen)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tokens, previous, cache, done = state
    step = decode_step(previous, cache)
    chosen, done_now = pick(step.logits, i, done)
    tokens = tokens.at[:, i].set(chosen)
    # A stopped row keeps feeding its last real token; its output is -1.
    return (i + 1, tokens, jnp.where(done, previous, chosen), step.cache,
            done_now)

  steps, tokens, _, _, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(1, jnp.int32), tokens, chosen, first.cache,
                   done))
  return tokens, steps
