"""DecoderConfig: the hyperparameters of a decoder-only LLM (a config leaf).

One dataclass covers Llama 3.x, Qwen 2.5, Qwen 3 and Gemma 3 (text): the
families differ in flags (q/k/v biases, q/k norms, Gemma's (1 + w) norms,
post-sublayer norms, embedding scale, activation, sliding-window layers, RoPE
scaling), not in structure. dro_fast.models.hf_decoder.config_from_hf fills
it from a transformers config.json; dro_fast.models.decoder builds the
network.

Frozen and hashable (every field a scalar, a string or a tuple), so it is a
static jit argument, like T5Config. The backend fields (`attention`,
`attention_interpret`, `matmul`) are filled in once per run by
dro_fast.backend.resolve. This module imports no implementation: only the
standard library, jax.numpy (its dtypes) and the T5 config leaf (its
REMAT_POLICIES and MATMULS).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from dro_fast.models.config import DECODER_LORA_TARGETS
from dro_fast.models.config import LoraConfig
from dro_fast.models.config import MATMULS
from dro_fast.models.config import REMAT_POLICIES

# The padding id of the decoder-only batch layout: prompts and completions
# are right-padded with it. Never a vocabulary id (Llama 3 has no pad token;
# Qwen's pad is its EOS).
PAD = -1

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTS = ("silu", "gelu_tanh")
# "xla": materialised logits; "cudnn": jax.nn.dot_product_attention's
# cuDNN kernels (GPU); "splash": Pallas TPU splash attention.
DECODER_ATTENTIONS = ("xla", "cudnn", "splash")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Decoder-only LLM hyperparameters (frozen, hashable).

  Attributes:
    family: one of FAMILIES; informational (and export's model_type), the
      flags below carry the differences.
    vocab_size: V, rows of embed_tokens.
    hidden_size: D, the residual width.
    num_layers: L.
    num_heads: H query heads.
    num_kv_heads: key/value heads (grouped-query attention; H a multiple).
    head_dim: K, per-head width.
    intermediate_size: F, the gated MLP's hidden width.
    rms_norm_eps: RMSNorm epsilon.
    rope_theta: RoPE base of the full-attention layers.
    rope_scaling: the full-attention layers' RoPE scaling as sorted
      (key, value) items with "rope_type" among them (ROPE_TYPES; "linear":
      "factor"; "llama3": "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"), or () for none.
    rope_local_theta: RoPE base of the sliding-window layers (Gemma 3's
      rope_local_base_freq; unscaled); None: rope_theta, unscaled.
    sliding_window: keys a sliding layer's query sees, itself included
      (query i sees keys j with i - W < j <= i); None: no sliding layers.
    layer_types: per layer, "full_attention" or "sliding_attention"; ()
      means all full.
    attention_bias: q/k/v projections have biases (Qwen 2.5).
    qk_norm: RMSNorm over each head of q and k before RoPE (Qwen 3, Gemma 3).
    norm_plus_one: RMSNorm scales by (1 + w), computed in float32 (Gemma).
    post_norms: norms after attention and MLP too (Gemma 3's
      post_attention_layernorm, pre_/post_feedforward_layernorm).
    embed_scale: embeddings multiplied by sqrt(D) in the compute dtype
      (Gemma).
    query_pre_attn_scalar: attention scale query_pre_attn_scalar^-½ (Gemma
      3); None: head_dim^-½.
    hidden_act: the gated MLP's activation, "silu" or "gelu_tanh".
    tie_word_embeddings: the output projection is embed_tokens transposed.
    final_logit_softcapping: logits = c·tanh(logits / c) where set.
    attn_logit_softcapping: the same on attention logits ("xla" only).
    max_position_embeddings: informational (export).
    bos_token_id, eos_token_id, pad_token_id: as in config.json
      (informational; eos may be a tuple). The batch layout pads with PAD.
    dtype: compute dtype, "float32" or "bfloat16"; norms, softmax and
      logits are computed in float32.
    param_dtype: the dtype export_hf_decoder writes by default; the network
      creates its parameters in float32 whatever it says.
    scan_layers: one hk.layer_stack named "layers" with [L, ...] params.
    remat: REMAT_POLICIES, as T5Config.remat.
    attention: DECODER_ATTENTIONS, for the uncached forward; cached decoding
      always runs "xla". "cudnn" needs bfloat16 and a CUDA GPU; "splash" a
      TPU (or attention_interpret on a CPU, for tests).
    attention_interpret: run "splash" in the Pallas interpreter.
    matmul: MATMULS, the form of every Dense matmul (as T5Config.matmul).
    name: informational.
    lora: low-rank adapters on the LoRA targets (DECODER_LORA_TARGETS:
      q/k/v/o_proj, gate/up/down_proj); None: none.
  """

  family: str = "llama"
  vocab_size: int = 128256
  hidden_size: int = 2048
  num_layers: int = 16
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 64
  intermediate_size: int = 8192
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: tuple = ()
  rope_local_theta: float | None = None
  sliding_window: int | None = None
  layer_types: tuple = ()
  attention_bias: bool = False
  qk_norm: bool = False
  norm_plus_one: bool = False
  post_norms: bool = False
  embed_scale: bool = False
  query_pre_attn_scalar: float | None = None
  hidden_act: str = "silu"
  tie_word_embeddings: bool = False
  final_logit_softcapping: float | None = None
  attn_logit_softcapping: float | None = None
  max_position_embeddings: int = 131072
  bos_token_id: int | None = None
  eos_token_id: int | tuple | None = None
  pad_token_id: int | None = None
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "xla"
  attention_interpret: bool | None = None
  matmul: str = "xla"
  name: str = "custom"
  lora: LoraConfig | None = None

  def __post_init__(self):
    def bad(field, allowed):
      raise ValueError(f"DecoderConfig.{field} must be one of {allowed}, got "
                       f"{getattr(self, field)!r}.")
    for field, allowed in (("family", FAMILIES), ("hidden_act", HIDDEN_ACTS),
                           ("attention", DECODER_ATTENTIONS),
                           ("remat", REMAT_POLICIES), ("matmul", MATMULS)):
      if getattr(self, field) not in allowed:
        bad(field, allowed)
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in ("float32", "bfloat16"):
        bad(field, ("float32", "bfloat16"))
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "intermediate_size"):
      if getattr(self, field) <= 0:
        raise ValueError(f"DecoderConfig.{field} must be positive, got "
                         f"{getattr(self, field)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig.num_heads={self.num_heads} must be a "
                       f"multiple of num_kv_heads={self.num_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim must be even (RoPE rotates "
                       f"pairs), got {self.head_dim}.")
    for field in ("rope_scaling", "layer_types"):
      if not isinstance(getattr(self, field), tuple):
        raise ValueError(f"DecoderConfig.{field} must be a tuple (hashable), "
                         f"got {type(getattr(self, field)).__name__}.")
    if self.layer_types:
      if len(self.layer_types) != self.num_layers:
        raise ValueError(
            f"DecoderConfig.layer_types has {len(self.layer_types)} entries "
            f"for num_layers={self.num_layers}.")
      if set(self.layer_types) - set(LAYER_TYPES):
        bad("layer_types", LAYER_TYPES)
      if self.any_sliding and not self.sliding_window:
        raise ValueError("DecoderConfig.layer_types has sliding_attention "
                         "layers but sliding_window is not set.")
    scaling = dict(self.rope_scaling)
    if scaling:
      if scaling.get("rope_type") not in ROPE_TYPES:
        raise ValueError(f"DecoderConfig.rope_scaling rope_type must be one "
                         f"of {ROPE_TYPES}, got {scaling.get('rope_type')!r}.")
      needed = {"default": (), "linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings")
                }[scaling["rope_type"]]
      missing = [k for k in needed if k not in scaling]
      if missing:
        raise ValueError(f"DecoderConfig.rope_scaling of rope_type "
                         f"{scaling['rope_type']!r} lacks {missing}.")
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise ValueError("DecoderConfig.attention='cudnn' runs cuDNN's fused "
                       "attention, which takes bfloat16 inputs: set "
                       "dtype='bfloat16' or attention='xla'.")
    if self.attention != "xla" and self.attn_logit_softcapping:
      raise ValueError(f"DecoderConfig.attention={self.attention!r} cannot "
                       f"soft-cap attention logits (attn_logit_softcapping="
                       f"{self.attn_logit_softcapping}): use attention='xla'.")
    self.lora_modules        # checks lora's targets

  @property
  def lora_modules(self) -> frozenset[str]:
    """The names of the Dense layers that carry LoRA adapters."""
    if self.lora is None:
      return frozenset()
    return self.lora.modules(
        DECODER_LORA_TARGETS, sum(DECODER_LORA_TARGETS.values(), ()),
        f"a {self.family} model")

  @property
  def any_sliding(self) -> bool:
    return "sliding_attention" in self.layer_types

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it is a sliding-window layer."""
    if not self.layer_types:
      return (False,) * self.num_layers
    return tuple(t == "sliding_attention" for t in self.layer_types)

  @property
  def attention_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @property
  def scaled_embedding(self) -> float:
    """The embedding multiplier (sqrt(D) with embed_scale, else 1)."""
    return math.sqrt(self.hidden_size) if self.embed_scale else 1.0

  @property
  def dropout_rate(self) -> float:
    """No dropout: these families train without it (shared code reads it)."""
    return 0.0

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def parameter_count(self) -> int:
    """Number of parameters, from the config alone."""
    d, k = self.hidden_size, self.head_dim
    q, kv = self.num_heads * k, self.num_kv_heads * k
    attention = 2 * d * q + 2 * d * kv
    if self.attention_bias:
      attention += q + 2 * kv
    if self.qk_norm:
      attention += 2 * k
    norms = (4 if self.post_norms else 2) * d
    layer = attention + 3 * d * self.intermediate_size + norms
    embeddings = self.vocab_size * d * (
        1 if self.tie_word_embeddings else 2)
    return self.num_layers * layer + d + embeddings

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)


def _gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple:
  """Gemma 3's layers: every `pattern`-th is global, the rest sliding."""
  return tuple("full_attention" if (i + 1) % pattern == 0
               else "sliding_attention" for i in range(num_layers))


_LLAMA3_ROPE = (("factor", 8.0), ("high_freq_factor", 4.0),
                ("low_freq_factor", 1.0),
                ("original_max_position_embeddings", 8192),
                ("rope_type", "llama3"))

# Shapes of the released models (their config.json) and the CPU demo's tiny
# model. A run of an LLM shape loads its weights from --init_checkpoint,
# whose config.json then decides; the shapes alone serve the deviceless
# compiles (benchmarks/tpu_compile.py) and the packaged flagfiles.
DECODER_PRESETS = {
    "tiny_decoder": DecoderConfig(
        family="qwen3", vocab_size=256, hidden_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=192,
        rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True,
        max_position_embeddings=512, name="tiny_decoder"),
    "llama-3.1-8b": DecoderConfig(
        family="llama", vocab_size=128256, hidden_size=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        bos_token_id=128000, eos_token_id=128001, name="llama-3.1-8b"),
    "llama-3.2-1b": DecoderConfig(
        family="llama", vocab_size=128256, hidden_size=2048, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=tuple(sorted(dict(_LLAMA3_ROPE, factor=32.0).items())),
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        name="llama-3.2-1b"),
    "qwen3-8b": DecoderConfig(
        family="qwen3", vocab_size=151936, hidden_size=4096, num_layers=36,
        num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
        rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
        max_position_embeddings=40960, bos_token_id=151643,
        eos_token_id=151645, name="qwen3-8b"),
    "gemma-3-4b": DecoderConfig(
        family="gemma3", vocab_size=262208, hidden_size=2560, num_layers=34,
        num_heads=8, num_kv_heads=4, head_dim=256, intermediate_size=10240,
        rms_norm_eps=1e-6, rope_theta=1000000.0,
        rope_scaling=(("factor", 8.0), ("rope_type", "linear")),
        rope_local_theta=10000.0, sliding_window=1024,
        layer_types=_gemma3_layer_types(34), qk_norm=True,
        norm_plus_one=True, post_norms=True, embed_scale=True,
        query_pre_attn_scalar=256.0, hidden_act="gelu_tanh",
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
        pad_token_id=0, name="gemma-3-4b"),
}


def decoder_preset(name: str, **changes) -> DecoderConfig:
  """The DECODER_PRESETS entry `name` with `changes` applied."""
  if name not in DECODER_PRESETS:
    raise ValueError(f"unknown decoder preset {name!r}; choose one of "
                     f"{', '.join(sorted(DECODER_PRESETS))}.")
  return DECODER_PRESETS[name].replace(**changes)
