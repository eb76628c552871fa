"""Logical axis names of every parameter, and the rules that map them to mesh
axes (the t5x / MaxText pattern).

Each parameter's dimensions carry logical names, assigned here in one place
by the parameter's path (`module/name`, as Haiku names it):

  embed     the model width D (T5 d_model, a decoder's hidden_size)
  heads     query heads, merged with the head size where stored so (H·K)
  kv_heads  key/value heads (a decoder's N·K; T5 has N = H: `heads`)
  mlp       the MLP's hidden units F
  vocab     the vocabulary V
  layers    the leading [L] axis of scan_layers' stacked parameters
  norm      a norm's scale [D]
  head_dim  a per-head norm's scale [K] (qk_norm)
  buckets   T5's relative-position buckets
  lora_rank a LoRA adapter's rank r: lora_a [in, r] and lora_b [r, out]
            take the in and out axes of the kernel they adapt
  None      a dimension no rule splits (the value head's output)

`RULES` maps logical names to mesh axes (training/sharding.py builds the
mesh of AXES = data, fsdp, model): embed over fsdp (ZeRO-3 / FSDP: every
weight is split on its width and gathered for its matmul), heads, kv_heads,
mlp and vocab over model (Megatron: the q / k / v and gate / up / wi
projections are column-parallel, o / out and down / wo row-parallel, so
XLA's SPMD partitioner inserts one all-reduce or reduce-scatter per
attention block and one per MLP block), everything else replicated. The
batch is split over BATCH_AXES only; the model axis sees the same rows.

A head split keeps whole heads on each model shard: a [D, H·K] kernel's
columns are head-major (attention reshapes them to [H, K]), so splitting
the merged dimension into `model` contiguous blocks splits H when model
divides H. `check_model_axis` refuses a model axis that does not divide
every dimension it would split.

Standard library only, so that a config module may name RULES.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
MODEL_AXIS = "model"

# Logical axis -> mesh axis (None: replicated). Every logical name that
# PARAM_AXES uses must appear here.
RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("buckets", None),
    ("lora_rank", None),
)

_ATTENTION = r"(attention|self_attention|encoder_decoder_attention)"

# (regular expression matched against the end of "module/name", logical
# axes of the unstacked parameter). The first match wins.
PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    # T5 (models/network.py, layers.py, attention.py).
    (r"token_embedder/embedding", ("vocab", "embed")),
    (r"relpos_bias/rel_embedding", ("heads", "buckets")),
    (_ATTENTION + r"/(query|key|value)/kernel", ("embed", "heads")),
    (_ATTENTION + r"/out/kernel", ("heads", "embed")),
    (r"mlp/(wi|wi_0|wi_1)/kernel", ("embed", "mlp")),
    (r"mlp/wo/kernel", ("mlp", "embed")),
    (r"logits_dense/kernel", ("embed", "vocab")),
    # Decoder-only LLMs (models/decoder.py).
    (r"embed_tokens/embedding", ("vocab", "embed")),
    (r"self_attn/q_proj/kernel", ("embed", "heads")),
    (r"self_attn/q_proj/bias", ("heads",)),
    (r"self_attn/(k_proj|v_proj)/kernel", ("embed", "kv_heads")),
    (r"self_attn/(k_proj|v_proj)/bias", ("kv_heads",)),
    (r"self_attn/o_proj/kernel", ("heads", "embed")),
    (r"self_attn/(q_norm|k_norm)/scale", ("head_dim",)),
    (r"mlp/(gate_proj|up_proj)/kernel", ("embed", "mlp")),
    (r"mlp/down_proj/kernel", ("mlp", "embed")),
    (r"lm_head/kernel", ("embed", "vocab")),
    # Value networks (models/value.py): hk.Linear(1).
    (r"value_head/w", ("embed", None)),
    (r"value_head/b", (None,)),
    # Every norm of both families: T5's *layer_norm, encoder_norm,
    # decoder_norm; the decoders' *layernorm and model/norm.
    (r"\w*norm/scale", ("norm",)),
)

_COMPILED = tuple((re.compile(r"(^|/)" + pattern + r"$"), axes)
                  for pattern, axes in PARAM_AXES)
# A stacked (scan_layers) stack's parameters live under .../layers/...;
# unstacked ones under .../layers_{i}/...
_STACKED = re.compile(r"(^|/)layers/")
# A LoRA adapter beside its kernel (models/layers.py: LORA_A, LORA_B).
_ADAPTER = re.compile(r"^(.*)/lora_(a|b)$")


def logical_axes(path: str, ndim: int | None = None
                 ) -> tuple[str | None, ...] | None:
  """The logical axes of the parameter at `path` ("module/name").

  A stacked parameter (under .../layers/...) gets a leading "layers". None
  for a path no pattern names, or when `ndim` is given and differs from the
  axes' count (an array that is not the parameter itself).
  """
  adapter = _ADAPTER.match(path)
  if adapter:
    kernel = logical_axes(adapter.group(1) + "/kernel")
    if kernel is None:
      return None
    axes = kernel[:-2] + ((kernel[-2], "lora_rank") if adapter.group(2) == "a"
                          else ("lora_rank", kernel[-1]))
    return None if ndim is not None and ndim != len(axes) else axes
  for pattern, axes in _COMPILED:
    if pattern.search(path):
      if _STACKED.search(path):
        axes = ("layers",) + axes
      if ndim is not None and ndim != len(axes):
        return None
      return axes
  return None


def mesh_axes(axes: Sequence[str | None],
              rules: Sequence[tuple[str, str | None]] = RULES
              ) -> tuple[str | None, ...]:
  """Logical axes -> mesh axes by `rules` (a name no rule lists: None)."""
  table = dict(rules)
  return tuple(None if a is None else table.get(a) for a in axes)


def split_dimensions(config: Any) -> dict[str, int]:
  """The dimensions of a T5Config or DecoderConfig that logical axes name.

  Keys: the config's field names (num_heads, num_kv_heads, d_ff or
  intermediate_size, vocab_size), each with the logical axis it is.
  """
  if hasattr(config, "intermediate_size"):             # DecoderConfig
    return {"num_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size}
  return {"num_heads": config.num_heads, "d_ff": config.d_ff,
          "vocab_size": config.vocab_size}


_LOGICAL = {"num_heads": "heads", "num_kv_heads": "kv_heads",
            "intermediate_size": "mlp", "d_ff": "mlp",
            "vocab_size": "vocab"}


def check_model_axis(mesh_spec: str, sizes: dict[str, int],
                     configs: Sequence[tuple[str, Any]],
                     rules: Sequence[tuple[str, str | None]] = RULES
                     ) -> None:
  """Raises ValueError unless the model axis divides what it splits.

  Args:
    mesh_spec: the `mesh` flag as given, for the message.
    sizes: the mesh's axis sizes (training.sharding.parse_mesh).
    configs: (what, config) pairs, e.g. ("policy", T5Config), ("value
      network", DecoderConfig).
    rules: logical axis -> mesh axis.
  """
  model = sizes.get(MODEL_AXIS, 1)
  if model == 1:
    return
  table = dict(rules)
  dims = [(what, field, size) for what, config in configs
          for field, size in split_dimensions(config).items()
          if table.get(_LOGICAL[field]) == MODEL_AXIS]
  for what, field, size in dims:
    if size % model:
      common = math.gcd(*(other for _, _, other in dims))
      divisors = ", ".join(str(d) for d in range(1, common + 1)
                           if common % d == 0)
      raise ValueError(
          f"`mesh`={mesh_spec}: model {model} does not divide {field} "
          f"{size} of the {what}; model sizes that divide every split "
          f"dimension: {divisors}.")

