"""dro_fast.jax_private: the private JAX functions are where it imports them.

A JAX upgrade that moves one makes the first test fail with the module's own
ImportError, which names the JAX version and the symbol.
"""

from __future__ import annotations

import importlib
import importlib.util
import re

import jax
import pytest

from dro_fast import jax_private


def test_every_private_symbol_is_present():
  assert jax_private.__all__, "jax_private exposes nothing"
  for name in jax_private.__all__:
    value = getattr(jax_private, name, None)
    assert callable(value), (
        f"dro_fast.jax_private.{name} is {value!r} under jax "
        f"{jax.__version__}, not a function")
    assert value.__module__.startswith("jax._src."), (name, value.__module__)


def test_every_private_symbol_is_exposed():
  """No private jax function is bound here without being listed."""
  private = {name for name, value in vars(jax_private).items()
             if not name.startswith("_") and callable(value)
             and getattr(value, "__module__", "").startswith("jax._src.")}
  assert private == set(jax_private.__all__)


def _import_afresh():
  """Runs dro_fast/jax_private.py as a new module, leaving the imported one."""
  spec = importlib.util.spec_from_file_location("jax_private_afresh",
                                                jax_private.__file__)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("module, name", [
    ("jax._src.xla_bridge", "backends_are_initialized"),
    ("jax._src.hardware_utils", "num_available_tpu_chips_and_device_id"),
])
def test_a_moved_symbol_fails_the_import_naming_it_and_jax(
    monkeypatch, module, name):
  assert callable(_import_afresh().__dict__[name])
  monkeypatch.delattr(importlib.import_module(module), name)
  with pytest.raises(ImportError, match=re.escape(
      f"jax {jax.__version__} has no {module}.{name}, a private symbol")):
    _import_afresh()
