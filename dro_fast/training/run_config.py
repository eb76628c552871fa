"""RunConfig: everything a training run is, frozen; run_config.json is its JSON.

`python -m dro_fast.train` builds one from its flags in main() and hands it
to the library (training.loop.train); the trainer writes it to
<workdir>/run_config.json (`to_json`), and training.runs reads it back
(`load` / `from_json`) to restore a run's policies without its flags.

A leaf: it imports only the other configs. Field names are the trainer's
flag names where there is one; validation errors name fields in backquotes
(`batch_size`), which the CLI rewrites as its flags. Before the data is read, `model` is the preset (or the overrides for an
--init_checkpoint) built from the flags; the trainer replaces it with the
policy's final config (vocabulary, checkpoint architecture) before it writes
run_config.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any

from dro_fast.data.config import DataConfig
from dro_fast.models.config import preset
from dro_fast.models.config import T5Config
from dro_fast.models.decoder_config import DecoderConfig
from dro_fast.training.config import AlgorithmConfig
from dro_fast.training.config import OptimizerConfig

REF_LOGPROBS = ("cached", "online")
# Fields of the policy's config that the run sets on an --init_checkpoint's
# own config (the rest, the architecture, comes from the checkpoint), where
# the config has them (a DecoderConfig has no dropout).
MODEL_OVERRIDES = ("dtype", "remat", "attention", "dropout_rate",
                   "scan_layers", "matmul", "attention_interpret", "lora")
# Fields that earlier versions wrote into run_config.json and that are now
# decided where a run is loaded ({config: fields}): T5Config.platform, whose
# choices dro_fast.backend.resolve now records as the model's `matmul` and
# `attention_interpret`. They are read and dropped.
LEGACY_FIELDS = {"model": ("platform",)}


class RunConfigError(ValueError):
  """A run_config.json that cannot be read; the message names file and field."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A training run.

  Attributes:
    workdir: the run's folder (checkpoints, metrics, summary...).
    data: what is trained on (DataConfig).
    model: the policy's T5Config, or DecoderConfig for a decoder-only LLM
      (see the module docstring).
    algorithm: what is optimised (AlgorithmConfig; its `implementation` is
      the dro_fast.kernels implementation, named by dro_fast.backend.resolve
      unless given; whether it imports on this host is the trainer's
      check).
    policy_optimizer: the policy's OptimizerConfig.
    value_optimizer: the value network's OptimizerConfig (DRO-V).
    init_checkpoint: the SFT policy, a T5X or Hugging Face checkpoint
      directory; None: random weights.
    value_model: a separate value network's own DecoderConfig, from
      value_init_checkpoint; None: the policy's architecture.
    value_init_checkpoint: a Hugging Face folder whose trunk starts the
      separate value network (e.g. a 1B model of the policy's tokenizer
      valuing an 8B policy); None: a copy of the initial policy.
    sft_steps: SFT steps on the training completions before the main
      algorithm (dro_v, kto) when there is no init_checkpoint.
    sft_lr: the SFT warm start's learning rate; None: the policy's.
    batch_size: global batch size.
    train_steps: steps to train.
    seed: seed of initialisation, shuffling and dropout.
    ref_logprobs: "cached" (computed once, on disk) or "online".
    ref_cache_dir: the reference log-prob cache; None: <workdir>/ref_cache.
    checkpoint_every: steps between checkpoints.
    keep_checkpoints: checkpoints kept.
    async_checkpoints: write checkpoints in the background while training
      goes on (Orbax's asynchronous saving); None: undecided, which
      dro_fast.backend.resolve turns into True unless the run compiles for
      the CPU (there the writing threads compete with the step:
      benchmarks/RESULTS.md#asynchronous-checkpoints); the trainer takes
      only a decided run.
    log_every: steps between logged metrics.
    max_bad_steps: stop after this many consecutive skipped updates.
    mesh: device mesh, e.g. "data:4,fsdp:2"; "": all devices on data.
    select_best: judge every kept checkpoint against the initial policy
      after training (python -m dro_fast.evaluation --best_checkpoint).
    eval_flags: flags passed on to the evaluator by select_best.
  """

  workdir: str
  data: DataConfig = DataConfig()
  model: T5Config | DecoderConfig = preset("tiny")
  algorithm: AlgorithmConfig = AlgorithmConfig()
  policy_optimizer: OptimizerConfig = OptimizerConfig()
  value_optimizer: OptimizerConfig = OptimizerConfig()
  init_checkpoint: str | None = None
  value_model: DecoderConfig | None = None
  value_init_checkpoint: str | None = None
  sft_steps: int = 0
  sft_lr: float | None = None
  batch_size: int = 32
  train_steps: int = 40000
  seed: int = 0
  ref_logprobs: str = "cached"
  ref_cache_dir: str | None = None
  checkpoint_every: int = 2000
  keep_checkpoints: int = 3
  async_checkpoints: bool | None = None
  log_every: int = 100
  max_bad_steps: int = 10
  mesh: str = ""
  select_best: bool = False
  eval_flags: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "eval_flags", tuple(self.eval_flags))
    for name, least in (("batch_size", 1), ("train_steps", 1),
                        ("log_every", 1), ("checkpoint_every", 1),
                        ("keep_checkpoints", 1), ("max_bad_steps", 1),
                        ("seed", 0), ("sft_steps", 0)):
      if getattr(self, name) < least:
        raise ValueError(f"`{name}` must be >= {least}, got "
                         f"{getattr(self, name)}.")
    if self.sft_lr is not None and not self.sft_lr > 0:
      raise ValueError(f"`sft_lr` must be > 0, got {self.sft_lr}.")
    dropout = getattr(self.model, "dropout_rate", 0.0)
    if not 0 <= dropout < 1:
      raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout}.")
    if self.value_init_checkpoint and (self.algorithm.value_net != "separate"
                                       or not self.algorithm.has_value):
      raise ValueError(
          "`value_init_checkpoint` starts a separate value network, which "
          f"`algo`={self.algorithm.algo} with `value_net`="
          f"{self.algorithm.value_net} does not train: drop it, or use "
          "`algo`=dro_v with `value_net`=separate.")
    if self.ref_logprobs not in REF_LOGPROBS:
      raise ValueError(f"`ref_logprobs`={self.ref_logprobs} is not one of "
                       f"{', '.join(REF_LOGPROBS)}.")
    odd = [f"`{name}`={getattr(self.data, name)}" for name in
           ("max_input_length", "max_target_length")
           if getattr(self.data, name) % 2]
    if self.model.attention == "cudnn" and odd:
      raise ValueError("`attention`=cudnn needs even sequence lengths, not "
                       f"{' and '.join(odd)}. Or use `attention`=xla.")
    if (self.sft_steps and self.init_checkpoint
        and self.algorithm.algo in ("dro_v", "kto")):
      raise ValueError(
          f"`sft_steps`={self.sft_steps} fine-tunes a policy from scratch, "
          "but `init_checkpoint` is already the SFT policy: leave `sft_steps` "
          "at 0, or drop `init_checkpoint`.")

  @property
  def sft_warm_start(self) -> bool:
    """Whether the run fine-tunes its initial policy first (sft_init/)."""
    return bool(self.sft_steps) and self.algorithm.algo in ("dro_v", "kto")

  @property
  def sft_optimizer(self) -> OptimizerConfig:
    """The SFT warm start's optimizer: the policy's, without clipping.

    Its learning rate is sft_lr where that is set.
    """
    return dataclasses.replace(
        self.policy_optimizer, clip_norm=None,
        learning_rate=self.sft_lr or self.policy_optimizer.learning_rate)

  def tokenizer_path(self, workdir: str | None = None) -> str:
    """The run's tokenizer: data.tokenizer, else `workdir`'s spiece.model."""
    return self.data.tokenizer or os.path.join(workdir or self.workdir,
                                               "spiece.model")

  def replace(self, **changes) -> RunConfig:
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    """The run as JSON (run_config.json); from_json reads it back equal."""
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, source: str = "run_config.json"
                ) -> RunConfig:
    """Reads to_json's output.

    Args:
      text: the JSON text.
      source: the file it came from, for error messages.

    Raises:
      RunConfigError: invalid JSON, a missing, unknown or mistyped field, or
        a value its config refuses; the message names `source` and the
        field.
    """
    try:
      value = json.loads(text)
    except json.JSONDecodeError as e:
      raise RunConfigError(f"{source}: invalid JSON ({e}).") from None
    if isinstance(value, dict):
      for name, legacy in LEGACY_FIELDS.items():
        if isinstance(value.get(name), dict):
          value[name] = {k: v for k, v in value[name].items()
                         if k not in legacy}
    return _build(cls, value, source, "")

  @classmethod
  def load(cls, path: str) -> RunConfig:
    """Reads a run_config.json (see from_json)."""
    with open(path) as f:
      return cls.from_json(f.read(), path)


def _build(cls: type, value: Any, source: str, where: str) -> Any:
  """A `cls` dataclass from the dict `value`, its fields checked by name."""
  if not isinstance(value, dict):
    raise RunConfigError(f"{source}: {where.rstrip('.') or 'the file'} must "
                         "be a JSON "
                         f"object, got {type(value).__name__}. Rewrite it, "
                         "or rerun the training that wrote it.")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(value.keys() - fields.keys())
  if unknown:
    raise RunConfigError(f"{source}: unknown field {where}{unknown[0]!r}; "
                         f"{cls.__name__} has {', '.join(sorted(fields))}.")
  missing = sorted(name for name, f in fields.items() if name not in value
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING)
  if missing:
    raise RunConfigError(f"{source}: field {where}{missing[0]!r} is missing.")
  kwargs = {}
  for name, item in value.items():
    hint = _config_class(hints[name], item)
    if dataclasses.is_dataclass(hint):
      kwargs[name] = _build(hint, item, source, f"{where}{name}.")
    else:
      kwargs[name] = _check_type(item, hint, source, f"{where}{name}")
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise RunConfigError(f"{source}: {where.rstrip('.') or cls.__name__}: "
                         f"{e}") from None


def _tuples(item: list) -> tuple:
  """A JSON list as a tuple, nested lists too (configs are hashable)."""
  return tuple(_tuples(x) if isinstance(x, list) else x for x in item)


def _config_class(hint: Any, item: Any) -> Any:
  """The config class a field's JSON object is, for a union of configs.

  A model is a DecoderConfig when it names its `family`, else a T5Config;
  an optional config (`X | None`) is X. Any other hint is returned as it
  is.
  """
  options = [option for option in typing.get_args(hint)
             if option in (T5Config, DecoderConfig)] if isinstance(
                 hint, types.UnionType) else []
  if not options and isinstance(item, dict) and isinstance(
      hint, types.UnionType):
    # An optional config of one class (a model's `lora`).
    options = [option for option in typing.get_args(hint)
               if dataclasses.is_dataclass(option)]
  if not options or item is None:
    return hint
  if not isinstance(item, dict):
    return options[0]        # _build says it must be an object
  if DecoderConfig in options and (len(options) == 1 or "family" in item):
    return DecoderConfig
  return options[0]


def _check_type(item: Any, hint: Any, source: str, name: str) -> Any:
  """`item` as the field's type (lists become tuples); raises if it is not."""
  options = typing.get_args(hint) if isinstance(
      hint, types.UnionType) else (hint,)
  for option in options:
    if option is type(None) and item is None:
      return None
    origin = typing.get_origin(option) or option
    if origin is tuple and isinstance(item, list):
      return _tuples(item)
    if option is float and isinstance(item, int) and not isinstance(
        item, bool):
      return float(item)
    if origin in (int, float) and isinstance(item, bool):
      continue
    if isinstance(origin, type) and isinstance(item, origin):
      return item
  expected = getattr(hint, "__name__", None) or str(hint)
  raise RunConfigError(f"{source}: field {name!r} is {item!r}, not "
                       f"{expected}.")
