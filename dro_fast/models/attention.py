"""T5 attention: the Attention module and its implementations by name.

Shapes: B batch, q queries, k keys, H heads, K d_kv (per-head width),
D d_model.

T5 attention has no biases and no 1/√K scale (folded into the query
initialisation); an additive bias [1, H, q, k] carries the relative
positions, and an AttentionMask says which keys each query sees.

`IMPLEMENTATIONS`, fixed at import, maps each name of config.ATTENTIONS to
an AttentionImplementation whose `fn` runs the attention core, all with one
signature:

  fn(queries [B, q, H, K], keys [B, k, H, K], values [B, k, H, K], *,
     bias [1, H, q, k] float32 or None, mask: AttentionMask,
     dropout_rng=None, dropout_rate=0.0) -> [B, q, H, K]

except that one with `relative_bias` gets the bias as a RelativeBias (the
[H, buckets] table and its bucket rule, for positions 0, 1, ...) and a
keyword `interpret` (T5Config.attention_interpret); the network then never
materialises the bias.

  "xla": the [B, H, q, k] logits and softmax as arrays (attention_logits'
    VJP runs the backward in the compute dtype); the only one with attention
    dropout, and the one cached decoding always takes.
  "cudnn": cuDNN's fused (flash) attention through
    jax.nn.dot_product_attention; never materialises the logits.
  "flash": dro_fast.kernels.flash_attention, a Pallas TPU (Mosaic) flash
    attention that builds the relative position bias tile by tile from its
    table; no [B, H, q, k] array in forward or backward. Runs natively on
    a TPU, in the TPU simulator on a CPU (tests).

A query that sees no key gets 0 from every built-in. A fused implementation
(any but "xla") gets no dropout (T5Config refuses dropout_rate > 0 with it)
and reads the key mask as per-example lengths of right-padded keys
(AttentionMask.lengths). An implementation of one's own is passed by value,
T5Config(attention=AttentionImplementation(...)) (benchmarks/
cudnn_stand_in.py); a fused one tags the residuals its backward needs with
checkpoint_name FUSED_RESIDUALS so that the "dots" remat policies keep them
(`saves_fused_residuals`).
"""

from __future__ import annotations

import types
from typing import Mapping, NamedTuple

import haiku as hk
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from dro_fast import kernels
from dro_fast.models import per_device
from dro_fast.models.config import AttentionImplementation
from dro_fast.models.config import T5Config
from dro_fast.models.layers import Dense
from dro_fast.models.layers import lora_for
from dro_fast.models.layers import RelativeBias

# Attention logits at masked positions (finite: a fully masked row stays
# NaN-free).
MASKED = -1e9

# checkpoint_name tags of a fused implementation's residuals: its output
# [B, q, H, K] and its softmax's log-sum-exp [B, H, q].
FUSED_RESIDUALS = ("fused_attention_out", "fused_attention_lse")

# jax's cuDNN attention forward primitives
# (jax/_src/cudnn/fused_attention_stablehlo.py): their outputs, the output
# and the softmax statistics, are the residuals of cuDNN's backward. They
# cannot be tagged from outside, so remat policies match them by name.
_CUDNN_FORWARD = frozenset({"dot_product_attention_fwd_wrapper",
                            "dot_product_attention_fwd"})


def _check_leading_runs(key_valid: jax.Array) -> None:
  """Refuses a concrete [B, k] key mask whose True entries are not a prefix.

  A traced mask cannot be read while tracing and is taken as prefix runs:
  the model builds its encoder mask as tokens != pad_id over inputs that
  dro_fast.data.pipeline right-pads (no pad id inside a text), and its
  decoding masks as positions <= the step.
  """
  try:
    valid = np.asarray(key_valid, bool)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return
  gaps = np.any(valid[:, 1:] & ~valid[:, :-1], axis=1)            # [B]
  if gaps.any():
    row = int(np.argmax(gaps))
    raise ValueError(
        f"AttentionMask.key_valid row {row} is not a leading run of valid "
        f"keys ({valid[row].astype(int).tolist()}): a fused attention reads "
        f"the mask as lengths, so a valid key after a masked one would be "
        f"masked; right-pad the inputs (no pad_id before a token), or use "
        f"attention 'xla'.")


class AttentionMask(NamedTuple):
  """Which keys each query may see.

  key_valid: [B, k] or [1, k] bool, False for keys no query sees (padding,
    cache slots not yet written); None for all. Fused implementations take
    it as lengths, so its True entries must come first in each row
    (`lengths` checks a concrete mask).
  causal: query i sees keys up to i only (self-attention, q == k).
  """
  key_valid: jax.Array | None = None
  causal: bool = False

  def visible(self, q_len: int, k_len: int) -> jax.Array | None:
    """Broadcastable to [B, 1, q, k]: whether query i sees key j."""
    visible = None
    if self.key_valid is not None:
      visible = self.key_valid[:, None, None, :]                  # [B,1,1,k]
    if self.causal:
      causal = (jnp.arange(k_len)[None, :]
                <= jnp.arange(q_len)[:, None])[None, None]        # [1,1,q,k]
      visible = causal if visible is None else visible & causal
    return visible

  def lengths(self) -> jax.Array | None:
    """[B] int32 count of visible keys (right-padded keys), or None.

    Raises:
      ValueError: key_valid is concrete and a row's True entries are not a
        leading run (the lengths would mask other keys than it does).
    """
    if self.key_valid is None:
      return None
    _check_leading_runs(self.key_valid)
    return jnp.sum(self.key_valid, axis=1, dtype=jnp.int32)


def attention_logits_backward(queries: jax.Array, keys: jax.Array,
                              d_logits: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
  """d(queries), d(keys) of attention_logits for d_logits [B, H, q, k].

  d_logits is cast to the compute dtype before the products (float32
  accumulation).
  """
  d_logits = d_logits.astype(queries.dtype)
  d_queries = jnp.einsum("bhqt,bthk->bqhk", d_logits, keys,
                         preferred_element_type=jnp.float32)
  d_keys = jnp.einsum("bhqt,bqhk->bthk", d_logits, queries,
                      preferred_element_type=jnp.float32)
  return d_queries.astype(queries.dtype), d_keys.astype(keys.dtype)


@jax.custom_vjp
def attention_logits(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """queries [B, q, H, K] · keys [B, k, H, K] -> logits [B, H, q, k] float32.

  The einsum "bqhk,bthk->bhqt" with float32 results, and a VJP of its own:
  autodiff of that einsum runs the backward products in float32 (the
  float32 logits' gradient promotes the bfloat16 operand: on a GPU, float32
  or TF32 GEMMs, at half bfloat16's rate or less). Here the gradient is
  cast to the compute dtype first, as cuDNN does (mixed precision: float32
  accumulation, compute-dtype operands).
  """
  return jnp.einsum("bqhk,bthk->bhqt", queries, keys,
                    preferred_element_type=jnp.float32)


def _logits_fwd(queries, keys):
  return attention_logits(queries, keys), (queries, keys)


def _logits_bwd(residuals, d_logits):
  return attention_logits_backward(*residuals, d_logits)


attention_logits.defvjp(_logits_fwd, _logits_bwd)


def xla_attention(queries: jax.Array, keys: jax.Array, values: jax.Array, *,
                  bias: jax.Array | None, mask: AttentionMask,
                  dropout_rng: jax.Array | None = None,
                  dropout_rate: float = 0.0) -> jax.Array:
  """Attention with the [B, H, q, k] logits and softmax materialised.

  A query that sees no key gets 0 (as from "flash"), not the mean of the
  values that a softmax over MASKED logits alone would give.
  """
  logits = attention_logits(queries, keys)                        # [B,H,q,k]
  if bias is not None:
    logits = logits + bias
  visible = mask.visible(queries.shape[1], keys.shape[1])
  if visible is not None:
    logits = jnp.where(visible, logits, MASKED)
  weights = jax.nn.softmax(logits, axis=-1)                       # float32
  if dropout_rng is not None:
    weights = hk.dropout(dropout_rng, dropout_rate, weights)
  weights = weights.astype(values.dtype)
  out = jnp.einsum("bhqt,bthk->bqhk", weights, values)           # [B,q,H,K]
  if visible is None:
    return out
  sees_a_key = jnp.swapaxes(jnp.any(visible, axis=-1), 1, 2)      # [B,q,1]
  return jnp.where(sees_a_key[..., None], out, jnp.zeros((), out.dtype))


def dot_product_attention(queries: jax.Array, keys: jax.Array,
                          values: jax.Array, *, bias: jax.Array | None,
                          mask: AttentionMask,
                          dropout_rng: jax.Array | None = None,
                          dropout_rate: float = 0.0,
                          implementation: str = "cudnn") -> jax.Array:
  """T5 attention as one jax.nn.dot_product_attention call (no scale).

  The bias is cast to the compute dtype (cuDNN takes one dtype). With
  implementation "cudnn" (the registry's entry) jax lowers it to cuDNN's
  fused kernels; "xla" runs the same call in plain XLA (tests check the
  call's values on a CPU that way).
  """
  del dropout_rng, dropout_rate        # fused: refused by T5Config.
  if bias is not None:
    bias = bias.astype(queries.dtype)
  return jax.nn.dot_product_attention(
      queries, keys, values, bias=bias, scale=1.0, is_causal=mask.causal,
      key_value_seq_lengths=mask.lengths(), implementation=implementation)


def flash_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                    *, bias: RelativeBias | None, mask: AttentionMask,
                    dropout_rng: jax.Array | None = None,
                    dropout_rate: float = 0.0,
                    interpret: bool | None = None) -> jax.Array:
  """T5 attention by dro_fast.kernels.flash_attention.

  Its Mosaic kernels compile unless `interpret`
  (T5Config.attention_interpret) says to run them in the TPU simulator;
  None: as the kernel decides. Saves its output and log-sum-exp only,
  tagged FUSED_RESIDUALS.
  """
  del dropout_rng, dropout_rate        # fused: refused by T5Config.
  if interpret is not None:
    interpret = kernels.interpret_mode("tpu", interpret)

  def attend(queries, keys, values, bias, lengths):
    return kernels.flash_attention(
        queries, keys, values, relative_bias=bias, lengths=lengths,
        causal=mask.causal, implementation="pallas_tpu", interpret=interpret,
        residual_names=FUSED_RESIDUALS)

  # A Pallas kernel on a mesh runs per device (per_device.over_batch), on
  # its rows and, on a model axis, its heads (the bias table's rows too).
  return per_device.over_batch(
      attend, (True, True, True, False, True), heads=(2, 2, 2, 0, None),
      out_heads=2)(queries, keys, values, bias, mask.lengths())


IMPLEMENTATIONS: Mapping[str, AttentionImplementation] = (
    types.MappingProxyType({
        "xla": AttentionImplementation("xla", xla_attention),
        "cudnn": AttentionImplementation("cudnn", dot_product_attention),
        "flash": AttentionImplementation("flash", flash_attention,
                                         relative_bias=True),
    }))


def implementation(attention: str | AttentionImplementation
                   ) -> AttentionImplementation:
  """T5Config.attention as an AttentionImplementation (a name: its entry)."""
  if isinstance(attention, AttentionImplementation):
    return attention
  return IMPLEMENTATIONS[attention]


def takes_relative_bias(attention: str | AttentionImplementation) -> bool:
  """Whether T5Config.attention builds the relative-position bias itself.

  Such an implementation gets a RelativeBias and `interpret=`, not a
  [1, H, q, k] array.
  """
  return implementation(attention).relative_bias


def saves_fused_residuals(prim, *avals, **params) -> bool:
  """A remat policy's test: are prim's outputs a fused attention's residuals?

  They are for cuDNN's forward primitives and for values tagged with
  FUSED_RESIDUALS.
  """
  return (prim.name in _CUDNN_FORWARD
          or _tagged_fused_residual(prim, *avals, **params))


_tagged_fused_residual = jax.checkpoint_policies.save_only_these_names(
    *FUSED_RESIDUALS)


class Attention(hk.Module):
  """Multi-head attention without biases or 1/√K scaling.

  All projections are created in __call__, so their parameters sit at
  <name>/{query,key,value,out}/kernel (Haiku adds a "~method" level to the
  names of submodules that other methods create). Each projection's output
  is tagged (checkpoint_name "attention_query", "_key", "_value", "_out")
  for the "dots_except_mlp_hidden" remat policy.
  """

  def __init__(self, config: T5Config, name: str):
    super().__init__(name=name)
    self.config = config

  def _split_heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.config.num_heads,
                     self.config.d_kv)                            # [B,n,H,K]

  def __call__(self, queries_in: jax.Array | None,
               kv_inputs: jax.Array | None = None, *,
               bias: jax.Array | None = None,
               mask: AttentionMask = AttentionMask(),
               dropout_rng: jax.Array | None = None,
               cached_kv: tuple[jax.Array, jax.Array] | None = None,
               cache_position: jax.Array | None = None):
    """Attends queries_in [B, q, D] to keys/values.

    Args:
      queries_in: [B, q, D] inputs of the query projection; None to only
        project kv_inputs into keys and values.
      kv_inputs: [B, k, D] inputs of the key/value projections, or None to
        use cached_kv as they are.
      bias: float32 additive bias [1, H, q, k] (relative positions), its
        factored form (a RelativeBias, for an implementation that
        takes_relative_bias; materialised here for any other), or None.
      mask: which keys each query sees.
      dropout_rng: key for dropout on the attention weights, or None.
      cached_kv: ([B, T_max, H, K], [B, T_max, H, K]) cache. With kv_inputs,
        their keys/values are written into it at cache_position. Attention
        over a cache always runs the "xla" implementation.
      cache_position: where kv_inputs go in the cache.

    Returns:
      (output [B, q, D] or None, (keys, values) [B, k, H, K]).
    """
    config = self.config
    def dense(name, init_scale=1.0):
      return Dense(config.num_heads * config.d_kv, config.compute_dtype,
                   form=config.matmul, init_scale=init_scale, name=name,
                   lora=lora_for(config, name))
    if kv_inputs is not None:
      keys = self._split_heads(checkpoint_name(dense(name="key")(kv_inputs),
                                               "attention_key"))
      values = self._split_heads(checkpoint_name(
          dense(name="value")(kv_inputs), "attention_value"))
      if cached_kv is not None:
        keys, values = (
            jax.lax.dynamic_update_slice_in_dim(
                cache, new.astype(cache.dtype), cache_position, axis=1)
            for cache, new in zip(cached_kv, (keys, values)))
    else:
      keys, values = cached_kv
    if queries_in is None:
      return None, (keys, values)
    # Query init scaled by 1/K: T5's folded-in 1/√K attention scale.
    queries = self._split_heads(checkpoint_name(
        dense(init_scale=1.0 / config.d_kv, name="query")(queries_in),
        "attention_query"))                                       # [B,q,H,K]
    impl = implementation("xla" if cached_kv is not None else
                          config.attention)
    extra = {}
    if impl.relative_bias:
      extra["interpret"] = config.attention_interpret
    elif isinstance(bias, RelativeBias):
      bias = bias.dense(queries.shape[1], keys.shape[1])          # [1,H,q,k]
    out = impl.fn(queries, keys, values, bias=bias, mask=mask,
                  dropout_rng=dropout_rng, dropout_rate=config.dropout_rate,
                  **extra)                                        # [B,q,H,K]
    out = out.reshape(*out.shape[:2], -1)                         # [B,q,H·K]
    out = Dense(config.d_model, config.compute_dtype, form=config.matmul,
                name="out", lora=lora_for(config, "out"))(out)   # [B, q, D]
    return checkpoint_name(out, "attention_out"), (keys, values)
