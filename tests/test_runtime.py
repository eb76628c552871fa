"""dro_fast.runtime: host memory settings and the host's compute dtype.

keep_freed_host_memory: XLA:CPU's temporary buffer stops page-faulting. Each
case runs in a fresh process (the malloc settings are process-wide and
must precede JAX's first computation). The probe jits a function whose
temporary buffer (a [6144, 6144] float32 intermediate, 150 MB) is far above
glibc's mmap threshold, runs it 10 times, and then counts the minor page
faults of 20 more calls. With the settings the buffer's pages stay mapped
from call to call (the heap grows by a buffer a few times while it settles);
without them (the control) glibc unmaps the buffer after every call and the
next one faults it in again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

WARMUP, CALLS = 10, 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import json, resource, sys
from dro_fast import runtime
how = runtime.keep_freed_host_memory() if sys.argv[1] == "keep" else "system"
import jax, jax.numpy as jnp
n, k = 6144, 32
WARMUP, CALLS = %d, %d

@jax.jit
def f(x, w, v):
  a = x @ w                    # [n, n]: a temporary, used twice
  return jnp.sum(jnp.tanh(a) @ v) + jnp.max(a)

args = [jnp.full(s, 0.5, jnp.float32) for s in ((n, k), (k, n), (n, 4))]
temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
for _ in range(WARMUP):
  f(*args).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(CALLS):
  f(*args).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"how": how, "faults": faults, "temp": temp}))
""" % (WARMUP, CALLS)


def probe(mode: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", PROBE, mode], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def result(p: subprocess.Popen) -> dict:
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="glibc's malloc settings")
def test_kept_memory_is_reused_without_page_faults():
  kept, control = probe("keep"), probe("system")
  kept, control = result(kept), result(control)
  assert kept["how"] == "kept"
  pages = kept["temp"] / os.sysconf("SC_PAGE_SIZE")
  assert kept["temp"] >= 6144 * 6144 * 4
  # The control shows what the settings remove: the buffer is faulted in
  # again on every call.
  assert control["faults"] > 0.5 * CALLS * pages, (control, pages)
  # The heap may still grow by a buffer now and then in this probe (more
  # often on a contended CPU); a bound of 8 of these 20 calls still fails
  # if the settings do nothing (every call faults).
  assert kept["faults"] < 8 * pages, (kept, pages)


def test_keep_freed_host_memory_says_why_not_without_glibc(monkeypatch):
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime.sys, "platform", "darwin")
  assert runtime.keep_freed_host_memory() == "system: not glibc (darwin)"


@pytest.mark.parametrize("platforms, expected", [
    ("cpu", True), ("CPU", True), ("cuda", False), ("cuda,cpu", False),
    ("tpu", False)])
def test_cpu_only_jax_follows_the_named_platforms(monkeypatch, platforms,
                                                  expected):
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime, "_configured_platforms", lambda: platforms)
  assert runtime.cpu_only_jax() is expected


def test_cpu_only_jax_sees_an_installed_accelerator_plugin(monkeypatch):
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime, "_configured_platforms", lambda: "")
  monkeypatch.setattr(runtime.importlib.metadata, "entry_points",
                      lambda group: [])
  installed = set()
  monkeypatch.setattr(runtime.importlib.util, "find_spec",
                      lambda name: types.SimpleNamespace(
                          submodule_search_locations=[])
                      if name in installed else None)
  assert runtime.cpu_only_jax()
  installed.add("libtpu")          # libtpu alone: deviceless compilation
  monkeypatch.setattr(runtime, "tpu_attached", lambda: False)
  assert runtime.cpu_only_jax()
  monkeypatch.setattr(runtime, "tpu_attached", lambda: True)
  assert not runtime.cpu_only_jax()
  installed.add("jax_plugins")     # a GPU plugin's package
  monkeypatch.setattr(runtime, "tpu_attached", lambda: False)
  monkeypatch.setattr(runtime.pkgutil, "iter_modules", lambda path: [object()])
  assert not runtime.cpu_only_jax()


def test_runtime_asks_jax_private_and_does_without_it(monkeypatch):
  """Without jax_private (e.g. after a jax upgrade), runtime still answers.

  JAX is then taken as not started, and libtpu as beside a TPU, as JAX
  itself would assume.
  """
  from dro_fast import jax_private  # pylint: disable=g-import-not-at-top
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime.importlib.util, "find_spec",
                      lambda name: types.SimpleNamespace())
  monkeypatch.setattr(jax_private, "backends_are_initialized", lambda: True)
  monkeypatch.setattr(jax_private, "num_available_tpu_chips_and_device_id",
                      lambda: (0, None))
  assert runtime._jax_started()   # pylint: disable=protected-access
  assert not runtime.tpu_attached()
  import dro_fast  # pylint: disable=g-import-not-at-top
  monkeypatch.delattr(dro_fast, "jax_private")
  monkeypatch.setitem(sys.modules, "dro_fast.jax_private", None)
  assert not runtime._jax_started()   # pylint: disable=protected-access
  assert runtime.tpu_attached()


class _FakeLibc:
  """A mallopt that answers `accept` and records its calls.

  The real one would change this test process's allocator.
  """

  def __init__(self, accept: int):
    self.calls = []
    calls = self.calls

    class Mallopt:     # takes argtypes / restype like a ctypes function
      def __call__(self, param, value):
        calls.append((param, value))
        return accept

    self.mallopt = Mallopt()


def test_keep_freed_host_memory_names_the_settings_glibc_refused(
    monkeypatch):
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  libc = _FakeLibc(accept=0)
  monkeypatch.setattr(runtime, "_glibc", lambda: libc)
  assert runtime.keep_freed_host_memory() == (
      "system: glibc refused M_ARENA_MAX=1, M_MMAP_MAX=0, "
      "M_TRIM_THRESHOLD=-1")
  assert libc.calls == [(-8, 1), (-4, 0), (-1, -1)]


def test_keep_freed_host_memory_warns_when_jax_has_started(monkeypatch):
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  warnings = []
  monkeypatch.setattr(runtime, "_glibc", lambda: _FakeLibc(accept=1))
  monkeypatch.setattr(runtime, "_jax_started", lambda: True)
  monkeypatch.setattr(runtime.logging, "warning",
                      lambda message, *args: warnings.append(message))
  assert runtime.keep_freed_host_memory() == "kept"
  assert len(warnings) == 1 and "before the first JAX computation" in (
      warnings[0])


_ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 "
         "avx512f avx512bw avx512_bf16 avx512_vnni\n")
_AVX2 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 "
         "avx avx2 fma\n")


@pytest.mark.parametrize("cpuinfo, machine, want", [
    (_ZEN4, "x86_64", True),
    (_AVX2, "x86_64", False),
    (_AVX2.replace("fma", "fma amx_bf16"), "x86_64", True),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", "aarch64", True),
    ("processor\t: 0\nFeatures\t: fp asimd\n", "aarch64", False),
    ("processor\t: 0\n", "x86_64", None),          # no flags line: unknown
])
def test_bf16_native_from_cpuinfo(cpuinfo, machine, want):
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  assert runtime.bf16_native_from_cpuinfo(cpuinfo, machine) is want


@pytest.mark.parametrize("requested, platform, native, want", [
    ("bfloat16", "cpu", False, "float32"),
    ("bfloat16", "cpu", True, "bfloat16"),
    ("bfloat16", "gpu", False, "bfloat16"),
    ("bfloat16", "tpu", False, "bfloat16"),
    ("float32", "cpu", False, "float32"),
])
def test_compute_dtype_upcasts_bfloat16_only_on_a_cpu_without_it(
    monkeypatch, requested, platform, native, want):
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime, "bf16_arithmetic", lambda: native)
  assert runtime.compute_dtype(requested, platform) == want


def test_a_cli_on_a_host_with_libtpu_but_no_tpu_prints_no_libtpu_warnings():
  """A CPU host with the `tpu` extra starts JAX without libtpu's warnings.

  That is what runtime.hide_absent_tpu does for the CLIs.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  assert importlib.util.find_spec("libtpu") is not None, (
      "libtpu is not installed: pip install -e '.[tpu]' (make does).")
  from dro_fast import runtime  # pylint: disable=g-import-not-at-top
  assert not runtime.tpu_attached()
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = ("from dro_fast import runtime; assert runtime.hide_absent_tpu(); "
          "import jax; print(jax.default_backend(), jax.numpy.ones(3).sum())")
  done = subprocess.run([sys.executable, "-c", code], env=env,
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ["cpu", "3.0"]
  assert "TPU" not in done.stderr and "INVALID_ARGUMENT" not in done.stderr, (
      done.stderr)
  # Without it, the same start prints libtpu's warnings: the check above
  # can fail.
  plain = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                         env=env, capture_output=True, text=True, timeout=120,
                         check=False)
  assert "TPU_ACCELERATOR_TYPE" in plain.stderr
