"""The platform a program compiles for: the one place that asks JAX.

Every backend choice of dro_fast follows from this one answer: the kernels'
own defaults (`implementation=None`, `interpret=None`) and dro_fast.backend,
which turns it into config fields once per run. tests/test_backend.py checks
that no other function reads jax.default_backend() or a device's platform.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax

# The platforms XLA compiles for that dro_fast has forms and kernels for.
PLATFORMS = ("cpu", "gpu", "tpu")


def target_platform(devices: Iterable[Any] | None = None) -> str:
  """"cpu", "gpu" or "tpu": the platform of `devices`, else JAX's default.

  Args:
    devices: the devices a program is compiled for (a mesh's `devices`
      array, a list), e.g. a TPU topology's on a CPU host; None: those of
      jax.default_backend().

  Raises:
    ValueError: a platform that is none of PLATFORMS.
  """
  if devices is None:
    platform = jax.default_backend()
  else:
    platform = next(iter(getattr(devices, "flat", devices))).platform
  if platform not in PLATFORMS:
    raise ValueError(f"the devices' platform {platform!r} is none of "
                     f"{', '.join(PLATFORMS)}.")
  return platform
