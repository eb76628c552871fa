"""T5 v1.1 / v1.0 encoder-decoder in Haiku, with T5X parameter names.

Shapes: B batch, S encoder length, T decoder length, D d_model, H heads,
K d_kv (per-head width), F d_ff, V vocabulary, L layers.

Parameter paths equal T5X's (`encoder/layers_3/attention/query` with param
`kernel` [D, H·K], `decoder/relpos_bias` with `rel_embedding` [H, 32], ...),
so checkpoint conversion is a rename table. With `scan_layers` a stack's
layers are one hk.layer_stack named `layers` and its parameters carry a
leading [L] axis (`encoder/layers/attention/query`).

v1.1: RMSNorm in float32, no biases, no 1/√K attention scale (folded into
the query initialisation), one relative-position bias table per stack
(bidirectional buckets in the encoder, causal in the decoder), gated-GELU MLP
(tanh approximation), untied `decoder/logits_dense`. v1.0: ReLU MLP with one
`wi`, logits from the tied `token_embedder` scaled by D^-½.

The blocks are in layers.py and attention.py; this module composes them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from dro_fast.models import attention
from dro_fast.models.attention import Attention
from dro_fast.models.attention import AttentionMask
from dro_fast.models.config import T5Config
from dro_fast.models.layers import Dense
from dro_fast.models.layers import Dropout
from dro_fast.models.layers import Embed
from dro_fast.models.layers import matmul
from dro_fast.models.layers import Mlp
from dro_fast.models.layers import RelativeBias
from dro_fast.models.layers import RelativePositionBias
from dro_fast.models.layers import RMSNorm


class LayerCache(NamedTuple):
  """Decoder key/value cache, stacked over layers.

  self_key, self_value: [L, B, T_max, H, K] self-attention keys and values of
    the positions decoded so far (zeros beyond).
  cross_key, cross_value: [L, B, S, H, K] encoder-decoder attention keys and
    values, computed once from the encoder output.
  """
  self_key: jax.Array
  self_value: jax.Array
  cross_key: jax.Array
  cross_value: jax.Array


class DecoderOutput(NamedTuple):
  """Final decoder states and the output projection.

  hidden: [B, T, D] (or [B, D] for one cached step), already multiplied by
    the output scale (D^-½ for v1.0), in the compute dtype.
  weight: [D, V] output projection in the compute dtype (logits_dense, or
    the tied embedding transposed for v1.0).
  cache: the updated LayerCache of a cached step, else None.
  """
  hidden: jax.Array
  weight: jax.Array
  cache: LayerCache | None = None

  def logits(self, *, form: str) -> jax.Array:
    """float32 logits [..., V]; form is T5Config.matmul."""
    return matmul(self.hidden, self.weight, form=form, out_dtype=jnp.float32)


# What remat "dots_except_mlp_hidden" keeps of a layer (checkpoint_name tags):
# each attention's projections and output. The backward recomputes the MLP
# from them, its d_ff-wide wi_0 / wi_1 included (two GEMMs per layer that
# "dots" keeps); the MLP's output needs no saving, since the next layer's
# input is kept at the remat boundary.
SAVED_EXCEPT_MLP_HIDDEN = ("attention_query", "attention_key",
                           "attention_value", "attention_out")


def _saving_fused_attention(policy: Callable) -> Callable:
  """`policy`, also saving what a fused attention's backward needs.

  A policy that does not save them makes the backward run the fused forward
  again, once per attention.
  """

  def save(prim, *avals, **params):
    return (attention.saves_fused_residuals(prim, *avals, **params)
            or policy(prim, *avals, **params))

  return save


def _remat(fn: Callable, policy: str) -> Callable:
  """fn under remat `policy` (REMAT_POLICIES).

  "dots" and "dots_except_mlp_hidden" also keep fused attention's residuals
  (with attention "cudnn": [B, q, H·K] in the compute dtype and [B, H, q]
  float32 per attention) so that its forward is not run twice; "full" keeps
  nothing.
  """
  if policy == "none":
    return fn
  if policy == "dots":
    return hk.remat(fn, policy=_saving_fused_attention(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable))
  if policy == "dots_except_mlp_hidden":
    return hk.remat(fn, policy=_saving_fused_attention(
        jax.checkpoint_policies.save_only_these_names(
            *SAVED_EXCEPT_MLP_HIDDEN)))
  return hk.remat(fn)


def run_layers(layer_fn: Callable, x: jax.Array, per_layer: Any,
               num_layers: int, config: T5Config) -> tuple[jax.Array, Any]:
  """Applies layer_fn(x, per_layer_i) -> (x, out_i) for i < num_layers.

  per_layer is a pytree of arrays stacked over layers (or None); the outputs
  come back stacked the same way. With config.scan_layers this is one
  hk.layer_stack named "layers"; otherwise a loop whose layers are named
  "layers_{i}".
  """
  layer_fn = _remat(layer_fn, config.remat)
  if config.scan_layers:
    if per_layer is None:
      stack = hk.layer_stack(num_layers, name="layers")
      return stack(lambda x: layer_fn(x, None)[0])(x), None
    stack = hk.layer_stack(num_layers, with_per_layer_inputs=True,
                           name="layers")
    return stack(layer_fn)(x, per_layer)
  outputs = []
  for i in range(num_layers):
    inputs_i = jax.tree.map(lambda a, i=i: a[i], per_layer)
    with hk.name_scope(f"layers_{i}"):
      x, out = layer_fn(x, inputs_i)
    outputs.append(out)
  if per_layer is None:
    return x, None
  return x, jax.tree.map(lambda *a: jnp.stack(a), *outputs)


class T5:
  """The encoder-decoder. Methods run inside a Haiku transform (t5()).

  Not itself an hk.Module, so that parameters sit at the T5X root paths
  (token_embedder, encoder, decoder). Haiku uniquifies a name scope entered
  twice ("decoder_1"), so one transformed function calls at most one of
  decode / init_cache / decode_step; t5()'s functions call one each.
  """

  def __init__(self, config: T5Config):
    self.config = config

  def embedder(self) -> Embed:
    return Embed(self.config)

  def _norm(self, name: str) -> RMSNorm:
    return RMSNorm(self.config.layer_norm_epsilon, name)

  def _relative_bias(self, bidirectional: bool, positions: jax.Array
                     ) -> jax.Array | RelativeBias:
    """A stack's self-attention bias over `positions` (0, 1, ...).

    The [1, H, n, n] array, computed once for all the stack's layers, or,
    for an implementation that builds it per tile
    (attention.takes_relative_bias), the table in factored form.
    """
    relpos = RelativePositionBias(self.config, bidirectional)
    if attention.takes_relative_bias(self.config.attention):
      return relpos.factored()
    return relpos(positions, positions)

  def encode(self, tokens: jax.Array, embedder: Embed,
             is_training: bool = False) -> jax.Array:
    """Encoder output [B, S, D] (compute dtype) of tokens [B, S]."""
    config = self.config
    dropout = Dropout(config.dropout_rate, is_training)
    positions = jnp.arange(tokens.shape[1])
    mask = AttentionMask(key_valid=tokens != config.pad_id)       # [B, S]
    with hk.name_scope("encoder"):
      relpos = self._relative_bias(True, positions)     # [1,H,S,S] or table

      def layer(x, _):
        h = self._norm("pre_attention_layer_norm")(x)
        out, _ = Attention(config, "attention")(
            h, h, bias=relpos, mask=mask, dropout_rng=dropout.rng())
        x = x + dropout(out)
        h = self._norm("pre_mlp_layer_norm")(x)
        return x + dropout(Mlp(config)(h, dropout.rng())), None

      x = dropout(embedder(tokens))                               # [B, S, D]
      x, _ = run_layers(layer, x, None, config.num_encoder_layers, config)
      return dropout(self._norm("encoder_norm")(x))

  def _decoder_stack(self, x, self_attend, cross_attend, encoded, cache,
                     cache_position, embedder, dropout) -> DecoderOutput:
    """Decoder layers, final norm and output projection (inside "decoder").

    self_attend / cross_attend: the bias and mask of the two attentions, as
    Attention takes them.
    """
    config = self.config

    def layer(x, layer_cache: LayerCache | None):
      h = self._norm("pre_self_attention_layer_norm")(x)
      out, (keys, values) = Attention(config, "self_attention")(
          h, h, **self_attend, dropout_rng=dropout.rng(),
          cached_kv=None if layer_cache is None else (
              layer_cache.self_key, layer_cache.self_value),
          cache_position=cache_position)
      x = x + dropout(out)
      h = self._norm("pre_cross_attention_layer_norm")(x)
      out, _ = Attention(config, "encoder_decoder_attention")(
          h, encoded, **cross_attend, dropout_rng=dropout.rng(),
          cached_kv=None if layer_cache is None else (
              layer_cache.cross_key, layer_cache.cross_value))
      x = x + dropout(out)
      h = self._norm("pre_mlp_layer_norm")(x)
      x = x + dropout(Mlp(config)(h, dropout.rng()))
      if layer_cache is None:
        return x, None
      return x, layer_cache._replace(self_key=keys, self_value=values)

    x, cache = run_layers(layer, x, cache, config.num_decoder_layers, config)
    x = dropout(self._norm("decoder_norm")(x))
    if config.tied_embeddings:
      weight = embedder.embedding.T.astype(config.compute_dtype)  # [D, V]
      x = x * jnp.asarray(config.d_model ** -0.5, x.dtype)
    else:
      weight = Dense(config.vocab_size, config.compute_dtype,
                     form=config.matmul,
                     name="logits_dense").kernel_only(config.d_model)
    return DecoderOutput(x, weight, cache)

  def decode(self, encoded: jax.Array, encoder_tokens: jax.Array,
             decoder_inputs: jax.Array, embedder: Embed,
             is_training: bool = False) -> DecoderOutput:
    """Teacher-forced decoder over decoder_inputs [B, T]."""
    config = self.config
    dropout = Dropout(config.dropout_rate, is_training)
    positions = jnp.arange(decoder_inputs.shape[1])
    with hk.name_scope("decoder"):
      relpos = self._relative_bias(False, positions)    # [1,H,T,T] or table
      self_attend = dict(bias=relpos, mask=AttentionMask(causal=True))
      cross_attend = dict(mask=AttentionMask(
          key_valid=encoder_tokens != config.pad_id))             # [B, S]
      x = dropout(embedder(decoder_inputs))                       # [B, T, D]
      return self._decoder_stack(x, self_attend, cross_attend, encoded, None,
                                 None, embedder, dropout)

  def init_cache(self, encoded: jax.Array, max_length: int) -> LayerCache:
    """Empty self-attention cache and the cross keys/values of `encoded`."""
    config = self.config

    def layer(x, _):
      _, keys_values = Attention(config, "encoder_decoder_attention")(
          None, encoded)
      return x, keys_values

    with hk.name_scope("decoder"):
      # A per-layer dummy input makes run_layers stack the outputs.
      _, (cross_key, cross_value) = run_layers(
          layer, jnp.zeros(()), jnp.zeros((config.num_decoder_layers,)),
          config.num_decoder_layers, config)
    shape = (config.num_decoder_layers, encoded.shape[0], max_length,
             config.num_heads, config.d_kv)
    zeros = jnp.zeros(shape, config.compute_dtype)
    return LayerCache(zeros, zeros, cross_key, cross_value)

  def decode_step(self, token: jax.Array, position: jax.Array,
                  cache: LayerCache, encoder_tokens: jax.Array,
                  embedder: Embed) -> DecoderOutput:
    """One cached decoder step for token [B] at `position` (a scalar)."""
    config = self.config
    key_positions = jnp.arange(cache.self_key.shape[2])           # [T_max]
    with hk.name_scope("decoder"):
      relpos = RelativePositionBias(config, bidirectional=False)(
          position[None], key_positions)                          # [1,H,1,Tm]
      self_attend = dict(bias=relpos, mask=AttentionMask(
          key_valid=(key_positions <= position)[None]))           # [1, T_max]
      cross_attend = dict(mask=AttentionMask(
          key_valid=encoder_tokens != config.pad_id))             # [B, S]
      x = embedder(token[:, None])                                # [B, 1, D]
      out = self._decoder_stack(x, self_attend, cross_attend, None, cache,
                                position, embedder, Dropout(0.0, False))
    return out._replace(hidden=out.hidden[:, 0])


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
  """Decoder inputs under teacher forcing: [start, y_0, ..., y_{T-2}]."""
  start = jnp.full_like(targets[:, :1], start_id)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


class DecoderStates(NamedTuple):
  """A teacher-forced forward up to, not through, the output projection.

  hidden: [B, T, D] final decoder states, already multiplied by the output
    scale, so that kernels.linear_sequence_logprobs(hidden, weight, ...)
    never materialises the logits.
  weight: [D, V] output projection (DecoderOutput.weight).
  encoded: what a value head sharing the policy reads (value.value_network
    "shared"): T5's encoder output [B, S, D]; a decoder-only model's
    final-normed state at the last prompt token [B, D].
  """
  hidden: jax.Array
  weight: jax.Array
  encoded: jax.Array


class DecodeStep(NamedTuple):
  """One cached decoder step: logits [B, V] (float32) and the cache after."""
  logits: jax.Array
  cache: LayerCache


class T5Apply(NamedTuple):
  """The T5's pure functions over one parameter set (hk.multi_transform).

  Each takes (params, rng, ...); rng may be None unless is_training
  (dropout). Shapes as in the module docstring.

  encode(params, rng, encoder_tokens [B, S], *, is_training=False)
    -> the encoder output [B, S, D] (compute dtype).
  decode(params, rng, encoder_tokens [B, S], decoder_targets [B, T], *,
         is_training=False) -> DecoderStates: encoder and decoder under
    teacher forcing, up to the output projection.
  logits(params, rng, encoder_tokens, decoder_targets, *, is_training=False)
    -> float32 logits [B, T, V] of the same forward.
  init_cache(params, rng, encoded [B, S, D], max_length) -> LayerCache: an
    empty self-attention cache and the cross-attention keys/values.
  decode_step(params, rng, token [B], position (scalar), cache,
              encoder_tokens [B, S]) -> DecodeStep.
  """
  encode: Callable[..., jax.Array]
  decode: Callable[..., DecoderStates]
  logits: Callable[..., jax.Array]
  init_cache: Callable[..., LayerCache]
  decode_step: Callable[..., DecodeStep]


def t5(config: T5Config) -> hk.MultiTransformed:
  """The encoder-decoder as an hk.MultiTransformed whose apply is a T5Apply.

  init(rng, encoder_tokens [B, S], decoder_targets [B, T]) runs the
  teacher-forced forward once and returns every parameter. The config's
  backend fields are taken as they are (dro_fast.backend.resolve fills
  them in for a run).
  """

  def functions():
    model = T5(config)

    def teacher_forced(encoder_tokens, decoder_targets, is_training):
      embedder = model.embedder()
      encoded = model.encode(encoder_tokens, embedder, is_training)
      out = model.decode(encoded, encoder_tokens,
                         shift_right(decoder_targets, config.decoder_start_id),
                         embedder, is_training)
      return out, encoded

    def encode(encoder_tokens, *, is_training=False):
      return model.encode(encoder_tokens, model.embedder(), is_training)

    def decode(encoder_tokens, decoder_targets, *, is_training=False):
      out, encoded = teacher_forced(encoder_tokens, decoder_targets,
                                    is_training)
      return DecoderStates(out.hidden, out.weight, encoded)

    def logits(encoder_tokens, decoder_targets, *, is_training=False):
      out, _ = teacher_forced(encoder_tokens, decoder_targets, is_training)
      return out.logits(form=config.matmul)

    def init_cache(encoded, max_length):
      return model.init_cache(encoded, max_length)

    def decode_step(token, position, cache, encoder_tokens):
      out = model.decode_step(token, position, cache, encoder_tokens,
                              model.embedder())
      return DecodeStep(out.logits(form=config.matmul), out.cache)

    return logits, T5Apply(encode, decode, logits, init_cache, decode_step)

  return hk.multi_transform(functions)
