"""Shared inputs and float64 references for the attention implementations'
tests (tests/models/test_fused_attention.py,
tests/benchmarks/test_cudnn_stand_in.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dro_fast import models
from dro_fast.models.attention import AttentionMask

CONFIG = models.preset("tiny", dropout_rate=0.0, dtype="bfloat16")
B, S, T = 3, 21, 19


def tokens(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Encoder tokens [B, S], right-padded as dro_fast.data pads, and targets
  [B, T]."""
  rng = np.random.default_rng(seed)
  encoder = rng.integers(2, CONFIG.vocab_size, (B, S)).astype(np.int32)
  encoder[1, 15:] = CONFIG.pad_id
  encoder[2, 4:] = CONFIG.pad_id
  targets = rng.integers(2, CONFIG.vocab_size, (B, T)).astype(np.int32)
  return encoder, targets


def attention_inputs(causal: bool):
  """Random float32 q [b, q, h, d], k, v [b, k, h, d], bias [1, h, q, k], a
  cotangent like q, key lengths [b] and the matching AttentionMask."""
  rng = np.random.default_rng(1)
  b, q_len, k_len, h, d = 3, 6, 6 if causal else 9, 2, 8
  q, k, v, cotangent = (rng.normal(size=shape).astype(np.float32) for shape in
                        ((b, q_len, h, d), (b, k_len, h, d), (b, k_len, h, d),
                         (b, q_len, h, d)))
  bias = rng.normal(size=(1, h, q_len, k_len)).astype(np.float32)
  lengths = np.array([k_len] * b if causal else [k_len, 4, 1], np.int32)
  mask = AttentionMask(
      key_valid=None if causal else
      jnp.arange(k_len)[None, :] < jnp.asarray(lengths)[:, None],
      causal=causal)
  return (q, k, v, bias), cotangent, lengths, mask


def attention_reference(q, k, v, bias, lengths, causal, cotangent):
  """float64 output and gradients (q, k, v, bias) of T5 attention."""
  q, k, v, bias, cotangent = (np.asarray(a, np.float64)
                              for a in (q, k, v, bias, cotangent))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) + bias
  keys = np.arange(k.shape[1])
  visible = keys[None, None, None, :] < lengths[:, None, None, None]
  if causal:
    visible = visible & (keys[None, :] <= np.arange(q.shape[1])[:, None])
  logits = np.where(visible, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v)
  d_weights = np.einsum("bqhd,bkhd->bhqk", cotangent, v)
  d_logits = weights * (d_weights - (d_weights * weights).sum(-1,
                                                              keepdims=True))
  return out, (np.einsum("bhqk,bkhd->bqhd", d_logits, k),
               np.einsum("bhqk,bqhd->bkhd", d_logits, q),
               np.einsum("bhqk,bqhd->bkhd", weights, cotangent),
               d_logits.sum(0, keepdims=True))


def check_against_reference(implementation, causal: bool):
  """implementation(q, k, v, bias=, mask=) and its gradients against the
  float64 reference, on float32 inputs."""
  args, cotangent, lengths, mask = attention_inputs(causal)

  def loss(q, k, v, bias):
    out = implementation(q, k, v, bias=bias, mask=mask)
    return jnp.sum(out * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                       has_aux=True)(*args)
  want_out, want_grads = attention_reference(*args, lengths, causal,
                                             cotangent)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for name, got, want in zip("q k v bias".split(), grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def logits_and_grads(config, params, encoder, targets):
  """The model's float32 logits and the gradient of sum(logits · c) for a
  fixed random cotangent c."""
  model = models.t5(config)
  cotangent = jax.random.normal(jax.random.key(2),
                                (B, T, config.vocab_size), jnp.float32)

  def loss(params):
    logits = model.apply.logits(params, None, encoder, targets).astype(
        jnp.float32)
    return jnp.sum(logits * cotangent), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def check_matches_materialised(config, params):
  """The model under `config` against attention "xla" on the same params.

  bfloat16 compute on both sides: the two differ in summation order and in
  where the bias and the probabilities are rounded to bfloat16.
  """
  encoder, targets = tokens()
  fused = logits_and_grads(config, params, encoder, targets)
  materialised = logits_and_grads(config.replace(attention="xla"), params,
                                  encoder, targets)
  scale = float(jnp.max(jnp.abs(materialised[0])))
  np.testing.assert_allclose(fused[0], materialised[0], atol=0.02 * scale)
  flat_fused = dict(jax.tree_util.tree_leaves_with_path(fused[1]))
  for path, want in jax.tree_util.tree_leaves_with_path(materialised[1]):
    got = flat_fused[path]
    assert float(jnp.max(jnp.abs(want))) > 0, path
    error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert error < 0.05, (jax.tree_util.keystr(path), error)
