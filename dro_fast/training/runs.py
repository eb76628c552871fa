"""Reading a training run back: its configuration and its policies.

The trainer writes <workdir>/run_config.json (RunConfig.to_json); from it,
any checkpoint's policy parameters (or the initial, SFT policy) are restored
without the flags that started the run. Only the policy is read: a
checkpoint's "policy" item, never its optimizer states, and no Trainer is
built.
"""

from __future__ import annotations

import os

import jax

from dro_fast import backend
from dro_fast import models
from dro_fast.models import lora
from dro_fast.models import pretrained
from dro_fast import hf_tokenizer
from dro_fast.tokenizer import DecoderOnlyTokenizer
from dro_fast.tokenizer import Tokenizer
from dro_fast.training import checkpointing
from dro_fast.training import init
from dro_fast.training.run_config import RunConfig
from dro_fast.training.run_config import RunConfigError

# Items of the trainer's checkpoints: the policy parameters, and the rest of
# the train state (value network, optimizer states, key, counters).
POLICY = "policy"
TRAIN_STATE = "train_state"
ITEMS = (POLICY, TRAIN_STATE)


class RunError(ValueError):
  """A workdir that cannot be read as a training run."""


def read_run_config(workdir: str) -> RunConfig:
  """The RunConfig in <workdir>/run_config.json."""
  path = os.path.join(workdir, "run_config.json")
  try:
    return RunConfig.load(path)
  except FileNotFoundError:
    raise RunError(f"{workdir}: no run_config.json; is this the `workdir` of "
                   f"a dro_fast.train run?") from None
  except RunConfigError as e:
    raise RunError(str(e)) from None


def model_config(run: RunConfig, platform: str) -> models.T5Config:
  """The run's T5Config for decoding on `platform`: attention "xla".

  Whatever the run trained with (cuDNN's fused attention is a choice of the
  training machine, and generation attends through the cache), its backend
  fields are decided anew for `platform` (dro_fast.backend.resolve), the
  platform the caller decodes on (kernels.target_platform()).
  """
  run = run.replace(model=run.model.replace(attention="xla"))
  return backend.resolve(run, platform).model


def tokenizer(run: RunConfig, workdir: str):
  """The run's tokenizer (its --tokenizer, or the one saved in `workdir`).

  In the run's batch layout: a Hugging Face folder's HFTokenizer, T5's
  Tokenizer, or for a decoder-only model trained with a SentencePiece model
  (tiny_decoder) that model as a DecoderOnlyTokenizer.
  """
  path = run.tokenizer_path(workdir)
  if os.path.isdir(path):
    return hf_tokenizer.HFTokenizer.load(path)
  tok = Tokenizer.load(path)
  tok.message_separator = run.data.message_separator
  return DecoderOnlyTokenizer(tok) if run.data.decoder_only else tok


def checkpoint_steps(workdir: str) -> list[int]:
  return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    ITEMS).all_steps()


def _params_config(run: RunConfig) -> models.T5Config:
  """The run's T5Config to build its parameters with on any host.

  Attention "xla" (the parameters are the same; a fused attention may not
  run here) and the recorded matmul form (plain JAX on every platform).
  """
  return run.model.replace(attention="xla")


def _policy_template(config: models.T5Config):
  """Shapes and dtypes of the policy parameters, allocating nothing."""
  return jax.eval_shape(
      lambda: init.init_params(config, None, jax.random.PRNGKey(0))[0])


def load_policy(workdir: str, step: int | None = None):
  """(policy parameters of checkpoint `step` (None: the newest), its step).

  A LoRA run's checkpoints hold its adapters: they come back with the
  run's base (load_initial_policy), as the whole adapted model.
  """
  run = read_run_config(workdir)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), ITEMS)
  template = _policy_template(_params_config(run))
  if run.model.lora is not None:
    template = lora.split(template)[0]
  items, _, step = checkpointer.restore({POLICY: template}, step)
  if run.model.lora is None:
    return items[POLICY], step
  base = lora.split(load_initial_policy(workdir))[1]
  return lora.combine(items[POLICY], base), step


def load_initial_policy(workdir: str):
  """The run's initial (SFT) policy.

  Its init_checkpoint, its SFT warm start, or its seeded random
  initialisation; for a LoRA run, with its initial adapters (equal to its
  base) and the base in LoraConfig.base_dtype, as the trainer starts.
  """
  run = read_run_config(workdir)
  config = _params_config(run)
  rng = jax.random.PRNGKey(run.seed)
  if run.init_checkpoint:
    _, params = pretrained.load(run.init_checkpoint)
    params = init.pretrained_params(params, config)
  elif run.sft_warm_start:
    # The warm start trains the whole model (a LoRA run's base).
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "sft_init"), (POLICY,))
    params = checkpointer.restore(
        {POLICY: _policy_template(config.replace(lora=None))})[0][POLICY]
  else:
    return init.init_params(config, None, rng)[0]
  if config.lora is None:
    return params
  # The adapters as the trainer drew them: lora_b zero, the base frozen.
  return init.init_params(config, None, rng, policy_params=params)[0]
