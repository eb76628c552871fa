"""Runs 5 DRO-V steps unsharded and on a data:4,fsdp:2 mesh; prints JSON.

On the mesh the log-prob kernel runs per device under shard_map
(steps.logprob_kernel), its output projection's gradient summed over the
mesh: the losses after the first step check that sum.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before JAX starts).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from dro_fast import models
from dro_fast.models import value
from dro_fast.training import optim
from dro_fast.training import sharding
from dro_fast.training import steps

CONFIG = models.preset("tiny", dropout_rate=0.1)
B, S, T = 16, 9, 7


def batches():
  rng = np.random.default_rng(0)
  for _ in range(5):
    yield {
        "inputs": rng.integers(2, 256, (B, S)).astype(np.int32),
        "targets": rng.integers(2, 256, (B, T)).astype(np.int32),
        "target_mask": rng.random((B, T)) < 0.9,
        "rewards": rng.normal(size=B).astype(np.float32),
        "ref_logprobs": rng.normal(size=B).astype(np.float32) - 30,
    }


def run(mesh):
  tokens = jnp.ones((1, 3), jnp.int32)
  policy_params = models.t5(CONFIG).init(jax.random.key(0), tokens, tokens)
  net = value.value_network(CONFIG, "separate")
  value_params = value.init_from_policy(
      net.init(jax.random.key(1), tokens, None), policy_params)
  trainer = steps.build_trainer(
      steps.AlgorithmConfig(implementation="chunked_xla"), CONFIG,
      optim.make_optimizer(1e-3, 2), optim.make_optimizer(1e-3, 2),
      mesh=mesh)
  state = trainer.init(policy_params, value_params, jax.random.PRNGKey(0))
  if mesh is not None:
    state = jax.device_put(state, sharding.tree_shardings(state, mesh))
  update = jax.jit(trainer.update)
  losses = []
  for batch in batches():
    if mesh is not None:
      batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, metrics = update(state, batch)
    losses.append(float(metrics["loss"]))
  leaf = state.policy_params["encoder/layers_0/mlp/wi_0"]["kernel"]
  return losses, str(leaf.sharding.spec) if mesh is not None else None


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.device_count()
  mesh = sharding.make_mesh(sharding.parse_mesh("data:4,fsdp:2"))
  single, _ = run(None)
  sharded, spec = run(mesh)
  print(json.dumps({"single": single, "sharded": sharded, "spec": spec}))
