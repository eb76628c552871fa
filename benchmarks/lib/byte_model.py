"""A byte model of one train step per chip: HBM traffic and ICI traffic.

XLA's cost analysis counts the bytes every fused op reads and writes
(`bytes accessed`), which sums operands that stay in VMEM or are re-read
from caches: for the T5-L step it is 93.7 GB per chip, several times what
must cross HBM. This model counts what a chip must move instead, for the
trainer's update as the TPU set-ups run it (scanned layers, remat "full",
fused attention and fused log-probs: no score or logits arrays), on a mesh
of data D x fsdp F x model M (training/sharding.py), with P the parameters,
P_t those trained (a LoRA policy: its adapters) and the batch split over
D x F:

HBM, per chip
  weights     each layer's weights are all-gathered over fsdp (in the
              compute dtype) in the forward and once more in the backward
              (whose body recomputes the forward, remat "full"): 2 writes
              of P/M, read 3 times (forward, recompute, input gradients).
  gradients   the trained weights' full-width gradient written and read
              once for the reduce-scatter (float32), then the optimizer
              reads gradient and parameter shards and writes the parameter
              (Adafactor's factored statistics are small): 2·P_t/M·4 +
              3·P_t/(F·M)·4.
  activations each layer's input saved (written, read back: 2·D per token)
              and the layer's own traffic: every matmul's, norm's and
              elementwise op's inputs and outputs once (layer_io, per token,
              the model-split widths divided by M), in the forward, the
              recompute and twice in the backward (gradients in and out).
ICI, per chip (bytes sent; a ring moves (n-1)/n of the data per chip)
  all-gathers of every weight over fsdp, twice per step: 2·(F-1)/F·P/M·2;
  reduce-scatter of the trained gradients over fsdp: (F-1)/F·P_t/M·4;
  their all-reduce over data: 2·(D-1)/D·P_t/(F·M)·4;
  a model axis's all-reduces of each block's output [rows, n, D] (bf16,
  2·(M-1)/M of it): per layer one per attention block and one per MLP
  block, in the forward, the recompute and the backward (the column-
  parallel projections' input gradients): 3 per block.

Without remat ("none") nothing is recomputed: the weights are read twice
(forward, input gradients), the activations see three passes (the forward
writes what the backward reads) and a model axis all-reduces in two.

Times: HBM bytes at the chip's HBM bandwidth, ICI bytes at its ICI
bandwidth (every link at once), and the FLOP model's compute
(dro_fast/training/flops.py, plus the forward that remat "full" recomputes)
at peak. Each is a lower bound on the step's time if nothing else took
any; the largest is the bound. Embedding lookups, the fused kernels'
re-reads of their weight tiles and the value head are not counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from dro_fast import models
from dro_fast.models import lora
from dro_fast.training import flops
from dro_fast.training import init
from dro_fast.training import steps

# ICI bandwidth per chip, all links together, bytes/s (public spec sheets:
# v5e 1,600 Gbps, v6e 3,584 Gbps, v5p 4,800 Gbps, v4 2,400 Gbps).
ICI_BYTES_PER_S = {"TPU v5 lite": 200e9, "TPU v6 lite": 448e9,
                   "TPU v5": 600e9, "TPU v4": 300e9}
COMPUTE_BYTES = 2          # bfloat16 activations and gathered weights


@dataclasses.dataclass(frozen=True)
class Mesh:
  data: int = 1
  fsdp: int = 1
  model: int = 1

  @property
  def chips(self) -> int:
    return self.data * self.fsdp * self.model


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def parameter_counts(config, value_config, value_net: str
                     ) -> tuple[int, int, int]:
  """(policy parameters, of them trained, value parameters)."""
  algorithm = steps.AlgorithmConfig(algo="dro_v", value_net=value_net)
  policy, value = jax.eval_shape(lambda: init.init_params(
      config, algorithm, jax.random.PRNGKey(0), value_config=value_config))
  trained = (_count(lora.split(policy)[0]) if config.lora is not None
             else _count(policy))
  return _count(policy), trained, _count(value)


def layer_io(config, model: int) -> tuple[float, float]:
  """Elements an (attention block, MLP block) reads and writes per token in
  its forward.

  Attention block: the norm (D in, D out), the q, k, v projections (D in
  each, their outputs out), the attention core (q, k, v in, q out), the
  output projection (q in, D out), the residual (2 D in, D out): 9 D +
  2 (q + 2 kv) + 2 q. MLP block: norm 2 D, the gate and up projections
  (2 D in, 2 F out), the gated product (2 F in, F out), the down
  projection (F in, D out), the residual 3 D: 8 D + 6 F (T5 v1.0's
  ungated MLP: 8 D + 4 F). q, kv, F are split over the model axis.
  """
  if isinstance(config, models.DecoderConfig):
    d, f = config.hidden_size, config.intermediate_size / model
    q = config.num_heads * config.head_dim / model
    kv = config.num_kv_heads * config.head_dim / model
    gated = True
  else:
    d, f = config.d_model, config.d_ff / model
    q = kv = config.num_heads * config.d_kv / model
    gated = config.gated
  return 9 * d + 2 * (q + 2 * kv) + 2 * q, 8 * d + (6 if gated else 4) * f


def _stacks(config, s: int, t: int, encoder_only: bool
            ) -> list[tuple[int, int, int]]:
  """(layers, tokens per row, attention blocks per layer) of each stack."""
  if isinstance(config, models.DecoderConfig):
    return [(config.num_layers, s + t, 1)]
  encoder = [(config.num_encoder_layers, s, 1)]
  return encoder if encoder_only else encoder + [
      (config.num_decoder_layers, t, 2)]


def _passes(remat: str) -> int:
  """Passes over each layer's activations: forward, (the recompute,) and
  the backward, counted twice (gradients in and out)."""
  return 4 if remat == "full" else 3


def _network_bytes(config, rows: float, s: int, t: int, mesh: Mesh,
                   remat: str, encoder_only: bool = False
                   ) -> tuple[float, float]:
  """(HBM, ICI) activation bytes per chip of one network's step."""
  hbm = ici = 0.0
  d = (config.hidden_size if isinstance(config, models.DecoderConfig)
       else config.d_model)
  attention, mlp = layer_io(config, mesh.model)
  for layers, tokens, blocks in _stacks(config, s, t, encoder_only):
    per_token = _passes(remat) * (blocks * attention + mlp) + (
        2 * d if remat == "full" else 0)     # the saved layer input
    hbm += layers * rows * tokens * per_token * COMPUTE_BYTES
    if mesh.model > 1:
      block = rows * tokens * d * COMPUTE_BYTES
      ici += layers * (blocks + 1) * (_passes(remat) - 1) * 2 * (
          mesh.model - 1) / (
          mesh.model) * block
  return hbm, ici


def step_bytes(config, value_config, value_net: str, batch: int, s: int,
               t: int, mesh: Mesh, remat: str = "full") -> dict[str, float]:
  """The byte model's HBM and ICI bytes per chip of one DRO-V step.

  value_config: a separate value network's own config (None: the
  policy's shape); value_net "shared" has no value network of its own.
  remat: "full" (the set-ups' flagfiles), or any other policy counted as
  "none" (no recompute: the weights read twice, three passes over the
  activations, which the forward writes and the backward reads).
  """
  if batch % (mesh.data * mesh.fsdp):
    raise ValueError(f"batch {batch} is not a multiple of data x fsdp = "
                     f"{mesh.data * mesh.fsdp}.")
  policy, trained, value = parameter_counts(config, value_config, value_net)
  m, f, dd = mesh.model, mesh.fsdp, mesh.data
  rows = batch / (dd * f)
  hbm = ici = 0.0
  for params, train in ((policy, trained), (value, value)):
    if not params:
      continue
    hbm += params / m * COMPUTE_BYTES * (2 + (3 if remat == "full" else 2))
    hbm += 2 * train / m * 4 + 3 * train / (f * m) * 4
    ici += 2 * (f - 1) / f * params / m * COMPUTE_BYTES
    ici += (f - 1) / f * train / m * 4 + 2 * (dd - 1) / dd * train / (
        f * m) * 4
  networks = [(config, s, t, False)]
  if value_net == "separate":
    # Over the prompts: a decoder's trunk, or T5's encoder alone.
    networks.append(((value_config or config).replace(lora=None), s, 0,
                     True))
  for network, ns, nt, encoder_only in networks:
    a_hbm, a_ici = _network_bytes(network, rows, ns, nt, mesh, remat,
                                  encoder_only)
    hbm, ici = hbm + a_hbm, ici + a_ici
  return {"hbm_bytes": hbm, "ici_bytes": ici, "policy_params": policy,
          "trained_policy_params": trained, "value_params": value}


def compute_flops(config, value_config, value_net: str, batch: int, s: int,
                  t: int, remat: str = "full") -> float:
  """The FLOP model's step plus the forward remat "full" recomputes."""
  step = flops.step_flops(config, "dro_v", value_net, batch, s, t,
                          value_config=value_config)
  if remat != "full":
    return step
  plain = config.replace(lora=None)
  forward = flops.step_flops(plain, "sft", "shared", batch, s, t) / 3
  if value_net == "separate":
    forward += (flops.step_flops(plain, "dro_v", "separate", batch, s, t,
                                 value_config=value_config)
                - flops.step_flops(plain, "sft", "shared", batch, s, t)) / 3
  return step + forward


def bounds(config, value_config, value_net: str, batch: int, s: int, t: int,
           mesh: Mesh, device_kind: str, hbm_bytes_per_s: float,
           remat: str = "full", xla_bytes: float | None = None
           ) -> dict[str, Any]:
  """Per chip: compute, byte-model HBM and ICI, and XLA's bytes, as
  seconds; the bound is the largest of the first three."""
  counted = step_bytes(config, value_config, value_net, batch, s, t, mesh,
                       remat)
  peak = flops.peak_flops(device_kind=device_kind)
  ici_rate = next((v for k, v in ICI_BYTES_PER_S.items()
                   if device_kind.startswith(k)), None)
  times = {
      "compute_s": compute_flops(config, value_config, value_net, batch, s,
                                 t, remat) / mesh.chips / peak,
      "hbm_s": counted["hbm_bytes"] / hbm_bytes_per_s,
      "ici_s": counted["ici_bytes"] / ici_rate,
  }
  bound_by = max(times, key=times.get)
  return dict(counted, **times, bound_s=times[bound_by],
              bound_by=bound_by[:-2],
              xla_bytes=xla_bytes,
              xla_hbm_s=None if xla_bytes is None else (
                  xla_bytes / hbm_bytes_per_s))
