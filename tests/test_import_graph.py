"""The import graph runs one way: kernels -> helpers -> data and models ->
losses -> training -> CLIs; the kernels import only jax, numpy, the
standard library and themselves, and the model's config imports no
implementation.

Read from the source with `ast` (nothing is imported), over every module of
dro_fast/ and kernels/ (installed as dro_fast.kernels). An import counts
wherever it is written: inside functions and under TYPE_CHECKING too.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Module prefix -> rank. A module may import modules of its own rank or
# lower; the longest matching prefix decides.
LAYERS = {
    "dro_fast.kernels": 0,      # the bottom: usable without the rest
    "dro_fast": 1,              # the package itself: no imports
    "dro_fast.fileio": 1,       # helpers with no upward imports
    "dro_fast.tokenizer": 1,
    "dro_fast.chat_template": 1,
    "dro_fast.hf_tokenizer": 1,
    "dro_fast.runtime": 1,
    "dro_fast.jax_private": 1,
    "dro_fast.configs": 1,      # the packaged flagfiles (configs/)
    "dro_fast.data": 2,
    "dro_fast.models": 2,
    "dro_fast.decoding": 2,     # a helper that may import models
    "dro_fast.losses": 3,
    "dro_fast.training": 4,
    "dro_fast.backend": 4,      # the run's backend decision (its configs)
    "dro_fast.train": 5,        # the CLIs
    "dro_fast.evaluation": 5,
    "dro_fast.scoring": 5,      # dro_fast.score: reads runs and HF folders
    "dro_fast.cli": 5,          # what the CLIs share
    "dro_fast.export": 5,
}

# What a kernel module may import besides dro_fast.kernels.
KERNEL_THIRD_PARTY = frozenset({"jax", "jaxlib", "numpy"})


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for dro_fast/, kernels/ and configs/."""
  modules = {}
  for root, package in (("dro_fast", "dro_fast"),
                        ("kernels", "dro_fast.kernels"),
                        ("configs", "dro_fast.configs")):
    for path in sorted((REPO / root).rglob("*.py")):
      parts = path.relative_to(REPO / root).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      modules[".".join((package, *parts))] = path
  return modules


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> list[str]:
  """Every module `name` imports, as absolute dotted names; for
  `from a import b`, "a.b" (b may be a module or an attribute of a)."""
  is_package = path.name == "__init__.py"
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.extend(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = name.split(".")
        package = package[:len(package) - node.level + is_package]
        base = ".".join(package + ([base] if base else []))
      found.extend(f"{base}.{alias.name}" for alias in node.names)
  return found


def _layer(module: str) -> str:
  """The longest LAYERS prefix of a dro_fast module."""
  return max((prefix for prefix in LAYERS
              if module == prefix or module.startswith(prefix + ".")),
             key=len)


def _rank(module: str) -> int:
  return LAYERS[_layer(module)]


def test_every_module_has_a_layer():
  assert len(MODULES) > 40, sorted(MODULES)
  unplaced = [m for m in MODULES if m != "dro_fast" and _layer(m) == "dro_fast"]
  assert not unplaced, f"add these modules to LAYERS: {unplaced}"
  assert "dro_fast.kernels.flash_attention.ops" in MODULES
  assert not any(m.startswith("dro_fast.models.flash_attention")
                 for m in MODULES)


def test_kernels_are_the_bottom_layer():
  # Nothing ranks below the kernels, and models rank above them (the
  # model's attention "flash" imports dro_fast.kernels).
  assert LAYERS["dro_fast.kernels"] == min(LAYERS.values())
  assert all(rank > LAYERS["dro_fast.kernels"] for prefix, rank in
             LAYERS.items() if prefix != "dro_fast.kernels")
  assert any(_layer(imported) == "dro_fast.kernels" for imported in _imports(
      "dro_fast.models.attention", MODULES["dro_fast.models.attention"])
             if imported.startswith("dro_fast."))


# The package's public API, imported lazily (module __getattr__) so that
# `import dro_fast` imports nothing: (package, module) pairs allowed upward.
LAZY_EXPORTS = {("dro_fast", "dro_fast.scoring")}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_run_one_way(name):
  rank = _rank(name)
  upward = [imported for imported in _imports(name, MODULES[name])
            if imported.startswith("dro_fast.")
            and _rank(imported) > rank
            and (name, imported) not in LAZY_EXPORTS]
  assert not upward, (f"{name} (layer {rank}) imports a higher layer: "
                      f"{upward}")


@pytest.mark.parametrize(
    "name", sorted(m for m in MODULES if m.startswith("dro_fast.kernels")))
def test_kernels_import_only_jax_numpy_stdlib_and_themselves(name):
  foreign = []
  for imported in _imports(name, MODULES[name]):
    top = imported.split(".")[0]
    if imported.startswith("dro_fast."):
      if not imported.startswith("dro_fast.kernels"):
        foreign.append(imported)
    elif top not in KERNEL_THIRD_PARTY and top not in sys.stdlib_module_names:
      foreign.append(imported)
  assert not foreign, f"{name} imports {foreign}"


# The configs are leaves: each imports only the standard library, jax (its
# types) and the configs listed beside it, and validates names against tuples
# of its own, so whether a config is valid never depends on what was
# imported first.
CONFIGS = {
    "dro_fast.models.config": (),
    "dro_fast.models.decoder_config": ("dro_fast.models.config",),
    "dro_fast.data.config": (),
    "dro_fast.training.config": ("dro_fast.models.config",),
    "dro_fast.training.run_config": ("dro_fast.data.config",
                                     "dro_fast.models.config",
                                     "dro_fast.models.decoder_config",
                                     "dro_fast.training.config"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_import_no_implementation(name):
  imported = _imports(name, MODULES[name])
  own = [m for m in imported if m.startswith("dro_fast.")]
  assert [m for m in own if m.rsplit(".", 1)[0] not in CONFIGS[name]] == [], (
      name, own)
  assert {m.split(".")[0] for m in imported} - {"dro_fast"} <= {
      "jax", *sys.stdlib_module_names}, imported


def _bound_names(path: pathlib.Path) -> set[str]:
  """Names a module binds at its top level (defs, classes, assignments,
  imports)."""
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names.update(t.id for t in targets if isinstance(t, ast.Name))
  return names


def test_every_dro_fast_import_names_something_that_exists():
  # A dro_fast import names a module, or a name bound in one (`from a
  # import b`). Catches imports of removed modules (dro_fast.cpu_gemm).
  missing = []
  for name, path in MODULES.items():
    for imported in _imports(name, path):
      if not imported.startswith("dro_fast.") or imported in MODULES:
        continue
      module, _, attribute = imported.rpartition(".")
      if module not in MODULES or attribute not in _bound_names(
          MODULES[module]):
        missing.append((name, imported))
  assert not missing, missing
  assert "dro_fast.cpu_gemm" not in MODULES


def test_bazel_kernels_target_stands_alone():
  # //:kernels is all of kernels/ and depends on nothing: with the tests
  # above, `bazel build //:kernels` needs no other target.
  build = (REPO / "BUILD").read_text()
  target = re.search(r'py_library\(\s*name = "kernels",(.*?)\n\)', build,
                     re.DOTALL)
  assert target, "BUILD has no py_library named kernels"
  assert 'glob(["kernels/**/*.py"])' in target.group(1)
  assert "deps" not in target.group(1)
