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
  """(policy parameters of checkpoint `step` (None: the newest), its step)."""
  run = read_run_config(workdir)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), ITEMS)
  items, _, step = checkpointer.restore(
      {POLICY: _policy_template(_params_config(run))}, step)
  return items[POLICY], step


def load_initial_policy(workdir: str):
  """The run's initial (SFT) policy.

  Its init_checkpoint, its SFT warm start, or its seeded random
  initialisation.
  """
  run = read_run_config(workdir)
  config = _params_config(run)
  if run.init_checkpoint:
    _, params = pretrained.load(run.init_checkpoint)
    return init.pretrained_params(params, config)
  if run.sft_warm_start:
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "sft_init"), (POLICY,))
    return checkpointer.restore({POLICY: _policy_template(config)}
                                )[0][POLICY]
  return init.init_params(config, None, jax.random.PRNGKey(run.seed))[0]
