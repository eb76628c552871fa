r"""One Adafactor update of a T5's parameters: optax's against ours.

  python -m benchmarks.optimizer_time --size=small [--repeats=15] \
      [--json_out=PATH]

Times `update` + `optax.apply_updates` (jitted, parameters and state
donated) over the parameters DRO-V trains at --size: the policy T5 and the
separate value encoder, float32. Variants, timed interleaved
(benchmarks/lib/timing.py), medians and the paired ratio to optax:

  optax             optax.adafactor(schedule, decay_rate=0.8)
  fused             dro_fast.training.optim.adafactor with its statistics as
                    GEMVs (reduce_with_dots=True, the CPU form)
  fused_reductions  the same with plain reductions (reduce_with_dots=False)

Before timing, one update of each from the same parameters, gradients and
state is checked against optax's: the largest difference relative to the
leaf's largest update is recorded ("max_rel_diff"), and the script exits 1
above 1e-5. "GB/s" counts one read of the gradients and one read and one
write of the parameters: the least any Adafactor moves. Claim:
benchmarks/RESULTS.md#optimizer.
"""

from __future__ import annotations

import statistics
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.lib import flags as shared
from benchmarks.lib import records
from benchmarks.lib import timing
from dro_fast import models
from dro_fast.training import init
from dro_fast.training import optim
from dro_fast.training import steps

_VARIANTS = flags.DEFINE_list("variants", ["optax", "fused",
                                           "fused_reductions"],
                              "Which updates to time (optax first).")

TOLERANCE = 1e-5


def make_variant(name: str) -> optax.GradientTransformation:
  schedule = optim.learning_rate_schedule(1e-4, 150)
  if name == "optax":
    return optax.adafactor(schedule, decay_rate=0.8)
  if name == "fused":
    return optim.adafactor(schedule, reduce_with_dots=True)
  if name == "fused_reductions":
    return optim.adafactor(schedule, reduce_with_dots=False)
  raise app.UsageError(f"--variants: unknown {name!r}; choose from optax, "
                       "fused, fused_reductions.")


def parameter_shapes(size: str):
  """The policy's and the separate value encoder's parameters (shapes)."""
  config = models.preset("tiny" if size == "tiny" else f"flan-t5-{size}",
                         dropout_rate=0.0)
  algorithm = steps.AlgorithmConfig(algo="dro_v", value_net="separate")
  return jax.eval_shape(
      lambda key: dict(zip(("policy", "value"),
                           init.init_params(config, algorithm, key))),
      jax.random.key(0))


def random_like(shapes, seed: int, scale: float):
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      scale * jax.random.normal(k, s.shape, s.dtype)
      for k, s in zip(keys, leaves)])


def max_relative_difference(a, b) -> float:
  """max over leaves of max |a - b| / max |b| (0 for an all-zero leaf)."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    top = np.max(np.abs(y))
    if top > 0:
      worst = max(worst, float(np.max(np.abs(x - y)) / top))
  return worst


def main(argv):
  del argv
  timing.quiet_backend_probe()
  how = shared.apply_host_memory()
  shared.check_sizes()
  size = shared.SIZE.value[0]
  if shared.REPEATS.value < 1:
    raise app.UsageError("--repeats takes a positive integer.")
  names = list(dict.fromkeys(_VARIANTS.value))
  if not names or names[0] != "optax":
    raise app.UsageError("--variants must start with optax (the baseline).")
  transforms = {name: make_variant(name) for name in names}
  shapes = parameter_shapes(size)
  params = random_like(shapes, 0, 0.05)
  grads = random_like(shapes, 1, 1e-3)
  count = sum(x.size for x in jax.tree.leaves(params))

  # One update from the same state (after a step, so the learning rate and
  # the second moments are non-trivial): compare with optax's.
  base = transforms["optax"]
  warm = base.update(grads, base.init(params), params)[1]
  warm = optax.tree_utils.tree_set(warm, count=jnp.asarray(200, jnp.int32))
  expected = base.update(grads, warm, params)[0]
  differences = {name: max_relative_difference(
      jax.jit(t.update)(grads, warm, params)[0], expected)
                 for name, t in transforms.items()}

  def make_call(transform):
    def update(params, state):
      updates, state = transform.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    update = jax.jit(update, donate_argnums=(0, 1))
    state = [(jax.tree.map(jnp.copy, params), transform.init(params))]

    def call():
      state[0] = update(*state[0])
      jax.block_until_ready(state[0])
    return call

  seconds = timing.interleaved_seconds(
      {name: make_call(t) for name, t in transforms.items()}, 1,
      shared.REPEATS.value)
  machine = records.machine()
  print(f"{machine['device']}  jax {jax.__version__}  size={size}  "
        f"{count / 1e6:.1f}M parameters (policy + value encoder)  threads "
        f"{machine['threads']}  host memory: {how}  "
        f"{shared.REPEATS.value} rounds")
  print(f"{'variant':>17} {'ms/update':>10} {'paired':>7} {'GB/s':>6} "
        f"{'max_rel_diff':>12}")
  out = []
  for name in names:
    median = statistics.median(seconds[name])
    paired = timing.speedup(seconds["optax"], seconds[name])[1]
    print(f"{name:>17} {median * 1e3:10.1f} {paired:6.3f}x "
          f"{3 * 4 * count / median / 1e9:6.1f} {differences[name]:12.2e}")
    out.append({"variant": name, "size": size, "parameters": count,
                "ms_per_update": median * 1e3, "paired_vs_optax": paired,
                "seconds": seconds[name], "max_rel_diff": differences[name],
                "host_memory": how, **machine})
  records.append(shared.JSON_OUT.value, out)
  if max(differences.values()) > TOLERANCE:
    sys.exit(f"an update differs from optax's by more than {TOLERANCE} of "
             "the leaf's largest update (max_rel_diff above).")


if __name__ == "__main__":
  shared.set_defaults(size=["small"], repeats=15)
  app.run(main)
