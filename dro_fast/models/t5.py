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
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, NamedTuple

import haiku as hk
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from dro_fast import cpu_gemm
from dro_fast.models.config import T5Config

# Attention logits at masked positions (finite: a fully masked row stays NaN-free).
_MASKED = -1e9


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


class RMSNorm(hk.Module):
  """T5's LayerNorm: scale only, no mean subtraction, computed in float32."""

  def __init__(self, epsilon: float, name: str):
    super().__init__(name=name)
    self.epsilon = epsilon

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32,
                             init=jnp.ones)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(variance + self.epsilon) * scale).astype(
        x.dtype)


class Dense(hk.Module):
  """x @ kernel without bias; kernel [in, out] float32, used in `dtype`."""

  def __init__(self, features: int, dtype, init_scale: float = 1.0,
               name: str | None = None):
    super().__init__(name=name)
    self.features = features
    self.dtype = dtype
    self.init_scale = init_scale

  def kernel_only(self, in_features: int, cast: bool = True) -> jax.Array:
    """The kernel [in, out] in `dtype` (float32 as stored if not cast), for
    callers that fuse the matmul."""
    return self(jnp.zeros((0, in_features), self.dtype),
                return_kernel="cast" if cast else "stored")

  def __call__(self, x: jax.Array, return_kernel: str | None = None
               ) -> jax.Array:
    init = hk.initializers.VarianceScaling(self.init_scale, "fan_in",
                                           "truncated_normal")
    kernel = hk.get_parameter("kernel", [x.shape[-1], self.features],
                              jnp.float32, init=init)
    if return_kernel == "stored":
      return kernel
    if return_kernel == "cast":
      return kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    if cpu_gemm.cpu_paths():
      return cpu_matmul(x, kernel, x.dtype)
    return jnp.dot(x, kernel.astype(self.dtype))


def _row_major_permute(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """jnp.transpose(x, axes), materialised in row-major order.

  A bare transpose reaches XLA:CPU as a non-default layout of the same
  buffer, which XLA's YNNPACK matmul does not take: the dot then runs in
  Eigen, and a bfloat16 one is first upcast to float32 (half the rate on a
  CPU with AVX512-BF16). Flattening the transpose behind an optimization
  barrier forces one row-major copy that the dot takes as it is.
  """
  permuted = jnp.transpose(x, axes)
  return jax.lax.optimization_barrier(
      permuted.reshape(-1)).reshape(permuted.shape)


def _row_major_transpose(x2d: jax.Array) -> jax.Array:
  """x2d [N, D] -> [D, N], materialised in row-major order."""
  return _row_major_permute(x2d, (1, 0))


def _matmul_2d(x: jax.Array, kernel: jax.Array, out_dtype) -> jax.Array:
  """x [..., D] @ kernel [D, F] as one 2-D GEMM, accumulated in float32."""
  y = jnp.dot(*cpu_gemm.operands(x.reshape(-1, x.shape[-1]), kernel),
              preferred_element_type=jnp.float32).astype(out_dtype)
  return y.reshape(*x.shape[:-1], kernel.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cpu_matmul(x: jax.Array, kernel: jax.Array, out_dtype) -> jax.Array:
  """x [..., D] @ kernel [D, F] in x.dtype, as XLA:CPU runs it fast.

  The kernel is cast to x.dtype (the compute dtype) inside, and every
  matmul, forward and backward, is a 2-D GEMM with both operands in that
  dtype, accumulated in float32; the result is cast to `out_dtype`. The
  gradient flowing back is cast to the compute dtype first (mixed
  precision). d(kernel) comes back in the kernel's own dtype (float32 for
  a float32 parameter, with no bfloat16 rounding on the way).

  Why not jnp.dot and autodiff, on the CPU:
    - autodiff of a dot on [B, n, D] contracts [B, n] as two dimensions for
      the weight gradient xᵀ·dy, and XLA:CPU copied dy into a transposed
      layout with a strided loop first (~0.5 s of a 3.4 s T5-small DRO-V
      step);
    - a transposed operand (xᵀ or kernelᵀ) has a column-major layout that
      XLA's YNNPACK matmul does not take: the GEMM runs in Eigen instead,
      and in bfloat16 it is upcast to float32 first. Here d(x) contracts
      the kernel's last dimension in place and xᵀ is materialised
      row-major (_row_major_transpose);
    - a bfloat16 x bfloat16 -> bfloat16 dot is also upcast; with a float32
      result it runs natively (AVX512-BF16). On a host without bfloat16
      arithmetic the native form is emulated and slower than float32, so
      every CPU GEMM here takes its operands through cpu_gemm.operands,
      which upcasts them there (dro_fast/cpu_gemm.py).
  The residuals are x and the kernel themselves, as the caller holds them
  (a reshaped or cast copy would be stacked as a second residual under
  scan_layers). Accelerators use jnp.dot. Measured in benchmarks/RESULTS.md
  (and benchmarks/cpu_gemm.py).
  """
  return _matmul_2d(x, kernel.astype(x.dtype), out_dtype)


def _cpu_matmul_fwd(x, kernel, out_dtype):
  return _matmul_2d(x, kernel.astype(x.dtype), out_dtype), (x, kernel)


def _cpu_matmul_bwd(out_dtype, residuals, dy):
  del out_dtype
  x, kernel = residuals
  kernel_c = kernel.astype(x.dtype)
  x2d = x.reshape(-1, x.shape[-1])
  dy2d = dy.reshape(-1, dy.shape[-1]).astype(x.dtype)
  dx = jax.lax.dot_general(*cpu_gemm.operands(dy2d, kernel_c),
                           (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
  dkernel = jnp.dot(*cpu_gemm.operands(_row_major_transpose(x2d), dy2d),
                    preferred_element_type=jnp.float32)
  return (dx.reshape(x.shape).astype(x.dtype),
          dkernel.astype(kernel.dtype))


cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


# Attention's two batched products on the CPU. Autodiff of the einsums
# gives backward products that contract a transposed operand ([q, t] over
# q) or take a float32 cotangent; XLA:CPU runs both as float32 Eigen dots,
# so in bfloat16 every backward product (and the forward's second) was
# upcast. These VJPs put every product in the one form YNNPACK runs
# natively: [B, H] leading batch dimensions, row-major operands in the
# compute dtype, contraction over the left operand's last dimension,
# float32 accumulation. Transposed operands are materialised row-major
# (_row_major_permute); the two that a product would need transposed are
# produced transposed instead (d(keys)ᵀ = queriesᵀ·d(logits),
# d(values)ᵀ = d(out)ᵀ·weights). Accelerators use the einsums.

def _head_dot(a: jax.Array, b: jax.Array, a_contract: int,
              b_contract: int) -> jax.Array:
  """Batched over [B, H] (dims 0, 1), float32 result."""
  return jax.lax.dot_general(
      *cpu_gemm.operands(a, b),
      (((a_contract,), (b_contract,)), ((0, 1), (0, 1))),
      preferred_element_type=jnp.float32)


_HEADS_FIRST = (0, 2, 1, 3)       # [B, T, H, K] <-> [B, H, T, K]


@jax.custom_vjp
def cpu_attention_logits(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """queries [B, q, H, K] · keys [B, t, H, K] -> logits [B, H, q, t] float32.

  The same product as einsum("bqhk,bthk->bhqt", preferred float32), in
  the forms XLA:CPU runs fast (see above). The logits' gradient is cast
  to the compute dtype before the backward products (mixed precision).
  """
  return _head_dot(_row_major_permute(queries, _HEADS_FIRST),
                   _row_major_permute(keys, _HEADS_FIRST), 3, 3)


def _logits_fwd(queries, keys):
  keys_h = _row_major_permute(keys, _HEADS_FIRST)          # [B, H, t, K]
  logits = _head_dot(_row_major_permute(queries, _HEADS_FIRST), keys_h,
                     3, 3)
  return logits, (queries, keys_h)


def _logits_bwd(residuals, d_logits):
  queries, keys_h = residuals
  d_logits = d_logits.astype(queries.dtype)                  # [B, H, q, t]
  d_queries = _head_dot(d_logits, keys_h, 3, 2)              # [B, H, q, K]
  d_keys_t = _head_dot(_row_major_permute(queries, (0, 2, 3, 1)),
                       d_logits, 3, 2)                       # [B, H, K, t]
  return (jnp.transpose(d_queries, _HEADS_FIRST).astype(queries.dtype),
          jnp.transpose(d_keys_t, (0, 3, 1, 2)).astype(keys_h.dtype))


cpu_attention_logits.defvjp(_logits_fwd, _logits_bwd)


@jax.custom_vjp
def attention_logits(queries: jax.Array, keys: jax.Array) -> jax.Array:
  """queries [B, q, H, K] · keys [B, t, H, K] -> logits [B, H, q, t] float32,
  as einsum("bqhk,bthk->bhqt", preferred float32), on accelerators.

  Autodiff of that einsum runs the backward products in float32: the
  float32 logits' gradient promotes the bfloat16 operand (on a GPU, float32
  or TF32 GEMMs, at half bfloat16's rate or less). Here the gradient is cast
  to the compute dtype first, as cpu_attention_logits and cuDNN do (mixed
  precision: float32 accumulation, compute-dtype operands).
  """
  return jnp.einsum("bqhk,bthk->bhqt", queries, keys,
                    preferred_element_type=jnp.float32)


def _accelerator_logits_fwd(queries, keys):
  return attention_logits(queries, keys), (queries, keys)


def _accelerator_logits_bwd(residuals, d_logits):
  queries, keys = residuals
  d_logits = d_logits.astype(queries.dtype)
  d_queries = jnp.einsum("bhqt,bthk->bqhk", d_logits, keys,
                         preferred_element_type=jnp.float32)
  d_keys = jnp.einsum("bhqt,bqhk->bthk", d_logits, queries,
                      preferred_element_type=jnp.float32)
  return d_queries.astype(queries.dtype), d_keys.astype(keys.dtype)


attention_logits.defvjp(_accelerator_logits_fwd, _accelerator_logits_bwd)


@jax.custom_vjp
def cpu_attention_combine(weights: jax.Array, values: jax.Array) -> jax.Array:
  """weights [B, H, q, t] · values [B, t, H, K] -> [B, q, H, K].

  The same product as einsum("bhqt,bthk->bqhk"), accumulated in float32
  and returned in values.dtype, in the forms XLA:CPU runs fast (see
  above). weights must already be in the compute dtype.
  """
  out = _head_dot(weights, _row_major_permute(values, _HEADS_FIRST), 3, 2)
  return jnp.transpose(out, _HEADS_FIRST).astype(values.dtype)


def _combine_fwd(weights, values):
  values_h = _row_major_permute(values, _HEADS_FIRST)        # [B, H, t, K]
  out = _head_dot(weights, values_h, 3, 2)
  return (jnp.transpose(out, _HEADS_FIRST).astype(values.dtype),
          (weights, values_h))


def _combine_bwd(residuals, d_out):
  weights, values_h = residuals
  d_out = d_out.astype(values_h.dtype)                       # [B, q, H, K]
  d_weights = _head_dot(_row_major_permute(d_out, _HEADS_FIRST), values_h,
                        3, 3)                                # [B, H, q, t]
  d_values_t = _head_dot(_row_major_permute(d_out, (0, 2, 3, 1)), weights,
                         3, 2)                               # [B, H, K, t]
  return (d_weights.astype(weights.dtype),
          jnp.transpose(d_values_t, (0, 3, 1, 2)).astype(values_h.dtype))


cpu_attention_combine.defvjp(_combine_fwd, _combine_bwd)


# T5 v1.1's gated GELU, gelu(x·W₀)·(x·W₁), on the CPU. Autodiff of the
# composition left about a dozen bfloat16 elementwise fusions per MLP in the
# backward pass (the tanh recomputed, an add_any for gelu's two uses of its
# input, casts of both GEMM outputs), each a full pass over [N, F] in
# memory. Here the forward reads the two float32 GEMM outputs once, and the
# backward forms d(h₀) and d(h₁) in one pass from d(hidden) and the saved
# h₀, h₁. Every GEMM is cpu_matmul's form.

_GELU_C = math.sqrt(2.0 / math.pi)       # gelu's tanh approximation


def _gelu_parts(h0: jax.Array) -> tuple[jax.Array, jax.Array]:
  """gelu(h0) (tanh approximation) and its derivative, in h0's dtype."""
  inner = _GELU_C * (h0 + 0.044715 * h0 * h0 * h0)
  t = jnp.tanh(inner)
  gelu = 0.5 * h0 * (1.0 + t)
  d_gelu = 0.5 * (1.0 + t) + 0.5 * h0 * (1.0 - t * t) * _GELU_C * (
      1.0 + 3 * 0.044715 * h0 * h0)
  return gelu, d_gelu


def _gated_gelu_forward(x, kernel_0, kernel_1):
  h0 = _matmul_2d(x, kernel_0.astype(x.dtype), jnp.float32)
  h1 = _matmul_2d(x, kernel_1.astype(x.dtype), jnp.float32)
  return h0, h1, (_gelu_parts(h0)[0] * h1).astype(x.dtype)


@jax.custom_vjp
def cpu_gated_gelu(x: jax.Array, kernel_0: jax.Array,
                   kernel_1: jax.Array) -> jax.Array:
  """gelu(x @ kernel_0) * (x @ kernel_1) [..., F] in x.dtype, on the CPU.

  x [..., D] is in the compute dtype, the kernels [D, F] as stored (cast
  inside). The GEMMs accumulate in float32 and the gate is computed from
  their float32 results; the backward pass saves h₀ and h₁ in x.dtype (as
  autodiff of the bfloat16 composition did) and returns the kernels'
  gradients in their own dtype.
  """
  return _gated_gelu_forward(x, kernel_0, kernel_1)[2]


def _gated_gelu_fwd(x, kernel_0, kernel_1):
  h0, h1, hidden = _gated_gelu_forward(x, kernel_0, kernel_1)
  return hidden, (x, kernel_0, kernel_1, h0.astype(x.dtype),
                  h1.astype(x.dtype))


def _gated_gelu_bwd(residuals, d_hidden):
  x, kernel_0, kernel_1, h0, h1 = residuals
  h0, h1 = h0.astype(jnp.float32), h1.astype(jnp.float32)
  d_hidden = d_hidden.astype(jnp.float32)
  gelu, d_gelu = _gelu_parts(h0)
  d_h0 = (d_hidden * h1 * d_gelu).astype(x.dtype)
  d_h1 = (d_hidden * gelu).astype(x.dtype)
  x2d_t = _row_major_transpose(x.reshape(-1, x.shape[-1]))
  d_x, d_kernels = 0.0, []
  for d_h, kernel in ((d_h0, kernel_0), (d_h1, kernel_1)):
    d_h2d = d_h.reshape(-1, d_h.shape[-1])
    d_x = d_x + jax.lax.dot_general(
        *cpu_gemm.operands(d_h2d, kernel.astype(x.dtype)),
        (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    d_kernels.append(jnp.dot(*cpu_gemm.operands(x2d_t, d_h2d),
                             preferred_element_type=jnp.float32
                             ).astype(kernel.dtype))
  return (d_x.reshape(x.shape).astype(x.dtype), *d_kernels)


cpu_gated_gelu.defvjp(_gated_gelu_fwd, _gated_gelu_bwd)


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucketing of key_position − query_position (Mesh TF / T5X / HF).

  Half the buckets (per direction) hold exact small distances; the rest grow
  logarithmically up to max_distance, beyond which all share the last.
  """
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket += (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


class RelativePositionBias(hk.Module):
  """One bias table rel_embedding [H, buckets] shared by a stack's layers."""

  def __init__(self, config: T5Config, bidirectional: bool, name="relpos_bias"):
    super().__init__(name=name)
    self.config = config
    self.bidirectional = bidirectional

    config = self.config
    self.table = hk.get_parameter(
        "rel_embedding",
        [config.num_heads, config.relative_attention_num_buckets],
        jnp.float32, init=hk.initializers.VarianceScaling(1.0, "fan_in",
                                                          "uniform"))

  def __call__(self, query_positions: jax.Array,
               key_positions: jax.Array) -> jax.Array:
    """Bias [1, H, q, k] for integer positions [q] and [k]."""
    config = self.config
    buckets = relative_position_bucket(
        key_positions[None, :] - query_positions[:, None], self.bidirectional,
        config.relative_attention_num_buckets,
        config.relative_attention_max_distance)                   # [q, k]
    return jnp.take(self.table, buckets, axis=1)[None]            # [1,H,q,k]


def cuda_backend() -> bool:
  """Whether JAX's default backend is an NVIDIA GPU, where attention "cudnn"
  can run (ROCm's backend is named "gpu" too, and has no cuDNN)."""
  if jax.default_backend() != "gpu":
    return False
  version = getattr(jax.devices()[0].client, "platform_version", "")
  return "rocm" not in str(version).lower()


# T5Config.attention -> jax.nn.dot_product_attention's implementation (tests
# map "cudnn" to "xla" to check the same call on a CPU), or MEMORY_STAND_IN.
_FUSED_ATTENTION = {"cudnn": "cudnn"}

# fused_attention's implementation that keeps what cuDNN's keeps for its
# backward (the output and the softmax's log-sum-exp), in plain XLA: for
# planning cuDNN attention's memory where cuDNN cannot compile (a CPU).
MEMORY_STAND_IN = "memory_stand_in"

# checkpoint_name tags of the stand-in's residuals, saved by the "dots"
# remat policies as they save cuDNN's (_saving_fused_attention).
_STAND_IN_RESIDUALS = ("fused_attention_out", "fused_attention_lse")


@contextlib.contextmanager
def cudnn_memory_stand_in():
  """Within: T5Config.attention "cudnn" traces MEMORY_STAND_IN instead of
  cuDNN, so that XLA on any backend can plan the memory of a cuDNN model
  (benchmarks/step_time.py --memory_only --accelerator_paths). Its
  transient [B, H, q, k] float32 arrays (the probabilities in the forward;
  probabilities and their gradients in the backward, one layer at a time)
  are a workspace cuDNN does not have, so it overstates cuDNN's memory, as
  far as XLA:CPU's buffer assignment stands for the GPU's. It does not
  refuse odd lengths as cuDNN does (step_time does). Read at trace time."""
  before = _FUSED_ATTENTION["cudnn"]
  _FUSED_ATTENTION["cudnn"] = MEMORY_STAND_IN
  try:
    yield
  finally:
    _FUSED_ATTENTION["cudnn"] = before


def _stand_in_probabilities(queries, keys, bias, kv_lengths, causal, lse):
  """Softmax probabilities [B, H, q, k] float32 with masks, and (when lse is
  None) the log-sum-exp [B, H, q] of the logits; else the probabilities
  from the given lse. A query that sees no key gets probabilities 0."""
  logits = attention_logits(queries, keys)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  key_index = jnp.arange(keys.shape[1])
  visible = jnp.ones((1, 1, 1, keys.shape[1]), jnp.bool_)
  if kv_lengths is not None:
    visible = key_index[None, None, None, :] < kv_lengths[:, None, None, None]
  if causal:
    visible = visible & (key_index[None, :]
                         <= jnp.arange(queries.shape[1])[:, None])
  logits = jnp.where(visible, logits, -1e30)
  computed = lse is None
  if computed:
    lse = jax.nn.logsumexp(logits, axis=-1)
  probabilities = jnp.where(visible, jnp.exp(logits - lse[..., None]), 0.0)
  return (probabilities, lse) if computed else probabilities


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _stand_in_attention(queries, keys, values, bias, kv_lengths, causal):
  return _stand_in_attention_fwd(queries, keys, values, bias, kv_lengths,
                                 causal)[0]


def _stand_in_attention_fwd(queries, keys, values, bias, kv_lengths, causal):
  probabilities, lse = _stand_in_probabilities(queries, keys, bias,
                                               kv_lengths, causal, None)
  probabilities = probabilities.astype(values.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", probabilities, values,
                   preferred_element_type=jnp.float32).astype(queries.dtype)
  out = checkpoint_name(out, _STAND_IN_RESIDUALS[0])
  lse = checkpoint_name(lse, _STAND_IN_RESIDUALS[1])
  return out, (queries, keys, values, bias, kv_lengths, out, lse)


def _stand_in_attention_bwd(causal, residuals, d_out):
  queries, keys, values, bias, kv_lengths, out, lse = residuals
  probabilities = _stand_in_probabilities(queries, keys, bias, kv_lengths,
                                          causal, lse)
  d_out = d_out.astype(queries.dtype)
  d_values = jnp.einsum("bhqk,bqhd->bkhd", probabilities.astype(d_out.dtype),
                        d_out, preferred_element_type=jnp.float32)
  d_probabilities = jnp.einsum("bqhd,bkhd->bhqk", d_out, values,
                               preferred_element_type=jnp.float32)
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32),
                     out.astype(jnp.float32))
  d_logits = probabilities * (d_probabilities - delta[..., None])
  d_queries, d_keys = _accelerator_logits_bwd((queries, keys), d_logits)
  d_bias = None
  if bias is not None:
    d_bias = jnp.sum(d_logits, axis=0, keepdims=True).astype(bias.dtype)
  return (d_queries, d_keys, d_values.astype(values.dtype), d_bias, None)


_stand_in_attention.defvjp(_stand_in_attention_fwd, _stand_in_attention_bwd)


def fused_attention(queries: jax.Array, keys: jax.Array, values: jax.Array,
                    bias: jax.Array | None, kv_lengths: jax.Array | None,
                    causal: bool, implementation: str) -> jax.Array:
  """T5 attention (no 1/√K scale) as one jax.nn.dot_product_attention call.

  queries [B, q, H, K], keys / values [B, k, H, K] in the compute dtype;
  bias [1, H, q, k] float32 (cast to the compute dtype: cuDNN takes one
  dtype), kv_lengths [B] int32 keys valid from the start, causal for the
  decoder's self-attention. Returns [B, q, H, K].
  """
  if implementation == "cudnn" and bias is not None and (
      queries.shape[1] % 2 or keys.shape[1] % 2):
    # jax refuses odd lengths with a bias only when the attention is
    # differentiated; refusing them always keeps one config valid for both
    # training and evaluation.
    raise ValueError(
        f"cuDNN's fused attention with a bias refuses odd sequence lengths "
        f"in its backward pass; got {queries.shape[1]} queries and "
        f"{keys.shape[1]} keys: pad the inputs and targets to even lengths, "
        f"or use attention='xla'.")
  if bias is not None:
    bias = bias.astype(queries.dtype)
  if implementation == MEMORY_STAND_IN:
    return _stand_in_attention(queries, keys, values, bias, kv_lengths,
                               causal)
  return jax.nn.dot_product_attention(
      queries, keys, values, bias=bias, scale=1.0, is_causal=causal,
      key_value_seq_lengths=kv_lengths, implementation=implementation)


def key_lengths(tokens: jax.Array, pad_id: int) -> jax.Array:
  """[B] int32 count of non-padding tokens of right-padded tokens [B, S]."""
  return jnp.sum(tokens != pad_id, axis=1, dtype=jnp.int32)


class Attention(hk.Module):
  """Multi-head attention without biases or 1/√K scaling.

  All projections are created in __call__, so their parameters sit at
  <name>/{query,key,value,out}/kernel (Haiku adds a "~method" level to the
  names of submodules that other methods create).
  """

  def __init__(self, config: T5Config, name: str):
    super().__init__(name=name)
    self.config = config

  def _split_heads(self, x: jax.Array) -> jax.Array:
    return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

  def __call__(self, queries_in: jax.Array | None,
               kv_inputs: jax.Array | None = None, *,
               bias: jax.Array | None = None,
               kv_lengths: jax.Array | None = None,
               causal: bool = False,
               dropout_rng: jax.Array | None = None,
               cached_kv: tuple[jax.Array, jax.Array] | None = None,
               cache_position: jax.Array | None = None):
    """Attends queries_in [B, q, D] to keys/values.

    Args:
      queries_in: [B, q, D] inputs of the query projection; None to only
        project kv_inputs into keys and values.
      kv_inputs: [B, k, D] inputs of the key/value projections, or None to
        use cached_kv as they are.
      bias: additive bias broadcastable to [B, H, q, k]: with
        config.attention "xla" (or a cache), relative positions and masks
        summed; with "cudnn", the relative positions [1, H, q, k] alone.
      kv_lengths: "cudnn" only: [B] int32 count of leading valid keys.
      causal: "cudnn" only: query i sees keys up to i.
      dropout_rng: key for dropout on the attention weights, or None.
      cached_kv: ([B, T_max, H, K], [B, T_max, H, K]) cache. With kv_inputs,
        their keys/values are written into it at cache_position.
      cache_position: where kv_inputs go in the cache.

    Returns:
      (output [B, q, D] or None, (keys, values) [B, k, H, K]).
    """
    config = self.config
    width = config.num_heads * config.d_kv
    dense = functools.partial(Dense, width, config.compute_dtype)
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
        dense(1.0 / config.d_kv, name="query")(queries_in),
        "attention_query"))                                       # [B,q,H,K]
    if config.attention != "xla" and cached_kv is None:
      if dropout_rng is not None:
        raise ValueError(
            f"T5Config.attention={config.attention!r} applies no dropout to "
            "the attention weights: train with dropout_rate=0, or use "
            "attention='xla'.")
      out = fused_attention(queries, keys, values, bias, kv_lengths, causal,
                            _FUSED_ATTENTION[config.attention])
      out = out.reshape(*out.shape[:2], -1)                        # [B,q,H·K]
      out = Dense(config.d_model, config.compute_dtype, name="out")(out)
      return checkpoint_name(out, "attention_out"), (keys, values)
    if kv_lengths is not None or causal:
      raise ValueError("kv_lengths and causal are inputs of fused attention; "
                       "fold masks into `bias` for attention='xla'.")
    on_cpu = cpu_gemm.cpu_paths()
    if on_cpu:
      logits = cpu_attention_logits(queries, keys)
    else:
      logits = attention_logits(queries, keys)
    weights = jax.nn.softmax(logits + bias, axis=-1)              # float32
    if dropout_rng is not None:
      weights = hk.dropout(dropout_rng, config.dropout_rate, weights)
    weights = weights.astype(values.dtype)
    if on_cpu:
      out = cpu_attention_combine(weights, values)
    else:
      out = jnp.einsum("bhqt,bthk->bqhk", weights, values)
    out = out.reshape(*out.shape[:2], -1)                          # [B,q,H·K]
    out = Dense(config.d_model, config.compute_dtype, name="out")(out)
    return checkpoint_name(out, "attention_out"), (keys, values)


class Mlp(hk.Module):
  """Gated-GELU (v1.1: wi_0, wi_1, wo) or ReLU (v1.0: wi, wo)."""

  def __init__(self, config: T5Config, name: str = "mlp"):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
    config = self.config
    dense = functools.partial(Dense, config.d_ff, config.compute_dtype)
    if config.gated and cpu_gemm.cpu_paths():
      x = x.astype(config.compute_dtype)
      hidden = cpu_gated_gelu(
          x, *(dense(name=name).kernel_only(x.shape[-1], cast=False)
               for name in ("wi_0", "wi_1")))                     # [B, n, F]
    elif config.gated:
      hidden = (jax.nn.gelu(dense(name="wi_0")(x), approximate=True)
                * dense(name="wi_1")(x))                           # [B, n, F]
    else:
      hidden = jax.nn.relu(dense(name="wi")(x))
    if dropout_rng is not None:
      hidden = hk.dropout(dropout_rng, config.dropout_rate, hidden)
    return Dense(config.d_model, config.compute_dtype, name="wo")(hidden)


class Embed(hk.Module):
  """token_embedder/embedding [V, D], shared by encoder, decoder (and v1.0's
  output projection)."""

  def __init__(self, config: T5Config, name: str = "token_embedder"):
    super().__init__(name=name)
    self.config = config
    self.embedding = hk.get_parameter(
        "embedding", [config.vocab_size, config.d_model], jnp.float32,
        init=hk.initializers.RandomNormal(1.0))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(
        self.config.compute_dtype)


class Dropout:
  """Dropout keyed off the Haiku rng stream; identity when not training."""

  def __init__(self, rate: float, is_training: bool):
    self.rate = rate if is_training else 0.0

  def rng(self) -> jax.Array | None:
    return hk.next_rng_key() if self.rate > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    return hk.dropout(hk.next_rng_key(), self.rate, x) if self.rate > 0 else x


# What remat "dots_except_mlp_hidden" keeps of a layer (checkpoint_name tags):
# each attention's projections and output. The backward recomputes the MLP
# from them, its d_ff-wide wi_0 / wi_1 included (two GEMMs per layer that
# "dots" keeps); the MLP's output needs no saving, since the next layer's
# input is kept at the remat boundary.
SAVED_EXCEPT_MLP_HIDDEN = ("attention_query", "attention_key",
                           "attention_value", "attention_out")


# jax's cuDNN attention forward (jax/_src/cudnn/fused_attention_stablehlo.py):
# its outputs, the attention's output and the softmax statistics ([B, H, q]
# float32), are the residuals of cuDNN's backward. A policy that does not
# save them makes the backward run cuDNN's forward again, once per attention
# (found by counting the calls in the lowered step).
_FUSED_ATTENTION_FORWARD = frozenset({"dot_product_attention_fwd_wrapper",
                                      "dot_product_attention_fwd"})


def _saving_fused_attention(policy: Callable) -> Callable:
  """`policy`, also saving what cuDNN attention's backward needs."""

  stand_in = jax.checkpoint_policies.save_only_these_names(
      *_STAND_IN_RESIDUALS)

  def save(prim, *avals, **params):
    return (prim.name in _FUSED_ATTENTION_FORWARD
            or stand_in(prim, *avals, **params)
            or policy(prim, *avals, **params))

  return save


def _remat(fn: Callable, policy: str) -> Callable:
  """fn under remat `policy` (REMAT_POLICIES). "dots" and
  "dots_except_mlp_hidden" also keep fused attention's outputs (with
  attention "cudnn": [B, q, H·K] in the compute dtype and [B, H, q] float32
  per attention) so that its forward is not run twice; "full" keeps
  nothing."""
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


def padding_bias(mask: jax.Array) -> jax.Array:
  """[B, k] key mask -> additive bias [B, 1, 1, k]."""
  return jnp.where(mask, 0.0, _MASKED)[:, None, None, :]


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

  def logits(self) -> jax.Array:
    """float32 logits [..., V]."""
    if cpu_gemm.cpu_paths():
      return cpu_matmul(self.hidden, self.weight, jnp.float32)
    return jnp.dot(self.hidden, self.weight,
                   preferred_element_type=jnp.float32)


class T5:
  """The encoder-decoder. Methods run inside an hk.transform.

  Not itself an hk.Module, so that parameters sit at the T5X root paths
  (token_embedder, encoder, decoder). Haiku uniquifies a name scope entered
  twice ("decoder_1"), so one transformed function calls at most one of
  decode / init_cache / decode_step.
  """

  def __init__(self, config: T5Config):
    self.config = config

  def embedder(self) -> Embed:
    return Embed(self.config)

  def encode(self, tokens: jax.Array, embedder: Embed,
             is_training: bool = False) -> jax.Array:
    """Encoder output [B, S, D] (compute dtype) of tokens [B, S]."""
    config = self.config
    dropout = Dropout(config.dropout_rate, is_training)
    positions = jnp.arange(tokens.shape[1])
    with hk.name_scope("encoder"):
      relpos = RelativePositionBias(config, bidirectional=True)(
          positions, positions)                                   # [1,H,S,S]
      if config.attention == "xla":
        attend = dict(bias=relpos + padding_bias(tokens != config.pad_id))
      else:
        attend = dict(bias=relpos,
                      kv_lengths=key_lengths(tokens, config.pad_id))

      def layer(x, _):
        h = RMSNorm(config.layer_norm_epsilon, "pre_attention_layer_norm")(x)
        out, _ = Attention(config, "attention")(h, h, **attend,
                                                dropout_rng=dropout.rng())
        x = x + dropout(out)
        h = RMSNorm(config.layer_norm_epsilon, "pre_mlp_layer_norm")(x)
        return x + dropout(Mlp(config)(h, dropout.rng())), None

      x = dropout(embedder(tokens))
      x, _ = run_layers(layer, x, None, config.num_encoder_layers, config)
      x = RMSNorm(config.layer_norm_epsilon, "encoder_norm")(x)
      return dropout(x)

  def _decoder_stack(self, x, self_attend, cross_attend, encoded, cache,
                     cache_position, embedder, dropout) -> DecoderOutput:
    """Decoder layers, final norm and output projection (inside "decoder").

    self_attend / cross_attend: the bias (and, for fused attention, the key
    lengths and causal flag) of the two attentions, as Attention takes them.
    """
    config = self.config

    def layer(x, layer_cache: LayerCache | None):
      h = RMSNorm(config.layer_norm_epsilon, "pre_self_attention_layer_norm")(x)
      out, (keys, values) = Attention(config, "self_attention")(
          h, h, **self_attend, dropout_rng=dropout.rng(),
          cached_kv=None if layer_cache is None else (
              layer_cache.self_key, layer_cache.self_value),
          cache_position=cache_position)
      x = x + dropout(out)
      h = RMSNorm(config.layer_norm_epsilon,
                  "pre_cross_attention_layer_norm")(x)
      out, _ = Attention(config, "encoder_decoder_attention")(
          h, encoded, **cross_attend, dropout_rng=dropout.rng(),
          cached_kv=None if layer_cache is None else (
              layer_cache.cross_key, layer_cache.cross_value))
      x = x + dropout(out)
      h = RMSNorm(config.layer_norm_epsilon, "pre_mlp_layer_norm")(x)
      x = x + dropout(Mlp(config)(h, dropout.rng()))
      if layer_cache is None:
        return x, None
      return x, layer_cache._replace(self_key=keys, self_value=values)

    x, cache = run_layers(layer, x, cache, config.num_decoder_layers, config)
    x = dropout(RMSNorm(config.layer_norm_epsilon, "decoder_norm")(x))
    if config.tied_embeddings:
      weight = embedder.embedding.T.astype(config.compute_dtype)
      x = x * jnp.asarray(config.d_model ** -0.5, x.dtype)
    else:
      weight = Dense(config.vocab_size, config.compute_dtype,
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
      relpos = RelativePositionBias(config, bidirectional=False)(
          positions, positions)                                   # [1,H,T,T]
      if config.attention == "xla":
        causal = jnp.where(positions[None, :] <= positions[:, None], 0.0,
                           _MASKED)[None, None]                   # [1,1,T,T]
        self_attend = dict(bias=relpos + causal)
        cross_attend = dict(
            bias=padding_bias(encoder_tokens != config.pad_id))
      else:
        self_attend = dict(bias=relpos, causal=True)
        cross_attend = dict(
            kv_lengths=key_lengths(encoder_tokens, config.pad_id))
      x = dropout(embedder(decoder_inputs))
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
    dropout = Dropout(0.0, False)
    key_positions = jnp.arange(cache.self_key.shape[2])
    visible = jnp.where(key_positions <= position, 0.0, _MASKED)
    cross_bias = padding_bias(encoder_tokens != config.pad_id)
    with hk.name_scope("decoder"):
      self_bias = RelativePositionBias(config, bidirectional=False)(
          position[None], key_positions) + visible                # [1,H,1,Tm]
      x = embedder(token[:, None])                                # [B, 1, D]
      out = self._decoder_stack(x, dict(bias=self_bias),
                                dict(bias=cross_bias), None, cache,
                                position, embedder, dropout)
    return out._replace(hidden=out.hidden[:, 0])


def shift_right(targets: jax.Array, start_id: int) -> jax.Array:
  """Decoder inputs under teacher forcing: [start, y_0, ..., y_{T-2}]."""
  start = jnp.full_like(targets[:, :1], start_id)
  return jnp.concatenate([start, targets[:, :-1]], axis=1)


OUTPUTS = ("logits", "hidden", "encoded", "hidden_and_encoded")


def t5(config: T5Config) -> hk.Transformed:
  """The teacher-forced encoder-decoder as an hk.Transformed.

  apply(params, rng, encoder_tokens [B, S], decoder_targets [B, T], *,
        is_training=False, output="logits")
    output="logits": float32 logits [B, T, V];
    output="hidden": (hidden [B, T, D], weight [D, V]) with hidden already
      scaled for the output projection, so that
      kernels.linear_sequence_logprobs(hidden, weight, ...) never
      materialises the logits.
    output="encoded": the encoder output [B, S, D] (decoder_targets unused);
    output="hidden_and_encoded": (hidden, weight, encoded), for a value head
      sharing the policy's encoder.
  rng may be None unless is_training (dropout).
  """

  def forward(encoder_tokens, decoder_targets=None, *, is_training=False,
              output="logits"):
    if output not in OUTPUTS:
      raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}.")
    model = T5(config)
    embedder = model.embedder()
    encoded = model.encode(encoder_tokens, embedder, is_training)
    if output == "encoded":
      return encoded
    if decoder_targets is None:
      raise ValueError(f"output={output!r} needs decoder_targets.")
    out = model.decode(encoded, encoder_tokens,
                       shift_right(decoder_targets, config.decoder_start_id),
                       embedder, is_training)
    if output == "hidden":
      return out.hidden, out.weight
    if output == "hidden_and_encoded":
      return out.hidden, out.weight, encoded
    return out.logits()

  return hk.transform(forward)
