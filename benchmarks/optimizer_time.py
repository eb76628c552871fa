r"""One Adafactor update of a T5's parameters: optax's against ours.

  python benchmarks/optimizer_time.py --size=small [--repeats=15] \
      [--json_out=PATH]

Times `update` + `optax.apply_updates` (jitted, parameters and state
donated) over the parameters DRO-V trains at --size: the policy T5 and the
separate value encoder, float32. Variants, timed interleaved in rounds
(order reversed every other round), medians and the median of each round's
ratio to optax ("paired"):

  optax             optax.adafactor(schedule, decay_rate=0.8)
  fused             dro_fast.training.optim.adafactor (what the trainer
                    uses; on the CPU its statistics are GEMVs)
  fused_reductions  the same with reduce_with_dots=False (the accelerator
                    path), to show what the GEMVs add on the CPU

Before timing, one update of each from the same parameters, gradients and
state is checked against optax's: the largest difference relative to the
leaf's largest update is printed and recorded ("max_rel_diff"), and the
script exits 1 above 1e-5. "GB/s" counts one read of the gradients and one
read and one write of the parameters: the least any Adafactor moves.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.append(os.path.dirname(_HERE))
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models import value  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import runtime as host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import optim  # pylint: disable=g-import-not-at-top,wrong-import-position

_SIZE = flags.DEFINE_enum("size", "small",
                          ["tiny", "small", "base", "large", "xl"],
                          "T5 v1.1 size (tiny: the test preset).")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed rounds.")
_VARIANTS = flags.DEFINE_list("variants", ["optax", "fused",
                                           "fused_reductions"],
                              "Which updates to time (optax first).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append JSON lines here.")

TOLERANCE = 1e-5


def make_variant(name: str) -> optax.GradientTransformation:
  schedule = optim.learning_rate_schedule(1e-4, 150)
  if name == "optax":
    return optax.adafactor(schedule, decay_rate=0.8)
  if name == "fused":
    return optim.adafactor(schedule)
  if name == "fused_reductions":
    return optim.adafactor(schedule, reduce_with_dots=False)
  raise app.UsageError(f"--variants: unknown {name!r}; choose from optax, "
                       "fused, fused_reductions.")


def parameter_shapes(size: str):
  """The policy's and the separate value encoder's parameters (shapes)."""
  config = models.preset("tiny" if size == "tiny" else f"flan-t5-{size}",
                         dropout_rate=0.0)
  tokens = jnp.ones((1, 2), jnp.int32)
  value_net = value.value_network(config, "separate")
  return jax.eval_shape(lambda key: {
      "policy": models.t5(config).init(key, tokens, tokens),
      "value": value_net.init(key, tokens)}, jax.random.key(0))


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
  # As the trainer does on a CPU-only JAX (step_time's --host_memory=auto).
  how = (host_memory.keep_freed_host_memory() if host_memory.cpu_only_jax()
         else "system")
  if _REPEATS.value < 1:
    raise app.UsageError("--repeats takes a positive integer.")
  names = list(dict.fromkeys(_VARIANTS.value))
  if not names or names[0] != "optax":
    raise app.UsageError("--variants must start with optax (the baseline).")
  transforms = {name: make_variant(name) for name in names}
  shapes = parameter_shapes(_SIZE.value)
  params = random_like(shapes, 0, 0.05)
  grads = random_like(shapes, 1, 1e-3)
  count = sum(x.size for x in jax.tree.leaves(params))

  # One update from the same state (after a step, so the learning rate and
  # the second moments are non-trivial): compare with optax's.
  base = transforms["optax"]
  warm = base.update(grads, base.init(params), params)[1]
  warm = optax.tree_utils.tree_set(warm, count=jnp.asarray(200, jnp.int32))
  expected = base.update(grads, warm, params)[0]
  differences = {}
  for name, transform in transforms.items():
    differences[name] = max_relative_difference(
        jax.jit(transform.update)(grads, warm, params)[0], expected)

  def make_step(transform):
    def step(params, state, grads):
      updates, state = transform.update(grads, state, params)
      return optax.apply_updates(params, updates), state
    return jax.jit(step, donate_argnums=(0, 1))

  steps, states = {}, {}
  for name, transform in transforms.items():
    steps[name] = make_step(transform)
    states[name] = (jax.tree.map(jnp.copy, params), transform.init(params))
  seconds = {name: [] for name in transforms}
  for name in transforms:                      # compile and warm up
    for _ in range(2):
      states[name] = steps[name](*states[name], grads)
    jax.block_until_ready(states[name])
  for round_ in range(_REPEATS.value):
    order = names if round_ % 2 == 0 else names[::-1]
    for name in order:
      start = time.perf_counter()
      states[name] = steps[name](*states[name], grads)
      jax.block_until_ready(states[name])
      seconds[name].append(time.perf_counter() - start)

  device = timing.device_description()
  print(f"{device}  jax {jax.__version__}  size={_SIZE.value}  "
        f"{count / 1e6:.1f}M parameters (policy + value encoder)  "
        f"threads {len(os.sched_getaffinity(0))}  host memory: {how}  "
        f"{_REPEATS.value} rounds")
  print(f"{'variant':>17} {'ms/update':>10} {'paired':>7} {'GB/s':>6} "
        f"{'max_rel_diff':>12}")
  failed = False
  for name in names:
    median = statistics.median(seconds[name])
    paired = statistics.median(
        b / x for b, x in zip(seconds["optax"], seconds[name]))
    rate = 3 * 4 * count / median / 1e9
    failed |= differences[name] > TOLERANCE
    print(f"{name:>17} {median * 1e3:10.1f} {paired:6.3f}x {rate:6.1f} "
          f"{differences[name]:12.2e}")
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, "a") as out:
        out.write(json.dumps({
            "variant": name, "size": _SIZE.value, "parameters": count,
            "ms_per_update": median * 1e3, "paired_vs_optax": paired,
            "seconds": seconds[name], "max_rel_diff": differences[name],
            "device": device, "jax": jax.__version__, "host_memory": how,
            "threads": len(os.sched_getaffinity(0))}) + "\n")
  if failed:
    sys.exit(f"an update differs from optax's by more than {TOLERANCE} of "
             "the leaf's largest update (max_rel_diff above).")


if __name__ == "__main__":
  app.run(main)
