r"""The DRO-V train step compiled for a TPU slice, on a host without one.

  python -m benchmarks.tpu_compile       # the paper's T5-L and T5-XL set-ups
  python -m benchmarks.tpu_compile --runs=large@v5e:4x4 --fsdp=1,4,16 \
      --remat=none,dots,full --attention=xla,flash
  python -m benchmarks.tpu_compile --runs=large@v5e:4x4 --max_batch
  python -m benchmarks.tpu_compile --runs=llama-3.1-8b+llama-3.2-1b@v5e:4x4 \
      --fsdp=all --remat=full --input_length=1024 --target_length=512 \
      --implementation=default,xla --noroofline
  python -m benchmarks.tpu_compile --runs=xxl@v5e:8x8 --fsdp=32 --model=2 \
      --remat=full --noroofline
  python -m benchmarks.tpu_compile --runs=llama-3.1-8b+llama-3.2-1b@v5e:2x2 \
      --lora_rank=16 --fsdp=all --remat=full --attention=splash \
      --input_length=1024 --target_length=512 --noroofline

Needs libtpu (the `tpu` extra). A run is POLICY[+VALUE]@TOPOLOGY: POLICY
a T5 size (benchmarks/lib/flags.py's SIZES) or a decoder-only preset
(dro_fast.models.DECODER_PRESETS), +VALUE for a decoder-only policy the
preset of its separate value network (RunConfig.value_model: a 1B value
network of an 8B policy; without it the value network has the policy's
shape). For each run and each variant (batch x remat x fsdp x attention x
log-prob implementation x value network) it builds the trainer's own
update (benchmarks/lib/step.py's JaxStep: training.loop.trainer_for_run,
the trainer's mesh and shardings laid over the topology's devices) from
shapes alone, and compiles it with XLA:TPU and Mosaic
(benchmarks/lib/tpu.py). Per variant it prints a table row and a JSON line:
the per-chip memory plan (arguments, outputs, temporaries, generated code
and their sum) against the chip's HBM, the compiled FLOPs per chip beside
the FLOP model's (dro_fast/training/flops.py), and the roofline as steps/s
beside the paper's throughput: an upper bound on steps/s from the compiled
program's FLOPs and bytes per chip at the chip's peak rates (tpu.py), never
a measurement.
A variant that XLA:TPU rejects for memory is a record with fits = false and
the compiler's line, not a traceback.

Memory comes from the program the flagfiles train (--scan_layers, the
default). XLA's cost analysis counts a loop body once, so the FLOPs and
the roofline come from a second compile with the layers unrolled
(--roofline, the default; not under --max_batch). Extrapolating from
unrolled compiles of 1 and 2 layers would be faster, but misses part of the
bytes: XLA fuses and schedules the full depth differently.

The mesh: --model=M puts M chips on the model axis (tensor parallel:
attention heads, MLP units and the vocabulary split, the log-probs
vocabulary-parallel; default 1, no model axis), --fsdp=F puts F chips on
fsdp, and data takes the rest (chips / (F x M)). The batch is split over
data x fsdp, so with a model axis a batch smaller than the chip count can
use them all (T5-XXL at batch 32 on 64 chips: --fsdp=32 --model=2).
--implementation: the log-prob kernels; "default" is what
dro_fast.backend.resolve picks for TPU (pallas_tpu: the fused linear
log-probs, no [B, T, V] logits), "xla" materialises the float32 logits.
Where both were compiled, a line per variant states the fused path's
saving per chip beside the logits and their gradient per chip
(2 x B/chips x T x V x 4 bytes; the batch is split over every chip, or
with a model axis the batch over data x fsdp and the vocabulary over model).
--lora_rank: LoRA adapters of that rank on the frozen bfloat16 policy
(the trainer's --lora_rank, alpha 2 x rank, --lora_targets), which trains
them alone; the value network stays whole.
--max_batch: the largest global batch (a multiple of data x fsdp) that
fits, per variant, by doubling from --batch_size and then bisecting.
Claims: benchmarks/RESULTS.md#the-paper-set-ups-on-tpu-v5e.
"""

from __future__ import annotations

import itertools
from typing import Any

from absl import app
from absl import flags

from benchmarks.lib import flags as shared
from benchmarks.lib import records
from benchmarks.lib import timing
from benchmarks.lib import tpu
from dro_fast.models.config import REMAT_POLICIES
from dro_fast.training import steps

# The paper's set-ups (§4) and the remat of their flagfiles
# (configs/large.flags, configs/xl.flags).
PAPER_RUNS = ("large@v5e:4x4", "xl@v5e:4x8")
CONFIG_REMAT = {"large": "dots", "xl": "full"}

_RUNS = flags.DEFINE_list(
    "runs", list(PAPER_RUNS), "POLICY[+VALUE]@TOPOLOGY items, e.g. "
    "large@v5e:4x4 or llama-3.1-8b+llama-3.2-1b@v5e:4x4 (see above).")
_REMAT = flags.DEFINE_list(
    "remat", ["config"], f"Remat policies of {REMAT_POLICIES}, or 'config' "
    "for the size's flagfile's (large: dots, xl: full).")
_FSDP = flags.DEFINE_list("fsdp", ["1", "all"], "Chips on the mesh's fsdp "
                          "axis (those on neither fsdp nor model on data); "
                          "'all' for every chip not on model.")
_MODEL = flags.DEFINE_list(
    "model", ["1"], "Chips on the mesh's model axis (tensor parallel: heads, "
    "MLP units and vocabulary split); the batch goes over the rest.")
_ATTENTION = flags.DEFINE_list(
    "attention", ["xla"], "Attention implementations (T5: xla, flash; "
    "decoder-only: xla, splash).")
_VALUE_NET = flags.DEFINE_list(
    "value_net", ["separate"], "DRO-V's value network(s): separate (its "
    "own trunk, +VALUE's shape) or shared (a head on the policy's).")
_ALGO = flags.DEFINE_enum("algo", "dro_v", list(steps.ALGORITHMS),
                          "Algorithm whose update is compiled.")
_ROOFLINE = flags.DEFINE_bool(
    "roofline", True, "Also compile each fitting variant with its layers "
    "unrolled, for XLA's FLOPs and bytes and the roofline (see above).")
_MAX_BATCH = flags.DEFINE_bool(
    "max_batch", False, "Search the largest batch that fits per variant.")

def batch_size() -> int:
  return shared.positive_ints("batch_size", shared.BATCH.value)[0]


def target_length() -> int:
  return shared.positive_ints("target_length", shared.TARGET_LENGTH.value)[0]


def variants(size: str, chips: int) -> list[dict[str, Any]]:
  """Every remat x fsdp x model x attention x ... variant of a run.

  --fsdp=all puts on fsdp every chip not on the model axis.
  """
  remats = [CONFIG_REMAT.get(size, "dots") if r == "config" else r
            for r in _REMAT.value]
  models = sorted({int(m) for m in _MODEL.value})
  meshes = sorted({(chips // m if f == "all" else int(f), m)
                   for f in _FSDP.value for m in models},
                  key=lambda fm: (fm[1], fm[0]))
  for f, m in meshes:
    try:
      tpu.mesh_sizes(chips, f, m)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
  implementations = [None if i == "default" else i
                     for i in shared.IMPLEMENTATION.value]
  return [{"remat": r, "fsdp": f, "model": m, "attention": a,
           "implementation": i, "value_net": v}
          for r, (f, m), a, i, v in
          itertools.product(dict.fromkeys(remats), meshes, _ATTENTION.value,
                            implementations, _VALUE_NET.value)]


def _num(value, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def print_row(r: dict[str, Any]) -> None:
  size = r["size"] + (f"+{r['value_size']}" if r.get("value_size") else "")
  if r.get("lora_rank"):
    size += f" lora{r['lora_rank']}"
  extra = ("" if "implementation" not in r else
           f" {r['implementation']:>10} value:{r['value_net']}")
  head = (f"{size:>5} {r['topology']:>8} b{r['batch_size']:<4} "
          f"{r['remat']:>22} {r['mesh']:>15} {r['attention']:>5}{extra}"
          f"{'' if r['scan_layers'] else ' unrolled'}")
  if "total_gib" not in r:
    print(f"{head}  does not fit: {r['error']}", flush=True)
    return
  print(f"{head}  {r['total_gib']:6.2f} GiB/chip (args {r['argument_gib']:.2f}"
        f" temp {r['temp_gib']:.2f}) of {_num(r['hbm_gib'], '.0f')}"
        f"{'' if r['fits'] else ' DOES NOT FIT'}  flops/chip "
        f"{_num(r['compiled_flops_per_chip'], '.3g')} (model "
        f"{r['model_flops_per_chip']:.3g})  bytes/chip "
        f"{_num(r.get('compiled_bytes_per_chip'), '.3g')}  roofline <= "
        f"{_num(r['roofline_steps_per_s_upper_bound'], '.2f')} steps/s "
        f"(paper {r['paper_steps_per_s']})  compile {r['compile_s']:.0f} s",
        flush=True)


def savings(records: list[dict[str, Any]]) -> list[str]:
  """Per variant compiled both ways: the fused log-probs' saving per chip.

  The total per chip with "xla" (materialised logits) less that with the
  fused kernels, beside the logits and their gradient per chip.
  """
  def key(r):
    return tuple((k, str(v)) for k, v in sorted(r.items())
                 if k in ("size", "value_size", "topology", "batch_size",
                          "input_length", "target_length", "remat", "mesh",
                          "attention", "value_net", "scan_layers"))
  fused = {key(r): r for r in records
           if r.get("implementation") not in (None, "xla") and
           "total_gib" in r}
  lines = []
  for r in records:
    other = fused.get(key(r))
    if r.get("implementation") != "xla" or other is None:
      continue
    if "total_gib" not in r:
      lines.append(f"{other['size']} b{other['batch_size']} {other['remat']}"
                   f" {other['mesh']}: xla does not fit ({r['error']}); "
                   f"{other['implementation']} {other['total_gib']:.2f} GiB/"
                   f"chip; logits + gradient "
                   f"{r['logits_and_grad_gib_per_chip']:.2f} GiB/chip")
      continue
    lines.append(
        f"{r['size']} b{r['batch_size']} {r['remat']} {r['mesh']}: "
        f"{other['implementation']} saves "
        f"{r['total_gib'] - other['total_gib']:.2f} GiB/chip (total "
        f"{r['total_gib']:.2f} -> {other['total_gib']:.2f}, temp "
        f"{r['temp_gib']:.2f} -> {other['temp_gib']:.2f}); logits + "
        f"gradient [B/chips, T, V] float32: "
        f"{r['logits_and_grad_gib_per_chip']:.2f} GiB/chip")
  return lines


def main(argv):
  timing.quiet_backend_probe()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    tpu.require_libtpu()
  except RuntimeError as e:
    raise app.UsageError(str(e)) from None
  found = []
  for item in _RUNS.value:
    try:
      size, value_size, topology = tpu.parse_run(item)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    chips = len(tpu.devices(topology))
    for variant in variants(size, chips):
      shards = chips // variant["model"]           # data x fsdp
      if batch_size() % shards and not _MAX_BATCH.value:
        raise app.UsageError(
            f"--batch_size={batch_size()} is not a multiple of data x fsdp "
            f"= {shards} ({topology}'s {chips} chips over --model="
            f"{variant['model']}).")
      fixed = dict(variant, input_length=shared.INPUT_LENGTH.value,
                   target_length=target_length(), algo=_ALGO.value,
                   dtype=shared.DTYPE.value, scan_layers=shared.SCAN.value,
                   roofline=_ROOFLINE.value and not _MAX_BATCH.value,
                   value_size=value_size, lora_rank=shared.LORA_RANK.value,
                   lora_targets=tuple(shared.LORA_TARGETS.value))
      if _MAX_BATCH.value:
        best, tried = tpu.largest_batch(size, topology, batch_size(),
                                        print_row, **fixed)
        found.extend(tried)
        print(f"largest batch that fits: {best or 'none'}", flush=True)
      else:
        found.append(tpu.compile_update(size, topology,
                                        batch_size=batch_size(), **fixed))
        print_row(found[-1])
  for line in savings(found):
    print(line, flush=True)
  records.emit(shared.JSON_OUT.value, found)


if __name__ == "__main__":
  app.run(main)
