"""Process-level host settings and host facts, for the CLIs and benchmarks.

Host memory. XLA:CPU gives every execution one temporary buffer of the size
its memory plan asks for and frees it when the execution ends. The buffer
comes from malloc on an XLA worker thread, and glibc serves a block that
large with a fresh mmap and returns it with munmap, so every step maps the
whole buffer again and zeroes it page by page on first touch; keeping freed
memory removes that system time from the CPU step
(benchmarks/RESULTS.md#host-memory).

`keep_freed_host_memory()` tells glibc's malloc to keep freed memory instead:

  M_ARENA_MAX = 1       every thread allocates from the main arena, the one
                        arena that grows contiguously (with brk) rather than
                        in heaps of at most 64 MB, whose overflow glibc serves
                        with mmap whatever M_MMAP_MAX says;
  M_MMAP_MAX = 0        no block is served with its own mmap;
  M_TRIM_THRESHOLD = -1 freed memory at the top of the heap is never given
                        back to the system.

The next step then reuses the same pages, already mapped. The cost is the
usual one of a caching allocator (the GPU's BFC allocator makes the same
trade): the process's resident memory stays at its peak, and all threads
share one arena's lock, which matters little at a handful of allocations per
step. The settings apply to the whole process.

Call it before the first JAX computation: worker threads that have already
allocated keep the arena they have, and theirs are the large blocks. It does
nothing, and says why, where the C library is not glibc. It is meant for
CPU-only runs (`cpu_only_jax()`); `python -m dro_fast.train` applies it only
there.

Compute dtype. A bfloat16 GEMM on a CPU without bfloat16 arithmetic
(AVX512-BF16 / AMX-BF16 on x86, the BF16 extension on Arm) is emulated and
slower than float32 (benchmarks/RESULTS.md#cpu-gemm-rates).
`compute_dtype(requested, platform)` therefore turns a bfloat16 request into
float32 on such a CPU; the CLIs call it when they build their T5Config.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform as platform_lib
import sys

from absl import logging

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

SETTINGS = ((_M_ARENA_MAX, 1, "M_ARENA_MAX=1"),
            (_M_MMAP_MAX, 0, "M_MMAP_MAX=0"),
            (_M_TRIM_THRESHOLD, -1, "M_TRIM_THRESHOLD=-1"))


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None       # musl and other C libraries have no mallopt
  return libc


def _jax_started() -> bool:
  """Whether JAX has started its backends; False where JAX cannot tell."""
  try:
    from dro_fast import jax_private  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(jax_private.backends_are_initialized())


def _configured_platforms() -> str:
  """JAX_PLATFORMS, else jax.config's jax_platforms, else ""."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if not platforms:
    try:
      import jax  # pylint: disable=g-import-not-at-top
      platforms = jax.config.jax_platforms or ""
    except (ImportError, AttributeError):
      platforms = ""
  return platforms


def _gpu_plugin_installed() -> bool:
  """Whether a JAX GPU plugin is installed.

  That is a module of the `jax_plugins` package or a `jax_plugins` entry
  point, as JAX finds its plugins.
  """
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and any(
      True for _ in pkgutil.iter_modules(spec.submodule_search_locations)):
    return True
  return bool(importlib.metadata.entry_points(group="jax_plugins"))


def tpu_attached() -> bool:
  """Whether libtpu is installed and a TPU chip is attached to this host.

  Read from the PCI bus, as JAX's own Cloud TPU start-up checks; True where
  that cannot be read.
  """
  if importlib.util.find_spec("libtpu") is None:
    return False
  try:
    from dro_fast import jax_private  # pylint: disable=g-import-not-at-top
    return jax_private.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, OSError):
    return True       # cannot tell: assume a TPU host, as JAX would


def cpu_only_jax() -> bool:
  """Whether JAX will run on the CPU alone, judged without starting it.

  Yes where JAX_PLATFORMS (or jax.config's jax_platforms) names only cpu;
  where it names nothing, yes unless a GPU plugin is installed or a TPU is
  attached (libtpu alone, as the `tpu` extra installs it for deviceless
  compilation, does not count). On accelerator hosts the setting is not
  needed (device memory has its own allocator) and would hold large host
  buffers, such as a checkpoint being restored, for the life of the
  process.
  """
  platforms = _configured_platforms()
  if platforms:
    return {p.strip() for p in platforms.lower().split(",")} == {"cpu"}
  return not _gpu_plugin_installed() and not tpu_attached()


def hide_absent_tpu() -> bool:
  """Starts JAX on the CPU alone where libtpu is installed but no TPU is.

  Without it, JAX's first backend start on such a host asks libtpu, which
  prints several lines of warnings (TPU_ACCELERATOR_TYPE, worker hostnames,
  an INVALID_ARGUMENT error) before JAX falls back to the CPU. The CLIs call
  this before their first JAX computation; it sets jax_platforms to "cpu"
  only where no platform is configured, libtpu is installed, no TPU is
  attached and no GPU plugin is installed. Returns whether it did.
  """
  if (_configured_platforms() or _jax_started()
      or importlib.util.find_spec("libtpu") is None
      or _gpu_plugin_installed() or tpu_attached()):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  return True


def keep_freed_host_memory() -> str:
  """Makes glibc keep freed memory for reuse (see the module docstring).

  Returns what it did, for logs and benchmark records: "kept" when every
  setting took, else "system: <why not>". Logs a warning when JAX has
  already started its backends, since their worker threads keep the arenas
  they have.
  """
  libc = _glibc()
  if libc is None:
    return f"system: not glibc ({sys.platform})"
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.mallopt.restype = ctypes.c_int
  refused = [name for param, value, name in SETTINGS
             if libc.mallopt(param, value) != 1]
  if refused:
    return f"system: glibc refused {', '.join(refused)}"
  if _jax_started():
    logging.warning(
        "keep_freed_host_memory() ran after JAX started its backends; the "
        "threads that already allocated keep their arenas, so XLA:CPU may "
        "still map its temporary buffer afresh every step. Call it before "
        "the first JAX computation.")
  return "kept"


# /proc/cpuinfo flags that mean bfloat16 dot products in hardware.
_X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_ARM_BF16_FEATURES = frozenset({"bf16"})


def bf16_native_from_cpuinfo(cpuinfo: str, machine: str) -> bool | None:
  """Whether /proc/cpuinfo's text lists bfloat16 arithmetic.

  Args:
    cpuinfo: the text of /proc/cpuinfo.
    machine: platform.machine(), e.g. "x86_64" or "aarch64".

  Returns:
    True or False from the first `flags` (x86) or `Features` (Arm) line;
    None when the text has no such line.
  """
  key = "features" if machine.lower() in ("aarch64", "arm64") else "flags"
  wanted = _ARM_BF16_FEATURES if key == "features" else _X86_BF16_FLAGS
  for line in cpuinfo.splitlines():
    name, sep, value = line.partition(":")
    if sep and name.strip().lower() == key:
      return bool(set(value.split()) & wanted)
  return None


@functools.cache
def bf16_arithmetic() -> bool:
  """Whether this host's CPU has bfloat16 arithmetic.

  Read from /proc/cpuinfo; True where it cannot tell (not Linux, or no
  flags line), leaving the requested dtype alone.
  """
  try:
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  except OSError:
    return True
  native = bf16_native_from_cpuinfo(cpuinfo, platform_lib.machine())
  return True if native is None else native


def compute_dtype(requested: str, platform: str) -> str:
  """The compute dtype to build a T5Config with on `platform`.

  Args:
    requested: "float32" or "bfloat16", as asked for.
    platform: the resolved JAX platform ("cpu", "gpu", "tpu").

  Returns:
    "float32" for a "bfloat16" request on a CPU without bfloat16
    arithmetic (logged once), else `requested`.
  """
  if requested == "bfloat16" and platform == "cpu" and not bf16_arithmetic():
    _log_float32_once()
    return "float32"
  return requested


@functools.cache
def _log_float32_once() -> None:
  logging.warning("this CPU has no bfloat16 arithmetic: computing in "
                  "float32 instead of the requested bfloat16.")
