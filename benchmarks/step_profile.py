r"""Where one train step's time goes, op by op, from a profiler trace.

  python benchmarks/step_profile.py --size=small --batch_size=8 \
      --input_length=128 --target_length=64 --dtype=float32 --remat=none \
      --noscan_layers --implementation=xla [--profile_steps=2] [--top=25]

Takes benchmarks/step_time.py's flags (the first --size, --batch_size,
--target_length, --implementation and --remat), builds the same step, runs
three untraced steps (the last two timed, to show the profiler's
overhead), then traces --profile_steps steps with jax.profiler and
joins the trace with the compiled HLO:

  - each traced op (a thunk on the CPU, a kernel on a GPU) is matched to its
    HLO instruction through the trace's hlo_op argument;
  - an op is a matmul when it is a dot or convolution, a fusion or custom
    call containing one, or a cuBLAS GEMM custom call; its FLOPs are
    2 · (output elements) · (contracted elements) summed over its dots;
  - on the CPU an op that XLA runs asynchronously (an Eigen dot) ends at its
    "end: <op>" event, not at the end of the event that started it;
  - while / conditional / call thunks are left out: the ops of their bodies
    are traced on their own.

Prints, per step: wall time, the span and busy time (union) of the traced
ops and their summed time; the matmuls' summed time, FLOPs and rate; how long
0, 1 or 2+ matmuls and other ops ran at once (on a 2-core CPU, one matmul
alone gets both cores, two at once get one each); then the top --top op
kinds (the instruction name without its number: ynn_fusion,
loop_multiply_fusion, ...) and the top named scopes (the op_name metadata,
layer numbers folded into layers_*). --json_out appends one JSON record
with all of it.

On a GPU the device's kernel events are used (the host-side launch events
are not op time). The trace is written to a temporary folder and removed,
unless --trace_dir is given.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Iterable

from absl import app
from absl import flags
import jax
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.append(os.path.dirname(_HERE))
from benchmarks import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 2,
                                      "Steps traced (after 2 untraced).")
_TOP = flags.DEFINE_integer("top", 25, "Rows in each table.")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Keep the trace here "
                                 "(default: a temporary folder, removed).")

# Thunks that only run other thunks, which are traced themselves.
CONTROL_OPCODES = frozenset({"while", "conditional", "call"})
_GEMM_TARGET = re.compile(r"gemm|matmul", re.IGNORECASE)


@dataclasses.dataclass
class Instruction:
  """One HLO instruction of the compiled module."""
  name: str
  opcode: str
  computation: str
  op_name: str          # the jax op_name metadata ("" when absent)
  called: list[str]     # computations it calls (fusion bodies, branches)
  flops: float = 0.0    # matmul FLOPs, its called computations included
  matmul: bool = False


def _dims(shape: str) -> list[int]:
  """[512, 384] from "bf16[512,384]{1,0}" (the first array of a tuple)."""
  match = re.search(r"[a-z]\w*\[([\d,]*)\]", shape)
  if not match:
    return []
  return [int(d) for d in match.group(1).split(",") if d]


def _closing(text: str, start: int) -> int:
  """Index just past the bracket that closes text[start]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for i in range(start, len(text)):
    if text[i] in pairs:
      stack.append(pairs[text[i]])
    elif stack and text[i] == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


def _operand_names(operands: str) -> list[str]:
  """Operand names from "%a, %b" or "f32[2]{0} %a, f32[2]{0} %b"."""
  names, depth, current = [], 0, ""
  for ch in operands:
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    if ch == "," and depth == 0:
      names.append(current)
      current = ""
    else:
      current += ch
  names.append(current)
  return [n.strip().split()[-1].lstrip("%") for n in names if n.strip()]


def _int_list(text: str | None) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", text or "")]


def _matmul_flops(out_shape: str, lhs_shape: str,
                  contracting: list[int]) -> float | None:
  """2 · (output elements) · (contracted elements of the lhs)."""
  lhs = _dims(lhs_shape)
  if not lhs or not all(c < len(lhs) for c in contracting):
    return None
  return 2.0 * math.prod(_dims(out_shape)) * math.prod(
      lhs[c] for c in contracting)


def parse_hlo(text: str) -> dict[str, Instruction]:
  """Every instruction of a compiled HLO module's text, by name, with the
  matmul FLOPs of each (a fusion's are those of the dots inside it)."""
  instructions: dict[str, Instruction] = {}
  shapes: dict[str, str] = {}
  by_computation: dict[str, list[str]] = collections.defaultdict(list)
  own_flops: dict[str, float] = {}
  roots: dict[str, str] = {}
  computation = ""
  for line in text.splitlines():
    if line and not line[0].isspace():
      header = re.match(r"(?:ENTRY\s+)?%?([^\s(]+)\s*\(", line)
      if header and line.rstrip().endswith("{"):
        computation = header.group(1)
      continue
    match = re.match(r"\s+(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$", line)
    if not match:
      continue
    is_root, name, rest = match.groups()
    if is_root:
      roots[computation] = name
    if rest.startswith("("):
      end = _closing(rest, 0)
    else:
      end = rest.find(" ")
      end = len(rest) if end < 0 else end
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode_match = re.match(r"([\w\-]+)\(", rest)
    if not opcode_match:
      continue
    opcode = opcode_match.group(1)
    open_at = opcode_match.end() - 1
    close_at = _closing(rest, open_at)
    operands = _operand_names(rest[open_at + 1:close_at - 1])
    attributes = rest[close_at:]
    shapes[name] = shape
    op_name = re.search(r'op_name="([^"]*)"', attributes)
    called = re.findall(
        r"(?:calls|to_apply|body|condition|true_computation|"
        r"false_computation)=%?([\w.\-]+)", attributes)
    for group in re.findall(r"(?:calls|branch_computations)=\{([^}]*)\}",
                            attributes):
      called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    instruction = Instruction(name, opcode, computation,
                              op_name.group(1) if op_name else "", called)
    lhs_shape = shapes.get(operands[0], "") if operands else ""
    flops = None
    if opcode == "dot":
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}",
                              attributes)
      flops = _matmul_flops(shape, lhs_shape, _int_list(
          contracting and contracting.group(1)))
      instruction.matmul = True
    elif opcode == "convolution":
      instruction.matmul = True
    elif opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]*)"', attributes)
      if target and _GEMM_TARGET.search(target.group(1)):
        instruction.matmul = True
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]',
                                attributes)
        if contracting:
          flops = _matmul_flops(shape, lhs_shape,
                                _int_list(contracting.group(1)))
    own_flops[name] = flops or 0.0
    instructions[name] = instruction
    by_computation[computation].append(name)

  # A fusion without metadata of its own takes its root's (XLA names the
  # fusion, not the jax op it came from).
  for inst in instructions.values():
    if not inst.op_name and inst.opcode == "fusion" and inst.called:
      body = inst.called[0]
      named = [instructions[m].op_name for m in by_computation.get(body, [])
               if instructions[m].op_name]
      root = roots.get(body)
      inst.op_name = ((instructions[root].op_name if root else "")
                      or (named[-1] if named else ""))

  totals: dict[str, tuple[float, bool]] = {}

  def computation_total(comp: str) -> tuple[float, bool]:
    if comp not in totals:
      totals[comp] = (0.0, False)        # guards against cycles
      flops, matmul = 0.0, False
      for member in by_computation.get(comp, []):
        f, m = instruction_total(instructions[member])
        flops, matmul = flops + f, matmul or m
      totals[comp] = (flops, matmul)
    return totals[comp]

  def instruction_total(inst: Instruction) -> tuple[float, bool]:
    flops, matmul = own_flops[inst.name], inst.matmul
    if inst.opcode in ("fusion", "custom-call"):
      for comp in inst.called:
        f, m = computation_total(comp)
        flops, matmul = flops + f, matmul or m
    return flops, matmul

  for inst in instructions.values():
    inst.flops, inst.matmul = instruction_total(inst)
  return instructions


def module_name(hlo_text: str) -> str:
  match = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
  return match.group(1) if match else ""


@dataclasses.dataclass
class OpEvent:
  start: float           # microseconds
  end: float
  instruction: Instruction


def op_events(trace: dict[str, Any], instructions: dict[str, Instruction],
              module: str) -> tuple[list[OpEvent], dict[str, int]]:
  """The trace's op events of `module`, matched to their instructions.

  Returns the events and counts of what was found: "device" (1 when GPU or
  TPU device events were used, else 0 for host thunks), "unmatched" (events
  of the module naming no instruction, or device kernels that match none by
  name) and "control" (control-flow thunks left out).
  """
  raw = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
  processes = {e["pid"]: e.get("args", {}).get("name", "")
               for e in trace.get("traceEvents", [])
               if e.get("ph") == "M" and e.get("name") == "process_name"}
  on_device = lambda e: processes.get(e["pid"], "").startswith(
      ("/device:GPU", "/device:TPU"))
  hlo_op = lambda e: (e.get("args") or {}).get("hlo_op")
  ours = [(hlo_op(e), e) for e in raw if hlo_op(e)
          and e["args"].get("hlo_module", module) == module]
  device = [(name, e) for name, e in ours if on_device(e)]
  missed = 0
  if not device:
    # Device kernels without hlo_op arguments: match the kernel's own name,
    # which XLA derives from its instruction's ("loop_add_fusion_3" for
    # loop_add_fusion.3).
    for e in raw:
      if not on_device(e) or hlo_op(e):
        continue
      for name in (e["name"], re.sub(r"_(\d+)$", r".\1", e["name"])):
        if name in instructions:
          device.append((name, e))
          break
      else:
        missed += 1
  chosen = device or ours
  # Host thunks that XLA runs asynchronously (Eigen dots) finish at their
  # "end: <op>" event; the k-th start of an op pairs with its k-th end.
  ends: dict[str, list[float]] = collections.defaultdict(list)
  if not device:
    for e in raw:
      if e["name"].startswith("end: "):
        ends[e["name"][5:]].append(e["ts"] + e.get("dur", 0.0))
  counts = {"device": int(bool(device)),
            "unmatched": missed if device else 0, "control": 0}
  starts: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for name, e in sorted(chosen, key=lambda pair: pair[1]["ts"]):
    starts[name].append(e)
  events = []
  for name, occurrences in starts.items():
    inst = instructions.get(name)
    if inst is None:
      counts["unmatched"] += len(occurrences)
      continue
    if inst.opcode in CONTROL_OPCODES:
      counts["control"] += len(occurrences)
      continue
    done = sorted(ends.get(name, []))
    if len(done) != len(occurrences):
      done = []
    for k, e in enumerate(occurrences):
      end = e["ts"] + e.get("dur", 0.0)
      events.append(OpEvent(e["ts"], max(end, done[k]) if done else end,
                            inst))
  events.sort(key=lambda e: e.start)
  return events, counts


def scope(inst: Instruction) -> str:
  """The op_name metadata without the jit prefix, layers folded, a scan's
  while/body/closed_call shortened to scan/ and a rematerialised
  computation's checkpoint/rematted_computation to remat/; ops XLA added
  itself (copies, say) are named by their kind."""
  text = re.sub(r"^jit\([^)]*\)/", "", inst.op_name)
  text = re.sub(r"while/body/(closed_call/)?", "scan/", text)
  text = text.replace("checkpoint/rematted_computation/", "remat/")
  return (re.sub(r"layers_\d+", "layers_*", text)
          or f"({kind(inst.name)}: no op_name)")


def kind(name: str) -> str:
  return re.sub(r"\.\d+$", "", name)


def _union(intervals: Iterable[tuple[float, float]]) -> float:
  total, current_start, current_end = 0.0, None, None
  for start, end in sorted(intervals):
    if current_end is None or start > current_end:
      if current_end is not None:
        total += current_end - current_start
      current_start, current_end = start, end
    else:
      current_end = max(current_end, end)
  if current_end is not None:
    total += current_end - current_start
  return total


def concurrency(events: list[OpEvent]) -> dict[str, float]:
  """Microseconds during which (matmuls, other ops) were running at once,
  each count capped at 2, over the span of the events."""
  points = []
  for e in events:
    points.append((e.start, 1, e.instruction.matmul))
    points.append((e.end, -1, e.instruction.matmul))
  points.sort(key=lambda p: (p[0], p[1]))
  spans: dict[str, float] = collections.Counter()
  running = {True: 0, False: 0}
  last = points[0][0] if points else 0.0
  for at, delta, is_matmul in points:
    key = (f"matmuls={min(running[True], 2)} "
           f"others={min(running[False], 2)}")
    spans[key] += at - last
    last = at
    running[is_matmul] += delta
  return dict(spans)


def summarize(events: list[OpEvent], steps: int, top: int) -> dict[str, Any]:
  """Per-step figures and the top kinds and scopes (milliseconds)."""
  per_step = lambda us: us / 1e3 / steps
  op_sum = sum(e.end - e.start for e in events)
  matmuls = [e for e in events if e.instruction.matmul]
  matmul_us = sum(e.end - e.start for e in matmuls)
  counted = [e for e in matmuls if e.instruction.flops]
  counted_us = sum(e.end - e.start for e in counted)
  counted_flops = sum(e.instruction.flops for e in counted)

  def table(key) -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    for e in events:
      row = rows.setdefault(key(e), {"name": key(e), "us": 0.0, "count": 0,
                                     "flops": 0.0, "matmul": False})
      row["us"] += e.end - e.start
      row["count"] += 1
      row["flops"] += e.instruction.flops
      row["matmul"] = row["matmul"] or e.instruction.matmul
    ordered = sorted(rows.values(), key=lambda r: -r["us"])[:top]
    return [{"name": r["name"], "ms_per_step": per_step(r["us"]),
             "share_of_op_time": r["us"] / op_sum if op_sum else 0.0,
             "ops_per_step": r["count"] / steps, "matmul": r["matmul"],
             "gflop_per_s": (r["flops"] / r["us"] / 1e3 if r["flops"]
                             else None)}
            for r in ordered]

  span = (max(e.end for e in events) - min(e.start for e in events)
          if events else 0.0)
  return {
      "ops_per_step": len(events) / steps,
      "span_ms": per_step(span),
      "busy_ms": per_step(_union((e.start, e.end) for e in events)),
      "op_sum_ms": per_step(op_sum),
      "matmul_ms": per_step(matmul_us),
      "matmul_share_of_op_time": matmul_us / op_sum if op_sum else 0.0,
      "matmul_gflop_per_step": counted_flops / 1e9 / steps,
      "matmul_gflop_per_s": (counted_flops / counted_us / 1e3 if counted_us
                             else None),
      "matmul_ms_without_flops": per_step(matmul_us - counted_us),
      "concurrency_ms": {k: per_step(v)
                         for k, v in sorted(concurrency(events).items())},
      "top_kinds": table(lambda e: kind(e.instruction.name)),
      "top_scopes": table(lambda e: scope(e.instruction)),
  }


def load_trace(directory: str) -> dict[str, Any]:
  files = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {directory}: the "
                            "profiler wrote no Perfetto trace.")
  with gzip.open(files[-1]) as f:
    return json.load(f)


def print_summary(summary: dict[str, Any], header: str) -> None:
  s = summary
  print(f"\n{header}")
  print(f"per step: wall {s['wall_ms']:.1f} ms traced, "
        f"{s['untraced_wall_ms']:.1f} ms untraced; traced ops: span "
        f"{s['span_ms']:.1f} ms, busy {s['busy_ms']:.1f} ms, summed "
        f"{s['op_sum_ms']:.1f} ms over {s['ops_per_step']:.0f} ops")
  rate = (f"{s['matmul_gflop_per_s']:.1f} GFLOP/s" if s["matmul_gflop_per_s"]
          else "rate n/a")
  print(f"matmuls: {s['matmul_ms']:.1f} ms summed "
        f"({s['matmul_share_of_op_time']:.1%} of op time), "
        f"{s['matmul_gflop_per_step']:.1f} GFLOP, {rate}"
        + (f" ({s['matmul_ms_without_flops']:.1f} ms of matmuls with no "
           "FLOP count)" if s["matmul_ms_without_flops"] > 0.05 else ""))
  if s.get("formula_flops_per_step"):
    print(f"  (step_time's FLOP formula: "
          f"{s['formula_flops_per_step'] / 1e9:.1f} "
          "GFLOP; the HLO also counts what the formula leaves out, and "
          "recomputation)")
  print("running at once (ms per step): " + ", ".join(
      f"{k} {v:.1f}" for k, v in s["concurrency_ms"].items()))
  for title, rows in (("op kind", s["top_kinds"]),
                      ("scope (op_name)", s["top_scopes"])):
    print(f"\n{'ms/step':>9s} {'share':>6s} {'ops':>6s} {'GFLOP/s':>8s}  "
          f"{title}")
    for r in rows:
      rate = f"{r['gflop_per_s']:8.1f}" if r["gflop_per_s"] else f"{'':8s}"
      print(f"{r['ms_per_step']:9.2f} {r['share_of_op_time']:6.1%} "
            f"{r['ops_per_step']:6.1f} {rate}  {r['name'][:110]}")
  print(f"\nunmatched trace events: {s['unmatched_events']}; control-flow "
        f"thunks left out: {s['control_events']}; device events: "
        f"{'yes' if s['device_events'] else 'no (host thunks)'}", flush=True)


def main(argv):
  del argv
  how = step_time.apply_host_memory()
  implementations = FLAGS.implementation[:1]
  step_time.check_flags(implementations)
  if _PROFILE_STEPS.value < 1 or _TOP.value < 1:
    raise app.UsageError("--profile_steps and --top take positive integers.")
  size, remat = FLAGS.size[0], FLAGS.remat[0]
  b, t, s = int(FLAGS.batch_size[0]), int(FLAGS.target_length[0]), \
      FLAGS.input_length
  implementation = implementations[0]
  config = step_time.config_for(size, remat)
  rng = np.random.default_rng(0)
  batches = [step_time.random_batch(config, b, s, t, rng) for _ in range(2)]
  step = step_time.build_jax_step(
      config, None if implementation == "default" else implementation,
      batches)
  if isinstance(step, str):
    sys.exit(f"{size} B={b} T={t} {implementation}/{remat}: {step}")
  untraced = []
  for _ in range(2):                       # untraced, for the overhead
    start = time.perf_counter()
    step()
    untraced.append(time.perf_counter() - start)
  hlo = step.compiled_text()
  instructions = parse_hlo(hlo)
  directory = _TRACE_DIR.value or tempfile.mkdtemp(prefix="step_profile_")
  walls = []
  try:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    for _ in range(_PROFILE_STEPS.value):
      start = time.perf_counter()
      step()
      walls.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    trace = load_trace(directory)
  finally:
    if not _TRACE_DIR.value:
      shutil.rmtree(directory, ignore_errors=True)
  events, counts = op_events(trace, instructions, module_name(hlo))
  if not events:
    sys.exit(f"the trace holds no op events of {module_name(hlo)!r} "
             f"({counts['unmatched']} unmatched): nothing to attribute.")
  summary = summarize(events, _PROFILE_STEPS.value, _TOP.value)
  summary.update({
      "wall_ms": statistics.median(walls) * 1e3,
      "untraced_wall_ms": statistics.median(untraced) * 1e3,
      "unmatched_events": counts["unmatched"],
      "control_events": counts["control"],
      "device_events": bool(counts["device"]),
      "formula_flops_per_step": step_time.step_flops(
          config, FLAGS.algo, FLAGS.value_net, b, s, t),
  })
  record = {
      "algo": FLAGS.algo, "size": size, "batch_size": b, "input_length": s,
      "target_length": t, "implementation": implementation, "remat": remat,
      "dtype": FLAGS.dtype, "scan_layers": FLAGS.scan_layers,
      "value_net": FLAGS.value_net, "profile_steps": _PROFILE_STEPS.value,
      "device": timing.device_description(), "host_memory": how,
      "threads": len(os.sched_getaffinity(0)), "jax": jax.__version__,
      "loss": step.loss, **summary,
  }
  print_summary(summary, f"{record['device']}  jax {jax.__version__}  "
                f"{FLAGS.algo}  size={size}  B={b}  S={s}  T={t}  "
                f"{FLAGS.dtype}  {implementation}  remat={remat}  "
                f"scan={FLAGS.scan_layers}  "
                f"{_PROFILE_STEPS.value} traced step(s)")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "a") as out:
      out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
