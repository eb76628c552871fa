"""Deviceless TPU compilation: a TPU topology's devices on a host without one.

With libtpu installed (`pip install -e ".[tpu]"`), jax can describe a TPU
slice it does not have (jax.experimental.topologies) and compile for it
ahead of time: `jax.jit(f).lower(<ShapeDtypeStructs sharded over the
topology's devices>).compile()` runs the real XLA:TPU and Mosaic compilers
on this host. The compiled object answers memory_analysis() (per-chip
bytes: timing.compiled_peak_bytes) and cost_analysis() (per-chip FLOPs and
bytes accessed). The roofline here is max(FLOPs / peak FLOP/s, bytes /
HBM bandwidth) per chip: a lower bound on the step's time as far as those
counts go, never a measurement. cost_analysis' own `optimal_seconds` is
recorded but not used: for the sharded T5-L and T5-XL updates libtpu
0.0.42.1 reports it negative. XLA counts no FLOPs inside a Pallas kernel
(a custom call), so the FLOPs taken are the larger of XLA's count and the
FLOP model's (dro_fast/training/flops.py).

`devices(name)` calls jax.config.update("jax_platforms", "cpu") first
unless JAX has already started: the host computes on its CPU and the TPU
plugin is loaded only to describe the topology and compile. It also lets
several processes load libtpu at once (ALLOW_MULTIPLE_LIBTPU_LOAD, as
jax's own multi-process tests do): libtpu otherwise takes a host-wide lock
file that a second compiling process (pytest -n 2) fails on.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Any

import jax

GIB = 1024 ** 3

# HBM per chip and its bandwidth in bytes/s, by libtpu's device_kind
# (public spec sheets).
HBM_BYTES = {
    "TPU v5 lite": 16 * GIB,     # v5e
    "TPU v6 lite": 32 * GIB,     # v6e (Trillium)
    "TPU v5": 95 * GIB,          # v5p
    "TPU v4": 32 * GIB,
}
HBM_BYTES_PER_S = {"TPU v5 lite": 819e9, "TPU v6 lite": 1640e9,
                   "TPU v5": 2765e9, "TPU v4": 1200e9}


def require_libtpu() -> None:
  """Raises RuntimeError with the install line when libtpu is missing."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        "deviceless TPU compilation needs libtpu: pip install -e \".[tpu]\" "
        "(the `tpu` extra; `make` installs it).")


@functools.cache
def devices(topology: str) -> tuple[Any, ...]:
  """The devices of a TPU topology such as "v5e:4x4" (16 chips)."""
  require_libtpu()
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  return tuple(desc.devices)


def chip(topology: str) -> str:
  """The device_kind of a topology's chips, e.g. "TPU v5 lite"."""
  return devices(topology)[0].device_kind


def cost(compiled) -> dict[str, float]:
  """Per-chip FLOPs, bytes accessed and XLA's optimal_seconds (see above)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):      # older jax: one per program
    analysis = analysis[0]
  value = lambda key: float(analysis[key]) if key in analysis else None
  return {"flops": value("flops"), "bytes_accessed": value("bytes accessed"),
          "optimal_seconds": value("optimal_seconds")}


def custom_call_targets(compiled) -> list[str]:
  """The custom-call targets in a compiled program's HLO.

  Mosaic kernels appear as "tpu_custom_call".
  """
  return re.findall(r'custom_call_target="([^"]+)"', compiled.as_text())


# The paper's throughput (§4), steps/s at batch 32: T5-L on 16 v5e chips,
# T5-XL on 32.
PAPER_STEPS_PER_S = {"large": 0.5, "xl": 0.1}


# How much of XLA:TPU's out-of-memory message (its largest allocations)
# a record keeps.
MEMORY_DETAIL_CHARS = 6000


def _memory_error_line(error: Exception) -> str | None:
  """XLA:TPU's line on running out of HBM, or None for another error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return None
  found = re.search(r"[^\n]*(Ran out of memory|exceed)[^\n]*", text)
  return (found.group(0) if found else text.splitlines()[0]).strip()[:300]


def parse_run(item: str) -> tuple[str, str | None, str]:
  """"POLICY[+VALUE]@TOPOLOGY" -> (policy, value or None, topology).

  POLICY is a T5 size or a decoder-only preset (models.DECODER_PRESETS);
  VALUE, for a decoder-only policy only, the preset of its separate value
  network (RunConfig.value_model), e.g. "llama-3.1-8b+llama-3.2-1b@v5e:4x4".
  Raises ValueError naming the item.
  """
  from benchmarks.lib import flags as shared  # pylint: disable=g-import-not-at-top
  from dro_fast import models  # pylint: disable=g-import-not-at-top
  sizes, at, topology = item.partition("@")
  size, plus, value = sizes.partition("+")
  decoders = models.DECODER_PRESETS
  if not at or not topology or (size not in shared.SIZES
                                and size not in decoders):
    raise ValueError(f"--runs: {item!r} is not POLICY[+VALUE]@TOPOLOGY with "
                     f"POLICY of {shared.SIZES} or {sorted(decoders)}.")
  if plus and (size not in decoders or value not in decoders):
    raise ValueError(f"--runs: in {item!r} +VALUE needs a decoder-only "
                     f"policy and value preset, of {sorted(decoders)}.")
  return size, (value or None), topology


def logits_bytes_per_chip(batch_size: int, target_length: int,
                          vocab_size: int, chips: int) -> float:
  """The float32 logits [B, T, V] and their gradient, per chip.

  What the "xla" log-prob implementation materialises for the policy's
  targets (the batch is split over every chip; on a model axis the batch
  over data x fsdp and the vocabulary over model, the same share) and a
  fused one does not.
  """
  return 2 * batch_size / chips * target_length * vocab_size * 4


def mesh_sizes(chips: int, fsdp: int, model: int = 1) -> dict[str, int]:
  """{"data": chips / (fsdp * model), "fsdp": fsdp[, "model": model]}.

  The model axis is named only when it is larger than 1, so a data x fsdp
  mesh is spelled as before. Raises ValueError when fsdp x model does not
  divide the chips.
  """
  if fsdp < 1 or model < 1 or chips % (fsdp * model):
    raise ValueError(f"--fsdp={fsdp} x --model={model} does not divide "
                     f"{chips} chips.")
  sizes = {"data": chips // (fsdp * model), "fsdp": fsdp}
  if model > 1:
    sizes["model"] = model
  return sizes


def compile_update(size: str, topology: str, *, batch_size: int,
                   input_length: int, target_length: int, remat: str,
                   fsdp: int, model: int = 1, attention: str = "xla",
                   algo: str = "dro_v",
                   dtype: str = "bfloat16", scan_layers: bool = True,
                   roofline: bool = False, value_size: str | None = None,
                   value_net: str = "separate",
                   implementation: str | None = None, lora_rank: int = 0,
                   lora_targets: tuple[str, ...] = ("attention", "mlp")
                   ) -> dict[str, Any]:
  """Compiles the trainer's update for a TPU topology; returns its record.

  The update is lib/step.py's abstract JaxStep (the trainer's own update,
  its mesh and shardings) over the topology's devices, on a data x fsdp x
  model mesh (mesh_sizes) with `fsdp` chips on fsdp and `model` on model
  (the batch over data x fsdp; a model axis of 1 is left out of the
  record's mesh). `size` is a T5 size or a decoder-only
  preset, `value_size` a decoder-only preset for a separate value network
  of its own shape (None: the policy's), `value_net` the algorithm's value
  network ("separate" or "shared"), `implementation` the log-prob kernels'
  (None: backend.resolve's for TPU, "pallas_tpu"; "xla" materialises the
  logits), `lora_rank` LoRA adapters of that rank on `lora_targets` of the
  frozen bfloat16 policy (alpha 2 x rank; 0: full fine-tuning). The record has the per-chip memory plan in GiB, whether it fits
  the chip's HBM, the compiled and modelled FLOPs per chip, and XLA's
  roofline (an upper bound on steps/s), which with scan_layers needs
  `roofline` (a second compile, unrolled). A program XLA:TPU rejects for
  memory is a record with fits False and the compiler's line.
  """
  from dro_fast import kernels  # pylint: disable=g-import-not-at-top
  from dro_fast import models  # pylint: disable=g-import-not-at-top
  from dro_fast.training import flops  # pylint: disable=g-import-not-at-top
  from benchmarks.lib import step as bench_step  # pylint: disable=g-import-not-at-top
  from dro_fast.training import sharding  # pylint: disable=g-import-not-at-top
  from dro_fast.training import steps  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  topology_devices = devices(topology)
  chips = len(topology_devices)
  kind = topology_devices[0].device_kind
  hbm = HBM_BYTES.get(kind)
  sizes = mesh_sizes(chips, fsdp, model)
  mesh = sharding.make_mesh(sizes, topology_devices)
  if value_net != "separate":          # no value network of its own
    value_size = None
  backend_fields = dict(remat=remat, attention=attention,
                        scan_layers=scan_layers, platform="tpu")
  config = bench_step.config_for(size, dtype, **backend_fields)
  if lora_rank:
    config = config.replace(lora=models.LoraConfig(
        rank=lora_rank, alpha=2.0 * lora_rank, targets=tuple(lora_targets)))
  value_config = (None if value_size is None else
                  bench_step.config_for(value_size, dtype, **backend_fields))
  algorithm = steps.AlgorithmConfig(algo=algo, value_net=value_net,
                                    implementation=implementation)
  decoder = isinstance(config, models.DecoderConfig)
  batch = bench_step.random_batch(config, batch_size, input_length,
                                  target_length, np.random.default_rng(0))
  record = {"topology": topology, "chips": chips, "chip": kind,
            "hbm_gib": hbm / GIB if hbm else None, "size": size,
            "algo": algo, "batch_size": batch_size,
            "input_length": input_length, "target_length": target_length,
            "dtype": config.dtype, "remat": remat, "attention": attention,
            "scan_layers": scan_layers, "value_size": value_size,
            "value_net": value_net, "lora_rank": lora_rank,
            "implementation": (implementation
                               or kernels.implementation_for("tpu")),
            "logits_and_grad_gib_per_chip": logits_bytes_per_chip(
                batch_size, target_length, config.vocab_size, chips) / GIB,
            "mesh": ",".join(f"{k}:{v}" for k, v in sizes.items()),
            "model": model,
            "paper_steps_per_s": PAPER_STEPS_PER_S.get(size)}
  try:
    step = bench_step.JaxStep(config, algorithm, [batch], abstract=True,
                              mesh=mesh, value_config=value_config)
  except Exception as e:  # pylint: disable=broad-except
    line = _memory_error_line(e)
    if line is None:
      raise
    # The compiler's account of the largest allocations, for the record.
    return dict(record, fits=False, error=line,
                error_detail=str(e)[:MEMORY_DETAIL_CHARS])
  # XLA's cost analysis counts a loop body once, not per trip: with
  # scanned layers its FLOPs and roofline describe no real step, so they
  # come from the same update with the layers unrolled.
  seconds = {"flops": None, "bytes_accessed": None, "optimal_seconds": None}
  if not scan_layers:
    seconds = cost(step.compiled)
  elif roofline:
    try:
      seconds = cost(bench_step.JaxStep(
          config.replace(scan_layers=False), algorithm, [batch],
          abstract=True, mesh=mesh,
          value_config=(value_config and
                        value_config.replace(scan_layers=False))).compiled)
    except Exception as e:  # pylint: disable=broad-except
      line = _memory_error_line(e)
      if line is None:
        raise
      record["roofline_error"] = f"unrolled: {line}"
  model_flops = flops.step_flops(config, algo, value_net, batch_size,
                                 input_length, target_length,
                                 value_config=value_config)
  peak = flops.peak_flops(device_kind=kind)
  bound = None
  if seconds["flops"] is not None:
    bound = roofline_seconds(max(seconds["flops"], model_flops / chips),
                             seconds["bytes_accessed"], peak,
                             HBM_BYTES_PER_S.get(kind))
  record.update(
      fits=hbm is None or step.memory["total_bytes"] <= hbm,
      compile_s=round(step.compile_s, 1),
      **{k.replace("_bytes", "_gib"): v / GIB
         for k, v in step.memory.items()},
      compiled_flops_per_chip=seconds["flops"],
      compiled_bytes_per_chip=seconds["bytes_accessed"],
      xla_optimal_seconds=seconds["optimal_seconds"],
      model_flops_per_chip=model_flops / chips,
      roofline_seconds=bound,
      roofline_steps_per_s_upper_bound=(1 / bound if bound and bound > 0
                                        else None),
      model_flops_at_peak_seconds=(model_flops / chips / peak
                                   if peak else None),
      custom_calls=sorted(set(custom_call_targets(step.compiled))),
      # A decoder-only model's scores are [B, KV heads, group, L, L] over
      # the L = S+T-1 positions it feeds (the last target is not an input);
      # T5's [B, H, S, S], H split over the model axis on each chip.
      encoder_score_arrays=len(score_arrays(
          step.compiled,
          config.num_heads // config.num_kv_heads if decoder
          else config.num_heads // model,
          input_length + target_length - 1 if decoder else input_length)))
  return record


def roofline_seconds(flops_per_chip: float, bytes_per_chip: float | None,
                     peak_flops: float | None,
                     bytes_per_s: float | None) -> float | None:
  """max(compute time at peak, memory time at HBM bandwidth), per chip.

  None where the chip's rates are unknown.
  """
  if not peak_flops or not bytes_per_s or bytes_per_chip is None:
    return None
  return max(flops_per_chip / peak_flops, bytes_per_chip / bytes_per_s)


def score_arrays(compiled, heads: int, length: int) -> list[str]:
  """The HLO values of shape [..., heads, length, length] in a compiled program.

  They are attention logits or weights over a length-long sequence, what a
  flash attention never materialises (`heads`: the dimension before the
  two lengths; a decoder-only model's query group).
  """
  return re.findall(rf"\b(?:bf16|f32)\[(?:\d+,)*{heads},{length},{length}\]"
                    r"[^ ]* \S+", compiled.as_text())


def largest_batch(size: str, topology: str, start: int, on_record=None,
                  **variant) -> tuple[int | None, list[dict[str, Any]]]:
  """The largest global batch, a multiple of data x fsdp, whose update fits.

  Doubles from `start`, then bisects between the last fit and the first
  miss. Returns it (None if not even one per batch shard fits) and every
  record compiled on the way (each also passed to on_record).
  """
  shards = len(devices(topology)) // variant.get("model", 1)  # data x fsdp
  tried = []

  def fits(batch):
    tried.append(compile_update(size, topology, batch_size=batch, **variant))
    if on_record:
      on_record(tried[-1])
    return tried[-1]["fits"]

  low, high = 0, max(shards, start // shards * shards)
  while fits(high):
    low, high = high, high * 2
  while high - low > shards:
    mid = (low + high) // 2 // shards * shards
    low, high = (mid, high) if fits(mid) else (low, mid)
  return (low or None), tried
