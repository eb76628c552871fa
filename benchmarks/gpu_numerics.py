r"""Numerics of every native implementation on this device against float64.

  python -m benchmarks.gpu_numerics [--json_out=PATH]

For both ops, float32 and bfloat16, shapes with vocabulary and row tails
(V = 32128), it compares the forward and the VJP (random cotangent) with a
float64 NumPy reference by ‖out − ref‖ / ‖ref‖, prints a table and exits
non-zero if any error exceeds its bound. The bounds: float32 logits 1e-5;
the linear op 3e-3 in float32 (GPU matmuls run in TF32 by default) and
2e-2 for bfloat16 gradients (rounded to bfloat16 before the contractions).
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.lib import kernel_cases as kernel_bench
from benchmarks.lib import timing
from benchmarks.lib import numpy_reference as ref

_JSON_OUT = flags.DEFINE_string("json_out", None, "Write JSON lines here.")

BOUNDS = {  # (op, dtype) -> (value bound, gradient bound)
    ("sequence", "float32"): (1e-5, 1e-5),
    ("sequence", "bfloat16"): (1e-5, 1e-2),
    ("linear", "float32"): (3e-3, 3e-3),
    ("linear", "bfloat16"): (1e-3, 2e-2),
}
SHAPES = [kernel_bench.Shape("seq_b3_t97_v32128", "sequence", 3, 97, 32128),
          kernel_bench.Shape("lin_b3_t97_d320_v32128", "linear", 3, 97, 32128,
                             320)]


def rel_error(actual, expected) -> float:
  actual = np.asarray(np.asarray(actual).astype(np.float32), np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def main(argv):
  del argv
  timing.quiet_backend_probe()
  print(f"device {timing.device_description()}  jax {jax.__version__}")
  rng = np.random.default_rng(0)
  records, failed = [], False
  for shape in SHAPES:
    for dtype in (jnp.float32, jnp.bfloat16):
      diff, targets, mask = kernel_bench.make_inputs(shape, dtype, seed=1)
      g = jnp.asarray(rng.normal(size=shape.batch) + 1.5, jnp.float32)
      if shape.op == "sequence":
        expected = ref.sequence_logprobs(diff[0], targets, mask)
        expected_grads = [ref.sequence_logprobs_vjp(diff[0], targets, mask, g)]
      else:
        expected = ref.linear_sequence_logprobs(*diff, targets, mask)
        expected_grads = ref.linear_sequence_logprobs_vjp(*diff, targets, mask,
                                                          g)
      for implementation in kernel_bench.native_implementations():
        step = kernel_bench.make_step(shape, implementation, "forward")
        value, vjp = jax.vjp(lambda *d: step(*d, targets, mask), *diff)
        grads = vjp(g)
        bound_value, bound_grad = BOUNDS[(shape.op, jnp.dtype(dtype).name)]
        record = {
            "name": shape.name, "implementation": implementation,
            "dtype": jnp.dtype(dtype).name,
            "device": timing.device_description(),
            "value_rel_error": rel_error(value, expected),
            "grad_rel_errors": [rel_error(a, e)
                                for a, e in zip(grads, expected_grads)],
        }
        record["ok"] = bool(record["value_rel_error"] <= bound_value and all(
            e <= bound_grad for e in record["grad_rel_errors"]))
        failed |= not record["ok"]
        records.append(record)
        print(f"{shape.name:24s} {implementation:12s} {record['dtype']:9s} "
              f"value {record['value_rel_error']:.2e}  grads "
              + " ".join(f"{e:.2e}" for e in record["grad_rel_errors"])
              + ("  ok" if record["ok"] else "  FAIL"), flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
  if failed:
    sys.exit("numerics: some errors exceed their bounds (see FAIL rows)")


if __name__ == "__main__":
  app.run(main)
