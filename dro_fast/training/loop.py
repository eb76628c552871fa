"""The training run: data, initial parameters, reference log-probs, the loop.

`train(run)` does what `python -m dro_fast.train` promises for a RunConfig:
it locks the workdir, prepares the data (dro_fast.data.prepare), builds the
policy's config and initial parameters (an --init_checkpoint, a random
initialisation, an SFT warm start: training.init, training.sft), writes
run_config.json, computes or reads the cached reference log-probs, resumes
from the newest readable checkpoint, steps to run.train_steps with metrics
and checkpoints, and writes summary.json (and, with run.select_best, the
best checkpoint's record).

Checkpoints hold two items (runs.ITEMS): the policy parameters, so that the
evaluator restores the policy alone, and the rest of the train state.
Problems with the run's inputs or state raise TrainingError (or the data's
DataError), with a message that says where and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import sys
import time
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dro_fast import fileio
from dro_fast import models
from dro_fast.data import pipeline
from dro_fast.data import prepare
from dro_fast.models import lora
from dro_fast.models import pretrained
from dro_fast.training import checkpointing
from dro_fast.training import demo
from dro_fast.training import flops
from dro_fast.training import init
from dro_fast.training import metrics as metrics_lib
from dro_fast.training import optim
from dro_fast.training import preemption
from dro_fast.training import reference
from dro_fast.training import runs
from dro_fast.training import select
from dro_fast.training import sft
from dro_fast.training import sharding
from dro_fast.training import steps
from dro_fast.training.run_config import MODEL_OVERRIDES
from dro_fast.training.run_config import RunConfig


class TrainingError(Exception):
  """A problem with a run's inputs or state: printed without a traceback."""


@contextlib.contextmanager
def claim_workdir(workdir: str) -> Iterator[None]:
  """Creates `workdir` if needed and holds its lock: one trainer per workdir.

  An exclusive flock on its lock file is held while the body runs.

  In a multi-process run process 0 holds .lock and process i .lock.i, so a
  second run is refused by every process and a run's own processes (sharing
  the workdir) do not refuse each other. When the body fails, the lock file
  and the workdir are removed again if this call created them and nothing
  else was written there: a refused run leaves nothing new behind.

  Raises:
    TrainingError: `workdir` names something other than a folder, or
      another trainer holds its lock.
    OSError: the file system refuses to create the folder or the lock file
      (read-only, permissions); its filename names the path.
  """
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise TrainingError(
        f"the workdir {workdir} exists and is not a folder: name a folder "
        "(new or of an earlier run), or move the file away.")
  created = not os.path.lexists(workdir)
  os.makedirs(workdir, exist_ok=True)
  index = jax.process_index()
  path = os.path.join(workdir, f".lock.{index}" if index else ".lock")
  created_lock = not os.path.lexists(path)
  try:
    handle = open(path, "a+")  # pylint: disable=consider-using-with
  except OSError:
    if created:
      _remove_if_empty(workdir)
    raise
  with handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise TrainingError(
          f"the workdir {workdir} is in use by another trainer (it holds "
          f"{path}); wait for it to finish or choose another workdir."
      ) from None
    try:
      yield
    except BaseException:
      if created_lock:
        os.unlink(path)
      if created:
        _remove_if_empty(workdir)
      raise


def _remove_if_empty(folder: str) -> None:
  try:
    os.rmdir(folder)
  except OSError:           # not empty (or already gone): keep what is there
    pass


def _overridden(config, run: RunConfig):
  """A checkpoint's config with the run's MODEL_OVERRIDES it has."""
  fields = {field.name for field in dataclasses.fields(config)}
  return config.replace(**{name: getattr(run.model, name)
                           for name in MODEL_OVERRIDES
                           if name in fields and hasattr(run.model, name)})


def _load_checkpoint(path: str, flag: str, tokenizer, run: RunConfig):
  """(config with the run's overrides, parameters in its layout)."""
  try:
    config, params = pretrained.load(path)
  except pretrained.CheckpointError as e:
    raise TrainingError(f"`{flag}`: {e}") from None
  if tokenizer.vocab_size > config.vocab_size:
    which = (f"`tokenizer`={run.data.tokenizer}" if run.data.tokenizer else
             "the tokenizer trained on the data (`tokenizer_vocab_size`="
             f"{run.data.tokenizer_vocab_size})")
    own = ("its own folder as `tokenizer`" if isinstance(
        config, models.DecoderConfig) else "the checkpoint's own "
        "spiece.model as `tokenizer`")
    raise TrainingError(
        f"{which} has {tokenizer.vocab_size} pieces but the checkpoint "
        f"{path} embeds only {config.vocab_size}: pass {own}.")
  try:
    config = _overridden(config, run)
  except ValueError as e:    # e.g. LoRA targets this architecture lacks
    raise TrainingError(f"`{flag}`={path}: {e}") from None
  return config, init.pretrained_params(params, config)


def policy_config(run: RunConfig, tokenizer):
  """(the policy's final config, its --init_checkpoint parameters or None).

  A preset takes the tokenizer's vocabulary; a checkpoint keeps its own
  architecture with the run's MODEL_OVERRIDES.
  """
  if not run.init_checkpoint:
    return run.model.replace(vocab_size=tokenizer.vocab_size), None
  config, params = _load_checkpoint(run.init_checkpoint, "init_checkpoint",
                                    tokenizer, run)
  if isinstance(config, models.DecoderConfig) != isinstance(
      run.model, models.DecoderConfig):
    raise TrainingError(
        f"`init_checkpoint`={run.init_checkpoint} holds a "
        f"{type(config).__name__} but the run was set up for a "
        f"{type(run.model).__name__}: pass the matching `model`, or let the "
        "checkpoint decide (the trainer's CLI does).")
  return config, params


def value_config(run: RunConfig, model_config, tokenizer):
  """(the separate value network's own config, its trunk) or (None, None).

  From `value_init_checkpoint`, a decoder-only folder of the policy's
  tokenizer; None: the value network copies the policy.
  """
  if not run.value_init_checkpoint:
    return None, None
  config, params = _load_checkpoint(run.value_init_checkpoint,
                                    "value_init_checkpoint", tokenizer, run)
  if not isinstance(config, models.DecoderConfig) or not isinstance(
      model_config, models.DecoderConfig):
    raise TrainingError(
        f"`value_init_checkpoint`={run.value_init_checkpoint}: a separate "
        "value network of its own size is a decoder-only model valuing a "
        "decoder-only policy; for T5, drop `value_init_checkpoint` (the "
        "value encoder copies the policy's).")
  # A value network trains whole: the run's LoRA is the policy's.
  return config.replace(lora=None), params


def _items(state: steps.TrainState) -> dict:
  """A TrainState as checkpoint items (runs.ITEMS).

  A LoRA policy's frozen base is left out: the "policy" item is its
  adapters, and the run rebuilds the base (runs.load_policy does too).
  """
  rest = state._asdict()
  del rest["frozen_params"]
  return {runs.POLICY: rest.pop("policy_params"), runs.TRAIN_STATE: rest}


def _restore(checkpointer: checkpointing.Checkpointer, state):
  """The newest readable checkpoint, its problems turned into user errors."""
  try:
    items, extra, step = checkpointer.restore(_items(state))
  except checkpointing.TemplateMismatchError as e:
    raise TrainingError(
        f"{e}. The checkpoints were written by a run with other flags (model, "
        "algorithm, value network...): rerun with that run's flags (see "
        "run_config.json beside them), or use a new `workdir`.") from None
  except checkpointing.CorruptCheckpointError as e:
    folder = checkpointer.directory
    raise TrainingError(
        f"{e}. No checkpoint here can be resumed: restore {folder} from a "
        f"copy, or start training afresh by moving it away (`mv {folder} "
        f"{folder}.damaged`) and rerunning the same command.") from None
  return steps.TrainState(policy_params=items[runs.POLICY],
                          frozen_params=state.frozen_params,
                          **items[runs.TRAIN_STATE]), extra, step


def _reference(run: RunConfig, dataset, model_config, params):
  """The reference log-probs: (arrays or None, online function, outputs).

  The arrays are None when they are computed online, every step.
  """
  algo, arrays = run.algorithm.algo, dataset.arrays
  ref_fn = steps.reference_logprob_fn(model_config,
                                      run.algorithm.implementation,
                                      run.algorithm.interpret)
  outputs = (reference.PAIRWISE if algo in steps.PAIRWISE else
             reference.KTO if algo == "kto" else reference.SINGLE)
  if algo == "sft":
    return {name: np.zeros(len(arrays["inputs"]), np.float32)
            for name in outputs}, ref_fn, outputs
  if run.ref_logprobs == "online":
    return None, ref_fn, outputs
  # Keyed by the data's fingerprints (those the workdir records) and
  # everything else that shapes the values.
  key = reference.cache_key(
      dataset.key, metrics_lib.params_digest(params), repr(model_config),
      repr(sorted(outputs.items())))
  own_cache = os.path.join(run.workdir, "ref_cache")
  with sharding.primary_first("reference_cache"):
    ref = reference.load_or_compute(
        run.ref_cache_dir or own_cache, key,
        lambda: reference.compute(ref_fn, params, arrays, outputs,
                                  run.batch_size),
        # Only the workdir's own cache: a shared folder holds other runs'.
        remove_stale=jax.process_index() == 0 and run.ref_cache_dir in (
            None, own_cache))
  return ref, ref_fn, outputs


def trainer_for_run(run: RunConfig,
                    model_config: models.T5Config | models.DecoderConfig,
                    mesh: jax.sharding.Mesh | None = None) -> steps.Trainer:
  """The run's Trainer: its algorithm, optimizers and their schedules.

  train() jits its update with donate_argnums=0 over the state's
  `sharding.tree_shardings` and the batch's `sharding.batch_sharding`;
  benchmarks/tpu_compile.py compiles the same.
  """
  policy_schedule = optim.schedule(run.policy_optimizer)
  value_schedule = optim.schedule(run.value_optimizer)
  return steps.build_trainer(
      run.algorithm, model_config, optim.optimizer(run.policy_optimizer),
      optim.optimizer(run.value_optimizer),
      learning_rates=lambda step: {"policy_lr": policy_schedule(step),
                                   "value_lr": value_schedule(step)},
      mesh=mesh, value_config=run.value_model)


def train(run: RunConfig) -> dict:
  """Trains; returns the summary written to <workdir>/summary.json.

  `run` is taken as it is: its backend fields are decided
  (dro_fast.backend.resolve), `async_checkpoints` among them.

  Raises:
    TrainingError, data.DataError, select.SelectionError: a problem with
      the run's inputs or state; nothing half-written is left behind.
    fileio.WriteError: a write fault (a full disk).
    OSError: the file system refuses the workdir or an input (its filename
      names the path).
    preemption.StartupStopped: SIGTERM before the first step (one process).
  """
  if run.async_checkpoints is None:
    raise TrainingError("`async_checkpoints` is unset: build the run with "
                        "dro_fast.backend.resolve, which decides it.")
  try:
    mesh = sharding.make_mesh(sharding.parse_mesh(run.mesh))
    sharding.check_batch_size(run.batch_size, mesh)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  with claim_workdir(run.workdir):
    return _train(run, mesh)


def _train(run: RunConfig, mesh) -> dict:
  """train() in its claimed workdir."""
  workdir = run.workdir
  checkpoints = os.path.join(workdir, "checkpoints")
  # On several processes, a preemption notice during the start-up below is
  # then answered at the first step (training.preemption).
  preemption.register_start(checkpointing.newest_step_name(checkpoints))
  primary = jax.process_index() == 0
  with preemption.stop_during_startup():
    # Process 0 writes the demo data into the (shared) workdir; the other
    # processes then read it. On a fresh run every process trains the same
    # tokenizer; process 0 saves its own (and the reward statistics).
    with sharding.primary_first("dataset"):
      dataset = prepare.load_dataset(workdir, run.data, run.algorithm.algo,
                                     run.seed)
    arrays = dataset.arrays
    try:
      sharding.check_same_on_every_process(dataset.key,
                                            "the tokenised training data")
    except ValueError as e:
      raise TrainingError(str(e)) from None
    if run.batch_size > len(arrays["inputs"]):
      raise TrainingError(f"`batch_size`={run.batch_size} exceeds the "
                          f"{len(arrays['inputs'])} training examples.")
    rng = jax.random.PRNGKey(run.seed)
    model_config, policy_params = policy_config(run, dataset.tokenizer)
    value_model, value_trunk = value_config(run, model_config,
                                            dataset.tokenizer)
    # The model axis splits heads, MLP units and the vocabulary, known
    # only now (the vocabulary is the tokenizer's).
    try:
      sharding.check_model_axis(mesh, [("policy", model_config)] + (
          [("value network", value_model)] if value_model else []))
    except ValueError as e:
      raise TrainingError(str(e)) from None
    if primary:
      prepare.save_inputs(workdir, dataset)   # every input is checked
      # A save cut short by a kill or a second Ctrl-C: never read, and
      # nobody else writes here while this trainer holds the workdir.
      for folder in (checkpoints, os.path.join(workdir, "sft_init")):
        checkpointing.remove_unfinished(folder)
    if run.sft_warm_start:
      # The warm start fine-tunes the whole model: with LoRA it is the base
      # the adapters then start from.
      base_config = model_config.replace(lora=None)
      if policy_params is None:
        policy_params, _ = init.init_params(base_config, None, rng)
      policy_params = sft.warm_start(
          run, base_config, policy_params, arrays,
          jax.random.fold_in(init.split(rng).policy, 1), mesh)
    policy_params, value_params = init.init_params(
        model_config, run.algorithm, rng, policy_params=policy_params,
        value_config=value_model, value_trunk=value_trunk)
    initial_params = jax.tree.map(jnp.copy, policy_params)
    # A LoRA run's checkpoints hold its adapters alone: they resume only
    # onto the base they were trained on, which this digest names.
    lora_base = (metrics_lib.params_digest(lora.split(policy_params)[1])
                 if model_config.lora is not None else None)
    run = run.replace(model=model_config, value_model=value_model)
    if primary:
      fileio.atomic_write_bytes(os.path.join(workdir, "run_config.json"),
                                (run.to_json() + "\n").encode())

    ref, ref_fn, outputs = _reference(run, dataset, model_config,
                                      policy_params)
    if ref is not None:
      arrays = dict(arrays, **ref)
    trainer = trainer_for_run(run, model_config, mesh)
    state = trainer.init(policy_params, value_params, init.split(rng).train)
    state_shardings = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, state_shardings)

    iterator = pipeline.BatchIterator(
        arrays, run.batch_size, run.seed,
        length_buckets=run.data.length_buckets,
        pad_id=dataset.tokenizer.pad_id)
    checkpointer = checkpointing.Checkpointer(
        checkpoints, runs.ITEMS, keep=run.keep_checkpoints,
        async_save=run.async_checkpoints)
    start = 0
    if checkpointer.latest_step() is not None:
      state, extra, start = _restore(checkpointer, state)
      if extra.get("lora_base", lora_base) != lora_base:
        raise TrainingError(
            f"cannot resume from {checkpointer.directory}/{start}: its LoRA "
            "adapters were trained on another base model than "
            f"`init_checkpoint`={run.init_checkpoint} holds now (the base is "
            "not checkpointed): restore that base, or use a new `workdir`.")
      state = jax.device_put(state, state_shardings)
      try:
        iterator.set_state(extra["data"])
      except ValueError as e:
        raise TrainingError(
            f"cannot resume from {checkpointer.directory}/{start}: {e} Here: "
            "rerun with the `train_data` and `seed` of the run that wrote "
            "it, or use a new `workdir`.") from None
      tqdm.write(f"Resumed from step {start} of {workdir}")
    update = jax.jit(trainer.update, donate_argnums=0)

  # Every process saves and restores its shards of the checkpoints (Orbax);
  # only process 0 writes the metrics and the summary.
  writer = metrics_lib.MetricsWriter(workdir) if primary else None
  if writer is not None:
    # Forget what a killed run logged after its last checkpoint (all of it
    # when it had none): those steps are trained again.
    writer.truncate_after(start)
  # The update donates the state's buffers: the online reference keeps a copy.
  online_ref = None if ref is not None else (ref_fn, initial_params, outputs)
  try:
    summary, state = train_loop(run, state, update, iterator,
                                sharding.batch_sharding(mesh), checkpointer,
                                writer, online_ref, lora_base=lora_base)
  finally:
    if writer is not None:
      writer.close()
  checkpointer.close()
  if "stopped" in summary:
    # Asked to stop (preemption, Ctrl-C): the step's checkpoint is saved;
    # no summary.json, which marks a finished run.
    # Every process says so (each host's log shows where it stopped).
    stopped = summary["stopped"]
    print(f"{stopped['signal']}: stopped at step {summary['final_step']} "
          f"of {run.train_steps}, {stopped['seconds']:.1f} s after the "
          f"signal, with a checkpoint in {checkpointer.directory}. Rerun "
          "the same command to resume.", flush=True)
    return summary
  summary.update(algo=run.algorithm.algo,
                 model=dataclasses.asdict(model_config), workdir=workdir)
  if run.data.synthetic_task and run.algorithm.algo not in steps.PAIRWISE:
    # The demo's task has a known reward: score greedy decoding before and
    # after training on held-out prompts.
    summary["demo_reward"] = demo.rewards(
        model_config, initial_params, sharding.to_host(state.policy),
        dataset.tokenizer, run.data.max_input_length,
        run.data.max_target_length)
  if not primary:
    return summary
  fileio.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
  metrics_lib.plot_curves(os.path.join(workdir, "metrics.jsonl"),
                          os.path.join(workdir, "training_curves.png"))
  if run.select_best:
    summary["best_checkpoint"] = select.select_best(workdir, run.eval_flags)
    fileio.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def train_loop(run: RunConfig, state, update, iterator, batch_sharding,
               checkpointer, writer, online_ref, lora_base: str | None = None
               ) -> tuple[dict, steps.TrainState]:
  """Steps to run.train_steps; logs, checkpoints; returns (summary, state).

  lora_base: a LoRA run's base digest, recorded with each checkpoint.
  """
  train_steps = run.train_steps
  start = int(state.step)
  last_metrics: dict = {}
  progress = tqdm(total=train_steps, initial=start,
                  disable=None if jax.process_index() == 0 else True,
                  desc="train", unit="step")
  # Where stdout is no terminal (a scheduler's log), tqdm is off: a line per
  # --log_every steps instead.
  lines = ProgressLines(run, start) if (
      jax.process_index() == 0 and not sys.stdout.isatty()) else None
  window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
  step_metrics = None
  stop = preemption.StopRequests()
  with stop:
    for step in range(start, train_steps):
      batch = next(iterator)
      if online_ref is not None:
        ref_fn, params0, outputs = online_ref
        for name, (targets, mask) in outputs.items():
          batch[name] = np.asarray(ref_fn(params0, batch["inputs"],
                                          batch[targets], batch[mask]))
      window_tokens += int(sum(np.sum(v) for k, v in batch.items()
                               if k.endswith("mask")))
      batch = sharding.global_batch(batch, batch_sharding)
      previous = step_metrics
      state, step_metrics = update(state, batch)
      if previous is not None:
        # At most two steps in flight: a stop request is then answered
        # within about one step, and a stop's save waits for no backlog.
        jax.block_until_ready(previous["loss"])
      if step == 0 and run.model.dropout_rate > 0:
        _warn_dropout_bias(run, step_metrics)
      window_steps += 1
      done = step + 1
      if done % run.log_every == 0 or done == train_steps:
        # The only host synchronisation: fetching the metrics to log them.
        host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        elapsed = time.perf_counter() - window_start
        host.update(examples_per_s=window_steps * run.batch_size / elapsed,
                    tokens_per_s=window_tokens / elapsed)
        if writer is not None:
          writer.write(done, host)
        last_metrics = host
        if host["consecutive_bad_steps"] >= run.max_bad_steps:
          _stop_diverged(run, done, int(host["consecutive_bad_steps"]),
                         checkpointer)
        progress.set_postfix(loss=f"{host['loss']:.4f}")
        if lines is not None:
          lines.write(done, host)
        window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
      stopping = stop.stop_after(done)
      if (done % run.checkpoint_every == 0 or done == train_steps
          or stopping):
        try:
          checkpointer.save(done, _items(state), dict(
              {"data": iterator.get_state()},
              **({"lora_base": lora_base} if lora_base else {})))
        except ValueError as e:     # non-finite parameters, a step taken
          raise TrainingError(f"cannot save the checkpoint of step {done}: "
                              f"{e}") from None
      progress.update(1)
      if stopping:
        break
    checkpointer.wait()          # the last save, if it runs in the background
  progress.close()
  final_step = int(state.step)
  if stop.signal_name is not None and final_step < train_steps:
    return {"final_step": final_step, "stopped": {
        "signal": stop.signal_name,
        "seconds": time.monotonic() - stop.received_at}}, state
  if not last_metrics:           # resumed at or past the last step
    last_metrics = (metrics_lib.read_metrics(
        os.path.join(run.workdir, "metrics.jsonl")) or [{}])[-1]
  return {"final_step": final_step, "final_metrics": last_metrics,
          "policy_params_sha256": metrics_lib.params_digest(
              sharding.to_host(state.policy_params))}, state


class ProgressLines:
  """One stdout line per logged step.

  Step, loss, examples/s, tokens/s, MFU (where the device's peak is known:
  training.flops), elapsed, ETA.
  """

  def __init__(self, run: RunConfig, start: int):
    self.run, self.start, self.began = run, start, time.perf_counter()
    peak = flops.peak_flops()
    self.step_flops = flops.step_flops(
        run.model, run.algorithm.algo, run.algorithm.value_net,
        run.batch_size, run.data.max_input_length,
        run.data.max_target_length, value_config=run.value_model)
    self.peak = peak * jax.device_count() if peak else None

  def write(self, done: int, host: dict) -> None:
    elapsed = time.perf_counter() - self.began
    eta = elapsed / (done - self.start) * (self.run.train_steps - done)
    steps_per_s = host["examples_per_s"] / self.run.batch_size
    mfu = ("" if self.peak is None else
           f"  MFU {steps_per_s * self.step_flops / self.peak:.1%}")
    clock = lambda s: time.strftime("%H:%M:%S", time.gmtime(s))
    print(f"step {done}/{self.run.train_steps}  loss {host['loss']:.4f}  "
          f"{host['examples_per_s']:.1f} examples/s  "
          f"{host['tokens_per_s']:.0f} tokens/s{mfu}  elapsed "
          f"{clock(elapsed)}  ETA {clock(eta)}", flush=True)


def _warn_dropout_bias(run: RunConfig, step_metrics: dict) -> None:
  """Warns when dropout makes log π − log π_ref nonzero from the start.

  The reference log-probs are computed without dropout; a policy trained
  with dropout scores its own completions lower (more so for longer ones),
  so DRO-V's residual and KTO's reference point start biased by a
  length-dependent amount. Measured on the first batch, before any update.
  """
  if "log_ratio_mean" in step_metrics:
    log_ratio_mean = float(step_metrics["log_ratio_mean"])
    logging.warning(
        "`dropout_rate`=%g with reference log-probs computed without "
        "dropout: on the first batch, mean log π − log π_ref = %.4g (0 "
        "without dropout). DRO-V's residual and KTO's reference point absorb "
        "it as a length-dependent bias; `dropout_rate`=0 (the default) "
        "avoids it.", run.model.dropout_rate, log_ratio_mean)


def _stop_diverged(run: RunConfig, done: int, bad: int, checkpointer) -> None:
  checkpointer.wait()
  newest = checkpointer.latest_step()
  saved = ("no checkpoint was saved" if newest is None else
           f"the checkpoints in {checkpointer.directory} (newest: step "
           f"{newest}) hold finite parameters, but they may already "
           "have diverged")
  raise TrainingError(
      f"stopping at step {done}: the last {bad} updates had a "
      f"non-finite loss or gradient and were skipped (`max_bad_steps`="
      f"{run.max_bad_steps}). Skipped updates change nothing, and "
      f"{saved}. Lower `policy_optimizer.learning_rate` / "
      "`value_optimizer.learning_rate`, set `policy_optimizer.clip_norm`, "
      "or check the data for extreme rewards, then start again in a "
      "new `workdir` (or delete the newer checkpoints to resume from "
      "an older one).")
