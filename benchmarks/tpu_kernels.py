r"""Every Pallas TPU kernel, compiled by Mosaic for TPU generations we lack.

  python -m benchmarks.tpu_kernels [--generations=v5e,v6e,v5p] \
      [--d=512,768,1024,2048,4096] [--t=128,512] [--dtypes=float32,bfloat16] \
      [--ops=sequence_logprobs,dro_residual,linear_sequence_logprobs] \
      [--passes=fwd,bwd] [--batch=2] [--json_out=PATH]
  python -m benchmarks.tpu_kernels --shapes=llm --generations=v5e --t=512 \
      --ops=sequence_logprobs,linear_sequence_logprobs --vmem_need

Needs libtpu (`pip install -e ".[tpu]"`), not a TPU: each case is jitted
with implementation="pallas_tpu", interpret=False and the ops' default
tiles (block_sizes=None, as the trainer calls them), lowered for one chip
of the generation's topology (benchmarks/lib/tpu.py) and compiled by the
real XLA:TPU and Mosaic compilers. --generations=v4 (16 MiB of VMEM, not a
default target) compiles with the tiles default_block_sizes(...,
generation="v4") picks instead. "fwd" compiles the op; "bwd" compiles
jax.value_and_grad of its sum (the forward kernel plus the backward
kernels). A case passes when it compiles (a VMEM overflow is a
CompileTimeScopedVmemOom error) and its HLO holds one tpu_custom_call per
kernel launch.

Prints one table row per case and appends JSON lines (op, pass,
generation, D, T, N, dtype, block sizes, ok / error, custom calls, per-chip
bytes from memory_analysis, FLOPs and optimal_seconds from cost_analysis
(the kernels' pl.CostEstimate plus XLA's ops around them; for a few cases,
mostly v6e, libtpu answers optimal_seconds near -1, shown n/a), lowering +
compile seconds).
The sequence ops read logits [B, T, V] and do not depend on D: they run
once per (V, T, dtype), with D recorded as null. The default matrix is 168
cases, about 9 minutes on a 2-core host shared with other compiles
(benchmarks/results/tpu_kernels.jsonl).

--shapes picks the (D, V) pairs: t5 (the default) crosses --d with T5's
V = 32128; llm takes each decoder LLM's hidden width and vocabulary from
LLM_SHAPES (--d is ignored), vocabularies that are no multiple of the
vocabulary tile (the kernels mask the tail tile). --vmem_need also records,
per linear-op kernel launch, the scoped VMEM Mosaic allocates for it
(mosaic_vmem_need: each launch compiled alone under a limit raised to the
size Mosaic's refusals state), beside the limit the kernels ask for
(VMEM_LIMIT_BYTES) and the tiles' own estimate (vmem_bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.lib import flags as shared
from benchmarks.lib import records
from benchmarks.lib import timing
from benchmarks.lib import tpu
from dro_fast import kernels
from dro_fast.kernels.linear_logprobs import pallas_tpu as linear_pallas_tpu
from dro_fast.kernels.sequence_logprobs import pallas_tpu as sequence_pallas_tpu

# One topology per generation: the smallest that libtpu accepts. A kernel
# runs on one chip, so only the first device is used.
TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1",
              "v6e": "v6e:2x2"}
OPS = ("sequence_logprobs", "dro_residual", "linear_sequence_logprobs")
PASSES = ("fwd", "bwd")
VOCAB = 32128                        # T5's vocabulary (= 251 · 128)
# Decoder LLMs' (hidden width D, vocabulary V), from their config.json
# (hidden_size, vocab_size); Gemma 3 4B's is its text model's.
LLM_SHAPES = {"llama3_8b": (4096, 128256), "qwen3_8b": (4096, 151936),
              "gemma3_4b": (2560, 262144)}
SHAPES = ("t5", "llm")
# Kernel launches per op and pass: the forward kernel, plus the backward ones.
LAUNCHES = {("sequence_logprobs", "fwd"): 1, ("sequence_logprobs", "bwd"): 2,
            ("dro_residual", "fwd"): 1, ("dro_residual", "bwd"): 2,
            ("linear_sequence_logprobs", "fwd"): 1,
            ("linear_sequence_logprobs", "bwd"): 3}

_GENERATIONS = flags.DEFINE_list(
    "generations", ["v5e", "v6e", "v5p"],
    f"TPU generations, of {sorted(TOPOLOGIES)} (topologies {TOPOLOGIES}).")
_D = flags.DEFINE_list("d", ["512", "768", "1024", "2048", "4096"],
                       "Hidden widths D for the linear op (T5 v1.1 "
                       "small, base, large, xl, xxl).")
_T = flags.DEFINE_list("t", ["128", "512"], "Completion lengths T.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "Logits / hidden / weight dtypes.")
_OPS = flags.DEFINE_list("ops", list(OPS), f"Ops, of {OPS}.")
_PASSES = flags.DEFINE_list("passes", list(PASSES),
                            "fwd (the op) and/or bwd (value_and_grad).")
_SHAPES = flags.DEFINE_enum(
    "shapes", "t5", list(SHAPES), "t5: --d at T5's V = 32128; llm: the "
    f"(D, V) of {LLM_SHAPES} (--d ignored).")
_VMEM_NEED = flags.DEFINE_bool(
    "vmem_need", False, "Record the scoped VMEM Mosaic allocates for each "
    "linear-op kernel (one more compile per launch).")
_BATCH = flags.DEFINE_integer(
    "batch", 2, "Sequences per chip (the paper's 32 examples on 16 v5e "
    "chips); N = batch · T rows.")


@dataclasses.dataclass(frozen=True)
class Case:
  op: str
  pass_: str
  generation: str
  d: int | None
  t: int
  batch: int
  dtype: str
  v: int = VOCAB
  model: str | None = None


def _op(op: str, blocks: kernels.BlockSizes | None
        ) -> tuple[Callable, Callable[[Case], list]]:
  """The op as fn(*differentiable, *rest) -> [B], and its argument shapes."""
  options = dict(implementation="pallas_tpu", interpret=False,
                 block_sizes=blocks)
  if op == "sequence_logprobs":
    return (lambda x, t, m: kernels.sequence_logprobs(x, t, m, **options),
            lambda c: [((c.batch, c.t, c.v), c.dtype)])
  if op == "dro_residual":
    def dro(x, v, t, m, r, ref):
      return kernels.dro_residual(x, t, m, r, v, ref, tau=1.0, **options)[0]
    return dro, lambda c: [((c.batch, c.t, c.v), c.dtype),
                           ((c.batch,), "float32")]
  if op == "linear_sequence_logprobs":
    return (lambda h, w, t, m: kernels.linear_sequence_logprobs(
        h, w, t, m, **options),
            lambda c: [((c.batch, c.t, c.d), c.dtype),
                       ((c.d, c.v), c.dtype)])
  raise ValueError(f"unknown op {op!r}; choose from {OPS}.")


def lower(case: Case, devices: tuple[Any, ...],
          blocks: kernels.BlockSizes | None = None):
  """The case's jitted program lowered for devices[0] (one chip).

  It uses the ops' default tiles unless `blocks` is given.
  """
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("chip",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                                   sharding=replicated)
  fn, shapes = _op(case.op, blocks)
  diff = [spec(s, d) for s, d in shapes(case)]
  rest = [spec((case.batch, case.t), "int32"),
          spec((case.batch, case.t), "bool")]
  if case.op == "dro_residual":
    rest += [spec((case.batch,), "float32")] * 2          # rewards, ref
  n_diff = len(diff)

  def program(*args):
    if case.pass_ == "fwd":
      return fn(*args)
    loss = lambda *d: jnp.sum(fn(*d, *args[n_diff:]))
    return jax.value_and_grad(loss, argnums=tuple(range(n_diff)))(
        *args[:n_diff])
  return jax.jit(program).lower(*diff, *rest)


def block_sizes(case: Case, generation: str | None
                ) -> kernels.BlockSizes:
  """The kernels' default tiles for the case on `generation`.

  None: what the ops pick without being told the generation.
  """
  if case.op == "linear_sequence_logprobs":
    return linear_pallas_tpu.default_block_sizes(case.d, case.dtype,
                                                 generation)
  return sequence_pallas_tpu.default_block_sizes(case.dtype, generation)


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def mosaic_vmem_need(case: Case, devices: tuple[Any, ...],
                     blocks: kernels.BlockSizes | None = None
                     ) -> dict[str, float]:
  """Scoped VMEM bytes Mosaic allocates per linear-op kernel launch.

  Each launch of the case's pass (fwd; bwd adds dhidden and dweight) is
  compiled alone with the kernels' VMEM_LIMIT_BYTES lowered, from 1 MiB:
  Mosaic's refusal states the scoped allocation it had reached ("Scoped
  allocation with size 8.38M", 3 significant digits), the limit is raised
  0.5% above it and the launch compiled again, until it compiles. The
  figure is that last limit: the need, rounded up by at most 0.5%, or
  1 MiB for a launch that fits it. JAX's caches are cleared around it:
  the kernels read the limit when traced.
  """
  if case.op != "linear_sequence_logprobs":
    raise ValueError(f"mosaic_vmem_need takes the linear op, not {case.op}.")
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("chip",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                                   sharding=replicated)
  n = case.batch * case.t
  hidden, weight = spec((n, case.d), case.dtype), spec((case.d, case.v),
                                                       case.dtype)
  targets, row = spec((n,), "int32"), spec((n,), "float32")
  impl = linear_pallas_tpu
  launches = {"fwd": (lambda h, w, t: impl.linear_token_logprobs(
      h, w, t, blocks, False), (hidden, weight, targets))}
  if case.pass_ == "bwd":
    for name, fn in (("dhidden", impl.linear_dhidden),
                     ("dweight", impl.linear_dweight)):
      launches[name] = (functools.partial(fn, block_sizes=blocks,
                                          interpret=False),
                        (hidden, weight, targets, row, row))
  need = {}
  try:
    for name, (fn, args) in launches.items():
      limit = 2**20
      for _ in range(32):
        jax.clear_caches()
        with mock.patch.object(impl, "VMEM_LIMIT_BYTES", limit):
          try:
            jax.jit(fn).lower(*args).compile()
            break
          except Exception as e:  # pylint: disable=broad-except
            found = re.search(
                r"Scoped allocation with size ([\d.]+)([KMG])", str(e))
            if found is None:
              raise
            size = float(found.group(1)) * _UNITS[found.group(2)]
            limit = max(int(size * 1.005), limit + 2**16)
      else:
        raise RuntimeError(f"{name}: no VMEM limit found in 32 compiles.")
      need[name] = float(limit)
  finally:
    jax.clear_caches()
  return need


def run_case(case: Case, vmem_need: bool = False) -> dict[str, Any]:
  """Compiles one case and returns its record.

  When Mosaic or XLA refuses it, the record has ok=False and the error's
  first 600 characters. For the linear op the record has the tiles' VMEM
  estimate and budget (linear_pallas_tpu.vmem_bytes), the limit the
  kernels ask for, and with vmem_need Mosaic's own figure per launch
  (mosaic_vmem_need).
  """
  devices = tpu.devices(TOPOLOGIES[case.generation])
  blocks = block_sizes(case, case.generation)
  # The ops' own default where it is the generation's (never told the
  # generation, they assume v5e/v5p/v6e), else the generation's tiles.
  default = blocks == block_sizes(case, None)
  bv = min(blocks.vocab, -(-case.v // 128) * 128)
  record = {"op": case.op, "pass": case.pass_, "generation": case.generation,
            "chip": devices[0].device_kind, "model": case.model, "D": case.d,
            "T": case.t, "N": case.batch * case.t, "B": case.batch,
            "V": case.v, "dtype": case.dtype,
            "block_sizes": {"rows": blocks.rows, "vocab": blocks.vocab},
            "vocab_tiles": -(-case.v // bv), "vocab_tail": case.v % bv,
            "ops_default_blocks": default,
            "jax": jax.__version__}
  if case.op == "linear_sequence_logprobs":
    record.update(
        vmem_estimate_bytes=linear_pallas_tpu.vmem_bytes(
            case.d, jnp.dtype(case.dtype).itemsize, blocks.rows,
            blocks.vocab),
        vmem_budget_bytes=linear_pallas_tpu.VMEM_BUDGET_BYTES[
            case.generation],
        vmem_limit_bytes=linear_pallas_tpu.VMEM_LIMIT_BYTES)
  start = time.perf_counter()
  try:
    compiled = lower(case, devices, None if default else blocks).compile()
  except Exception as e:  # pylint: disable=broad-except
    message = " ".join(str(e).split())
    record.update(ok=False, error=message[:600],
                  compile_s=time.perf_counter() - start)
    return record
  record["compile_s"] = time.perf_counter() - start
  targets = tpu.custom_call_targets(compiled)
  calls = targets.count("tpu_custom_call")
  expected = LAUNCHES[(case.op, case.pass_)]
  record.update(tpu_custom_calls=calls, ok=calls == expected,
                **timing.compiled_peak_bytes(compiled),
                **tpu.cost(compiled))
  hbm = tpu.HBM_BYTES.get(devices[0].device_kind)
  record["fits_hbm"] = None if hbm is None else record["total_bytes"] <= hbm
  if calls != expected:
    record["error"] = (f"expected {expected} tpu_custom_call(s), found "
                       f"{calls}: {targets}")
  if vmem_need and case.op == "linear_sequence_logprobs":
    record["mosaic_vmem_bytes"] = mosaic_vmem_need(
        case, devices, None if default else blocks)
  return record


def cases(generations, shapes, ts, dtypes, ops, passes, batch) -> list[Case]:
  """Every case; shapes are (model or None, D, V) triples.

  The sequence ops do not depend on D: they run once per (model, V).
  """
  out = []
  for generation in generations:
    for op in ops:
      these = (shapes if op == "linear_sequence_logprobs" else
               list(dict.fromkeys((m, None, v) for m, _, v in shapes)))
      for model, d, v in these:
        for t in ts:
          for dtype in dtypes:
            for pass_ in passes:
              out.append(Case(op, pass_, generation, d, t, batch, dtype,
                              v=v, model=model))
  return out


def shapes_for(kind: str, ds: list[int]) -> list[tuple[str | None, int, int]]:
  """(model, D, V) triples of --shapes: t5 crosses ds with T5's V."""
  if kind == "llm":
    return [(m, d, v) for m, (d, v) in LLM_SHAPES.items()]
  return [(None, d, VOCAB) for d in ds]


def format_row(r: dict[str, Any]) -> str:
  d = "-" if r["D"] is None else str(r["D"])
  head = (f"{r['op']:25s} {r['pass']:3s} {r['generation']:4s} {d:>5s} "
          f"{r['V']:6d} {r['T']:4d} {r['N']:5d} {r['dtype']:8s} "
          f"{r['block_sizes']['rows']:4d}x{r['block_sizes']['vocab']:<5d} "
          f"{r['compile_s']:6.1f}s ")
  if not r["ok"]:
    return head + "FAIL " + r["error"][:160]
  bound = (f"{r['optimal_seconds'] * 1e6:9.1f} us"
           if r["optimal_seconds"] >= 0 else "      n/a")
  vmem = ""
  if "mosaic_vmem_bytes" in r:
    vmem = "  vmem " + " ".join(
        f"{k} {v / 2**20:.2f}" for k, v in r["mosaic_vmem_bytes"].items()) + (
            f" of {r['vmem_limit_bytes'] / 2**20:.0f} MiB")
  return head + (f"ok  temp {r['temp_bytes'] / 2**20:8.1f} MiB  total "
                 f"{r['total_bytes'] / 2**20:8.1f} MiB  "
                 f"{r['flops'] / 1e9:8.2f} GFLOP  {bound}{vmem}")


def main(argv):
  del argv
  timing.quiet_backend_probe()
  tpu.require_libtpu()
  todo = cases(
      shared.known_values("generations", _GENERATIONS.value, TOPOLOGIES),
      shapes_for(_SHAPES.value, shared.positive_ints("d", _D.value)),
      shared.positive_ints("t", _T.value),
      shared.known_values("dtypes", _DTYPES.value, ("float32", "bfloat16")),
      shared.known_values("ops", _OPS.value, OPS),
      shared.known_values("passes", _PASSES.value, PASSES), _BATCH.value)
  print(f"jax {jax.__version__}  {len(todo)} cases  shapes {_SHAPES.value}  "
        f"batch {_BATCH.value}")
  print(f"{'op':25s} {'pass':3s} {'gen':4s} {'D':>5s} {'V':>6s} {'T':>4s} "
        f"{'N':>5s} "
        f"{'dtype':8s} {'tiles':10s} compile")
  start = time.perf_counter()
  failures = 0
  for case in todo:
    record = run_case(case, _VMEM_NEED.value)
    failures += not record["ok"]
    print(format_row(record), flush=True)
    records.append(shared.JSON_OUT.value, [record])
  print(f"{len(todo) - failures}/{len(todo)} compiled in "
        f"{time.perf_counter() - start:.0f} s")
  return 1 if failures else 0


if __name__ == "__main__":
  app.run(main)
