"""A stand-in for cuDNN attention's memory, for planning it without a GPU.

cuDNN's fused attention cannot compile where there is no CUDA GPU, so XLA on
a CPU cannot plan the memory of a model with T5Config.attention "cudnn".
This implementation keeps, for its backward pass, what cuDNN's keeps: the
attention's output [B, q, H, K] and the softmax's log-sum-exp [B, H, q]
float32 (tagged FUSED_RESIDUALS, so the "dots" remat policies save them as
they save cuDNN's), and recomputes the probabilities in the backward.

Its transient [B, H, q, k] float32 arrays (the probabilities in the forward;
probabilities and their gradients in the backward, one layer at a time) are
a workspace cuDNN does not have, so it overstates cuDNN's memory, as far as
XLA:CPU's buffer assignment stands for the GPU's.

Use (the model takes an implementation of one's own by value):
  config = T5Config(attention=cudnn_stand_in.IMPLEMENTATION,
                    dtype="bfloat16", dropout_rate=0.0, ...)
  (resolved for platform "gpu": benchmarks/lib/step.py's JaxStep)
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from dro_fast.models import attention
from dro_fast.models.config import AttentionImplementation

NAME = "cudnn_stand_in"


def _probabilities(queries, keys, bias, mask, lse):
  """Softmax probabilities [B, H, q, k] float32 with the mask applied.

  With lse None, also the logits' log-sum-exp [B, H, q]; else the
  probabilities from the given lse. A query that sees no key gets
  probabilities 0.
  """
  logits = attention.attention_logits(queries, keys)              # [B,H,q,k]
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  visible = mask.visible(queries.shape[1], keys.shape[1])
  if visible is None:
    visible = jnp.ones((1, 1, 1, keys.shape[1]), jnp.bool_)
  logits = jnp.where(visible, logits, -1e30)
  computed = lse is None
  if computed:
    lse = jax.nn.logsumexp(logits, axis=-1)                       # [B, H, q]
  probabilities = jnp.where(visible, jnp.exp(logits - lse[..., None]), 0.0)
  return (probabilities, lse) if computed else probabilities


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(queries, keys, values, bias, key_valid, causal):
  return _attention_fwd(queries, keys, values, bias, key_valid, causal)[0]


def _attention_fwd(queries, keys, values, bias, key_valid, causal):
  mask = attention.AttentionMask(key_valid, causal)
  probabilities, lse = _probabilities(queries, keys, bias, mask, None)
  out = jnp.einsum("bhqk,bkhd->bqhd", probabilities.astype(values.dtype),
                   values, preferred_element_type=jnp.float32
                   ).astype(queries.dtype)                        # [B,q,H,K]
  out = checkpoint_name(out, attention.FUSED_RESIDUALS[0])
  lse = checkpoint_name(lse, attention.FUSED_RESIDUALS[1])
  return out, (queries, keys, values, bias, key_valid, out, lse)


def _attention_bwd(causal, residuals, d_out):
  queries, keys, values, bias, key_valid, out, lse = residuals
  probabilities = _probabilities(
      queries, keys, bias, attention.AttentionMask(key_valid, causal), lse)
  d_out = d_out.astype(queries.dtype)
  d_values = jnp.einsum("bhqk,bqhd->bkhd", probabilities.astype(d_out.dtype),
                        d_out, preferred_element_type=jnp.float32)
  d_probabilities = jnp.einsum("bqhd,bkhd->bhqk", d_out, values,
                               preferred_element_type=jnp.float32)
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32),
                     out.astype(jnp.float32))
  d_logits = probabilities * (d_probabilities - delta[..., None])
  d_queries, d_keys = attention.attention_logits_backward(queries, keys,
                                                          d_logits)
  d_bias = None
  if bias is not None:
    d_bias = jnp.sum(d_logits, axis=0, keepdims=True).astype(bias.dtype)
  return (d_queries, d_keys, d_values.astype(values.dtype), d_bias, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def stand_in_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                       *, bias: jax.Array | None,
                       mask: attention.AttentionMask,
                       dropout_rng: jax.Array | None = None,
                       dropout_rate: float = 0.0) -> jax.Array:
  """T5 attention that keeps cuDNN's residuals, in models.attention's signature.

  The bias is cast to the compute dtype, as cuDNN takes it.
  """
  del dropout_rng, dropout_rate        # fused: refused by T5Config.
  if bias is not None:
    bias = bias.astype(queries.dtype)
  return _attention(queries, keys, values, bias, mask.key_valid, mask.causal)


# T5Config.attention for the stand-in.
IMPLEMENTATION = AttentionImplementation(NAME, stand_in_attention)
