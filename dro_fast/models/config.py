"""T5Config: the global hyperparameters of a T5 encoder-decoder.

Sizes follow t5x's t5_1_1 gin files. FLAN-T5 uses the v1.1
architecture. The v1.0 variant differs in its MLP (ReLU, one `wi`), its tied
input/output embedding and its logits scale d_model^-½.

Backend choices (`attention`, `matmul`, `attention_interpret`) are fields,
so they are part of jax.jit's cache key wherever the config is a static
argument. The fields that follow from the platform a run compiles for are
filled in once per run by dro_fast.backend.resolve; what a field's value
constrains on its own is checked here, in __post_init__.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

VARIANTS = ("v1_1", "v1_0")
REMAT_POLICIES = ("none", "full", "dots", "dots_except_mlp_hidden")
# The forms of the Dense layers' matmul (dro_fast.models.layers.matmul).
MATMULS = ("xla", "cpu_row_major")
# The built-in attention implementations (dro_fast.models.attention's table).
ATTENTIONS = ("xla", "cudnn", "flash")
# Value networks of DRO-V: its own encoder, or a head on the policy's.
VALUE_NETS = ("separate", "shared")

# LoRA targets: the Dense layers (their module names) each family can adapt,
# by group. A target is a group or a layer name.
T5_LORA_TARGETS = {"attention": ("query", "key", "value", "out"),
                   "mlp": ("wi", "wi_0", "wi_1", "wo")}
DECODER_LORA_TARGETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj")}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on a model's Dense layers (a model config's `lora`).

  Each targeted layer computes x·W + (alpha / rank)·(x·A)·B with A [in,
  rank] drawn as PEFT draws it (uniform ±1/√in) and B [rank, out] zero, so
  an adapted model equals its base at initialisation. Only A and B train;
  the base weights are frozen and held in `base_dtype`.

  Attributes:
    rank: r, the adapters' inner width.
    alpha: the scale's numerator (PEFT's lora_alpha; scale = alpha / rank).
    targets: layer names or the groups "attention" and "mlp" of the
      family's LoRA targets (T5_LORA_TARGETS, DECODER_LORA_TARGETS).
    base_dtype: the frozen base weights' dtype, "bfloat16" or "float32".
  """

  rank: int = 16
  alpha: float = 32.0
  targets: tuple[str, ...] = ("attention", "mlp")
  base_dtype: str = "bfloat16"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}.")
    if not self.alpha > 0:
      raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}.")
    if not self.targets:
      raise ValueError("LoraConfig.targets is empty: name layers or the "
                       "groups attention, mlp.")
    if self.base_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"LoraConfig.base_dtype must be 'float32' or "
                       f"'bfloat16', got {self.base_dtype!r}.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def modules(self, groups: dict[str, tuple[str, ...]],
              present: tuple[str, ...], what: str) -> frozenset[str]:
    """The Dense layer names `targets` name among a model's `present` ones.

    Raises ValueError naming a target that names no layer of `what` (the
    model) and the valid names.
    """
    names = set()
    for target in self.targets:
      layers = [n for n in groups.get(target, (target,)) if n in present]
      if not layers:
        valid = ", ".join(list(groups) + list(present))
        raise ValueError(f"LoRA target {target!r} names no layer of {what}; "
                         f"valid targets: {valid}.")
      names.update(layers)
    return frozenset(names)


@dataclasses.dataclass(frozen=True)
class AttentionImplementation:
  """An attention core by value: a built-in's entry, or a caller's own.

  T5Config.attention takes one of these where a name of ATTENTIONS does not
  fit (benchmarks/cudnn_stand_in.py); it is part of the config's hash, as a
  name is. Such a config is not written to run_config.json.

  Attributes:
    name: how records and errors name it.
    fn: fn(queries [B, q, H, K], keys [B, k, H, K], values [B, k, H, K], *,
      bias, mask: attention.AttentionMask, dropout_rng, dropout_rate) ->
      [B, q, H, K]; bias is [1, H, q, k] float32 or None, or, with
      relative_bias, a RelativeBias (the table and its bucket rule) or None,
      and fn then also takes `interpret` (T5Config.attention_interpret).
    relative_bias: fn builds the relative-position bias from its table, so
      the model never materialises it.
  """
  name: str
  fn: Callable[..., jax.Array]
  relative_bias: bool = False


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Global hyperparameters (frozen, hashable: usable as a static argument).

  Attributes:
    vocab_size: V, rows of the token embedding.
    d_model: D, the residual width.
    d_kv: per-head width (64 for every released size).
    d_ff: MLP hidden width.
    num_heads: H.
    num_encoder_layers: encoder depth.
    num_decoder_layers: decoder depth.
    relative_attention_num_buckets: relative-position buckets (32).
    relative_attention_max_distance: distance of the last bucket (128).
    dropout_rate: dropout on embeddings, sublayer outputs and attention.
    layer_norm_epsilon: RMSNorm epsilon.
    variant: "v1_1" (gated-GELU, untied logits_dense) or "v1_0" (ReLU, tied
      embedding, logits scaled by d_model^-½).
    dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32,
      RMSNorm, softmax and logits are computed in float32.
    scan_layers: run each stack as one hk.layer_stack (compile time does not
      grow with depth); parameters are then stacked [L, ...] under
      ".../layers/..." instead of ".../layers_{i}/...".
    remat: rematerialise each layer in the backward pass: "none", "full",
      "dots" (save matmul outputs only) or "dots_except_mlp_hidden" (save
      the attentions' projections and outputs, recompute the MLP and its
      d_ff-wide hidden: less memory than "dots", two GEMMs more per layer).
    attention: how attention runs where no key/value cache is involved
      (training, scoring): a name of ATTENTIONS, or an
      AttentionImplementation of one's own. "xla" computes the [B, H, q, k]
      logits and softmax as arrays; "cudnn" calls cuDNN's fused (flash)
      attention through jax.nn.dot_product_attention, which never
      materialises them. A fused implementation (any but "xla") has no
      attention dropout, so it needs dropout_rate 0, and right-padded
      encoder inputs: the padding mask becomes per-example key lengths, and
      a concrete mask that is not a leading run of valid keys is refused
      when the model runs (a traced one is taken as such a run). "cudnn"
      also needs bfloat16 compute and a CUDA GPU, and even sequence
      lengths when trained with a bias (checked by the trainer's
      RunConfig). "flash" is a Pallas TPU kernel that builds the
      relative-position bias per tile from its table (any lengths): a TPU
      runs it, a CPU simulates it (slow: tests); a GPU is refused
      (dro_fast.backend.resolve). Cached decoding always takes the "xla"
      path.
    matmul: the form of every Dense layer's matmul, one of MATMULS: "xla"
      (jnp.dot and autodiff) or "cpu_row_major" (the CPU backend's form
      with its own VJP, dro_fast/models/cpu.py). dro_fast.backend.resolve
      picks "cpu_row_major" for a CPU program, "xla" for any other.
    attention_interpret: whether a kernel attention ("flash") runs in its
      interpreter (the TPU simulator) rather than compiled: True for a
      program that does not compile for the kernel's platform; None: as
      dro_fast.kernels decides for the platform it compiles for.
    pad_id: padding id (masked in attention); also the decoder start id.
    eos_id: end-of-sequence id.
    name: preset name, informational.
    lora: low-rank adapters on the LoRA targets (T5_LORA_TARGETS: every
      attention's query / key / value / out, the MLP's wi* / wo); None:
      none.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  variant: str = "v1_1"
  dtype: str = "float32"
  scan_layers: bool = False
  remat: str = "none"
  attention: str | AttentionImplementation = "xla"
  matmul: str = "xla"
  attention_interpret: bool | None = None
  pad_id: int = 0
  eos_id: int = 1
  name: str = "custom"
  lora: LoraConfig | None = None

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"T5Config.variant must be one of {VARIANTS}, got "
                       f"{self.variant!r}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"T5Config.dtype must be 'float32' or 'bfloat16', got "
                       f"{self.dtype!r}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"T5Config.remat must be one of {REMAT_POLICIES}, got "
                       f"{self.remat!r}.")
    if self.matmul not in MATMULS:
      raise ValueError(f"T5Config.matmul must be one of {MATMULS}, got "
                       f"{self.matmul!r}.")
    if not (self.attention in ATTENTIONS
            or isinstance(self.attention, AttentionImplementation)):
      raise ValueError(f"T5Config.attention must be one of {ATTENTIONS} "
                       f"(or an AttentionImplementation), got "
                       f"{self.attention!r}.")
    if self.attention == "cudnn" and self.dtype != "bfloat16":
      raise ValueError("T5Config.attention='cudnn' runs cuDNN's fused "
                       "attention, which takes bfloat16 (not float32) "
                       "inputs: set dtype='bfloat16' or attention='xla'.")
    if self.attention != "xla" and self.dropout_rate:
      raise ValueError(f"T5Config.attention={self.attention!r} applies no "
                       f"dropout to the attention weights, got dropout_rate="
                       f"{self.dropout_rate}: set dropout_rate=0, or use "
                       f"attention='xla'.")
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
                  "num_encoder_layers", "num_decoder_layers",
                  "relative_attention_num_buckets"):
      if getattr(self, field) <= 0:
        raise ValueError(f"T5Config.{field} must be positive, got "
                         f"{getattr(self, field)}.")
    self.lora_modules        # checks lora's targets

  @property
  def lora_modules(self) -> frozenset[str]:
    """The names of the Dense layers that carry LoRA adapters."""
    if self.lora is None:
      return frozenset()
    mlp = ("wi_0", "wi_1") if self.gated else ("wi",)
    return self.lora.modules(
        T5_LORA_TARGETS, T5_LORA_TARGETS["attention"] + mlp + ("wo",),
        f"T5 {self.variant}")

  @property
  def gated(self) -> bool:
    """Gated-GELU MLP (v1.1) rather than ReLU (v1.0)."""
    return self.variant == "v1_1"

  @property
  def tied_embeddings(self) -> bool:
    return self.variant == "v1_0"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def decoder_start_id(self) -> int:
    return self.pad_id

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)


_SIZES = {  # name: (d_model, d_ff, num_heads, num_layers)
    "small": (512, 1024, 6, 8),
    "base": (768, 2048, 12, 12),
    "large": (1024, 2816, 16, 24),
    "xl": (2048, 5120, 32, 24),
    "xxl": (4096, 10240, 64, 24),
}

PRESETS: dict[str, T5Config] = {}
for _size, (_d, _ff, _h, _l) in _SIZES.items():
  for _family in ("t5-v1_1", "flan-t5"):
    PRESETS[f"{_family}-{_size}"] = T5Config(
        d_model=_d, d_ff=_ff, num_heads=_h, num_encoder_layers=_l,
        num_decoder_layers=_l, name=f"{_family}-{_size}")
PRESETS["tiny"] = T5Config(
    vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_heads=4,
    num_encoder_layers=2, num_decoder_layers=2, name="tiny")


def preset(name: str, **overrides) -> T5Config:
  """A named preset, optionally with fields replaced."""
  try:
    config = PRESETS[name]
  except KeyError:
    raise ValueError(f"Unknown T5 preset {name!r}; choose one of "
                     f"{sorted(PRESETS)}.") from None
  return config.replace(**overrides) if overrides else config


def parameter_count(config: T5Config) -> int:
  """Number of parameters of the encoder-decoder, from the config alone."""
  d, h = config.d_model, config.num_heads * config.d_kv
  attention = 4 * d * h
  mlp = (3 if config.gated else 2) * d * config.d_ff
  encoder = config.num_encoder_layers * (attention + mlp + 2 * d) + d
  decoder = config.num_decoder_layers * (2 * attention + mlp + 3 * d) + d
  relpos = 2 * config.num_heads * config.relative_attention_num_buckets
  embeddings = config.vocab_size * d * (1 if config.tied_embeddings else 2)
  return encoder + decoder + relpos + embeddings
