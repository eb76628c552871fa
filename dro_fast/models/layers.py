"""T5's building blocks in Haiku.

Norms, dense layers, MLP, embedding, dropout and the relative-position bias
(its maths: RelativeBias, from dro_fast.kernels.flash_attention, whose
kernel builds it per tile).

Shapes: B batch, n positions, D d_model, F d_ff, V vocabulary, H heads.

Module and parameter names are T5X's (`wi_0/kernel`, `relpos_bias/
rel_embedding`, `token_embedder/embedding`), so checkpoint conversion is a
rename table. Parameters are float32; the layers compute in
T5Config.compute_dtype. Every matmul of a parameter goes through `matmul`,
the one point where a form is chosen (T5Config.matmul).
"""

from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp

from dro_fast.kernels.flash_attention.relative_bias import RelativeBias
from dro_fast.models import cpu
from dro_fast.models.config import LoraConfig
from dro_fast.models.config import T5Config

# The LoRA adapters' parameter names beside a Dense layer's `kernel`.
LORA_A = "lora_a"
LORA_B = "lora_b"


def matmul(x: jax.Array, kernel: jax.Array, *, form: str,
           out_dtype) -> jax.Array:
  """x [..., D] @ kernel [D, F] -> [..., F] in out_dtype.

  Both operands in x.dtype (the kernel is cast), accumulated as the backend
  does for that dtype. `form` (T5Config.matmul) "cpu_row_major" takes the
  CPU backend's form with its own VJP (cpu.matmul); "xla" plain jnp.dot
  and autodiff.
  """
  if form == "cpu_row_major":
    return cpu.matmul(x, kernel, out_dtype)
  return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=out_dtype)


class RMSNorm(hk.Module):
  """RMSNorm in float32: x·rsqrt(mean x² + eps)·w, or ·(1 + w).

  T5's LayerNorm and Llama's / Qwen's norm (scale only, no mean
  subtraction); with plus_one, Gemma's, whose stored `scale` is the w of
  (1 + w) (zeros at init), as transformers stores it.
  """

  def __init__(self, epsilon: float, name: str, plus_one: bool = False):
    super().__init__(name=name)
    self.epsilon = epsilon
    self.plus_one = plus_one

  def __call__(self, x: jax.Array) -> jax.Array:
    scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32,
                             init=jnp.zeros if self.plus_one else jnp.ones)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    weight = 1.0 + scale if self.plus_one else scale
    return (x32 * jax.lax.rsqrt(variance + self.epsilon) * weight).astype(
        x.dtype)


def lora_for(config, name: str) -> LoraConfig | None:
  """A model config's LoraConfig if the Dense layer `name` is targeted."""
  return config.lora if name in config.lora_modules else None


class Dense(hk.Module):
  """x @ kernel without bias; kernel [in, out] float32, used in `dtype`.

  With `lora`, also x @ lora_a @ lora_b · lora.scale: lora_a [in, r] drawn
  uniform in ±1/√in (PEFT's kaiming-uniform draw), lora_b [r, out] zeros,
  float32 like the kernel. The kernel may be stored in another dtype (a
  frozen LoRA base in bfloat16): it is cast to `dtype` either way.

  Attributes:
    features: output width.
    dtype: the compute dtype of inputs and output.
    form: T5Config.matmul, passed to `matmul`.
    init_scale: VarianceScaling (fan-in, truncated normal) scale.
    lora: the layer's adapters (lora_for), or None.
  """

  def __init__(self, features: int, dtype, *, form: str,
               init_scale: float = 1.0, name: str | None = None,
               lora: LoraConfig | None = None):
    super().__init__(name=name)
    self.features = features
    self.dtype = dtype
    self.form = form
    self.init_scale = init_scale
    self.lora = lora

  def kernel_only(self, in_features: int) -> jax.Array:
    """The kernel [in, out] cast to `dtype`, for a caller that fuses it.

    The output projection goes into the fused log-probs this way.
    """
    return self(jnp.zeros((0, in_features), self.dtype), return_kernel=True)

  def __call__(self, x: jax.Array, return_kernel: bool = False) -> jax.Array:
    # The parameter is created here (not in kernel_only) so that its path is
    # <name>/kernel whichever method runs first.
    init = hk.initializers.VarianceScaling(self.init_scale, "fan_in",
                                           "truncated_normal")
    kernel = hk.get_parameter("kernel", [x.shape[-1], self.features],
                              jnp.float32, init=init)
    if return_kernel:
      if self.lora is not None:
        raise ValueError(f"{self.module_name}: a LoRA-adapted layer has no "
                         "single kernel to fuse.")
      return kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    y = matmul(x, kernel, form=self.form, out_dtype=self.dtype)
    if self.lora is None:
      return y
    rank = self.lora.rank
    a = hk.get_parameter(LORA_A, [x.shape[-1], rank], jnp.float32,
                         init=hk.initializers.VarianceScaling(
                             1.0 / 3.0, "fan_in", "uniform"))
    b = hk.get_parameter(LORA_B, [rank, self.features], jnp.float32,
                         init=jnp.zeros)
    low = matmul(matmul(x, a, form=self.form, out_dtype=self.dtype), b,
                 form=self.form, out_dtype=self.dtype)
    return y + low * jnp.asarray(self.lora.scale, self.dtype)


class Mlp(hk.Module):
  """T5's MLP: gated-GELU (v1.1) or ReLU (v1.0).

  v1.1 has wi_0, wi_1 and wo (GELU's tanh form); v1.0 has wi and wo.
  """

  def __init__(self, config: T5Config, name: str = "mlp"):
    super().__init__(name=name)
    self.config = config

  def __call__(self, x: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
    config = self.config
    def dense(features, name):
      return Dense(features, config.compute_dtype, form=config.matmul,
                   name=name, lora=lora_for(config, name))
    if config.gated:
      hidden = (jax.nn.gelu(dense(config.d_ff, name="wi_0")(x),
                            approximate=True)
                * dense(config.d_ff, name="wi_1")(x))              # [B, n, F]
    else:
      hidden = jax.nn.relu(dense(config.d_ff, name="wi")(x))     # [B, n, F]
    if dropout_rng is not None:
      hidden = hk.dropout(dropout_rng, config.dropout_rate, hidden)
    return dense(config.d_model, name="wo")(hidden)               # [B, n, D]


class Embed(hk.Module):
  """token_embedder/embedding [V, D], shared by encoder and decoder.

  v1.0 also uses it as the output projection.
  """

  def __init__(self, config: T5Config, name: str = "token_embedder"):
    super().__init__(name=name)
    self.config = config
    self.embedding = hk.get_parameter(
        "embedding", [config.vocab_size, config.d_model], jnp.float32,
        init=hk.initializers.RandomNormal(1.0))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, n] -> [B, n, D] in the compute dtype."""
    return jnp.take(self.embedding, tokens, axis=0).astype(
        self.config.compute_dtype)


class Dropout:
  """Dropout keyed off the Haiku rng stream; identity when not training."""

  def __init__(self, rate: float, is_training: bool):
    self.rate = rate if is_training else 0.0

  def rng(self) -> jax.Array | None:
    """A key for a layer's own dropout, or None when there is none."""
    return hk.next_rng_key() if self.rate > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    return hk.dropout(hk.next_rng_key(), self.rate, x) if self.rate > 0 else x


class RelativePositionBias(hk.Module):
  """One bias table rel_embedding [H, buckets] shared by a stack's layers."""

  def __init__(self, config: T5Config, bidirectional: bool,
               name: str = "relpos_bias"):
    super().__init__(name=name)
    self.table = hk.get_parameter(
        "rel_embedding",
        [config.num_heads, config.relative_attention_num_buckets],
        jnp.float32, init=hk.initializers.VarianceScaling(1.0, "fan_in",
                                                          "uniform"))
    self.relative = RelativeBias(self.table, bidirectional,
                                 config.relative_attention_max_distance)

  def __call__(self, query_positions: jax.Array,
               key_positions: jax.Array) -> jax.Array:
    """Bias [1, H, q, k] float32 for integer positions [q] and [k]."""
    return self.relative.lookup(key_positions[None, :]
                                - query_positions[:, None])       # [1,H,q,k]

  def factored(self) -> RelativeBias:
    """The bias for positions 0, 1, ... as the table and its bucket rule."""
    return self.relative
