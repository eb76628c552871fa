r"""Trains a policy from single-trajectory feedback: DRO-V and its baselines.

  python -m dro_fast.train --flagfile=configs/xl.flags \
      --train_data=ultrafeedback.jsonl --data_format=ultrafeedback \
      --init_checkpoint=gs-copy/flan_t5_xl/checkpoint_1138000 \
      --tokenizer=spiece.model --workdir=runs/xl

With no flags it runs the demo: a synthetic "repeat the prompt's words" task
(dro_fast.data.synthetic) is written to the workdir, a SentencePiece model is
trained on it, and a tiny T5 learns it with DRO-V on the CPU in a minute or
two. Rerunning with the same --workdir resumes from the latest checkpoint.

Outputs in --workdir: checkpoints/, metrics.jsonl, tensorboard/,
reward_stats.json, summary.json (final step, metrics, SHA-256 of the final
policy parameters) and training_curves.png; with --select_best also
best_checkpoint.json.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dro_fast import checkpoints as model_checkpoints
from dro_fast import data
from dro_fast import fileio
from dro_fast import decoding
from dro_fast import models
from dro_fast.data import synthetic
from dro_fast.models import value
from dro_fast.tokenizer import Tokenizer
from dro_fast.tokenizer import train_sentencepiece
from dro_fast.training import checkpointing
from dro_fast.training import metrics as metrics_lib
from dro_fast.training import optim
from dro_fast.training import reference
from dro_fast.training import sharding
from dro_fast.training import steps

# Data.
_TRAIN_DATA = flags.DEFINE_string(
    "train_data", None, "Training data (JSONL or Parquet). Unset: the demo's "
    "synthetic task, written to the workdir.")
_DATA_FORMAT = flags.DEFINE_enum(
    "data_format", "triplets", ["triplets", "ultrafeedback", "pairwise"],
    "Layout of --train_data: (prompt, completion, reward) rows, OpenBMB "
    "UltraFeedback rows, or (prompt, chosen, rejected) rows for dpo/ipo/slic.")
_PROMPT_FIELD = flags.DEFINE_string("prompt_field", "prompt",
                                    "Prompt field (triplets, pairwise).")
_COMPLETION_FIELD = flags.DEFINE_string("completion_field", "completion",
                                        "Completion field (triplets).")
_REWARD_FIELD = flags.DEFINE_string("reward_field", "reward",
                                    "Reward field (triplets).")
_CHOSEN_FIELD = flags.DEFINE_string("chosen_field", "chosen",
                                    "Preferred completion field (pairwise).")
_REJECTED_FIELD = flags.DEFINE_string("rejected_field", "rejected",
                                      "Dispreferred completion field.")
_UF_REWARD = flags.DEFINE_string(
    "ultrafeedback_reward", "mean_rating", "UltraFeedback reward: "
    "mean_rating (mean of the aspect ratings, N/A ignored), overall_score, "
    "an aspect name (helpfulness, honesty, ...), or binary (thumbs-up when "
    "the mean rating >= --binary_threshold).")
_BINARY_THRESHOLD = flags.DEFINE_float(
    "binary_threshold", None, "Mean rating at or above which a completion is "
    "a thumbs-up, for --ultrafeedback_reward=binary.")
_SKIP_BAD_ROWS = flags.DEFINE_bool(
    "skip_bad_rows", False, "Drop malformed rows (logging a count per reason) "
    "instead of stopping at the first one.")
_MAX_INPUT_LENGTH = flags.DEFINE_integer("max_input_length", 64,
                                         "Prompt tokens kept (truncation).")
_MAX_TARGET_LENGTH = flags.DEFINE_integer("max_target_length", 32,
                                          "Completion tokens kept.")
_SFT_STEPS = flags.DEFINE_integer(
    "sft_steps", 0, "Steps of supervised fine-tuning on the training "
    "completions before the main algorithm, when there is no SFT checkpoint; "
    "the result is both the initial policy and π_ref (the demo uses 400).")
_DEMO_EXAMPLES = flags.DEFINE_integer(
    "demo_examples", 2048, "Examples of the synthetic demo task (used when "
    "--train_data is unset).")

# Algorithm.
_ALGO = flags.DEFINE_enum("algo", "dro_v", list(steps.ALGORITHMS),
                          "dro_v (paper), or the kto / sft / dpo / ipo / slic "
                          "baselines.")
_TAU = flags.DEFINE_float("tau", 1.0, "DRO's KL regularisation τ.")
_BETA = flags.DEFINE_float("beta", None,
                           "β of KTO and the pairwise losses (default: --tau).")
_RESCALE = flags.DEFINE_bool(
    "rescale_policy_grad", True, "Scale the policy gradient by 1/τ (DRO-V's "
    "policy learning-rate rescaling, paper §3.3).")
_VALUE_NET = flags.DEFINE_enum(
    "value_net", "separate", list(value.KINDS), "DRO-V value network: its own "
    "encoder (paper default) or a head on the policy's encoder.")
_VALUE_GRANULARITY = flags.DEFINE_enum(
    "value_granularity", "per_example", ["per_example", "per_batch"],
    "One value per prompt (paper default) or one per batch (Figure 5).")

# Model and optimisation.
_MODEL = flags.DEFINE_enum("model", "tiny", sorted(models.PRESETS),
                           "T5 preset when no --init_checkpoint is given.")
_INIT_CHECKPOINT = flags.DEFINE_string(
    "init_checkpoint", None, "The SFT policy: a T5X checkpoint directory "
    "(with a `checkpoint` file) or a Hugging Face directory (config.json). "
    "Unset: random weights.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "SentencePiece model (T5's spiece.model). Unset: one "
    "is trained on the training data and saved in the workdir.")
_TOKENIZER_VOCAB = flags.DEFINE_integer(
    "tokenizer_vocab_size", 256, "Vocabulary of a tokenizer trained here.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (parameters stay float32).")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False,
                                 "Scan over layers (faster compiles).")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots"],
                           "Rematerialisation policy per layer.")
_DROPOUT = flags.DEFINE_float("dropout_rate", 0.0, "Dropout while training.")
_POLICY_LR = flags.DEFINE_float("policy_lr", 1e-4, "Policy learning rate.")
_VALUE_LR = flags.DEFINE_float("value_lr", 1e-4, "Value learning rate.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 150, "Linear warm-up steps.")
_DECAY_RATE = flags.DEFINE_float("adafactor_decay_rate", 0.8,
                                 "Adafactor decay rate.")
_CLIP = flags.DEFINE_float("clip_grad_norm", 0.0,
                           "Global-norm gradient clipping (0: off).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 40000,
                                    "Steps to train (paper, T5-L: 40,000).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of init, shuffling, dropout.")
_KERNEL = flags.DEFINE_string(
    "kernel_implementation", None, "dro_fast.kernels implementation (xla, "
    "chunked_xla, pallas_tpu, pallas_gpu); unset: by backend.")
_REF_LOGPROBS = flags.DEFINE_enum(
    "ref_logprobs", "cached", ["cached", "online"], "Reference log-probs: "
    "computed once and cached on disk, or recomputed every step.")
_REF_CACHE_DIR = flags.DEFINE_string(
    "ref_cache_dir", None, "Reference log-prob cache (default: "
    "<workdir>/ref_cache).")

# Run.
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "The run's folder.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 2000,
                                         "Steps between checkpoints.")
_KEEP_CHECKPOINTS = flags.DEFINE_integer("keep_checkpoints", 3,
                                         "Checkpoints kept.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Steps between metrics.")
_MAX_BAD_STEPS = flags.DEFINE_integer(
    "max_bad_steps", 10, "Stop after this many consecutive updates skipped "
    "for a non-finite loss or gradient (checked when logging).")
_SELECT_BEST = flags.DEFINE_bool(
    "select_best", False, "After training, judge every kept checkpoint "
    "against the initial (SFT) policy with dro_fast.evaluate "
    "--best_checkpoint and record the best in <workdir>/"
    "best_checkpoint.json (the paper's checkpoint selection, §4).")
_EVAL_FLAGS = flags.DEFINE_multi_string(
    "eval_flag", [], "A flag passed on to dro_fast.evaluate by --select_best, "
    "e.g. --eval_flag=--judge=http:URL --eval_flag=--prompts=test.jsonl "
    "(default for the demo task: 1 fold of 200 held-out prompts, its "
    "reward as the judge).")
_MESH = flags.DEFINE_string(
    "mesh", "", "Device mesh, e.g. data:4,fsdp:2 (batch over both axes, "
    "parameters and optimizer states over fsdp). Unset: all on data.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-host "
    "runs (jax.distributed.initialize).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's index.")


# The demo (no --train_data): flags left unset take these values (those of
# configs/tiny.flags), so that a tiny T5 learns the synthetic task in a few
# minutes on a laptop CPU; everything else keeps the paper's defaults.
DEMO_DEFAULTS = {"train_steps": 300, "policy_lr": 1e-3, "value_lr": 1e-3,
                 "warmup_steps": 30, "checkpoint_every": 100, "log_every": 25,
                 "max_input_length": 16, "max_target_length": 12,
                 "sft_steps": 400}


def apply_demo_defaults() -> None:
  if _TRAIN_DATA.value:
    return
  for name, value_ in DEMO_DEFAULTS.items():
    if name == "sft_steps" and _INIT_CHECKPOINT.value:
      continue                     # the checkpoint is already the SFT policy
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value_


class UserError(Exception):
  """A problem with the flags or inputs: printed without a traceback."""


@dataclasses.dataclass
class Dataset:
  arrays: dict[str, np.ndarray]
  tokenizer: Tokenizer
  tokenizer_fingerprint: str


def _tokenizer(workdir: str, texts: list[str]) -> tuple[Tokenizer, str]:
  if _TOKENIZER.value:
    path = _TOKENIZER.value
    try:
      tok = Tokenizer.load(path)
    except (OSError, ValueError) as e:
      raise UserError(f"--tokenizer: {e}") from None
  else:
    path = os.path.join(workdir, "spiece.model")
    if os.path.isfile(path):
      tok = Tokenizer.load(path)
    else:
      tok = train_sentencepiece(texts, _TOKENIZER_VOCAB.value, path)
  with open(path, "rb") as f:
    return tok, data.fingerprint({"model": np.frombuffer(f.read(), np.uint8)})


def _demo_data(workdir: str, pairwise: bool) -> str:
  path = os.path.join(workdir, "demo_pairs.jsonl" if pairwise
                      else "demo_train.jsonl")
  if not os.path.isfile(path):
    rows = (synthetic.make_pairs(_DEMO_EXAMPLES.value, _SEED.value) if pairwise
            else synthetic.make_triplets(_DEMO_EXAMPLES.value, _SEED.value))
    synthetic.write_jsonl(path, rows)
  return path


def load_dataset(workdir: str, algorithm: steps.AlgorithmConfig) -> Dataset:
  """Reads, checks, normalises and tokenises the training data."""
  pairwise = algorithm.algo in steps.PAIRWISE
  if pairwise != (_DATA_FORMAT.value == "pairwise") and _TRAIN_DATA.value:
    raise UserError(f"--algo={algorithm.algo} needs "
                    f"{'--data_format=pairwise' if pairwise else 'single-trajectory data (--data_format=triplets or ultrafeedback)'}"
                    f", got --data_format={_DATA_FORMAT.value}.")
  path = _TRAIN_DATA.value or _demo_data(workdir, pairwise)
  data_format = _DATA_FORMAT.value if _TRAIN_DATA.value else (
      "pairwise" if pairwise else "triplets")
  kwargs = {"skip_bad_rows": _SKIP_BAD_ROWS.value}
  if data_format == "triplets":
    kwargs.update(prompt_field=_PROMPT_FIELD.value,
                  completion_field=_COMPLETION_FIELD.value,
                  reward_field=_REWARD_FIELD.value)
  elif data_format == "ultrafeedback":
    kwargs.update(reward=_UF_REWARD.value, threshold=_BINARY_THRESHOLD.value)
  else:
    kwargs.update(prompt_field=_PROMPT_FIELD.value,
                  chosen_field=_CHOSEN_FIELD.value,
                  rejected_field=_REJECTED_FIELD.value)
  rows = data.read_dataset(path, data_format, **kwargs)
  if pairwise:
    texts = [t for r in rows for t in (r.prompt, r.chosen, r.rejected)]
  else:
    texts = [t for r in rows for t in (r.prompt, r.completion)]
  tok, tok_fingerprint = _tokenizer(workdir, texts)
  if pairwise:
    arrays = data.tokenize_pairs(rows, tok, _MAX_INPUT_LENGTH.value,
                                 _MAX_TARGET_LENGTH.value)
    return Dataset(arrays, tok, tok_fingerprint)
  stats_path = os.path.join(workdir, "reward_stats.json")
  if os.path.isfile(stats_path):
    stats = data.RewardStats.load(stats_path)
  else:
    stats = data.RewardStats.fit([r.reward for r in rows], path)
    stats.save(stats_path)
  arrays = data.tokenize_triplets(rows, tok, _MAX_INPUT_LENGTH.value,
                                  _MAX_TARGET_LENGTH.value, stats)
  if algorithm.algo == "kto":
    # Each prompt's mismatched completion for the KL reference point: a
    # fixed derangement of the data (HALOs rotates within each batch).
    order = np.random.default_rng([_SEED.value, 1]).permutation(
        len(arrays["targets"]))
    partner = np.empty_like(order)
    partner[order] = np.roll(order, -1)
    arrays["mismatched_targets"] = arrays["targets"][partner]
    arrays["mismatched_mask"] = arrays["target_mask"][partner]
  return Dataset(arrays, tok, tok_fingerprint)


def model_config_and_params(tokenizer: Tokenizer, rng: jax.Array):
  """The policy's config and initial (SFT) parameters."""
  overrides = dict(dtype=_DTYPE.value, remat=_REMAT.value,
                   dropout_rate=_DROPOUT.value)
  if _INIT_CHECKPOINT.value:
    path = _INIT_CHECKPOINT.value
    try:
      config, params = model_checkpoints.load(path)
    except model_checkpoints.CheckpointError as e:
      raise UserError(f"--init_checkpoint: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
      raise UserError(
          f"--tokenizer has {tokenizer.vocab_size} pieces but the checkpoint "
          f"{path} embeds only {config.vocab_size}: use the checkpoint's own "
          f"spiece.model.")
    config = config.replace(scan_layers=_SCAN_LAYERS.value, **overrides)
    return config, model_checkpoints.stack_layers(params, config)
  config = models.preset(_MODEL.value, vocab_size=tokenizer.vocab_size,
                         scan_layers=_SCAN_LAYERS.value, **overrides)
  tokens = jnp.ones((1, 2), jnp.int32)
  return config, models.t5(config).init(rng, tokens, tokens)


def sft_warm_start(workdir: str, model_config: models.T5Config, params,
                   arrays: dict, rng: jax.Array):
  """--sft_steps of SFT from `params`; saved once, reused when resuming."""
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "sft_init"), keep=1)
  template = {"params": params}
  if checkpointer.latest_step() is not None:
    return checkpointer.restore(template)[0]["params"]
  trainer = steps.make_trainer(
      steps.AlgorithmConfig(algo="sft", implementation=_KERNEL.value),
      model_config, optim.make_optimizer(_POLICY_LR.value, _WARMUP.value,
                                         _DECAY_RATE.value), None)
  state = trainer.init(params, {}, rng)
  update = jax.jit(trainer.update)
  iterator = data.BatchIterator(
      {k: arrays[k] for k in ("inputs", "targets", "target_mask")},
      _BATCH_SIZE.value, _SEED.value + 1)
  for _ in tqdm(range(_SFT_STEPS.value), desc="sft", unit="step",
                disable=None):
    state, _ = update(state, next(iterator))
  checkpointer.save(_SFT_STEPS.value, {"params": state.policy_params}, {})
  return state.policy_params


def demo_reward(model_config: models.T5Config, params, tokenizer: Tokenizer,
                num: int = 256) -> float:
  """Mean synthetic reward of greedy completions of held-out prompts."""
  prompts = [t.prompt for t in synthetic.make_triplets(num, seed=10**6)]
  inputs, _ = tokenizer.encode_batch(prompts, _MAX_INPUT_LENGTH.value)
  tokens = decoding.generate(params, jnp.asarray(inputs), config=model_config,
                             max_length=_MAX_TARGET_LENGTH.value)
  texts = tokenizer.decode_batch(np.asarray(tokens))
  return float(np.mean([synthetic.reward(p, y)
                        for p, y in zip(prompts, texts)]))


def _algorithm() -> steps.AlgorithmConfig:
  try:
    return steps.AlgorithmConfig(
        algo=_ALGO.value, tau=_TAU.value,
        beta=_BETA.value if _BETA.value is not None else _TAU.value,
        rescale_policy_grad=_RESCALE.value, value_net=_VALUE_NET.value,
        value_granularity=_VALUE_GRANULARITY.value,
        implementation=_KERNEL.value)
  except ValueError as e:
    raise UserError(str(e)) from None


def _check_flags():
  for flag, value_, least in ((_BATCH_SIZE, _BATCH_SIZE.value, 1),
                              (_TRAIN_STEPS, _TRAIN_STEPS.value, 1),
                              (_LOG_EVERY, _LOG_EVERY.value, 1),
                              (_CHECKPOINT_EVERY, _CHECKPOINT_EVERY.value, 1),
                              (_KEEP_CHECKPOINTS, _KEEP_CHECKPOINTS.value, 1),
                              (_MAX_INPUT_LENGTH, _MAX_INPUT_LENGTH.value, 2),
                              (_MAX_TARGET_LENGTH, _MAX_TARGET_LENGTH.value,
                               2)):
    if value_ < least:
      raise UserError(f"--{flag.name} must be >= {least}, got {value_}.")
  for flag in (_POLICY_LR, _VALUE_LR):
    if not flag.value > 0:
      raise UserError(f"--{flag.name} must be > 0, got {flag.value}.")


def run() -> dict:
  """Trains; returns the summary written to <workdir>/summary.json."""
  apply_demo_defaults()
  _check_flags()
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  lock_workdir(workdir)
  algorithm = _algorithm()
  try:
    mesh = sharding.make_mesh(sharding.parse_mesh(_MESH.value))
    sharding.check_batch_size(_BATCH_SIZE.value, mesh)
  except ValueError as e:
    raise UserError(str(e)) from None

  dataset = load_dataset(workdir, algorithm)
  arrays = dataset.arrays
  if _BATCH_SIZE.value > len(arrays["inputs"]):
    raise UserError(f"--batch_size={_BATCH_SIZE.value} exceeds the "
                    f"{len(arrays['inputs'])} training examples.")
  rng = jax.random.PRNGKey(_SEED.value)
  init_rng, value_rng, train_rng = jax.random.split(rng, 3)
  model_config, policy_params = model_config_and_params(dataset.tokenizer,
                                                        init_rng)
  if _SFT_STEPS.value and algorithm.algo in ("dro_v", "kto"):
    if _INIT_CHECKPOINT.value:
      raise UserError("--sft_steps fine-tunes a policy from scratch; with "
                      "--init_checkpoint (already the SFT policy) leave it 0.")
    policy_params = sft_warm_start(workdir, model_config, policy_params,
                                   arrays, jax.random.fold_in(init_rng, 1))
  initial_params = jax.tree.map(jnp.copy, policy_params)
  fileio.atomic_write_json(
      os.path.join(workdir, "run_config.json"),
      run_config(algorithm, model_config, dataset.tokenizer))

  # Reference log-probs from the initial parameters.
  ref_fn = steps.reference_logprob_fn(model_config, _KERNEL.value)
  outputs = (reference.PAIRWISE if algorithm.algo in steps.PAIRWISE else
             reference.KTO if algorithm.algo == "kto" else reference.SINGLE)
  compute = lambda: reference.compute(ref_fn, policy_params, arrays, outputs,
                                      _BATCH_SIZE.value)
  if algorithm.algo == "sft":
    ref = {name: np.zeros(len(arrays["inputs"]), np.float32)
           for name in outputs}
  elif _REF_LOGPROBS.value == "cached":
    key = reference.cache_key(
        data.fingerprint(arrays), dataset.tokenizer_fingerprint,
        metrics_lib.params_digest(policy_params), repr(model_config),
        repr(sorted(outputs.items())))
    ref = reference.load_or_compute(
        _REF_CACHE_DIR.value or os.path.join(workdir, "ref_cache"), key,
        compute)
  else:
    ref = None
  if ref is not None:
    arrays = dict(arrays, **ref)

  value_params = {}
  if algorithm.has_value:
    value_net = value.value_network(model_config, algorithm.value_net)
    if algorithm.value_net == "separate":
      value_params = value.init_from_policy(
          value_net.init(value_rng, arrays["inputs"][:1]), policy_params)
    else:
      value_params = value_net.init(
          value_rng, jnp.zeros((1, 2, model_config.d_model)),
          jnp.ones((1, 2), jnp.int32))

  policy_schedule = optim.learning_rate_schedule(_POLICY_LR.value,
                                                 _WARMUP.value)
  value_schedule = optim.learning_rate_schedule(_VALUE_LR.value,
                                                _WARMUP.value)
  clip = _CLIP.value or None
  trainer = steps.make_trainer(
      algorithm, model_config,
      optim.make_optimizer(_POLICY_LR.value, _WARMUP.value, _DECAY_RATE.value,
                           clip),
      optim.make_optimizer(_VALUE_LR.value, _WARMUP.value, _DECAY_RATE.value,
                           clip),
      learning_rates=lambda step: {"policy_lr": policy_schedule(step),
                                   "value_lr": value_schedule(step)})
  state = trainer.init(policy_params, value_params, train_rng)
  state_shardings = sharding.tree_shardings(state, mesh)
  state = jax.device_put(state, state_shardings)

  iterator = data.BatchIterator(arrays, _BATCH_SIZE.value, _SEED.value)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=_KEEP_CHECKPOINTS.value)
  writer = metrics_lib.MetricsWriter(workdir)
  if checkpointer.latest_step() is not None:
    state, extra, start = checkpointer.restore(state)
    state = jax.device_put(state, state_shardings)
    iterator.set_state(extra["data"])
    writer.truncate_after(start)
    tqdm.write(f"Resumed from step {start} of {workdir}")

  update = jax.jit(trainer.update, donate_argnums=0)
  batch_sharding = sharding.batch_sharding(mesh)
  # The update donates the state's buffers: the online reference keeps a copy.
  online_ref = None if ref is not None else (ref_fn, initial_params, outputs)
  summary, state = train_loop(state, update, iterator, batch_sharding,
                              checkpointer, writer, online_ref)
  writer.close()
  summary.update(algo=algorithm.algo, model=dataclasses.asdict(model_config),
                 workdir=workdir)
  if not _TRAIN_DATA.value and algorithm.algo not in steps.PAIRWISE:
    # The demo's task has a known reward: score greedy decoding before and
    # after training on held-out prompts.
    summary["demo_reward"] = {
        "behaviour_policy": float(np.mean(
            [t.reward for t in synthetic.make_triplets(256, seed=10**6)])),
        "initial_policy": demo_reward(model_config, initial_params,
                                      dataset.tokenizer),
        "final_policy": demo_reward(model_config,
                                    jax.device_get(state.policy_params),
                                    dataset.tokenizer)}
  fileio.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
  metrics_lib.plot_curves(os.path.join(workdir, "metrics.jsonl"),
                          os.path.join(workdir, "training_curves.png"))
  if _SELECT_BEST.value and jax.process_index() == 0:
    summary["best_checkpoint"] = select_best(workdir)
    fileio.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def select_best(workdir: str) -> dict:
  """Runs dro_fast.evaluate --best_checkpoint on this run; returns its record.

  A subprocess: the evaluator has flags of its own (--batch_size, --seed...)
  that would clash with the trainer's in one process.
  """
  extra = list(_EVAL_FLAGS.value)
  if not any(f.startswith(("--folds", "--prompts_per_fold")) for f in extra):
    extra += ["--folds=1", "--prompts_per_fold=200"]
  command = [sys.executable, "-m", "dro_fast.evaluate",
             f"--best_checkpoint={workdir}", *extra]
  tqdm.write("Selecting the best checkpoint: " + " ".join(command[1:]))
  result = subprocess.run(command, capture_output=True, text=True,
                          check=False)
  if result.returncode:
    raise UserError(
        f"training finished and its checkpoints are saved in {workdir}/"
        f"checkpoints, but --select_best failed:\n"
        f"{result.stderr.strip()[-2000:]}\nFix the --eval_flag values and "
        f"run {' '.join(command[1:])} yourself.")
  with open(os.path.join(workdir, "best_checkpoint.json")) as f:
    return json.load(f)


_LOCK = None   # the open lock file, held for the life of the process


def lock_workdir(workdir: str) -> None:
  """An exclusive flock on <workdir>/.lock: one trainer per workdir."""
  global _LOCK
  path = os.path.join(workdir, ".lock")
  handle = open(path, "a+")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise UserError(f"--workdir={workdir} is in use by another trainer "
                    f"(it holds {path}); wait for it to finish or choose "
                    f"another --workdir.") from None
  _LOCK = handle


def run_config(algorithm: steps.AlgorithmConfig,
               model_config: models.T5Config, tokenizer: Tokenizer) -> dict:
  """What evaluation needs to rebuild the run's policies (run_config.json)."""
  if _INIT_CHECKPOINT.value:
    init = {"kind": "checkpoint", "path": os.path.abspath(
        _INIT_CHECKPOINT.value)}
  elif _SFT_STEPS.value and algorithm.algo in ("dro_v", "kto"):
    init = {"kind": "sft_init"}
  else:
    init = {"kind": "random", "seed": _SEED.value}
  clip = _CLIP.value or None
  return {
      "algorithm": dataclasses.asdict(algorithm),
      "model": dataclasses.asdict(model_config),
      "policy_optimizer": {"learning_rate": _POLICY_LR.value,
                           "warmup_steps": _WARMUP.value,
                           "decay_rate": _DECAY_RATE.value, "clip_norm": clip},
      "value_optimizer": {"learning_rate": _VALUE_LR.value,
                          "warmup_steps": _WARMUP.value,
                          "decay_rate": _DECAY_RATE.value, "clip_norm": clip},
      "tokenizer": os.path.abspath(tokenizer.path),
      "max_input_length": _MAX_INPUT_LENGTH.value,
      "max_target_length": _MAX_TARGET_LENGTH.value,
      "init": init,
      "synthetic_task": not _TRAIN_DATA.value,
  }


def train_loop(state, update, iterator, batch_sharding, checkpointer, writer,
               online_ref) -> tuple[dict, steps.TrainState]:
  """Steps until --train_steps; logs, checkpoints; returns (summary, state)."""
  train_steps = _TRAIN_STEPS.value
  start = int(state.step)
  last_metrics: dict = {}
  progress = tqdm(total=train_steps, initial=start, disable=None,
                  desc="train", unit="step")
  window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
  for step in range(start, train_steps):
    batch = next(iterator)
    if online_ref is not None:
      ref_fn, params0, outputs = online_ref
      for name, (targets, mask) in outputs.items():
        batch[name] = np.asarray(ref_fn(params0, batch["inputs"],
                                        batch[targets], batch[mask]))
    window_tokens += int(sum(np.sum(v) for k, v in batch.items()
                             if k.endswith("mask")))
    batch = jax.device_put(batch, batch_sharding)
    state, step_metrics = update(state, batch)
    window_steps += 1
    done = step + 1
    if done % _LOG_EVERY.value == 0 or done == train_steps:
      # The only host synchronisation: fetching the metrics to log them.
      host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      elapsed = time.perf_counter() - window_start
      host.update(examples_per_s=window_steps * _BATCH_SIZE.value / elapsed,
                  tokens_per_s=window_tokens / elapsed)
      writer.write(done, host)
      last_metrics = host
      if host["consecutive_bad_steps"] >= _MAX_BAD_STEPS.value:
        raise UserError(
            f"stopping at step {done}: the last "
            f"{int(host['consecutive_bad_steps'])} updates had a non-finite "
            f"loss or gradient and were skipped (--max_bad_steps="
            f"{_MAX_BAD_STEPS.value}); the newest checkpoint in "
            f"{_WORKDIR.value}/checkpoints holds the last good parameters. "
            f"Lower the learning rate or check the data.")
      progress.set_postfix(loss=f"{host['loss']:.4f}")
      window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    if done % _CHECKPOINT_EVERY.value == 0 or done == train_steps:
      checkpointer.save(done, state, {"data": iterator.get_state()})
    progress.update(1)
  progress.close()
  if not last_metrics:           # resumed at or past the last step
    last_metrics = (metrics_lib.read_metrics(
        os.path.join(_WORKDIR.value, "metrics.jsonl")) or [{}])[-1]
  return {"final_step": int(state.step), "final_metrics": last_metrics,
          "policy_params_sha256": metrics_lib.params_digest(
              jax.device_get(state.policy_params))}, state


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; progress shows on the tqdm bar instead.
    logging.set_verbosity(logging.WARNING)
  try:
    summary = run()
  except (UserError, data.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({k: summary[k] for k in ("final_step", "final_metrics",
                                            "policy_params_sha256",
                                            "demo_reward", "best_checkpoint") if k in summary},
                   indent=2))


if __name__ == "__main__":
  app.run(main)
