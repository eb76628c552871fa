"""Timing and memory measures shared by the benchmark scripts.

Ratios between variants are taken two ways (benchmarks/RESULTS.md uses
both): the ratio of the medians, and "paired", the median of each round's
ratio, where both sides ran back to back under the same load.
"""

from __future__ import annotations

import logging
import resource
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from dro_fast import kernels


def quiet_backend_probe() -> None:
  """Hides jax's INFO lines about backends it could not start.

  absl prints INFO, and a host without a TPU logs one such line per process.
  Each script's main() calls this first: it changes a process-wide logger,
  so importing this module must not.
  """
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def device_description() -> str:
  """"<platform>:<device kind>" of the first device, for records."""
  device = jax.devices()[0]
  return f"{kernels.target_platform([device])}:{device.device_kind}"


def compiled_peak_bytes(compiled) -> dict[str, int]:
  """XLA's static memory plan of a compiled program, per device.

  peak_bytes = arguments + outputs + temporaries − aliases (donated inputs
  reused as outputs), and the parts; total_bytes adds the generated code,
  which a TPU also holds in HBM.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {"peak_bytes": -1, "temp_bytes": -1}
  parts = {"argument_bytes": analysis.argument_size_in_bytes,
           "output_bytes": analysis.output_size_in_bytes,
           "alias_bytes": analysis.alias_size_in_bytes,
           "temp_bytes": analysis.temp_size_in_bytes,
           "code_bytes": analysis.generated_code_size_in_bytes}
  parts = {k: int(v) for k, v in parts.items()}
  parts["peak_bytes"] = (parts["argument_bytes"] + parts["output_bytes"]
                         + parts["temp_bytes"] - parts["alias_bytes"])
  parts["total_bytes"] = parts["peak_bytes"] + parts["code_bytes"]
  return parts


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


def host_usage() -> tuple[int, float]:
  """This process's minor page faults and system CPU seconds so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_minflt, usage.ru_stime


def peak_rss_bytes() -> int:
  """The process's peak resident set so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def interleaved_seconds(
    variants: Mapping[str, Callable[[], None]], steps_per_round: int,
    rounds: int, warmup: int = 2,
    usage: dict[str, list[tuple[float, float]]] | None = None,
) -> dict[str, list[float]]:
  """Seconds per call of each variant in each round, variants alternating.

  Each variant runs `warmup` untimed calls; then every round times
  `steps_per_round` calls of each variant in turn, reversing the order on
  odd rounds so that neither side always follows the other. A call must
  return only once its work is done. With `usage`, also records each
  round's minor page faults and system CPU seconds per call there (from the
  variant's `usage()` where it runs in another process, else this one's).
  """
  for step in variants.values():
    for _ in range(warmup):
      step()
  seconds = {name: [] for name in variants}
  for round_ in range(rounds):
    order = list(variants.items())
    for name, step in order[::-1] if round_ % 2 else order:
      count = getattr(step, "usage", host_usage)
      faults, system_s = count()
      start = time.perf_counter()
      for _ in range(steps_per_round):
        step()
      seconds[name].append((time.perf_counter() - start) / steps_per_round)
      if usage is not None:
        now_faults, now_system_s = count()
        usage.setdefault(name, []).append(
            ((now_faults - faults) / steps_per_round,
             (now_system_s - system_s) / steps_per_round))
  return seconds


def speedup(reference: Sequence[float],
            own: Sequence[float]) -> tuple[float, float]:
  """How much faster `own` ran than `reference`, from per-round seconds.

  Returns the ratio of the medians and the paired ratio (the median of
  per-round ratios).
  """
  return (statistics.median(reference) / statistics.median(own),
          statistics.median(r / o for r, o in zip(reference, own)))
