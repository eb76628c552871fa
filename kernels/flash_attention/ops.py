"""T5 flash attention as a differentiable op over its implementations.

Shapes: B batch, q queries, k keys, H heads, K per-head width.

IMPLEMENTATIONS, fixed at import: "xla" (reference.py, the materialised
attention, differentiated by JAX's autodiff) and, where its module imports,
"pallas_tpu" (the Mosaic kernels, pallas_tpu.py). Every entry other than
"xla" runs under this module's custom VJP, which saves the output and the
log-sum-exp [B, H, q] only (tagged with `residual_names`, for the remat
policies that keep them) and hands them to the entry's backward.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, Mapping

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from dro_fast.kernels import config
from dro_fast.kernels.flash_attention import reference
from dro_fast.kernels.flash_attention.config import BlockSizes
from dro_fast.kernels.flash_attention.config import CallConfig
from dro_fast.kernels.flash_attention.relative_bias import RelativeBias


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One backend of flash_attention.

  Attributes:
    name: registry key.
    forward: (q [B, q, H, K], k, v [B, k, H, K], table [H, buckets] float32
      or None, lengths [B] int32, static: CallConfig) -> (out [B, q, H, K],
      lse [B, H, q] float32).
    backward: (q, k, v, table, lengths, out, lse, d_out, static) -> (dq,
      dk, dv, d_table or None); None: JAX's autodiff of forward.
    native_backend: the platform its kernels compile for; elsewhere they
      run in interpret mode (None: plain XLA).
  """
  name: str
  forward: Callable[..., tuple[jax.Array, jax.Array]]
  backward: Callable[..., tuple] | None = None
  native_backend: str | None = None


def _implementations() -> Mapping[str, Implementation]:
  """The table, built once: "xla" always, Pallas backends where they import."""
  table = {"xla": Implementation("xla", reference.forward)}
  try:
    from dro_fast.kernels.flash_attention import pallas_tpu  # pylint: disable=g-import-not-at-top
    table["pallas_tpu"] = Implementation(
        "pallas_tpu", pallas_tpu.forward, pallas_tpu.backward,
        native_backend="tpu")
  except ImportError:  # pragma: no cover - depends on the jaxlib build
    pass
  return types.MappingProxyType(table)


IMPLEMENTATIONS: Mapping[str, Implementation] = _implementations()


def _get(name: str) -> Implementation:
  try:
    return IMPLEMENTATIONS[name]
  except KeyError:
    raise ValueError(f"Unknown flash_attention implementation {name!r}; "
                     f"choose one of {sorted(IMPLEMENTATIONS)}.") from None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static: CallConfig, q, k, v, table, lengths):
  return _get(static.implementation).forward(q, k, v, table, lengths,
                                             static)[0]


def _attention_fwd(static, q, k, v, table, lengths):
  out, lse = _get(static.implementation).forward(q, k, v, table, lengths,
                                                 static)
  if static.residual_names is not None:
    out = checkpoint_name(out, static.residual_names[0])
    lse = checkpoint_name(lse, static.residual_names[1])
  return out, (q, k, v, table, lengths, out, lse)


def _attention_bwd(static, residuals, d_out):
  q, k, v, table, lengths, out, lse = residuals
  dq, dk, dv, d_table = _get(static.implementation).backward(
      q, k, v, table, lengths, out, lse, d_out, static)
  return dq, dk, dv, d_table, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                    *, relative_bias: RelativeBias | None,
                    lengths: jax.Array | None, causal: bool = False,
                    implementation: str = "pallas_tpu",
                    block_sizes: BlockSizes | None = None,
                    interpret: Any = None,
                    residual_names: tuple[str, str] | None = None
                    ) -> jax.Array:
  """T5 attention (no 1/√K scale) without a [B, H, q, k] array.

  Args:
    queries: [B, q, H, K]; keys, values: [B, k, H, K]; one floating dtype,
      the compute dtype (products in it, float32 accumulation and softmax).
    relative_bias: the relative-position bias as its table (query and key
      positions are the indices 0, 1, ...), or None for no bias.
    lengths: [B] (or [1]) int visible keys per example: keys at or past
      lengths[b] are masked (right padding); None: all k.
    causal: query i sees keys j <= i only (needs q == k).
    implementation: a key of IMPLEMENTATIONS.
    block_sizes: tiles (None: BlockSizes()).
    interpret: pallas_call's interpret, best given by the caller that knows
      the platform the program compiles for: kernels.interpret_for("tpu",
      platform) is False (Mosaic: a TPU, or a lowering for one) on "tpu",
      the TPU simulator elsewhere. None: that choice for
      kernels.target_platform().
    residual_names: checkpoint_name tags for the saved output and
      log-sum-exp, or None.

  Returns:
    [B, q, H, K] in the queries' dtype; a query that sees no key gets 0.
    Differentiable w.r.t. queries, keys, values and relative_bias.table.
  """
  if not queries.dtype == keys.dtype == values.dtype:
    raise ValueError(f"flash_attention takes one dtype; got queries "
                     f"{queries.dtype}, keys {keys.dtype}, values "
                     f"{values.dtype}.")
  impl = _get(implementation)
  batch, k_len = keys.shape[0], keys.shape[1]
  if lengths is None:
    lengths = jnp.full((batch,), k_len, jnp.int32)
  else:
    lengths = jnp.minimum(jnp.broadcast_to(lengths, (batch,)),
                          k_len).astype(jnp.int32)
  static = CallConfig(
      implementation=impl.name, causal=causal,
      bidirectional=None if relative_bias is None else
      relative_bias.bidirectional,
      max_distance=0 if relative_bias is None else relative_bias.max_distance,
      block_sizes=block_sizes or BlockSizes(),
      interpret=config.resolve_interpret(interpret, "tpu"),
      residual_names=residual_names)
  table = None if relative_bias is None else relative_bias.table.astype(
      jnp.float32)
  if impl.backward is None:
    out, _ = impl.forward(queries, keys, values, table, lengths, static)
    return out
  return _attention(static, queries, keys, values, table, lengths)
