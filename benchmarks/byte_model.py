r"""Roofline bounds of a DRO-V step per mesh: compute, HBM and ICI bytes.

  python -m benchmarks.byte_model --runs=llama-3.1-8b+llama-3.2-1b@v5e:8x8 \
      --fsdp=32,16,8 --model=2,4,8 --batch_size=32 --input_length=1024 \
      --target_length=512
  python -m benchmarks.byte_model --runs=large@v5e:4x4 --fsdp=16 --remat=none \
      --xla_records=benchmarks/results/tpu_setups.jsonl

For each run (POLICY[+VALUE]@TOPOLOGY, as benchmarks/tpu_compile.py takes
it) and each mesh (--fsdp x --model chips, data the rest; meshes whose
data x fsdp does not divide the batch are skipped), prints per chip the
FLOP model's compute time at peak, the byte model's HBM and ICI traffic
and their times (benchmarks/lib/byte_model.py: what a chip must move, not
XLA's sum over fused ops), which of the three bounds the step, and, where
--xla_records holds tpu_compile's unrolled compile of the same set-up,
XLA's bytes accessed and their HBM time beside them. Nothing is compiled
and libtpu is not needed. The mesh that moves the fewest ICI bytes is named
per run.
Claims: benchmarks/RESULTS.md#roofline-bounds-and-the-mesh.
"""

from __future__ import annotations

import json
import math
from typing import Any

from absl import app
from absl import flags

from benchmarks.lib import byte_model
from benchmarks.lib import flags as shared
from benchmarks.lib import records
from benchmarks.lib import step as bench_step
from benchmarks.lib import tpu

_RUNS = flags.DEFINE_list("runs", ["large@v5e:4x4"],
                          "POLICY[+VALUE]@TOPOLOGY items.")
_FSDP = flags.DEFINE_list("fsdp", ["all"], "Chips on fsdp (all: every chip "
                          "not on the model axis).")
_MODEL = flags.DEFINE_list("model", ["1"], "Chips on the model axis.")
_REMAT = flags.DEFINE_enum("remat", "full", ["full", "none"],
                           "The step's remat, as the byte model counts it.")
_VALUE_NET = flags.DEFINE_enum("value_net", "separate",
                               ["separate", "shared"], "DRO-V's value net.")
_XLA_RECORDS = flags.DEFINE_string(
    "xla_records", None, "tpu_compile JSON lines; an unrolled compile of the "
    "same set-up gives XLA's bytes accessed per chip.")


def _xla_bytes(record: dict[str, Any], found: list[dict[str, Any]]
               ) -> float | None:
  keys = ("size", "topology", "batch_size", "input_length", "target_length",
          "remat", "mesh")
  for other in found:
    # Records older than these fields were full fine-tunes with a separate
    # value network.
    if (other.get("compiled_bytes_per_chip")
        and not other.get("scan_layers", True)
        and (other.get("lora_rank") or 0) == record["lora_rank"]
        and (other.get("value_net") or "separate") == record["value_net"]
        and all(other.get(k) == record[k] for k in keys)
        and (other.get("value_size") or None) == record["value_size"]):
      return other["compiled_bytes_per_chip"]
  return None


# libtpu's device_kind of each topology's chip generation.
_KINDS = {"v5e": "TPU v5 lite", "v6e": "TPU v6 lite", "v5p": "TPU v5",
          "v4": "TPU v4"}


def chips_of(topology: str) -> tuple[str, int]:
  """(device kind, chips) of "v5e:8x8"-style names, without libtpu."""
  generation, _, shape = topology.partition(":")
  try:
    chips = math.prod(int(n) for n in shape.split("x"))
    return _KINDS[generation], chips
  except (KeyError, ValueError):
    raise app.UsageError(f"--runs: topology {topology!r} is not GEN:AxB[xC] "
                         f"with GEN one of {sorted(_KINDS)}.") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  found = []
  if _XLA_RECORDS.value:
    with open(_XLA_RECORDS.value) as f:
      found = [json.loads(line) for line in f if line.strip()]
  batch = shared.positive_ints("batch_size", shared.BATCH.value)[0]
  t = shared.positive_ints("target_length", shared.TARGET_LENGTH.value)[0]
  s = shared.INPUT_LENGTH.value
  out = []
  for item in _RUNS.value:
    try:
      size, value_size, topology = tpu.parse_run(item)
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    kind, chips = chips_of(topology)
    config = shared.with_lora(bench_step.config_for(
        size, shared.DTYPE.value, platform="tpu"))
    value_config = (bench_step.config_for(value_size, shared.DTYPE.value,
                                          platform="tpu")
                    if value_size and _VALUE_NET.value == "separate"
                    else None)
    rows = []
    for m in sorted({int(x) for x in _MODEL.value}):
      for f in sorted({chips // m if x == "all" else int(x)
                       for x in _FSDP.value}, reverse=True):
        try:
          sizes = tpu.mesh_sizes(chips, f, m)
        except ValueError:
          continue
        mesh = byte_model.Mesh(sizes["data"], sizes["fsdp"],
                               sizes.get("model", 1))
        if batch % (mesh.data * mesh.fsdp):
          continue
        record = {"size": size, "value_size": value_size,
                  "topology": topology, "chips": chips, "chip": kind,
                  "batch_size": batch, "input_length": s, "target_length": t,
                  "remat": _REMAT.value, "value_net": _VALUE_NET.value,
                  "lora_rank": shared.LORA_RANK.value,
                  "mesh": ",".join(f"{k}:{v}" for k, v in sizes.items())}
        record.update(byte_model.bounds(
            config, value_config, _VALUE_NET.value, batch, s, t, mesh, kind,
            tpu.HBM_BYTES_PER_S[kind], _REMAT.value,
            xla_bytes=_xla_bytes(record, found)))
        rows.append(record)
        xla = ("" if record["xla_bytes"] is None else
               f"  XLA bytes {record['xla_bytes'] / 1e9:.1f} GB -> "
               f"{record['xla_hbm_s'] * 1e3:.1f} ms")
        print(f"{item} {record['mesh']:>22}  compute "
              f"{record['compute_s'] * 1e3:7.1f} ms  HBM "
              f"{record['hbm_bytes'] / 1e9:6.1f} GB {record['hbm_s'] * 1e3:7.1f}"
              f" ms  ICI {record['ici_bytes'] / 1e9:6.1f} GB "
              f"{record['ici_s'] * 1e3:7.1f} ms  bound "
              f"{record['bound_s'] * 1e3:7.1f} ms ({record['bound_by']}) <= "
              f"{1 / record['bound_s']:.2f} steps/s{xla}", flush=True)
    if not rows:
      raise app.UsageError(f"{item}: no mesh of --fsdp x --model splits "
                           f"batch {batch} over {chips} chips.")
    least = min(rows, key=lambda r: r["ici_bytes"])
    print(f"{item}: least ICI traffic on {least['mesh']} "
          f"({least['ici_bytes'] / 1e9:.1f} GB per chip per step)",
          flush=True)
    out.extend(rows)
  records.emit(shared.JSON_OUT.value, out)


if __name__ == "__main__":
  app.run(main)
