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

from dro_fast.models import pretrained
from dro_fast import data
from dro_fast import decoding
from dro_fast import fileio
from dro_fast import kernels
from dro_fast import models
from dro_fast.data import synthetic
from dro_fast.models import value
from dro_fast.tokenizer import Tokenizer
from dro_fast.tokenizer import train_sentencepiece
from dro_fast.training import checkpointing
from dro_fast import runtime
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
_UF_REWARD = flags.DEFINE_enum(
    "ultrafeedback_reward", "mean_rating", list(data.ULTRAFEEDBACK_REWARDS),
    "UltraFeedback reward: "
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
_LONG_ROWS = flags.DEFINE_enum(
    "long_rows", "truncate", ["truncate", "skip", "error"], "Rows whose "
    "prompt or completion has more tokens (EOS included) than "
    "--max_input_length or --max_target_length: truncate those texts (EOS "
    "kept last; a warning counts them), skip those rows (with a warning), or "
    "stop with an error naming the first.")
_SFT_STEPS = flags.DEFINE_integer(
    "sft_steps", 0, "Steps of supervised fine-tuning on the training "
    "completions before the main algorithm, when there is no SFT checkpoint; "
    "the result is both the initial policy and π_ref (the demo uses 400).")
_SFT_LR = flags.DEFINE_float(
    "sft_lr", None, "Learning rate of the --sft_steps warm start (unset: "
    "--policy_lr). Set it when sweeping --policy_lr so that every run "
    "starts from the same SFT policy.")
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
_REMAT = flags.DEFINE_enum("remat", "none", list(models.REMAT_POLICIES),
                           "Rematerialisation policy per layer.")
_ATTENTION = flags.DEFINE_enum(
    "attention", "xla", ["xla", "cudnn"],
    "Attention in training and scoring: xla materialises the [B, H, q, k] "
    "logits; cudnn runs cuDNN's fused (flash) attention, which does not "
    "(CUDA GPU, --dtype=bfloat16, --dropout_rate=0 and even "
    "--max_input_length / --max_target_length only).")
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_freed_host_memory", True, "When JAX runs on the CPU alone (no GPU "
    "or TPU plugin, or JAX_PLATFORMS=cpu), keep freed host memory for the "
    "next step instead of returning it to the system (glibc only). XLA:CPU "
    "otherwise maps its temporary buffer afresh every step and page-faults "
    "all of it; resident memory then stays at its peak. See "
    "dro_fast/training/runtime.py.")
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
    "coordinator_address", None, "host:port of process 0, for multi-process "
    "runs (jax.distributed.initialize; needs --num_processes and "
    "--process_id), or auto where JAX detects the cluster itself (Cloud TPU "
    "pod slices, SLURM, Open MPI). Every process must see the same --workdir "
    "(a shared file system); see docs/SCALING.md.")
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
  """The tokenised training data.

  Attributes:
    arrays: the model's input arrays (see data.tokenize_triplets).
    tokenizer: the tokenizer; `path` None while one trained here is unsaved.
    tokenizer_fingerprint: a digest of the SentencePiece model.
    reward_stats: reward statistics not yet saved in the workdir, or None.
  """
  arrays: dict[str, np.ndarray]
  tokenizer: Tokenizer
  tokenizer_fingerprint: str
  reward_stats: data.RewardStats | None = None


def _tokenizer(workdir: str, texts: list[str]) -> tuple[Tokenizer, str]:
  """--tokenizer, the workdir's, or one trained on `texts` (not yet saved)."""
  if _TOKENIZER.value:
    path = _TOKENIZER.value
    try:
      tok = Tokenizer.load(path)
    except (OSError, ValueError) as e:
      raise UserError(f"--tokenizer: {e}") from None
  else:
    path = os.path.join(workdir, "spiece.model")
    if os.path.isfile(path):
      try:
        tok = Tokenizer.load(path)
      except ValueError as e:
        raise UserError(f"{e} It was trained by an earlier run in --workdir="
                        f"{workdir}: delete it to train a new one, or pass "
                        "--tokenizer.") from None
    else:
      try:
        tok = train_sentencepiece(texts, _TOKENIZER_VOCAB.value, None)
      except ValueError as e:
        raise UserError(f"cannot train a tokenizer with --tokenizer_vocab_"
                        f"size={_TOKENIZER_VOCAB.value}: {e} Pass --tokenizer="
                        "<spiece.model> instead.") from None
  return tok, data.fingerprint(
      {"model": np.frombuffer(tok.serialized_model(), np.uint8)})


def _demo_data(workdir: str, pairwise: bool) -> str:
  path = os.path.join(workdir, "demo_pairs.jsonl" if pairwise
                      else "demo_train.jsonl")
  if not os.path.isfile(path):
    rows = (synthetic.make_pairs(_DEMO_EXAMPLES.value, _SEED.value) if pairwise
            else synthetic.make_triplets(_DEMO_EXAMPLES.value, _SEED.value))
    synthetic.write_jsonl(path, rows)
  return path


def _check_lengths(rows: list, tokenizer: Tokenizer) -> list:
  """Applies --long_rows to the rows with texts over the length limits."""
  long = data.long_texts(rows, tokenizer, _MAX_INPUT_LENGTH.value,
                         _MAX_TARGET_LENGTH.value)
  if not long:
    return rows
  index, field, length, limit = long[0]
  flag = "--max_input_length" if field == "prompt" else "--max_target_length"
  first = (f"{rows[index].source}: the {field} has {length} tokens (EOS "
           f"included), more than {flag}={limit}")
  bad = {i for i, *_ in long}
  if _LONG_ROWS.value == "error":
    raise UserError(
        f"{first} ({len(bad)} of {len(rows)} rows are too long; "
        "--long_rows=error). Raise the length flags, shorten or remove those "
        "rows, or pass --long_rows=truncate (cut the texts, EOS kept last) "
        "or --long_rows=skip (drop the rows).")
  if _LONG_ROWS.value == "truncate":
    logging.warning("truncating %d of %d rows longer than --max_input_length "
                    "or --max_target_length (first: %s); --long_rows=skip "
                    "drops them, --long_rows=error stops.", len(bad),
                    len(rows), first)
    return rows
  kept = [row for i, row in enumerate(rows) if i not in bad]
  if not kept:
    raise UserError(f"--long_rows=skip dropped all {len(rows)} rows (first: "
                    f"{first}). Raise --max_input_length and "
                    "--max_target_length, or pass --long_rows=truncate.")
  logging.warning("skipping %d of %d rows longer than --max_input_length or "
                  "--max_target_length (--long_rows=skip; first: %s).",
                  len(bad), len(rows), first)
  return kept


def load_dataset(workdir: str, algorithm: steps.AlgorithmConfig) -> Dataset:
  """Reads, checks, normalises and tokenises the training data.

  A tokenizer trained here and the reward statistics are returned unsaved
  (see save_inputs), so that a bad input found later leaves neither behind.
  """
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
  rows = _check_lengths(rows, tok)
  if pairwise:
    arrays = data.tokenize_pairs(rows, tok, _MAX_INPUT_LENGTH.value,
                                 _MAX_TARGET_LENGTH.value)
    return Dataset(arrays, tok, tok_fingerprint)
  stats_path = os.path.join(workdir, "reward_stats.json")
  unsaved = None
  rewards = [r.reward for r in rows]
  if os.path.isfile(stats_path):
    stats = data.RewardStats.load(stats_path)
    fitted = stats.fitted_on(rewards)
    if fitted is False:
      raise UserError(
          f"{stats_path} holds the reward statistics of other data "
          f"({stats.count} rewards; {path} now gives {len(rows)}), so this "
          "workdir was trained on different rewards. Rerun with the "
          "--train_data and reward flags of the run that wrote it, or use a "
          "new --workdir.")
    if fitted is None:
      logging.warning("%s predates reward fingerprints: reusing it without "
                      "checking that it was fitted on %s.", stats_path, path)
  else:
    stats = unsaved = data.RewardStats.fit(rewards, path)
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
  return Dataset(arrays, tok, tok_fingerprint, unsaved)


def save_inputs(workdir: str, dataset: Dataset) -> None:
  """Saves a tokenizer trained here and the reward statistics in the workdir.

  Called once every input has been checked, so that a run stopped by a bad
  input leaves nothing that a later run (with fixed inputs) would reuse.
  """
  if jax.process_index() != 0:
    return
  if dataset.tokenizer.path is None:
    dataset.tokenizer.save(os.path.join(workdir, "spiece.model"))
  if dataset.reward_stats is not None:
    dataset.reward_stats.save(os.path.join(workdir, "reward_stats.json"))
    dataset.reward_stats = None


def model_config_and_params(tokenizer: Tokenizer, rng: jax.Array):
  """The policy's config and initial (SFT) parameters."""
  overrides = dict(dtype=_DTYPE.value, remat=_REMAT.value,
                   attention=_ATTENTION.value, dropout_rate=_DROPOUT.value)
  if _INIT_CHECKPOINT.value:
    path = _INIT_CHECKPOINT.value
    try:
      config, params = pretrained.load(path)
    except pretrained.CheckpointError as e:
      raise UserError(f"--init_checkpoint: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
      which = (f"--tokenizer={_TOKENIZER.value}" if _TOKENIZER.value else
               "the tokenizer trained on the data (--tokenizer_vocab_size="
               f"{_TOKENIZER_VOCAB.value})")
      raise UserError(
          f"{which} has {tokenizer.vocab_size} pieces but the checkpoint "
          f"{path} embeds only {config.vocab_size}: pass the checkpoint's "
          "own spiece.model as --tokenizer.")
    config = config.replace(scan_layers=_SCAN_LAYERS.value, **overrides)
    return config, pretrained.stack_layers(params, config)
  config = models.preset(_MODEL.value, vocab_size=tokenizer.vocab_size,
                         scan_layers=_SCAN_LAYERS.value, **overrides)
  tokens = jnp.ones((1, 2), jnp.int32)
  return config, models.t5(config).init(rng, tokens, tokens)


def _sft_lr() -> float:
  return _SFT_LR.value if _SFT_LR.value is not None else _POLICY_LR.value


def sft_warm_start(workdir: str, model_config: models.T5Config, params,
                   arrays: dict, rng: jax.Array, mesh: jax.sharding.Mesh):
  """--sft_steps of SFT from `params`; saved once, reused when resuming.

  Runs on `mesh` like the main loop (so every process of a multi-process
  run takes part in the checkpoint); returns the parameters as NumPy arrays.
  """
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "sft_init"), keep=1)
  if checkpointer.latest_step() is not None:
    template = {"params": params}
    template = jax.device_put(template,
                              sharding.tree_shardings(template, mesh))
    return sharding.to_host(checkpointer.restore(template)[0]["params"])
  trainer = steps.make_trainer(
      steps.AlgorithmConfig(algo="sft", implementation=_KERNEL.value),
      model_config, optim.make_optimizer(_sft_lr(), _WARMUP.value,
                                         _DECAY_RATE.value), None)
  state = trainer.init(params, {}, rng)
  state = jax.device_put(state, sharding.tree_shardings(state, mesh))
  update = jax.jit(trainer.update)
  batch_sharding = sharding.batch_sharding(mesh)
  iterator = data.BatchIterator(
      {k: arrays[k] for k in ("inputs", "targets", "target_mask")},
      _BATCH_SIZE.value, _SEED.value + 1)
  for _ in tqdm(range(_SFT_STEPS.value), desc="sft", unit="step",
                disable=None if jax.process_index() == 0 else True):
    state, _ = update(state, sharding.global_batch(next(iterator),
                                                   batch_sharding))
  checkpointer.save(_SFT_STEPS.value, {"params": state.policy_params}, {})
  return sharding.to_host(state.policy_params)


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
  """Flag values out of range or in conflict, before anything is written."""
  for flag, least in ((_BATCH_SIZE, 1), (_TRAIN_STEPS, 1), (_LOG_EVERY, 1),
                      (_CHECKPOINT_EVERY, 1), (_KEEP_CHECKPOINTS, 1),
                      (_MAX_INPUT_LENGTH, 2), (_MAX_TARGET_LENGTH, 2),
                      (_MAX_BAD_STEPS, 1), (_DEMO_EXAMPLES, 1), (_SEED, 0),
                      (_WARMUP, 0), (_SFT_STEPS, 0), (_CLIP, 0)):
    if flag.value < least:
      raise UserError(f"--{flag.name} must be >= {least}, got {flag.value}.")
  for flag in (_POLICY_LR, _VALUE_LR, _SFT_LR):
    if flag.value is not None and not flag.value > 0:
      raise UserError(f"--{flag.name} must be > 0, got {flag.value}.")
  if not 0 <= _DROPOUT.value < 1:
    raise UserError(f"--dropout_rate must be in [0, 1), got "
                    f"{_DROPOUT.value}.")
  if _ATTENTION.value == "cudnn":
    needs = []
    if not models.cuda_backend():
      needs.append(f"a CUDA GPU (JAX's backend here is "
                   f"{jax.default_backend()!r})")
    if _DTYPE.value != "bfloat16":
      needs.append("--dtype=bfloat16")
    if _DROPOUT.value:
      needs.append("--dropout_rate=0 (it has no attention dropout)")
    odd = [f"--{flag.name}={flag.value}" for flag in
           (_MAX_INPUT_LENGTH, _MAX_TARGET_LENGTH) if flag.value % 2]
    if odd:
      needs.append(f"even sequence lengths, not {' and '.join(odd)}")
    if needs:
      raise UserError("--attention=cudnn needs " + "; ".join(needs)
                      + ". Or use --attention=xla.")
  if not _TOKENIZER.value and _TOKENIZER_VOCAB.value < 4:
    raise UserError(f"--tokenizer_vocab_size must be >= 4 (pad, eos, unk "
                    f"and one character), got {_TOKENIZER_VOCAB.value}.")
  if (_KERNEL.value is not None
      and _KERNEL.value not in kernels.IMPLEMENTATIONS):
    raise UserError(
        f"--kernel_implementation={_KERNEL.value} is not available here; "
        f"choose one of {', '.join(sorted(kernels.IMPLEMENTATIONS))}, or "
        "leave it unset to pick by backend.")
  binary = _UF_REWARD.value == "binary"
  if _BINARY_THRESHOLD.value is not None and not binary:
    raise UserError(
        f"--binary_threshold applies only to --ultrafeedback_reward=binary, "
        f"not --ultrafeedback_reward={_UF_REWARD.value}: drop "
        "--binary_threshold or set --ultrafeedback_reward=binary.")
  if binary and _DATA_FORMAT.value == "ultrafeedback":
    if _BINARY_THRESHOLD.value is None:
      raise UserError(
          "--ultrafeedback_reward=binary needs --binary_threshold=<mean "
          "rating>: completions whose mean aspect rating is at or above it "
          "get reward 1, the others 0 (ratings run from 1 to 5).")
    if not np.isfinite(_BINARY_THRESHOLD.value):
      raise UserError(f"--binary_threshold must be a finite number, got "
                      f"{_BINARY_THRESHOLD.value}.")
  if (_SFT_STEPS.value and _INIT_CHECKPOINT.value
      and _ALGO.value in ("dro_v", "kto")):
    raise UserError(
        f"--sft_steps={_SFT_STEPS.value} fine-tunes a policy from scratch, "
        "but --init_checkpoint is already the SFT policy: leave --sft_steps "
        "at 0, or drop --init_checkpoint.")


def init_distributed() -> None:
  """Joins a multi-process run (before anything touches a JAX device)."""
  if _COORDINATOR.value == "auto":
    sharding.initialize_distributed(None, None, None)
    return
  if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
    raise UserError("--coordinator_address needs --num_processes and "
                    "--process_id (or use --coordinator_address=auto on a "
                    "cluster JAX detects).")
  if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    raise UserError(f"--process_id={_PROCESS_ID.value} must be in [0, "
                    f"--num_processes={_NUM_PROCESSES.value}).")
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)


def run() -> dict:
  """Trains; returns the summary written to <workdir>/summary.json."""
  apply_demo_defaults()
  _check_flags()
  if _COORDINATOR.value:
    init_distributed()
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  lock_workdir(workdir)
  algorithm = _algorithm()
  try:
    mesh = sharding.make_mesh(sharding.parse_mesh(_MESH.value))
    sharding.check_batch_size(_BATCH_SIZE.value, mesh)
  except ValueError as e:
    raise UserError(str(e)) from None

  primary = jax.process_index() == 0
  # Process 0 writes the demo data into the (shared) workdir; the other
  # processes then read it. On a fresh run every process trains the same
  # tokenizer; save_inputs keeps process 0's (and its reward statistics).
  with sharding.primary_first("dataset"):
    dataset = load_dataset(workdir, algorithm)
  arrays = dataset.arrays
  try:
    sharding.check_same_on_every_process(
        data.fingerprint(arrays) + dataset.tokenizer_fingerprint,
        "the tokenised training data")
  except ValueError as e:
    raise UserError(str(e)) from None
  if _BATCH_SIZE.value > len(arrays["inputs"]):
    raise UserError(f"--batch_size={_BATCH_SIZE.value} exceeds the "
                    f"{len(arrays['inputs'])} training examples.")
  rng = jax.random.PRNGKey(_SEED.value)
  init_rng, value_rng, train_rng = jax.random.split(rng, 3)
  model_config, policy_params = model_config_and_params(dataset.tokenizer,
                                                        init_rng)
  save_inputs(workdir, dataset)   # every input is checked
  if _SFT_STEPS.value and algorithm.algo in ("dro_v", "kto"):
    policy_params = sft_warm_start(workdir, model_config, policy_params,
                                   arrays, jax.random.fold_in(init_rng, 1),
                                   mesh)
  initial_params = jax.tree.map(jnp.copy, policy_params)
  if primary:
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
    with sharding.primary_first("reference_cache"):
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
  # Every process saves and restores its shards of the checkpoints (Orbax);
  # only process 0 writes the metrics and the summary.
  writer = metrics_lib.MetricsWriter(workdir) if primary else None
  start = 0
  if checkpointer.latest_step() is not None:
    state, extra, start = restore(checkpointer, state)
    state = jax.device_put(state, state_shardings)
    try:
      iterator.set_state(extra["data"])
    except ValueError as e:
      raise UserError(
          f"cannot resume from {checkpointer.directory}/{start}: {e} Here: "
          "rerun with the --train_data and --seed of the run that wrote it, "
          "or use a new --workdir.") from None
    tqdm.write(f"Resumed from step {start} of {workdir}")
  if writer is not None:
    # Forget what a killed run logged after its last checkpoint (all of it
    # when it had none): those steps are trained again.
    writer.truncate_after(start)

  update = jax.jit(trainer.update, donate_argnums=0)
  batch_sharding = sharding.batch_sharding(mesh)
  # The update donates the state's buffers: the online reference keeps a copy.
  online_ref = None if ref is not None else (ref_fn, initial_params, outputs)
  summary, state = train_loop(state, update, iterator, batch_sharding,
                              checkpointer, writer, online_ref)
  if writer is not None:
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
                                    sharding.to_host(state.policy_params),
                                    dataset.tokenizer)}
  if not primary:
    return summary
  fileio.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
  metrics_lib.plot_curves(os.path.join(workdir, "metrics.jsonl"),
                          os.path.join(workdir, "training_curves.png"))
  if _SELECT_BEST.value:
    summary["best_checkpoint"] = select_best(workdir)
    fileio.atomic_write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def restore(checkpointer: checkpointing.Checkpointer, template):
  """The newest readable checkpoint, its problems turned into user errors."""
  try:
    return checkpointer.restore(template)
  except checkpointing.TemplateMismatchError as e:
    raise UserError(
        f"{e}. The checkpoints were written by a run with other flags (model, "
        "algorithm, value network...): rerun with that run's flags (see "
        "run_config.json beside them), or use a new --workdir.") from None
  except checkpointing.CorruptCheckpointError as e:
    raise UserError(
        f"{e}. Restore the checkpoints from a copy, or move "
        f"{checkpointer.directory} away to start training again.") from None


def select_best(workdir: str) -> dict:
  """Runs dro_fast.evaluate --best_checkpoint on this run; returns its record.

  A subprocess: the evaluator has flags of its own (--batch_size, --seed...)
  that would clash with the trainer's in one process.
  """
  extra = list(_EVAL_FLAGS.value)
  if not any(f.startswith(("--folds", "--prompts_per_fold")) for f in extra):
    extra += ["--folds=1", "--prompts_per_fold=200"]
  command = [sys.executable, "-m", "dro_fast.evaluation",
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
  """An exclusive flock on <workdir>/.lock: one trainer per workdir.

  In a multi-process run process 0 holds .lock and process i .lock.i, so a
  second run is refused by every process and a run's own processes (sharing
  the workdir) do not refuse each other.
  """
  global _LOCK
  index = jax.process_index()
  path = os.path.join(workdir, f".lock.{index}" if index else ".lock")
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
    init = {"kind": "sft_init", "steps": _SFT_STEPS.value,
            "learning_rate": _sft_lr()}
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
  progress = tqdm(total=train_steps, initial=start,
                  disable=None if jax.process_index() == 0 else True,
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
    batch = sharding.global_batch(batch, batch_sharding)
    state, step_metrics = update(state, batch)
    window_steps += 1
    done = step + 1
    if done % _LOG_EVERY.value == 0 or done == train_steps:
      # The only host synchronisation: fetching the metrics to log them.
      host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      elapsed = time.perf_counter() - window_start
      host.update(examples_per_s=window_steps * _BATCH_SIZE.value / elapsed,
                  tokens_per_s=window_tokens / elapsed)
      if writer is not None:
        writer.write(done, host)
      last_metrics = host
      if host["consecutive_bad_steps"] >= _MAX_BAD_STEPS.value:
        bad = int(host["consecutive_bad_steps"])
        newest = checkpointer.latest_step()
        saved = ("no checkpoint was saved" if newest is None else
                 f"the checkpoints in {checkpointer.directory} (newest: step "
                 f"{newest}) hold finite parameters, but they may already "
                 "have diverged")
        raise UserError(
            f"stopping at step {done}: the last {bad} updates had a "
            f"non-finite loss or gradient and were skipped (--max_bad_steps="
            f"{_MAX_BAD_STEPS.value}). Skipped updates change nothing, and "
            f"{saved}. Lower --policy_lr / --value_lr, set --clip_grad_norm, "
            "or check the data for extreme rewards, then start again in a "
            "new --workdir (or delete the newer checkpoints to resume from "
            "an older one).")
      progress.set_postfix(loss=f"{host['loss']:.4f}")
      window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
    if done % _CHECKPOINT_EVERY.value == 0 or done == train_steps:
      try:
        checkpointer.save(done, state, {"data": iterator.get_state()})
      except ValueError as e:     # non-finite parameters, a step taken
        raise UserError(f"cannot save the checkpoint of step {done}: "
                        f"{e}") from None
    progress.update(1)
  progress.close()
  if not last_metrics:           # resumed at or past the last step
    last_metrics = (metrics_lib.read_metrics(
        os.path.join(_WORKDIR.value, "metrics.jsonl")) or [{}])[-1]
  return {"final_step": int(state.step), "final_metrics": last_metrics,
          "policy_params_sha256": metrics_lib.params_digest(
              sharding.to_host(state.policy_params))}, state


def _user_error(message: str) -> None:
  """Prints `message` as the CLI's one error line(s) and exits with 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, its errors reported as user errors (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    hint = ("Run `python -m dro_fast.train --helpfull` to list the flags and "
            "their values.")
    if "flagfile" in str(e):
      hint = ("Check the --flagfile path (configs/ holds one flagfile per "
              "model size, e.g. --flagfile=configs/tiny.flags).")
    _user_error(f"{e}. {hint}")


def main(argv):
  if len(argv) > 1:
    _user_error(f"unexpected arguments {argv[1:]}: every setting is a flag, "
                "e.g. --train_data=FILE. Run `python -m dro_fast.train "
                "--helpfull` to list them.")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every save at INFO; progress shows on the tqdm bar instead.
    logging.set_verbosity(logging.WARNING)
  if _KEEP_HOST_MEMORY.value and runtime.cpu_only_jax():
    how = runtime.keep_freed_host_memory()
    if how != "kept":
      logging.info("--keep_freed_host_memory: %s", how)
  try:
    summary = run()
  except (UserError, data.DataError) as e:
    _user_error(str(e))
  print(json.dumps({k: summary[k] for k in ("final_step", "final_metrics",
                                            "policy_params_sha256",
                                            "demo_reward", "best_checkpoint") if k in summary},
                   indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
