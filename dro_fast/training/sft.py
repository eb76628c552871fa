"""The SFT warm start: supervised fine-tuning before the main algorithm.

With --sft_steps and no SFT checkpoint, the run fine-tunes its initial
policy on the training completions; the result is both the initial policy
and π_ref. It is saved once in <workdir>/sft_init and reused on resume.
"""

from __future__ import annotations

import os

import jax
from tqdm import tqdm

from dro_fast.data import pipeline
from dro_fast.training import checkpointing
from dro_fast.training import optim
from dro_fast.training import runs
from dro_fast.training import sharding
from dro_fast.training import steps
from dro_fast.training.run_config import RunConfig


def warm_start(run: RunConfig, model_config, params, arrays: dict,
               rng: jax.Array, mesh: jax.sharding.Mesh):
  """run.sft_steps of SFT from `params`; saved once, reused when resuming.

  Runs on `mesh` like the main loop (so every process of a multi-process
  run takes part in the checkpoint).

  Args:
    run: the run (batch size, seed, SFT optimizer, kernel implementation).
    model_config: the policy's config.
    params: the policy to fine-tune.
    arrays: the tokenised data (inputs, targets, target_mask are used).
    rng: the dropout key (the trainer passes fold_in(policy key, 1)).
    mesh: the device mesh.

  Returns:
    The fine-tuned parameters as NumPy arrays.
  """
  checkpointer = checkpointing.Checkpointer(
      os.path.join(run.workdir, "sft_init"), (runs.POLICY,), keep=1)
  if checkpointer.latest_step() is not None:
    template = jax.device_put(params, sharding.tree_shardings(params, mesh))
    items = checkpointer.restore({runs.POLICY: template})[0]
    return sharding.to_host(items[runs.POLICY])
  trainer = steps.build_trainer(
      steps.AlgorithmConfig(algo="sft",
                            implementation=run.algorithm.implementation,
                            interpret=run.algorithm.interpret),
      model_config, optim.optimizer(run.sft_optimizer), None, mesh=mesh)
  state = trainer.init(params, {}, rng)
  state = jax.device_put(state, sharding.tree_shardings(state, mesh))
  update = jax.jit(trainer.update)
  batch_sharding = sharding.batch_sharding(mesh)
  iterator = pipeline.BatchIterator(
      {k: arrays[k] for k in ("inputs", "targets", "target_mask")},
      run.batch_size, run.seed + 1)
  for _ in tqdm(range(run.sft_steps), desc="sft", unit="step",
                disable=None if jax.process_index() == 0 else True):
    state, _ = update(state, sharding.global_batch(next(iterator),
                                                   batch_sharding))
  checkpointer.save(run.sft_steps, {runs.POLICY: state.policy_params}, {})
  return sharding.to_host(state.policy_params)
