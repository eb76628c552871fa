r"""Where the DRO-V step's time goes, in JAX and in PyTorch, part by part.

  python benchmarks/step_parts.py --size=small --batch_size=8 \
      --input_length=128 --target_length=64 --dtype=float32 --remat=none \
      [--noscan_layers] [--repeats=5]

Takes benchmarks/step_time.py's flags (one size, batch and target length;
the first --implementation and --remat; --json_out appends one line per
part). Each part of the step is timed
alone, its JAX and PyTorch (benchmarks/torch_step.py) versions and all parts
interleaved in every round; medians over --repeats rounds of one call each:

  policy forward   log π(y|x) [B], no gradient (JAX: the fused linear
                   log-prob kernel; PyTorch: logits and cross-entropy)
  policy grad      the same, forward and backward of Σ_i log π(y_i|x_i)
  value forward    V(x) [B] of the separate value network
  value grad       forward and backward of Σ_i V(x_i)
  loss grad        forward and backward of the whole DRO-V loss
  adafactor        one Adafactor update of the policy
  step             the whole train step (step_time's JaxStep / TorchStep)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.append(os.path.dirname(_HERE))
from benchmarks import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models import value  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import steps  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
Part = Callable[[], None]         # runs one part once and waits for it
PARTS = ("policy forward", "policy grad", "value forward", "value grad",
         "loss grad", "adafactor", "step")


def jax_parts(config: models.T5Config, implementation: str | None,
              batches: list[dict[str, np.ndarray]]) -> dict[str, Part]:
  """Each part of the JAX step, by name."""
  policy = models.t5(config)
  value_net = value.value_network(config)
  tokens = jnp.ones((1, 2), jnp.int32)
  policy_params = jax.jit(policy.init)(jax.random.key(0), tokens, tokens)
  value_params = value.init_from_policy(
      jax.jit(value_net.init)(jax.random.key(1), tokens), policy_params)
  batch = jax.device_put(batches[0])

  def logprobs(params, batch):
    return steps.sequence_logprobs(
        policy, params, None, batch["inputs"], batch["targets"],
        batch["target_mask"], is_training=True, implementation=implementation)

  def values(params, batch):
    return value_net.apply(params, None, batch["inputs"], is_training=True)

  def loss(policy_params, value_params, batch):
    return losses.dro_v_loss(logprobs(policy_params, batch),
                             batch["ref_logprobs"],
                             values(value_params, batch), batch["rewards"],
                             tau=1.0)[0]

  optimizer = optim.make_optimizer(1e-4)
  opt_state = optimizer.init(policy_params)

  def adafactor(grads, opt_state, params):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  total = lambda f: lambda *args: jnp.sum(f(*args))
  fns = {
      "policy forward": (jax.jit(logprobs), (policy_params, batch)),
      "policy grad": (jax.jit(jax.grad(total(logprobs))),
                      (policy_params, batch)),
      "value forward": (jax.jit(values), (value_params, batch)),
      "value grad": (jax.jit(jax.grad(total(values))), (value_params, batch)),
      "loss grad": (jax.jit(jax.grad(loss, argnums=(0, 1))),
                    (policy_params, value_params, batch)),
  }
  grads = fns["policy grad"][0](policy_params, batch)
  fns["adafactor"] = (jax.jit(adafactor), (grads, opt_state, policy_params))
  parts = {name: (lambda f=f, args=args: jax.block_until_ready(f(*args)))
           for name, (f, args) in fns.items()}
  parts["step"] = step_time.JaxStep(config, implementation, batches)
  return parts


def torch_parts(config: models.T5Config,
                batches: list[dict[str, np.ndarray]]) -> dict[str, Part]:
  """The same parts on benchmarks/torch_step.DroVStep."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_step  # pylint: disable=g-import-not-at-top
  whole = step_time.TorchStep(config, batches)        # sets the threads
  step = torch_step.DroVStep(config, autocast=whole.autocast)
  batch = torch_step.to_torch(batches[0])

  def autocast():
    return torch.autocast("cpu", dtype=step.autocast,
                          enabled=step.autocast is not None)

  def logprobs():
    with autocast():
      return torch_step.sequence_logprobs(step.policy, batch["inputs"],
                                          batch["targets"],
                                          batch["target_mask"])

  def no_grad(f):
    def run():
      with torch.no_grad():
        f()
    return run

  def grad(module, f):
    def run():
      module.zero_grad(set_to_none=True)
      f().sum().backward()
    return run

  def values():
    with autocast():
      return step.value(batch["inputs"])

  grad(step.policy, logprobs)()                       # grads for adafactor
  return {
      "policy forward": no_grad(logprobs),
      "policy grad": grad(step.policy, logprobs),
      "value forward": no_grad(values),
      "value grad": grad(step.value, values),
      "loss grad": lambda: step.backward(batch),
      "adafactor": step.policy_optimizer.step,
      "step": whole,
  }


def main(argv):
  del argv
  how = step_time.apply_host_memory()
  size, b, t = FLAGS.size[0], int(FLAGS.batch_size[0]), int(
      FLAGS.target_length[0])
  implementation = FLAGS.implementation[0]
  implementation = None if implementation == "default" else implementation
  config = step_time.config_for(size, FLAGS.remat[0])
  rng = np.random.default_rng(0)
  batches = [step_time.random_batch(config, b, FLAGS.input_length, t, rng)
             for _ in range(2)]
  jax_fns = jax_parts(config, implementation, batches)
  torch_fns = torch_parts(config, batches)
  variants = {}
  for part in PARTS:
    variants[("jax", part)] = jax_fns[part]
    variants[("torch", part)] = torch_fns[part]
  seconds = step_time.interleaved_step_seconds(variants, 1, FLAGS.repeats)

  print(f"jax {jax.__version__}  threads {len(os.sched_getaffinity(0))}  "
        f"size={size} B={b} S={FLAGS.input_length} T={t} {FLAGS.dtype} "
        f"remat={config.remat} scan={config.scan_layers} "
        f"implementation={implementation or 'default'}  "
        f"{FLAGS.repeats} rounds  host memory: {how}")
  print(f"{'part':>16s} {'JAX s':>8s} {'PyTorch s':>9s} {'JAX speed-up':>12s}"
        f"  rounds JAX | PyTorch")
  records = []
  for part in PARTS:
    jax_s, torch_s = seconds[("jax", part)], seconds[("torch", part)]
    records.append({
        "part": part, "size": size, "batch_size": b,
        "input_length": FLAGS.input_length, "target_length": t,
        "dtype": FLAGS.dtype, "remat": config.remat,
        "scan_layers": config.scan_layers,
        "implementation": implementation or "default",
        "threads": len(os.sched_getaffinity(0)), "host_memory": how,
        "jax_round_s": jax_s, "torch_round_s": torch_s,
        "jax_median_s": statistics.median(jax_s),
        "torch_median_s": statistics.median(torch_s),
        "jax_speedup": statistics.median(torch_s) / statistics.median(jax_s),
    })
    print(f"{part:>16s} {statistics.median(jax_s):8.3f} "
          f"{statistics.median(torch_s):9.3f} "
          f"{records[-1]['jax_speedup']:11.2f}x  "
          + " ".join(f"{x:.3f}" for x in jax_s) + " | "
          + " ".join(f"{x:.3f}" for x in torch_s))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)


if __name__ == "__main__":
  app.run(main)
