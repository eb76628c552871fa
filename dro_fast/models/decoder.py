"""Decoder-only LLMs (Llama 3.x, Qwen 2.5 / 3, Gemma 3 text) in Haiku.

Shapes: B batch, S prompt length, T completion length, n sequence length,
D hidden_size, H query heads, N key/value heads, K head_dim, F
intermediate_size, V vocabulary, L layers, M cache length.

Batch layout (dro_fast design, shared with the data pipeline): prompts
`inputs` [B, S] and completions `targets` [B, T] are each right-padded with
decoder_config.PAD (-1). The model places each row's completion right after
its prompt, so a row is [prompt, completion, pads] (left-aligned, valid
tokens contiguous from index 0); positions are the indices, attention is
causal over valid keys (and within the window on sliding layers), and ids
< 0 are embedded as 0. hidden[:, t], the final-normed state at
prompt_len - 1 + t, predicts targets[:, t]. Every prompt must hold at least
one token (a BOS).

Parameter paths map 1:1 to transformers' names (hf_decoder's table):
`model/embed_tokens` {embedding [V, D]}, `model/layers_{i}/input_layernorm`
{scale [D]}, `model/layers_{i}/self_attn/q_proj` {kernel [D, H·K],
bias [H·K] when attention_bias}, `.../k_proj`, `.../v_proj`, `.../o_proj`,
`.../self_attn/q_norm` / `k_norm` {scale [K]} (qk_norm),
`model/layers_{i}/post_attention_layernorm`, (post_norms:)
`pre_feedforward_layernorm`, `post_feedforward_layernorm`,
`model/layers_{i}/mlp/{gate,up,down}_proj` {kernel}, `model/norm` {scale},
`lm_head` {kernel [D, V]} unless tied. With scan_layers, `model/layers/...`
with a leading [L] axis. Norm scales are stored as transformers stores them
(Gemma's w of (1 + w)). Parameters are float32; matmuls run in the compute
dtype through layers.Dense (DecoderConfig.matmul); norms, RoPE tables,
softmax and logits are float32.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import haiku as hk
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from dro_fast.models import per_device
from dro_fast.models.decoder_config import DecoderConfig
from dro_fast.models.decoder_config import PAD
from dro_fast.models.layers import Dense
from dro_fast.models.layers import lora_for
from dro_fast.models.layers import matmul
from dro_fast.models.layers import RMSNorm
from dro_fast.models.network import DecodeStep
from dro_fast.models.network import DecoderStates
from dro_fast.models.network import run_layers

# Attention logits at masked positions (finite: a fully masked row stays
# NaN-free).
MASKED = -1e9


class DecoderCache(NamedTuple):
  """Key/value cache of cached decoding, stacked over layers.

  key, value: [L, B, M, N, K] in the compute dtype; slot j of a row holds
    the keys/values of its position j.
  length: [B] int32, each row's valid entries, which is also the position
    of the next token (rows are left-aligned).
  """
  key: jax.Array
  value: jax.Array
  length: jax.Array

  @property
  def position(self) -> jax.Array:
    """[B] the position the next decode_step's token takes."""
    return self.length


# ---------------------------------------------------------------------------
# RoPE.


def rope_inv_freq(config: DecoderConfig, sliding: bool) -> np.ndarray:
  """Inverse frequencies [K/2] float32 of a full or sliding layer.

  Sliding layers with rope_local_theta use it unscaled (Gemma 3); every
  other layer uses rope_theta and rope_scaling ("linear": divided by the
  factor; "llama3": low frequencies divided, a smooth band between).
  """
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  if sliding and config.rope_local_theta is not None:
    return (1.0 / config.rope_local_theta ** exponents).astype(np.float32)
  inv = 1.0 / config.rope_theta ** exponents
  scaling = dict(config.rope_scaling)
  kind = scaling.get("rope_type", "default")
  if kind == "linear":
    inv = inv / scaling["factor"]
  elif kind == "llama3":
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_table(inv_freq: np.ndarray, positions: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, n, K] float32 for integer positions [B, n]."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq     # [B,n,K/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, n, heads, K] (halves form) in x's dtype."""
  cos = cos.astype(x.dtype)[:, :, None, :]
  sin = sin.astype(x.dtype)[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# ---------------------------------------------------------------------------
# Layers.


class Projection(Dense):
  """layers.Dense with an optional float32 bias (Qwen 2.5's q/k/v)."""

  def __init__(self, features: int, dtype, *, form: str, bias: bool = False,
               name: str | None = None, lora=None):
    super().__init__(features, dtype, form=form, name=name, lora=lora)
    self.bias = bias

  def __call__(self, x: jax.Array, return_kernel: bool = False) -> jax.Array:
    y = super().__call__(x, return_kernel)
    if self.bias and not return_kernel:
      bias = hk.get_parameter("bias", [self.features], jnp.float32,
                              init=jnp.zeros)
      y = y + bias.astype(y.dtype)
    return y


class Embedding(hk.Module):
  """embed_tokens/embedding [V, D]; also the tied output projection."""

  def __init__(self, config: DecoderConfig, name: str = "embed_tokens"):
    super().__init__(name=name)
    self.config = config
    self.embedding = hk.get_parameter(
        "embedding", [config.vocab_size, config.hidden_size], jnp.float32,
        init=hk.initializers.RandomNormal(0.02))

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [B, n] (< 0 read as 0) -> [B, n, D], scaled, compute dtype."""
    dtype = self.config.compute_dtype
    x = jnp.take(self.embedding, jnp.maximum(ids, 0), axis=0).astype(dtype)
    if self.config.embed_scale:
      # As transformers: the scale cast to the weights' dtype first.
      x = x * jnp.asarray(self.config.scaled_embedding, dtype)
    return x


# ---------------------------------------------------------------------------
# Attention cores. Each takes queries [B, q, H, K], keys / values
# [B, k, N, K] (RoPE applied, unscaled) and returns [B, q, H, K].


def xla_attention(queries, keys, values, visible, *, scale: float,
                  softcap: float | None) -> jax.Array:
  """Grouped-query attention with materialised float32 logits.

  visible: [B, q, k] bool. A query that sees no key gets 0.
  """
  b, q, h, k = queries.shape
  n = keys.shape[2]
  grouped = queries.reshape(b, q, n, h // n, k)
  logits = jnp.einsum("bqngk,btnk->bngqt", grouped, keys,
                      preferred_element_type=jnp.float32) * scale
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  mask = visible[:, None, None]                                  # [B,1,1,q,k]
  logits = jnp.where(mask, logits, MASKED)
  weights = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
  out = jnp.einsum("bngqt,btnk->bqngk", weights, values)
  out = jnp.where(jnp.any(visible, axis=-1)[:, :, None, None, None], out,
                  jnp.zeros((), out.dtype))
  return out.reshape(b, q, h, k)


def cudnn_attention(queries, keys, values, lengths, *, scale: float,
                    window: int | None, implementation: str = "cudnn"
                    ) -> jax.Array:
  """cuDNN's fused attention: causal, right-padded keys, optional window.

  One jax.nn.dot_product_attention call; implementation "xla" runs the same
  call in plain XLA (tests check its masks on a CPU that way). "cudnn" is a
  CUDA GPU's program only: dro_fast.backend.resolve refuses it for any
  other platform.
  """
  return jax.nn.dot_product_attention(
      queries, keys, values, scale=scale, is_causal=True,
      key_value_seq_lengths=lengths,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation)


def splash_attention(queries, keys, values, lengths, *, scale: float,
                     window: int | None, interpret: bool | None
                     ) -> jax.Array:
  """Pallas TPU splash attention, vmapped over the batch.

  Causal (or local: the window) masks per head; padding through segment
  ids (valid keys 1, padding 0). Lengths are padded to a multiple of the
  block (128); key/value heads are repeated for grouped-query attention.
  """
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash)
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_mask as masks)
  # pylint: enable=g-import-not-at-top
  n = queries.shape[1]
  block = 128
  padded = -(-n // block) * block
  groups = queries.shape[2] // keys.shape[2]

  def heads_first(x):
    x = jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
    return jnp.swapaxes(x, 1, 2)                                  # [B,H,n,K]

  q = heads_first(queries * jnp.asarray(scale, queries.dtype))
  k = heads_first(jnp.repeat(keys, groups, axis=2))
  v = heads_first(jnp.repeat(values, groups, axis=2))
  segments = (jnp.arange(padded)[None] < lengths[:, None]).astype(jnp.int32)
  shape = (padded, padded)
  mask = (masks.CausalMask(shape) if window is None else
          masks.LocalMask(shape, (window - 1, 0), offset=0))
  sizes = splash.BlockSizes(block_q=block, block_kv=block,
                            block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)

  def attend(q, k, v, seg):
    # Built for the heads this device holds (a model axis splits them).
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([mask] * q.shape[1]), block_sizes=sizes,
        head_shards=1, q_seq_shards=1, interpret=bool(interpret))
    return jax.vmap(lambda q, k, v, seg: kernel(
        q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg)))(q, k, v, seg)

  # A Pallas kernel on a mesh runs per device (per_device.over_batch), on
  # its rows and, on a model axis, its heads.
  out = per_device.over_batch(attend, (True, True, True, True),
                              heads=(1, 1, 1, None), out_heads=1)(
                                  q, k, v, segments)              # [B,H,n,K]
  return jnp.swapaxes(out, 1, 2)[:, :n]


def _visible(query_index: jax.Array, key_index: jax.Array,
             key_valid: jax.Array | None, sliding, window: int | None
             ) -> jax.Array:
  """[B, q, k]: causal, valid keys, and the window where `sliding`.

  query_index [B, q], key_index [k]; sliding a bool or a traced scalar.
  """
  distance = query_index[:, :, None] - key_index[None, None, :]   # [B, q, k]
  visible = distance >= 0
  if key_valid is not None:
    visible = visible & key_valid[:, None, :]
  if window is not None and sliding is not False:
    visible = visible & (jnp.logical_not(sliding) | (distance < window))
  return visible


# ---------------------------------------------------------------------------
# The network.


class Decoder:
  """The decoder-only LM; methods run inside a Haiku transform (decoder()).

  Not an hk.Module, so that parameters sit at transformers' root paths
  (model/..., lm_head). One transformed function calls one of forward /
  step (Haiku would uniquify a second `model` scope's modules).
  """

  def __init__(self, config: DecoderConfig):
    self.config = config
    sliding = config.sliding_layers
    self.mixed = len(set(sliding)) > 1
    self.all_sliding = all(sliding)
    self.inv_freq = {False: rope_inv_freq(config, False)}
    if any(sliding):
      self.inv_freq[True] = rope_inv_freq(config, True)

  # Per-layer data: the sliding flag ([L] bool, scanned) where layers differ.
  def _per_layer(self, **arrays):
    if self.mixed:
      arrays["sliding"] = np.asarray(self.config.sliding_layers)
    return arrays or None

  def _sliding(self, per_layer):
    """The layer's kind: a Python bool, or a traced scalar under scan."""
    if self.mixed:
      flag = per_layer["sliding"]
      return bool(flag) if isinstance(flag, (np.ndarray, np.bool_)) else flag
    return self.all_sliding

  def _rope(self, tables, sliding):
    if sliding is True or sliding is False:
      return tables[sliding]
    return tuple(jnp.where(sliding, a, b)
                 for a, b in zip(tables[True], tables[False]))

  def _tables(self, positions):
    return {kind: rope_table(inv, positions)
            for kind, inv in self.inv_freq.items()}

  def _norm(self, name: str) -> RMSNorm:
    return RMSNorm(self.config.rms_norm_eps, name,
                   plus_one=self.config.norm_plus_one)

  def _layer(self, x, rope, sliding, attend):
    """One block; attend(q, k, v, sliding) -> (out, kv to return)."""
    config = self.config
    def dense(features, name, bias=False):
      return Projection(features, config.compute_dtype, form=config.matmul,
                        bias=bias, name=name, lora=lora_for(config, name))
    b, n, _ = x.shape
    h = self._norm("input_layernorm")(x)
    with hk.name_scope("self_attn"):
      width = config.num_kv_heads * config.head_dim
      q = dense(config.num_heads * config.head_dim,
                bias=config.attention_bias, name="q_proj")(h)
      k = dense(width, bias=config.attention_bias, name="k_proj")(h)
      v = dense(width, bias=config.attention_bias, name="v_proj")(h)
      q = checkpoint_name(q, "attention_query").reshape(
          b, n, config.num_heads, config.head_dim)
      k = checkpoint_name(k, "attention_key").reshape(
          b, n, config.num_kv_heads, config.head_dim)
      v = checkpoint_name(v, "attention_value").reshape(
          b, n, config.num_kv_heads, config.head_dim)
      if config.qk_norm:
        q = self._norm("q_norm")(q)
        k = self._norm("k_norm")(k)
      cos, sin = self._rope(rope, sliding)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      out, kv = attend(q, k, v, sliding)
      out = dense(config.hidden_size, name="o_proj")(
          out.reshape(b, n, -1).astype(config.compute_dtype))
      out = checkpoint_name(out, "attention_out")
    if config.post_norms:
      out = self._norm("post_attention_layernorm")(out)
      x = x + out
      h = self._norm("pre_feedforward_layernorm")(x)
    else:
      x = x + out
      h = self._norm("post_attention_layernorm")(x)
    with hk.name_scope("mlp"):
      act = (jax.nn.silu if config.hidden_act == "silu" else
             functools.partial(jax.nn.gelu, approximate=True))
      hidden = (act(dense(config.intermediate_size, name="gate_proj")(h))
                * dense(config.intermediate_size, name="up_proj")(h))
      out = dense(config.hidden_size, name="down_proj")(hidden)
    if config.post_norms:
      out = self._norm("post_feedforward_layernorm")(out)
    return x + out, kv

  def _fused(self, core, queries, keys, values, lengths, sliding):
    """A fused core with a static window; lax.cond where it is traced."""
    window = self.config.sliding_window
    if sliding is True or sliding is False:
      return core(queries, keys, values, lengths,
                  window=window if sliding else None)
    return jax.lax.cond(sliding, functools.partial(core, window=window),
                        functools.partial(core, window=None),
                        queries, keys, values, lengths)

  def forward(self, ids: jax.Array, *, collect_kv: bool = False,
              output_weight: bool = True):
    """Uncached forward over left-aligned ids [B, n] (PAD after each row).

    Returns (final-normed hidden [B, n, D], (keys, values) [L, B, n, N, K]
    when collect_kv else None, the output weight [D, V] when output_weight
    else None).
    """
    config = self.config
    n = ids.shape[1]
    valid = ids >= 0
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)            # [B]
    index = jnp.arange(n)
    positions = jnp.broadcast_to(index, ids.shape)
    with hk.name_scope("model"):
      embedder = Embedding(config)
      x = embedder(ids)
      tables = self._tables(positions)

      def attend(q, k, v, sliding):
        if config.attention == "xla":
          out = xla_attention(
              q, k, v, _visible(positions, index, valid, sliding,
                                config.sliding_window),
              scale=config.attention_scale,
              softcap=config.attn_logit_softcapping)
        elif config.attention == "cudnn":
          out = self._fused(functools.partial(
              cudnn_attention, scale=config.attention_scale), q, k, v,
                            lengths, sliding)
        else:
          out = self._fused(functools.partial(
              splash_attention, scale=config.attention_scale,
              interpret=config.attention_interpret), q, k, v, lengths,
                            sliding)
        return out, ((k, v) if collect_kv else None)

      def layer(x, per_layer):
        return self._layer(x, tables, self._sliding(per_layer), attend)

      # run_layers returns per-layer outputs only for per-layer inputs.
      per_layer = self._per_layer(**(
          {"index": np.arange(config.num_layers)} if collect_kv else {}))
      x, kv = run_layers(layer, x, per_layer, config.num_layers, config)
      x = self._norm("norm")(x)
    return x, kv, (self._output_weight(embedder) if output_weight else None)

  def step(self, token: jax.Array, cache: DecoderCache):
    """One cached step: (final-normed hidden [B, D], new cache, weight)."""
    config = self.config
    position = cache.length                                       # [B]
    slots = jnp.arange(cache.key.shape[2])                        # [M]
    write = (slots[None, :] == position[:, None])[:, :, None, None]
    with hk.name_scope("model"):
      embedder = Embedding(config)
      x = embedder(token[:, None])                                # [B, 1, D]
      tables = self._tables(position[:, None])

      def layer(x, per_layer):
        def attend(q, k, v, sliding):
          keys = jnp.where(write, k.astype(per_layer["key"].dtype),
                           per_layer["key"])
          values = jnp.where(write, v.astype(per_layer["value"].dtype),
                             per_layer["value"])
          out = xla_attention(
              q, keys, values,
              _visible(position[:, None], slots, None, sliding,
                       config.sliding_window),
              scale=config.attention_scale,
              softcap=config.attn_logit_softcapping)
          return out, (keys, values)
        return self._layer(x, tables, self._sliding(per_layer), attend)

      x, (keys, values) = run_layers(
          layer, x, self._per_layer(key=cache.key, value=cache.value),
          config.num_layers, config)
      x = self._norm("norm")(x)
    return (x[:, 0], DecoderCache(keys, values, cache.length + 1),
            self._output_weight(embedder))

  def _output_weight(self, embedder: Embedding) -> jax.Array:
    config = self.config
    if config.tie_word_embeddings:
      return embedder.embedding.T.astype(config.compute_dtype)   # [D, V]
    return Dense(config.vocab_size, config.compute_dtype, form=config.matmul,
                 name="lm_head").kernel_only(config.hidden_size)

  def logits(self, hidden: jax.Array, weight: jax.Array) -> jax.Array:
    """float32 logits [..., V] of final-normed hidden, soft-capped if set."""
    logits = matmul(hidden, weight, form=self.config.matmul,
                    out_dtype=jnp.float32)
    cap = self.config.final_logit_softcapping
    return jnp.tanh(logits / cap) * cap if cap else logits


def prompt_lengths(inputs: jax.Array) -> jax.Array:
  """[B] int32 valid tokens of right-padded prompts [B, S]."""
  return jnp.sum(inputs >= 0, axis=1, dtype=jnp.int32)


def join(inputs: jax.Array, targets: jax.Array) -> jax.Array:
  """[B, S + T - 1] rows [prompt, completion minus its last slot, PAD...].

  The completion follows each row's prompt directly; its last slot is
  never an input of a prediction, so it is left out.
  """
  s, t = inputs.shape[1], targets.shape[1]
  n = s + t - 1
  index = jnp.arange(n)[None, :]                                  # [1, n]
  lengths = prompt_lengths(inputs)[:, None]                       # [B, 1]
  prompt = jnp.pad(inputs, ((0, 0), (0, max(n - s, 0))),
                   constant_values=PAD)[:, :n]
  offset = index - lengths                                        # [B, n]
  completion = jnp.take_along_axis(targets, jnp.clip(offset, 0, t - 1),
                                   axis=1)
  completion = jnp.where(offset < t, completion, PAD)
  return jnp.where(index < lengths, prompt, completion)


def last_prompt_state(hidden: jax.Array, inputs: jax.Array,
                      steps: int = 1) -> jax.Array:
  """hidden [B, n, D] at prompt_len - 1 + t for t < steps -> [B, steps, D]."""
  start = jnp.maximum(prompt_lengths(inputs) - 1, 0)              # [B]
  index = start[:, None] + jnp.arange(steps)[None, :]             # [B, steps]
  return jnp.take_along_axis(hidden, index[..., None], axis=1)


class DecoderApply(NamedTuple):
  """The decoder's pure functions over one parameter set.

  Each takes (params, rng, ...); rng may be None (no dropout). Batch
  layout as in the module docstring.

  decode(params, rng, inputs [B, S], targets [B, T], *, is_training=False)
    -> DecoderStates(hidden [B, T, D], weight [D, V], encoded [B, D]):
    hidden[:, t] predicts targets[:, t] (compute dtype, before soft-capping);
    encoded is the final-normed state at the last prompt token.
  logits(params, rng, inputs, targets, *, is_training=False) -> float32
    [B, T, V] of the same forward (soft-capped where set).
  prefill(params, rng, inputs [B, S], max_new_tokens) -> DecodeStep(logits
    [B, V] of each row's next token, DecoderCache of M = S + max_new_tokens);
    max_new_tokens is a Python int (static under jit).
  decode_step(params, rng, token [B], cache) -> DecodeStep: token takes the
    position cache.length; logits [B, V] of the token after it. At most
    M - length steps per row: a token past the cache is not stored.
  """
  decode: Callable[..., DecoderStates]
  logits: Callable[..., jax.Array]
  prefill: Callable[..., DecodeStep]
  decode_step: Callable[..., DecodeStep]


def decoder(config: DecoderConfig) -> hk.MultiTransformed:
  """The decoder as an hk.MultiTransformed whose apply is a DecoderApply.

  init(rng, inputs [B, S], targets [B, T]) returns every parameter.
  """

  def functions():
    model = Decoder(config)

    def states(inputs, targets):
      hidden, _, weight = model.forward(join(inputs, targets))
      hidden = last_prompt_state(hidden, inputs, targets.shape[1])
      return DecoderStates(hidden, weight, hidden[:, 0])

    def decode(inputs, targets, *, is_training=False):
      del is_training        # no dropout in these families
      return states(inputs, targets)

    def logits(inputs, targets, *, is_training=False):
      del is_training
      out = states(inputs, targets)
      return model.logits(out.hidden, out.weight)

    def prefill(inputs, max_new_tokens):
      hidden, (keys, values), weight = model.forward(inputs, collect_kv=True)
      pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))
      cache = DecoderCache(jnp.pad(keys, pad), jnp.pad(values, pad),
                           prompt_lengths(inputs))
      last = last_prompt_state(hidden, inputs)[:, 0]
      return DecodeStep(model.logits(last, weight), cache)

    def decode_step(token, cache):
      hidden, cache, weight = model.step(token, cache)
      return DecodeStep(model.logits(hidden, weight), cache)

    return logits, DecoderApply(decode, logits, prefill, decode_step)

  return hk.multi_transform(functions)


def encode_prompt(config: DecoderConfig, inputs: jax.Array) -> jax.Array:
  """Inside a transform: the final-normed state [B, D] at the last prompt
  token of inputs [B, S] (a value network's trunk; no lm_head made)."""
  hidden, _, _ = Decoder(config).forward(inputs, output_weight=False)
  return last_prompt_state(hidden, inputs)[:, 0]
