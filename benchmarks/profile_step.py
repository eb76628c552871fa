r"""Where a DRO-V train step's device time goes: a jax.profiler trace, by op.

  python -m benchmarks.profile_step --size=large --remat=dots \
      --attention=cudnn --json_out=PATH --trace_out=profile.xplane.pb

Builds the step as step_time does (benchmarks/lib/step.py), runs --warmup
steps, traces --steps more (no Python tracer) and appends one record to
--json_out: the steps' seconds, device ms per step in all and by category,
and the --top HLO ops with their category and JAX scope (from the compiled
HLO's metadata). The raw XSpace (xprof, TensorBoard) is kept at --trace_out
within --max_trace_mib, gzipped if only that fits ("trace_file" says).
--dry_run traces a small function instead: the CPU test of this plumbing.
"""

from __future__ import annotations

import collections
import glob
import gzip
import os
import re
import shutil
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.lib import flags as shared
from benchmarks.lib import records
from benchmarks.lib import step as bench_step
from benchmarks.lib import timing
from dro_fast.training import steps

_REMAT = flags.DEFINE_string("remat", "dots", "Rematerialisation policy.")
_ATTENTION = flags.DEFINE_enum("attention", "cudnn", ["xla", "cudnn"],
                               "Attention implementation.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untraced steps first.")
_TRACE_OUT = flags.DEFINE_string("trace_out", None, "Keep the raw trace here.")
_MAX_TRACE_MIB = flags.DEFINE_float("max_trace_mib", 15, "Largest trace kept.")
_TOP = flags.DEFINE_integer("top", 30, "HLO ops listed.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Trace a small function.")

# The categories a custom call or fusion falls in by what it names (its
# target, fusion kind, backend kind), first match; else by opcode.
KINDS = (("attention (cuDNN)", ("fmha", "flash")),
         ("matmul", ("gemm", "matmul", "cublas")), ("cuDNN fusion", ("cudnn",)),
         ("triton/pallas", ("triton", "pallas", "mosaic")))
CONTROL_FLOW = ("while", "conditional", "call")    # hold other ops' time


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name, also as a kernel spells it: (category, JAX scope)}."""
  ops = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)", line)
    opcode = m and re.search(r"(?:^|\s)([a-z][\w\-]*)\(", m[2])
    if opcode:
      found = [(re.search(p, m[2]) or ["", ""])[1] for p in (
          'custom_call_target="([^"]+)"', r"kind=(k\w+)", '"kind":"([^"]+)"',
          'op_name="([^"]+)"')]
      names = " ".join(found[:3]).lower()
      category = next((c for c, keys in KINDS if any(k in names for k in keys)),
                      "matmul" if opcode[1] in ("dot", "convolution") else
                      f"fusion {found[1]}" if found[1] else
                      f"custom-call {found[0]}" if found[0] else opcode[1])
      ops[m[1]] = ops[re.sub(r"[.\-]", "_", m[1])] = (category, found[3][-160:])
  return ops


def device_events(xspace) -> list[tuple[str, int]]:
  """(op, nanoseconds) of each op the device ran.

  From a GPU's or TPU's planes (their "XLA Ops" line where derived, else
  every line), else from the CPU's thunks (the events that name an hlo_op).
  """
  for prefix in ("/device:GPU", "/device:TPU", "/host:CPU"):
    found = []
    for plane in [p for p in xspace.planes if p.name.startswith(prefix)]:
      lines = list(plane.lines)
      for line in [l for l in lines if l.name == "XLA Ops"] or lines:
        for event in line.events:
          op = dict(event.stats).get("hlo_op")
          if op or prefix != "/host:CPU":
            found.append((op or event.name, event.duration_ns))
    if found:
      return found
  return []


def keep_trace(path: str, out: str) -> str | None:
  """Copies the trace to `out`, else gzipped to `out`.gz, within the cap."""
  for kept, write in ((out, open), (out + ".gz", gzip.open)):
    with open(path, "rb") as raw, write(kept, "wb") as copy:
      shutil.copyfileobj(raw, copy)
    if os.path.getsize(kept) <= _MAX_TRACE_MIB.value * 2**20:
      return kept
    os.remove(kept)
  return None


def profile(run, hlo_text: str, n: int, trace_dir: str) -> dict:
  """Traces `n` calls of `run`.

  Returns their seconds and the device ms per step by op, joined with the
  HLO; the raw trace is kept at --trace_out.
  """
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  seconds = []
  with jax.profiler.trace(trace_dir, profiler_options=options):
    for i in range(n):
      start = time.perf_counter()
      with jax.profiler.StepTraceAnnotation("train", step_num=i):
        run()
      seconds.append(time.perf_counter() - start)
  [path] = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  ops = collections.defaultdict(lambda: ("other", ""), hlo_ops(hlo_text))
  ms, calls, by_category = (collections.Counter() for _ in range(3))
  for op, ns in device_events(jax.profiler.ProfileData.from_file(path)):
    if ops[op][0] not in CONTROL_FLOW:               # per step
      ms[op] += ns * 1e-6 / n
      calls[op] += 1 / n
      by_category[ops[op][0]] += ns * 1e-6 / n
  kept = _TRACE_OUT.value and keep_trace(path, _TRACE_OUT.value)
  return {"step_s": seconds, "device_ms_per_step": sum(ms.values()),
          "by_category": dict(by_category.most_common()),
          "top_ops": [{"op": op, "ms": x, "calls": calls[op],
                       "category": ops[op][0], "scope": ops[op][1]}
                      for op, x in ms.most_common(_TOP.value)],
          "peak_bytes": (jax.devices()[0].memory_stats() or {}).get(
              "peak_bytes_in_use", -1),
          "trace_bytes": os.path.getsize(path),
          "trace_file": kept and os.path.basename(kept)}


def main(argv):
  del argv
  timing.quiet_backend_probe()
  size, b = shared.SIZE.value[0], int(shared.BATCH.value[0])
  s, t = shared.INPUT_LENGTH.value, int(shared.TARGET_LENGTH.value[0])
  config = bench_step.config_for(
      size, shared.DTYPE.value, remat=_REMAT.value, attention=_ATTENTION.value,
      scan_layers=shared.SCAN.value, platform=shared.program_platform())
  record = {"check": "profile", "size": size, "remat": _REMAT.value,
            "attention": _ATTENTION.value, "batch_size": b, "input_length": s,
            "target_length": t, "dtype": shared.DTYPE.value,
            "compute_dtype": config.dtype,
            "platform": shared.program_platform(),
            "dry_run": _DRY_RUN.value, "warmup": _WARMUP.value,
            "steps_traced": shared.STEPS.value, **records.machine()}
  if _DRY_RUN.value:
    x = jnp.ones((64, 64))
    compiled = jax.jit(lambda x: jnp.tanh(x @ x)).lower(x).compile()
    run = lambda: compiled(x).block_until_ready()
  else:
    batches = [bench_step.random_batch(config, b, s, t,
                                       np.random.default_rng(i))
               for i in range(2)]
    run = bench_step.JaxStep(config, steps.AlgorithmConfig(algo="dro_v"),
                             batches, platform=shared.program_platform())
    compiled = run.compiled
    record.update(compile_s=run.compile_s,
                  planned_peak_bytes=run.memory["peak_bytes"])
  for _ in range(_WARMUP.value):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    record.update(profile(run, compiled.as_text(), shared.STEPS.value,
                          trace_dir))
  records.append(shared.JSON_OUT.value, [record])
  print(f"{record['device']} {size} remat={_REMAT.value} attention="
        f"{_ATTENTION.value} B={b} {s}/{t}: {record['device_ms_per_step']:.1f}"
        f" device ms/step; trace -> {record['trace_file']}\n  "
        f"{record['by_category']}")
  for r in record["top_ops"][:10]:                   # the rest: the record
    print(f"  {r['ms']:10.2f} ms {r['calls']:5.0f}x  {r['category']:>18s}  "
          f"{r['op']}  {r['scope'][-80:]}")


if __name__ == "__main__":
  shared.set_defaults(steps=2)
  app.run(main)
