"""The private JAX functions the project uses, imported in this one place.

JAX keeps no promise about jax._src: an upgrade may move or rename what is
there. Each private function is imported here when this module is imported,
so that such an upgrade fails in one place, with one ImportError naming the
JAX version and the missing symbol (tests/test_jax_private.py imports this
module, so the test suite says it first). Callers that can do without one
import this module inside a try and fall back on ImportError.

  backends_are_initialized  (jax._src.xla_bridge) whether JAX has started
      its backends, asked without starting them: jax.devices() and
      jax.default_backend() start them, and JAX has no public question.
      runtime.hide_absent_tpu may set jax_platforms only before the start,
      and runtime.keep_freed_host_memory warns when it comes after it (the
      started threads keep their malloc arenas).
  num_available_tpu_chips_and_device_id  (jax._src.hardware_utils) the TPU
      chips on this host's PCI bus, as JAX's own Cloud TPU start-up counts
      them, without loading libtpu. runtime.tpu_attached tells a TPU host
      from a CPU host that only has libtpu installed; starting a backend to
      ask would print the libtpu warnings that hide_absent_tpu avoids.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax

__all__ = ["backends_are_initialized",
           "num_available_tpu_chips_and_device_id"]


def _private(module: str, name: str) -> Any:
  """module.name, or an ImportError naming the JAX version and the symbol."""
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ImportError(
        f"jax {jax.__version__} has no {module}.{name}, a private symbol "
        "that dro_fast.jax_private imports; install the jax version of "
        "requirements/constraints.txt, or find where this jax keeps it and "
        "update dro_fast/jax_private.py.") from e


backends_are_initialized = _private("jax._src.xla_bridge",
                                    "backends_are_initialized")
num_available_tpu_chips_and_device_id = _private(
    "jax._src.hardware_utils", "num_available_tpu_chips_and_device_id")
