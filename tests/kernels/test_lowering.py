"""Pallas kernels compile for hardware we lack: lowering for "tpu" (Mosaic)
and "cuda" (Triton) on the CPU with interpret=False surfaces block-shape and
layout errors without a TPU or GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dro_fast import kernels

PLATFORMS = [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")]
B, T, V, D = 2, 40, 32128, 256


def _sequence_grad(name):
  def fn(logits, targets, mask):
    return jax.value_and_grad(lambda x: jnp.sum(kernels.sequence_logprobs(
        x, targets, mask, implementation=name, interpret=False)))(logits)
  return fn


def _linear_grad(name):
  def fn(hidden, weight, targets, mask):
    return jax.value_and_grad(
        lambda h, w: jnp.sum(kernels.linear_sequence_logprobs(
            h, w, targets, mask, implementation=name, interpret=False)),
        argnums=(0, 1))(hidden, weight)
  return fn


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=lambda d: d.__name__)
@pytest.mark.parametrize("name, platform", PLATFORMS)
def test_lowers_for_platform(name, platform, dtype):
  spec = jax.ShapeDtypeStruct
  targets, mask = spec((B, T), jnp.int32), spec((B, T), jnp.bool_)
  lowered = jax.jit(_sequence_grad(name)).trace(
      spec((B, T, V), dtype), targets, mask).lower(
          lowering_platforms=(platform,))
  text = lowered.as_text()
  assert "token_logprobs_fwd" in text and "token_logprobs_bwd" in text
  lowered = jax.jit(_linear_grad(name)).trace(
      spec((B, T, D), dtype), spec((D, V), dtype), targets, mask).lower(
          lowering_platforms=(platform,))
  assert "linear_token_logprobs_fwd" in lowered.as_text()


@pytest.mark.parametrize("name, platform, blocks", [
    ("pallas_tpu", "tpu", dict(rows=8, vocab=100)),
    ("pallas_gpu", "cuda", dict(rows=4, vocab=100)),
])
def test_lowering_rejects_bad_tiles(name, platform, blocks, monkeypatch):
  # Bypass our own BlockSizes checks to show the compiler's would fire too.
  monkeypatch.setattr(kernels.BlockSizes, "check_tpu", lambda self: None)
  monkeypatch.setattr(kernels.BlockSizes, "check_gpu", lambda self: None)
  spec = jax.ShapeDtypeStruct
  fn = lambda x, t, m: kernels.sequence_logprobs(
      x, t, m, implementation=name, interpret=False,
      block_sizes=kernels.BlockSizes(**blocks))
  with pytest.raises(Exception, match="block shape|power of 2"):
    jax.jit(fn).trace(spec((B, T, V), jnp.float32), spec((B, T), jnp.int32),
                      spec((B, T), jnp.bool_)).lower(
                          lowering_platforms=(platform,))
