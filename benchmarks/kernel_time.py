r"""Benchmark of the log-prob kernels: implementations x modes x named shapes.

  python -m benchmarks.kernel_time [--shapes=small|paper|all|NAME,...]
      [--implementations=xla,chunked_xla,...] [--json_out=PATH]

For every case it prints and writes (JSON lines) the median time, XLA's
static peak memory for the compiled step (arguments + outputs +
temporaries), and on a GPU the achieved bytes/s against the bytes the op must
move (each input read once, each output written once) and the fraction of
the measured copy bandwidth.

Pallas implementations run only where they compile natively (pallas_gpu on a
GPU, pallas_tpu on a TPU); interpret-mode timings would be meaningless.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks.lib import kernel_cases
from benchmarks.lib import timing
from dro_fast import kernels

_SHAPES = flags.DEFINE_string(
    "shapes", None, "Comma-separated shape names, or a group: small (quick, "
    "CPU default), paper (at the paper's scale: V 32128, T 128/512, B 8/32, "
    "D 1024; GPU default) or all.")
_IMPLEMENTATIONS = flags.DEFINE_list(
    "implementations", None, "Implementations to run (default: those that "
    "compile natively on this backend).")
_MODES = flags.DEFINE_list("modes", ["forward", "forward_backward"],
                           "forward and/or forward_backward.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "Logits / hidden / weight dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions per case.")
_MEMORY_ONLY = flags.DEFINE_multi_string(
    "memory_only", [], "Shape names to compile and plan memory for without "
    "timing (for shapes too slow to run on a CPU).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append JSON lines here.")
_BLOCK_SWEEP = flags.DEFINE_bool(
    "block_sweep", False, "Also time pallas_gpu block sizes on the largest "
    "sequence and linear shapes (GPU only).")


def bytes_moved(shape: kernel_cases.Shape, mode: str, itemsize: int) -> int:
  """The fewest bytes the op must move: inputs read once, outputs written."""
  n = shape.batch * shape.time
  if shape.op == "sequence":
    logits = n * shape.vocab * itemsize
    # forward reads the logits; backward reads them again, writes dlogits.
    return logits if mode == "forward" else 3 * logits
  hw = (n * shape.hidden + shape.hidden * shape.vocab) * itemsize
  return hw if mode == "forward" else 3 * hw


def flops(shape: kernel_cases.Shape, mode: str) -> int:
  if shape.op != "linear":
    return 0
  ndv = 2 * shape.batch * shape.time * shape.hidden * shape.vocab
  return ndv if mode == "forward" else 3 * ndv


def run_case(shape, implementation, mode, dtype, repeats, time_it,
             copy_rate, block_sizes=None):
  diff, targets, mask = kernel_cases.make_inputs(shape, dtype)
  args = (*diff, targets, mask)
  step = kernel_cases.make_step(shape, implementation, mode, block_sizes)
  compiled = step.lower(*args).compile()
  record = {
      "name": shape.name, "op": shape.op, "implementation": implementation,
      "mode": mode, "dtype": jnp.dtype(dtype).name,
      "shape": dataclasses.asdict(shape), "device": timing.device_description(),
      **timing.compiled_peak_bytes(compiled),
  }
  if block_sizes is not None:
    record["block_sizes"] = dataclasses.asdict(block_sizes)
  if time_it:
    median, _ = timing.median_seconds(compiled, args, repeats)
    moved = bytes_moved(shape, mode, jnp.dtype(dtype).itemsize)
    record.update(median_s=median, bytes_moved=moved,
                  bytes_per_s=moved / median)
    if copy_rate:
      record["fraction_of_copy_bandwidth"] = moved / median / copy_rate
    if flops(shape, mode):
      record["tflops_per_s"] = flops(shape, mode) / median / 1e12
  else:
    record["median_s"] = None
  return record


def format_row(r) -> str:
  median = f"{r['median_s'] * 1e3:10.3f}" if r["median_s"] else "       n/a"
  bw = r.get("fraction_of_copy_bandwidth")
  extra = f"{bw * 100:5.1f}% bw" if bw is not None else ""
  if r.get("tflops_per_s"):
    extra += f" {r['tflops_per_s']:6.1f} TFLOP/s"
  if r.get("block_sizes"):
    extra += " " + ",".join(f"{k}={v}" for k, v in r["block_sizes"].items())
  return (f"{r['name']:28s} {r['implementation']:12s} {r['mode']:16s} "
          f"{median} ms {r['peak_bytes'] / 2**20:10.1f} MiB  {extra}")


def sweep_configs(op: str):
  """pallas_gpu block sizes to try on a GPU."""
  bs = kernels.BlockSizes
  if op == "sequence":
    return [bs(rows=r, vocab=v, num_warps=w, num_stages=st, vocab_splits=sp)
            for r, v, w, st, sp in [
                (1, 2048, 4, 2, 1), (1, 2048, 4, 3, 1), (1, 2048, 4, 4, 1),
                (1, 2048, 4, 2, 4), (1, 2048, 4, 3, 4), (1, 1024, 4, 3, 8),
                (1, 4096, 8, 3, 2), (2, 2048, 8, 3, 2), (4, 1024, 4, 3, 4),
                (1, 1024, 2, 3, 4), (1, 512, 2, 4, 4)]]
  return [bs(rows=r, vocab=v, hidden=d, num_warps=w, vocab_chunk=c,
             num_stages=st)
          for r, v, d, w, c, st in [
              (128, 128, 64, 8, 2048, 3), (128, 128, 64, 8, 1024, 3),
              (128, 128, 64, 8, 4096, 3), (128, 128, 64, 8, 2048, 4),
              (128, 256, 64, 8, 2048, 3), (128, 128, 32, 4, 2048, 4),
              (64, 128, 64, 4, 2048, 3)]]


def main(argv):
  del argv
  timing.quiet_backend_probe()
  platform = kernels.target_platform()
  group = _SHAPES.value or ("small" if platform == "cpu" else "paper")
  names = kernel_cases.GROUPS.get(group, None) or group.split(",")
  unknown = [n for n in names + _MEMORY_ONLY.value
             if n not in kernel_cases.SHAPES]
  if unknown:
    raise app.UsageError(
        f"--shapes/--memory_only: unknown shape(s) {unknown}; known: "
        f"{sorted(kernel_cases.SHAPES)} or {sorted(kernel_cases.GROUPS)}.")
  implementations = (_IMPLEMENTATIONS.value
                     or kernel_cases.native_implementations())
  for name in implementations:
    kernels.IMPLEMENTATIONS.get(name) or sys.exit(
        f"--implementations: unknown {name!r}; known: "
        f"{sorted(kernels.IMPLEMENTATIONS)}")
  dtype = jnp.dtype(_DTYPE.value)
  copy_rate = timing.copy_bandwidth() if backend == "gpu" else None
  out = open(_JSON_OUT.value, "a") if _JSON_OUT.value else None
  print(f"device {timing.device_description()}  jax {jax.__version__}  "
        f"dtype {dtype.name}" + (f"  copy bandwidth {copy_rate / 1e12:.2f} "
                                 f"TB/s" if copy_rate else ""))

  def emit(record):
    print(format_row(record), flush=True)
    if out:
      out.write(json.dumps(record) + "\n")
      out.flush()

  cases = [(n, True) for n in names] + [(n, False) for n in _MEMORY_ONLY.value]
  for name, time_it in cases:
    for implementation in implementations:
      for mode in _MODES.value:
        emit(run_case(kernel_cases.SHAPES[name], implementation, mode, dtype,
                      _REPEATS.value, time_it, copy_rate))
  if _BLOCK_SWEEP.value and "pallas_gpu" in implementations:
    for name in ("seq_b32_t512_v32128", "lin_b32_t512_d1024_v32128"):
      shape = kernel_cases.SHAPES[name]
      for block_sizes in sweep_configs(shape.op):
        modes = (["forward", "forward_backward"] if shape.op == "sequence"
                 else ["forward_backward"])
        for mode in modes:
          try:
            emit(run_case(shape, "pallas_gpu", mode, dtype, _REPEATS.value,
                          True, copy_rate, block_sizes))
          except Exception as e:  # pylint: disable=broad-except
            print(f"{name} {block_sizes}: failed: {e!s:.300}", flush=True)
  if out:
    out.close()


if __name__ == "__main__":
  app.run(main)
