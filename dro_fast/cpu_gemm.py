"""The operand dtype XLA:CPU's GEMMs run fastest in, on this host.

A bfloat16 GEMM with float32 accumulation gives the same products either
way (a product of two bfloat16 values is exact in float32), so on the CPU
the only question is speed:

  - with AVX512-BF16 or AMX-BF16 (x86) or the BF16 extension (Arm), XLA's
    YNNPACK matmul runs bfloat16 operands natively, at about twice its
    float32 rate;
  - without it (an AVX2-only x86, or an AVX-512 one without BF16), the
    "native" bfloat16 GEMM is emulated: on a 2-core AMD EPYC VM that exposed
    only AVX2, 86-95 GFLOP/s against 124-140 GFLOP/s for float32 operands
    (benchmarks/cpu_gemm.py), and a bfloat16 T5-small DRO-V step took 1.57x
    the float32 one; upcast, 1.08x (benchmarks/RESULTS.md, ninth session).

So the CPU paths of dro_fast.models.t5 and dro_fast.kernels' chunked_xla
pass their GEMM operands through `operands`, which upcasts bfloat16 to
float32 where the host lacks bfloat16 arithmetic. The values are first
rounded to bfloat16 as the compute dtype asks; only the GEMM's input
format changes. Accelerators are not affected.

DRO_FAST_CPU_BF16_GEMM=native|upcast overrides the detection (benchmarks
and tests set it); it is read when a function is traced.

`cpu_paths()` is the one switch for every CPU-only form in dro_fast (this
upcast, the model's CPU VJPs, the optimizer's GEMV statistics, chunked_xla's
float32 carry): true when tracing for the CPU backend, except inside
`accelerator_paths()`, which traces the forms a GPU or TPU gets so that
XLA:CPU can plan the memory of the program an accelerator would run
(benchmarks/step_time.py --memory_only --accelerator_paths).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform

import jax
import jax.numpy as jnp

ENV = "DRO_FAST_CPU_BF16_GEMM"
_ACCELERATOR_PATHS = [False]


def cpu_paths() -> bool:
  """Whether to trace the CPU-only forms: on the CPU backend, unless inside
  accelerator_paths()."""
  return jax.default_backend() == "cpu" and not _ACCELERATOR_PATHS[0]


@contextlib.contextmanager
def accelerator_paths():
  """Within: trace the forms an accelerator gets, on any backend (for
  memory plans; on a CPU they run, but slower).

  Only the forms cpu_paths() chooses change: the kernel registry still
  picks by the real backend (chunked_xla on a CPU, not pallas_gpu). The
  switch is read at trace time and is not part of jax.jit's cache key, so a
  function jitted and traced outside the context keeps its CPU forms when
  called inside it: build (or jax.jit anew) what is traced within."""
  before = _ACCELERATOR_PATHS[0]
  _ACCELERATOR_PATHS[0] = True
  try:
    yield
  finally:
    _ACCELERATOR_PATHS[0] = before
_MODES = ("native", "upcast")

# /proc/cpuinfo flags that mean bfloat16 dot products in hardware.
_X86_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_ARM_FEATURES = frozenset({"bf16"})


def bf16_native_from_cpuinfo(cpuinfo: str, machine: str) -> bool | None:
  """Whether /proc/cpuinfo's text lists bfloat16 arithmetic; None if the
  text names no flags for this machine (then assume native)."""
  key = "features" if machine.lower() in ("aarch64", "arm64") else "flags"
  for line in cpuinfo.splitlines():
    name, sep, value = line.partition(":")
    if sep and name.strip().lower() == key:
      words = set(value.split())
      wanted = _ARM_FEATURES if key == "features" else _X86_FLAGS
      return bool(words & wanted)
  return None


@functools.cache
def _host_bf16_native() -> bool:
  try:
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  except OSError:                       # not Linux: leave XLA's choice alone
    return True
  native = bf16_native_from_cpuinfo(cpuinfo, platform.machine())
  return True if native is None else native


def bf16_mode() -> str:
  """"native" or "upcast": how CPU GEMMs take bfloat16 operands here."""
  override = os.environ.get(ENV, "").strip().lower()
  if override:
    if override not in _MODES:
      raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of "
                       f"{', '.join(_MODES)} (or unset, to detect).")
    return override
  return "native" if _host_bf16_native() else "upcast"


def operands(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The arrays as a CPU GEMM should take them: bfloat16 ones upcast to
  float32 on hosts without bfloat16 arithmetic, all else unchanged.

  Call it at trace time, on operands already in the compute dtype, right
  before the dot. An upcast costs a convert (a pass over the operand,
  unless XLA fuses it into the operand's producer) and float32 copies
  that may stay live: about +320 MiB of XLA peak for the bfloat16 T5-small
  DRO-V step at batch 8.
  """
  if (not cpu_paths()
      or not any(a.dtype == jnp.bfloat16 for a in arrays)
      or bf16_mode() == "native"):
    return arrays
  return tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a
               for a in arrays)
