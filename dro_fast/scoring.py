"""log π(y | x) of a policy, as the trainer computes its reference log-probs.

  import dro_fast
  logps = dro_fast.score("hf:/models/qwen3-0.6b", prompts, completions)

`score` reads a policy (`resolve`), tokenises each (prompt, completion) with
the policy's tokenizer through the pipeline's protocol (encode_prompts /
encode_completions: a string as it is, a TRL message list through the chat
template as TRL tokenises it) and returns Σ_t log π(y_t | x, y_<t) over the
completion's tokens, float32 [N], from
dro_fast.training.steps.reference_logprob_fn: the same jitted function, and
so the same numbers, as the trainer's reference log-probs for the same
model, tokenizer and lengths.

A policy spec (shared with the evaluation CLI) is
  * `hf:DIR`, or a directory holding config.json and no run_config.json:
    a Hugging Face checkpoint (T5 or a decoder-only family that
    models.pretrained reads), tokenised with the folder's own tokenizer;
  * WORKDIR, WORKDIR:STEP or WORKDIR:init: a dro_fast training run's
    newest, given or initial policy, with the run's tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import os
from typing import Any, NamedTuple

import numpy as np

from dro_fast import hf_tokenizer
from dro_fast import kernels
from dro_fast import models
from dro_fast.models import pretrained
from dro_fast.tokenizer import Tokenizer
from dro_fast.training import runs
from dro_fast.training import steps
from dro_fast.training.run_config import RunConfig

HF_PREFIX = "hf:"
# Lengths measured per batch (max_*_length None) round up to a power of two
# of at least this, so that few shapes compile; no row may exceed _MAX_LENGTH.
_MIN_BUCKET = 16
_MAX_LENGTH = 1 << 15


class Policy(NamedTuple):
  """A policy read back for decoding or scoring.

  name: the spec with the step it resolved to ("run:120", "hf:DIR").
  config: its model configuration for the platform it runs on (T5Config or
    DecoderConfig; attention "xla").
  params: its parameters, in config's layout.
  tokenizer: its tokenizer (dro_fast.tokenizer.Tokenizer for T5,
    hf_tokenizer.HFTokenizer for decoder-only models).
  run: the training run it comes from; None for a Hugging Face folder.
  """
  name: str
  config: Any
  params: Any
  tokenizer: Any
  run: RunConfig | None


def parse_spec(spec: str) -> tuple[str, str, str | int | None]:
  """(kind, path, which): kind "hf" or "run"; which None, "init" or a step.

  "hf:DIR" and directories with config.json but no run_config.json are
  Hugging Face folders; "dir:120" -> ("run", dir, 120); "dir:init".
  """
  if spec.startswith(HF_PREFIX):
    return "hf", spec[len(HF_PREFIX):], None
  workdir, sep, which = spec.rpartition(":")
  if sep and (which == "init" or which.isdigit()):
    return "run", workdir, which if which == "init" else int(which)
  if (os.path.isfile(os.path.join(spec, "config.json"))
      and not os.path.isfile(os.path.join(spec, "run_config.json"))):
    return "hf", spec, None
  return "run", spec, None


def resolve(spec: str, platform: str | None = None) -> Policy:
  """The Policy of a spec, its model configured for `platform`.

  Args:
    spec: see the module docstring.
    platform: "cpu", "gpu" or "tpu"; None: JAX's default backend's.

  Raises:
    runs.RunError, pretrained.CheckpointError, FileNotFoundError,
    ValueError: a spec that does not name a readable policy.
  """
  platform = platform or kernels.target_platform()
  kind, path, which = parse_spec(spec)
  if kind == "hf":
    config, params = pretrained.load(path)
    config = runs.model_config(RunConfig(workdir=path, model=config),
                               platform)
    return Policy(f"{HF_PREFIX}{path}", config, params,
                  hf_folder_tokenizer(path, config), None)
  run = runs.read_run_config(path)
  if which == "init":
    params, name = runs.load_initial_policy(path), f"{path}:init"
  else:
    params, step = runs.load_policy(path, which)
    name = f"{path}:{step}"
  return Policy(name, runs.model_config(run, platform), params,
                runs.tokenizer(run, path), run)


def hf_folder_tokenizer(path: str, config) -> Any:
  """A Hugging Face folder's own tokenizer for its model."""
  if isinstance(config, models.T5Config):
    return Tokenizer.load(os.path.join(path, "spiece.model"))
  return hf_tokenizer.HFTokenizer.load(path)


def as_example(value: str | Sequence[Mapping[str, str]]):
  """A prompt or completion as the tokenizer protocol takes it.

  A string stays; a TRL message list becomes a tuple of messages.
  """
  if isinstance(value, str):
    return value
  return tuple(dict(message) for message in value)


def encode(tokenizer, prompts: Sequence[Any], completions: Sequence[Any],
           max_input_length: int | None, max_target_length: int | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs [B, S], targets [B, T], target mask [B, T]) of a batch.

  A length None: as long as the batch's longest row, rounded up to a power
  of two (at least 16), without truncation.
  """
  inputs, _ = _encode(tokenizer.encode_prompts, (prompts,), max_input_length,
                      "max_input_length")
  targets, mask = _encode(tokenizer.encode_completions,
                          (prompts, completions), max_target_length,
                          "max_target_length")
  return inputs, targets, mask


def _encode(encode_fn, args, max_length, name):
  if max_length is not None:
    return encode_fn(*args, max_length)
  ids, mask = encode_fn(*args, _MAX_LENGTH)
  if mask[:, -1].any():
    raise ValueError(f"a row is longer than {_MAX_LENGTH} tokens; give "
                     f"{name} to truncate it.")
  longest = int(mask.sum(axis=1).max(initial=1))
  width = max(_MIN_BUCKET, 1 << (longest - 1).bit_length())
  return ids[:, :width], mask[:, :width]


def score(policy: str | os.PathLike,
          prompts: Sequence[str | Sequence[Mapping[str, str]]],
          completions: Sequence[str | Sequence[Mapping[str, str]]], *,
          batch_size: int = 8, max_input_length: int | None = None,
          max_target_length: int | None = None,
          platform: str | None = None) -> np.ndarray:
  """log π(completion | prompt), summed over the completion's tokens.

  Args:
    policy: a policy spec (module docstring): "hf:DIR", a Hugging Face
      folder, WORKDIR, WORKDIR:STEP or WORKDIR:init.
    prompts: N prompts: strings or TRL message lists
      ([{"role": ..., "content": ...}, ...]).
    completions: N completions, of the same kind as their prompts.
    batch_size: rows per forward; the last batch is padded to it (one
      compilation).
    max_input_length, max_target_length: token budgets (prompts keep their
      end for decoder-only models, completions their start); None: a run's
      own (data.max_input_length / max_target_length), no truncation for a
      Hugging Face folder.
    platform: where it runs, "cpu", "gpu" or "tpu"; None: JAX's default.

  Returns:
    float32 [N].

  Raises:
    ValueError: mismatched lengths or a bad batch_size; what resolve
      raises for a bad spec.
  """
  if len(prompts) != len(completions):
    raise ValueError(f"prompts has {len(prompts)} rows and completions "
                     f"{len(completions)}; give one completion per prompt.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  resolved = resolve(os.fspath(policy), platform)
  if resolved.run is not None:
    if max_input_length is None:
      max_input_length = resolved.run.data.max_input_length
    if max_target_length is None:
      max_target_length = resolved.run.data.max_target_length
  logprob_fn = steps.reference_logprob_fn(resolved.config, None)
  prompts = [as_example(p) for p in prompts]
  completions = [as_example(c) for c in completions]
  out = np.zeros(len(prompts), np.float32)
  for start in range(0, len(prompts), batch_size):
    stop = min(start + batch_size, len(prompts))
    fill = [start] * (batch_size - (stop - start))   # repeats, dropped
    rows = list(range(start, stop)) + fill
    inputs, targets, mask = encode(
        resolved.tokenizer, [prompts[i] for i in rows],
        [completions[i] for i in rows], max_input_length, max_target_length)
    logps = logprob_fn(resolved.params, inputs, targets, mask)
    out[start:stop] = np.asarray(logps, np.float32)[:stop - start]
  return out
