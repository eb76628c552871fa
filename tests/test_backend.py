"""One backend decision per run: dro_fast.backend.resolve, and who asks JAX.

The platform a program compiles for is read in one function,
dro_fast.kernels.platform.target_platform; `resolve` turns it into config
fields once. The last tests read every module of dro_fast/, kernels/ and
benchmarks/ with `ast` and check that no other function reads it.
"""

from __future__ import annotations

import ast
import json
import pathlib
import types

import pytest

from dro_fast import backend
from dro_fast import kernels
from dro_fast import models
from dro_fast.training.config import AlgorithmConfig
from dro_fast.training.run_config import RunConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN = RunConfig("/w", model=models.preset("tiny", dropout_rate=0.0))


def _fields(run: RunConfig) -> tuple:
  return (run.model.matmul, run.model.attention_interpret,
          run.algorithm.implementation, run.algorithm.interpret,
          run.policy_optimizer.reduce_with_dots,
          run.value_optimizer.reduce_with_dots, run.async_checkpoints)


def test_a_cpu_program_takes_the_cpu_forms():
  assert _fields(backend.resolve(RUN, "cpu")) == (
      "cpu_row_major", True, "chunked_xla", False, True, True, False)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_an_accelerator_program_takes_its_kernels_compiled(platform):
  native = kernels.implementation_for(platform)
  assert _fields(backend.resolve(RUN, platform)) == (
      "xla", platform != "tpu", native, False, False, False, True)


def test_what_the_run_names_is_kept():
  run = RUN.replace(algorithm=AlgorithmConfig(implementation="pallas_tpu"),
                    async_checkpoints=True)
  resolved = backend.resolve(run, "cpu")
  # The TPU kernel in a CPU program runs in the simulator.
  assert (resolved.algorithm.implementation,
          resolved.algorithm.interpret) == ("pallas_tpu", True)
  assert resolved.async_checkpoints is True
  assert backend.resolve(resolved, "cpu") == resolved      # idempotent


def test_a_plan_of_another_platform_s_program_keeps_the_kernels_of_its_host():
  # A CPU host planning a GPU's step: the GPU's forms, the CPU's kernels
  # (Triton has no CPU lowering).
  resolved = backend.resolve(RUN, "gpu", target="cpu")
  assert _fields(resolved) == ("xla", True, "chunked_xla", False, False,
                               False, True)


@pytest.mark.parametrize("attention, platform, message", [
    ("flash", "gpu", "`attention`=flash is a Pallas TPU"),
    ("cudnn", "cpu", "`attention`=cudnn runs cuDNN's fused attention, "
     "which needs a CUDA GPU; the run compiles for 'cpu'"),
    ("cudnn", "tpu", "compiles for 'tpu'"),
])
def test_attention_that_the_platform_cannot_run_is_refused(
    attention, platform, message):
  run = RUN.replace(model=RUN.model.replace(attention=attention,
                                            dtype="bfloat16"))
  with pytest.raises(ValueError, match=message):
    backend.resolve(run, platform)


def test_an_unknown_platform_is_refused():
  with pytest.raises(ValueError, match="platform 'metal' is none of"):
    backend.resolve(RUN, "metal")


def test_target_platform_reads_the_devices_given():
  tpu = types.SimpleNamespace(platform="tpu")
  assert kernels.target_platform([tpu, tpu]) == "tpu"
  assert kernels.target_platform(types.SimpleNamespace(flat=iter([tpu]))) == (
      "tpu")
  with pytest.raises(ValueError, match="'metal' is none of cpu, gpu, tpu"):
    kernels.target_platform([types.SimpleNamespace(platform="metal")])
  assert kernels.target_platform() in kernels.platform.PLATFORMS


@pytest.mark.parametrize("legacy", ["cpu", "auto", "tpu"])
def test_a_run_config_with_the_old_platform_field_still_loads(legacy):
  # Earlier versions recorded T5Config.platform; the fields it decided are
  # resolved where the run is loaded (training.runs.model_config).
  written = json.loads(RUN.to_json())
  del written["model"]["matmul"], written["model"]["attention_interpret"]
  written["model"]["platform"] = legacy
  assert RunConfig.from_json(json.dumps(written)) == RUN


def test_the_resolved_fields_round_trip_through_run_config_json():
  resolved = backend.resolve(RUN, "cpu")
  assert RunConfig.from_json(resolved.to_json()) == resolved


# The one function allowed to ask JAX which platform runs.
READER = ("kernels/platform.py", "target_platform")
# Attributes that read a device's or a client's platform. No module has a
# field of these names, so any such attribute is a read of JAX's answer
# (sys.platform, the OS, excepted).
PLATFORM_ATTRIBUTES = frozenset({"platform", "platform_version"})


def _backend_reads(source: str, path: str) -> list[str]:
  """Where `source` asks JAX its platform outside READER: "line: what".

  A read is a call of default_backend (jax.default_backend(), or the name
  imported), an import of that name, an attribute of PLATFORM_ATTRIBUTES
  (device.platform, mesh.devices.flat[0].platform,
  client.platform_version), or getattr of one by name.
  """
  found = []

  def visit(node: ast.AST, function: str | None) -> None:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      function = node.name
    allowed = (path, function) == READER
    what = None
    if isinstance(node, ast.Call):
      func = node.func
      name = (func.attr if isinstance(func, ast.Attribute) else
              func.id if isinstance(func, ast.Name) else None)
      if name == "default_backend":
        what = "default_backend()"
      elif (name == "getattr" and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in PLATFORM_ATTRIBUTES):
        what = f"getattr(..., {node.args[1].value!r})"
    elif isinstance(node, ast.ImportFrom) and any(
        alias.name == "default_backend" for alias in node.names):
      what = "import of default_backend"
    elif (isinstance(node, ast.Attribute)
          and node.attr in PLATFORM_ATTRIBUTES
          and not (isinstance(node.value, ast.Name)
                   and node.value.id == "sys")):
      what = f".{node.attr}"
    if what and not allowed:
      found.append(f"{path}:{node.lineno}: {what}")
    for child in ast.iter_child_nodes(node):
      visit(child, function)

  visit(ast.parse(source), None)
  return found


def _sources() -> dict[str, str]:
  """Every module of dro_fast/, kernels/ and benchmarks/, by path.

  Paths are relative to the repository; dro_fast/kernels (a link to
  kernels/ in a checkout) is read once, as kernels/.
  """
  sources = {}
  for root in ("dro_fast", "kernels", "benchmarks"):
    for path in sorted((REPO / root).rglob("*.py")):
      relative = path.relative_to(REPO).as_posix()
      if not relative.startswith("dro_fast/kernels/"):
        sources[relative] = path.read_text()
  return sources


def test_only_target_platform_asks_jax_its_platform():
  sources = _sources()
  assert "kernels/platform.py" in sources and len(sources) > 80
  reads = [r for path, source in sources.items()
           for r in _backend_reads(source, path)]
  assert not reads, ("read the platform through "
                     "dro_fast.kernels.target_platform() and decide in "
                     f"dro_fast.backend.resolve: {reads}")
  # The reader itself is seen: the rule is not vacuous.
  assert _backend_reads(sources["kernels/platform.py"], "other.py")


@pytest.mark.parametrize("source", [
    "import jax\nbackend = jax.default_backend()",
    "from jax import default_backend",
    "import jax\nif jax.devices()[0].platform == 'cpu': pass",
    "def kernel(mesh):\n  return mesh.devices.flat[0].platform",
    "def f(device):\n  return device.client.platform_version",
    "def f(device):\n  return getattr(device, 'platform')",
    "def target_platform():\n  import jax\n  return jax.default_backend()",
])
def test_the_rule_finds_a_read_anywhere_else(source):
  assert _backend_reads(source, "dro_fast/models/layers.py")


def test_the_rule_allows_the_reader_and_the_os():
  reader = ("def target_platform():\n  import jax\n"
            "  return jax.default_backend()")
  assert not _backend_reads(reader, READER[0])
  assert _backend_reads("import jax\nX = jax.default_backend()", READER[0])
  assert not _backend_reads("import sys\nLINUX = sys.platform == 'linux'",
                            "dro_fast/runtime.py")
