r"""Each kept CPU form against its removal, paired, in one process.

  python -m benchmarks.cpu_forms [--repeats=9] [--json_out=PATH]
  make bench-cpu-forms

A CPU-only form stays in dro_fast only if it speeds up the T5-small DRO-V
CPU step (batch 8, inputs 128 / targets 64, float32, unrolled layers, remat
none) by at least 5% (benchmarks/RESULTS.md#cpu-forms). This script builds
that step with every kept form on ("all") and, for each form, with that
form alone off, and times them interleaved (benchmarks/lib/timing.py):

  dense_vjp        Dense's row-major CPU VJP (dro_fast/models/cpu.py): off
                   is the same step built for platform "gpu"
                   (dro_fast.backend.resolve: T5Config.matmul "xla", plain
                   jnp.dot), compiled for the CPU
  adafactor_gemv   Adafactor's statistics as GEMVs
                   (optim.adafactor(reduce_with_dots=True)): off is
                   reduce_with_dots=False

It prints each variant's median s/step and the speed-up of the form, "all"
against the variant without it: the ratio of the medians and the paired
ratio (median of per-round ratios). The shape flags are step_time's, with
this measurement's defaults.
"""

from __future__ import annotations

import statistics
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks.lib import flags as shared
from dro_fast import kernels
from benchmarks.lib import records
from benchmarks.lib import step as bench_step
from benchmarks.lib import timing
from dro_fast.training import steps

# form -> the step's settings with that form off.
FORMS = {"dense_vjp": {"platform": "gpu"},
         "adafactor_gemv": {"reduce_with_dots": False}}
ALL_ON = {"platform": "cpu", "reduce_with_dots": True}
BASELINE = "all"

_FORMS = flags.DEFINE_list("forms", list(FORMS),
                           f"Forms to measure, of {list(FORMS)}.")

DEFAULTS = {"size": ["small"], "batch_size": ["8"], "input_length": 128,
            "target_length": ["64"], "dtype": "float32",
            "scan_layers": False, "steps": 1, "repeats": 9}


def build(settings: dict[str, Any], batches) -> bench_step.JaxStep:
  """The CPU step with `settings` (platform, reduce_with_dots)."""
  implementation = shared.IMPLEMENTATION.value[0]
  config = bench_step.config_for(
      shared.SIZE.value[0], shared.DTYPE.value, remat="none",
      scan_layers=shared.SCAN.value, platform=settings["platform"])
  algorithm = steps.AlgorithmConfig(
      algo="dro_v",
      implementation=None if implementation == "default" else implementation)
  return bench_step.JaxStep(config, algorithm, batches,
                            reduce_with_dots=settings["reduce_with_dots"],
                            platform=settings["platform"])


def measure(forms: list[str]) -> list[dict[str, Any]]:
  """One record per variant ("all", then "no_<form>" for each form)."""
  b = int(shared.BATCH.value[0])
  s, t = shared.INPUT_LENGTH.value, int(shared.TARGET_LENGTH.value[0])
  shapes = bench_step.config_for(shared.SIZE.value[0], shared.DTYPE.value)
  rng = np.random.default_rng(0)
  batches = [bench_step.random_batch(shapes, b, s, t, rng) for _ in range(2)]
  settings = {BASELINE: ALL_ON,
              **{f"no_{form}": {**ALL_ON, **FORMS[form]} for form in forms}}
  variants = {name: build(value, batches) for name, value in settings.items()}
  seconds = timing.interleaved_seconds(variants, shared.STEPS.value,
                                       shared.REPEATS.value)
  out = []
  for name, step in variants.items():
    median, paired = timing.speedup(seconds[name], seconds[BASELINE])
    out.append({
        "variant": name, **settings[name],
        "form": name.removeprefix("no_") if name != BASELINE else None,
        # How much faster the step is with the form than without it.
        "speedup_of_form": median, "paired_speedup_of_form": paired,
        "median_step_s": statistics.median(seconds[name]),
        "round_step_s": seconds[name], "loss": step.loss,
        "size": shared.SIZE.value[0], "batch_size": b, "input_length": s,
        "target_length": t, "dtype": shared.DTYPE.value,
        "compute_dtype": shapes.dtype, "scan_layers": shared.SCAN.value,
        "implementation": shared.IMPLEMENTATION.value[0],
        **records.machine()})
  return out


def main(argv):
  del argv
  timing.quiet_backend_probe()
  how = shared.apply_host_memory()
  shared.known_values("forms", _FORMS.value, FORMS)
  shared.check_sizes()
  platform = kernels.target_platform()
  if platform != "cpu":
    raise app.UsageError("cpu_forms measures CPU forms: run it with JAX on "
                         f"the CPU (platform here: {platform!r}).")
  out = measure(list(dict.fromkeys(_FORMS.value)))
  r = out[0]
  print(f"jax {jax.__version__}  {r['device']}  threads {r['threads']}  host "
        f"memory: {how}  size={r['size']}  B={r['batch_size']}  "
        f"S={r['input_length']}  T={r['target_length']}  "
        f"{r['compute_dtype']}  {len(r['round_step_s'])} rounds")
  print(f"{'variant':>20s} {'s/step':>8s} {'form speed-up':>13s} "
        f"{'paired':>7s}  rounds (s/step)")
  for r in out:
    print(f"{r['variant']:>20s} {r['median_step_s']:8.4f} "
          f"{r['speedup_of_form']:12.3f}x {r['paired_speedup_of_form']:6.3f}x"
          "  " + " ".join(f"{x:.3f}" for x in r["round_step_s"]))
  records.append(shared.JSON_OUT.value, out)


if __name__ == "__main__":
  shared.set_defaults(**DEFAULTS)
  app.run(main)
