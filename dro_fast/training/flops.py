"""The FLOP model of a train step, device peaks, and the paper's throughput.

Counted: matmuls and attention; embedding lookups, norms and elementwise
work are not.

  forward of one network on one example = 2 · N_matmul · tokens + attention,
    where the encoder's N_matmul (its layers' projections) sees S tokens;
    the decoder's (its layers' projections plus the output projection D·V)
    sees T tokens, except cross-attention's key and value projections
    (2 · D·H·K per layer), which see the S encoder outputs; attention adds
    4 · S² · H·K per encoder layer, 4 · T² · H·K (self) + 4 · T · S · H·K
    (cross) per decoder layer.
  a decoder-only LLM (DecoderConfig) reads prompt and completion as one
    sequence of S + T tokens: its layers' projections (q, k, v, o with
    grouped key/value heads, the gated MLP's three) see all of them, the
    output projection D·V only the T completion positions, and attention
    adds 4 · (S + T)² · H·K per layer (the full square, as the "xla"
    attention computes it; a causal or sliding mask skips none of it);
    its separate value network reads the S prompt tokens, no projection.
  a trained network costs 3x its forward, a forward-only one 1x; a LoRA
    policy (its config's `lora`) 2x (the backward's input gradients; its
    frozen weights get none) plus 3x its adapters' forward, 2 · r · (in +
    out) per token through each adapted layer.
  dro_v: policy trained + separate value encoder trained (a shared value
    head adds no matmul work); kto: policy trained on 2B sequences (examples
    and their mismatched completions); sft: policy trained.

The model matches the dots of the compiled T5-small step within 0.1%
(benchmarks/RESULTS.md#train-step-on-the-h100); `xla_flops`, XLA's cost
analysis, also counts elementwise work, so it lies somewhat above.
"""

from __future__ import annotations

import jax

from dro_fast import models

# Dense bfloat16 FLOP/s of one device, by a substring of its device_kind;
# the first match counts ("TPU v5" is v5p's kind, a prefix of v5e's).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v6 lite": 918e12, "TPU v5": 459e12}

# Paper, §4: T5-L 0.5 steps/s at batch 32 on 16 TPU v5e; T5-XL 0.1 steps/s
# on 32 chips. Examples per second per chip:
PAPER_EXAMPLES_PER_CHIP = {"large": 0.5 * 32 / 16, "xl": 0.1 * 32 / 32}


def forward_flops(config: models.T5Config, batch: int, s: int, t: int,
                  part: str) -> float:
  """Forward FLOPs of the encoder ("encoder") or the decoder ("decoder")."""
  d, hk, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  mlp = (3 if config.gated else 2) * d * ff
  if part == "encoder":
    n = config.num_encoder_layers * (4 * d * hk + mlp)
    attention = config.num_encoder_layers * 4 * s * s * hk
    return batch * (2 * n * s + attention)
  # Self-attention q, k, v, o and cross-attention q, o see the T targets;
  # cross-attention k, v see the S encoder outputs.
  n = config.num_decoder_layers * (6 * d * hk + mlp) + d * config.vocab_size
  cross_kv = config.num_decoder_layers * 2 * d * hk
  attention = config.num_decoder_layers * (4 * t * t * hk + 4 * t * s * hk)
  return batch * (2 * n * t + 2 * cross_kv * s + attention)


def decoder_forward_flops(config: models.DecoderConfig, batch: int,
                          tokens: int, output_tokens: int) -> float:
  """Forward FLOPs of a decoder-only LLM over `tokens` positions per row,
  `output_tokens` of them through the output projection."""
  d, k = config.hidden_size, config.head_dim
  per_layer = (2 * d * config.num_heads * k + 2 * d * config.num_kv_heads * k
               + 3 * d * config.intermediate_size)
  attention = config.num_layers * 4 * tokens * tokens * config.num_heads * k
  return batch * (2 * config.num_layers * per_layer * tokens + attention
                  + 2 * d * config.vocab_size * output_tokens)


def lora_forward_flops(config: models.T5Config | models.DecoderConfig,
                       batch: int, s: int, t: int) -> float:
  """Forward FLOPs of a LoRA policy's adapters (0 without `lora`).

  A decoder-only model's layers see S + T tokens; T5's encoder layers S,
  its decoder layers T (cross-attention's key and value adapters S).
  """
  if config.lora is None:
    return 0.0
  r, targets = config.lora.rank, config.lora_modules
  per_token = lambda widths: sum(2 * r * (i + o) for name, (i, o) in
                                 widths.items() if name in targets)
  if isinstance(config, models.DecoderConfig):
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, (config.num_kv_heads
                                                 * config.head_dim)
    widths = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv),
              "o_proj": (q, d), "gate_proj": (d, f), "up_proj": (d, f),
              "down_proj": (f, d)}
    return batch * config.num_layers * per_token(widths) * (s + t)
  d, hk, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  attention = {"query": (d, hk), "key": (d, hk), "value": (d, hk),
               "out": (hk, d)}
  mlp = {"wi_0": (d, ff), "wi_1": (d, ff), "wo": (ff, d)} if config.gated \
      else {"wi": (d, ff), "wo": (ff, d)}
  kv = {"key": (d, hk), "value": (d, hk)}
  encoder = config.num_encoder_layers * per_token(attention | mlp) * s
  decoder = config.num_decoder_layers * (
      per_token(attention | mlp) * t + per_token(attention) * t
      - per_token(kv) * t + per_token(kv) * s)
  return batch * (encoder + decoder)


def step_flops(config: models.T5Config | models.DecoderConfig, algo: str,
               value_net: str, batch: int, s: int, t: int,
               value_config: models.DecoderConfig | None = None) -> float:
  """FLOPs of one train step of `algo` at batch `batch`, lengths s and t.

  value_config: a separate value network's own config (None: the policy's).
  """
  if isinstance(config, models.DecoderConfig):
    policy = decoder_forward_flops(config, batch, s + t, t)
    value = decoder_forward_flops(value_config or config, batch, s, 0)
  else:
    policy = (forward_flops(config, batch, s, t, "encoder")
              + forward_flops(config, batch, s, t, "decoder"))
    value = forward_flops(config, batch, s, t, "encoder")
  # A LoRA policy's frozen weights get no gradient: 2x its forward, and 3x
  # its adapters'.
  trained = policy * (3 if config.lora is None else 2) + 3 * (
      lora_forward_flops(config, batch, s, t))
  if algo == "kto":
    return 2 * trained
  flops = trained
  if algo == "dro_v" and value_net == "separate":
    flops += 3 * value
  return flops


def xla_flops(compiled) -> float | None:
  """XLA's FLOP count of a compiled function.

  2·M·N·K per dot plus one per elementwise op; a loop body is counted once,
  not per trip.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):     # older jax: one per device
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def peak_flops(override: float | None = None,
               device_kind: str | None = None) -> float | None:
  """`override`, else the peak of `device_kind`, else None.

  device_kind None stands for the first device's.
  """
  if override:
    return override
  kind = device_kind or jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
