"""Shared measurement helpers for the benchmark scripts."""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


# jax logs at INFO that it found no TPU library; absl would print it.
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def device_description() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{device.device_kind}"


def compiled_peak_bytes(compiled) -> dict[str, int]:
  """XLA's static memory plan: arguments + outputs + temporaries − aliases."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {"peak_bytes": -1, "temp_bytes": -1}
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return {"peak_bytes": int(peak),
          "temp_bytes": int(analysis.temp_size_in_bytes)}


def median_seconds(fn: Callable[..., Any], args, repeats: int,
                   warmup: int = 2) -> tuple[float, list[float]]:
  """Median wall time of fn(*args), synchronised on its outputs."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def copy_bandwidth(num_bytes: int = 1 << 30, repeats: int = 10) -> float:
  """Measured device copy rate in bytes/s, counting bytes read + written."""
  x = jnp.ones((num_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)
  seconds, _ = median_seconds(copy, (x,), repeats)
  return 2 * num_bytes / seconds
