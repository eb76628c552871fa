"""The editable install maps kernels/ to dro_fast.kernels (no `kernels`)."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_editable_install_imports_from_outside_the_repo(tmp_path):
  code = ("import dro_fast.kernels as k, importlib.util as u; "
          "print(k.__file__); print(u.find_spec('kernels'))")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                       capture_output=True, text=True, check=True).stdout
  kernels_file, top_level = out.splitlines()
  assert kernels_file == os.path.join(REPO, "kernels", "__init__.py")
  assert top_level == "None"


def test_package_layers_import_in_order():
  # Kernels import neither Haiku nor the rest of dro_fast.
  code = ("import sys, dro_fast.kernels; "
          "print(sorted(m for m in sys.modules if m.startswith(('haiku', "
          "'dro_fast.losses', 'dro_fast.models'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True).stdout.strip()
  assert out == "[]"
  assert importlib.util.find_spec("dro_fast.losses") is not None


def test_pyproject_lists_every_package():
  # setuptools installs only the packages pyproject names: a package folder
  # missing from the list (a moved op folder) would be missing from the
  # wheel, while the editable install still finds it.
  repo = pathlib.Path(REPO)
  with open(repo / "pyproject.toml", "rb") as f:
    setuptools = tomllib.load(f)["tool"]["setuptools"]
  found = set()
  for package, folder in setuptools["package-dir"].items():
    for init in (repo / folder).rglob("__init__.py"):
      parts = init.parent.relative_to(repo / folder).parts
      found.add(".".join((package, *parts)))
  assert set(setuptools["packages"]) == found
  assert "dro_fast.kernels.flash_attention" in found
