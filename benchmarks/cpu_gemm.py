r"""One GEMM on XLA:CPU in the forms a CPU matmul can take, torch.mm, numpy.

  python -m benchmarks.cpu_gemm [--shapes=1024x512x1024,...] [--repeats=15]

For each M x K x N, GFLOP/s (2·M·K·N / the median seconds of a call) of the
forms below. Each form runs in blocks of --repeats back-to-back calls after
3 warm-up calls, and --rounds rounds alternate the order of the blocks
(single calls interleaved with torch.mm swing ±40% with thread wake-up):

  f32             jnp.dot, float32
  bf16->f32       jnp.dot of bfloat16 operands, preferred_element_type f32
  bf16->bf16      jnp.dot of bfloat16 operands, bfloat16 result
  bf16 NT         lax.dot_general contracting both operands' last dimension
                  (how the Dense VJP's d(x) contracts the kernel in place)
  bf16 b.T        jnp.dot(a, bt.T): a transposed operand, as autodiff writes
                  a weight gradient
  torch f32 / torch bf16   torch.mm with torch's threads = XLA's
  numpy f32       numpy.matmul (the BLAS numpy ships: OpenBLAS in the
                  wheels), a third float32 GEMM library on the same host

and, per JAX form, the operand types XLA compiled the GEMM with ("upcast"
when bfloat16 operands reached the GEMM as float32). It is the evidence
behind the row-major forms of dro_fast/models/cpu.py and the host's GEMM
rates against its peak (benchmarks/RESULTS.md#cpu-gemm-rates).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

_SHAPES = flags.DEFINE_list(
    "shapes", ["1024x512x1024", "1024x1024x512", "512x512x32128"],
    "M x K x N of each GEMM (T5-small: tokens x D x F, and the output "
    "projection).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Back-to-back calls per "
                                "block.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Blocks per form.")
_PEAK = flags.DEFINE_float(
    "peak_gflops", 0.0, "The host's float32 peak in GFLOP/s (cores x clock "
    "x FLOP per cycle: 32 for AVX2 with two FMA pipes); when given, each "
    "rate is also printed as a fraction of it.")

_F32 = dict(preferred_element_type=jnp.float32)


def _forms(m: int, k: int, n: int):
  """name -> (function, operands) for each JAX form."""
  rng = np.random.default_rng(0)
  a = rng.standard_normal((m, k)).astype(np.float32)
  b = rng.standard_normal((k, n)).astype(np.float32)
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  return {
      "f32": (lambda x, y: jnp.dot(x, y), (jnp.asarray(a), jnp.asarray(b))),
      "bf16->f32": (lambda x, y: jnp.dot(x, y, **_F32), (bf(a), bf(b))),
      "bf16->bf16": (lambda x, y: jnp.dot(x, y), (bf(a), bf(b))),
      "bf16 NT": (lambda x, yt: jax.lax.dot_general(
          x, yt, (((1,), (1,)), ((), ())), **_F32), (bf(a), bf(b.T.copy()))),
      "bf16 b.T": (lambda x, yt: jnp.dot(x, yt.T, **_F32),
                   (bf(a), bf(b.T.copy()))),
  }


def gemm_operand_types(compiled_text: str) -> str:
  """The operand types of the compiled GEMM, from XLA's optimised HLO."""
  for block in compiled_text.split("\n\n"):
    if " dot(" in block:
      header = block.strip().splitlines()[0].split("->")[0]
      return "/".join(re.findall(r"(\w+)\[", header)[:2])
  return "?"


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  print(f"jax {jax.__version__}  torch {torch.__version__}  threads "
        f"{torch.get_num_threads()}  GFLOP/s, medians of {_ROUNDS.value} "
        f"blocks x {_REPEATS.value} calls")
  for shape in _SHAPES.value:
    try:
      m, k, n = (int(v) for v in shape.split("x"))
    except ValueError:
      raise app.UsageError(f"--shapes: {shape!r} is not MxKxN") from None
    calls, types = {}, {}
    for name, (fn, args) in _forms(m, k, n).items():
      jitted = jax.jit(fn)
      types[name] = gemm_operand_types(jitted.lower(*args).compile().as_text())
      calls[name] = (lambda f=jitted, a=args: f(*a).block_until_ready())
    ta = torch.randn(m, k)
    tb = torch.randn(k, n)
    calls["torch f32"] = lambda: torch.mm(ta, tb)
    ta16, tb16 = ta.bfloat16(), tb.bfloat16()
    calls["torch bf16"] = lambda: torch.mm(ta16, tb16)
    na, nb = ta.numpy(), tb.numpy()
    calls["numpy f32"] = lambda: np.matmul(na, nb)
    seconds = {name: [] for name in calls}
    for round_ in range(_ROUNDS.value):
      order = list(calls.items())
      for name, call in (order if round_ % 2 == 0 else order[::-1]):
        for _ in range(3):
          call()
        for _ in range(_REPEATS.value):
          start = time.perf_counter()
          call()
          seconds[name].append(time.perf_counter() - start)
    flop = 2.0 * m * k * n
    print(f"{m}x{k}x{n}")
    for name, ts in seconds.items():
      rate = flop / statistics.median(ts) / 1e9
      kind = types.get(name, "")
      note = ("  (upcast)" if kind.startswith("f32") and "bf16" in name
              else "")
      peak = f"  {rate / _PEAK.value:6.1%} of peak" if _PEAK.value else ""
      print(f"  {name:12s} {rate:7.1f}{peak}  {kind}{note}")
    sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
