r"""The export CLI: a trained policy as a Hugging Face transformers folder.

  python -m dro_fast.export WORKDIR[:STEP] OUT_DIR [--dtype=bfloat16]
      [--max_shard_bytes=1073741824] [--overwrite] [--peft]

WORKDIR is a dro_fast.train run; without STEP its newest checkpoint is
exported, WORKDIR:init exports the run's initial (SFT) policy. OUT_DIR gets
what transformers' from_pretrained loads: config.json,
generation_config.json, the weights as save_pretrained writes them
(model.safetensors, or model-0000k-of-0000n.safetensors with
model.safetensors.index.json past --max_shard_bytes) and the tokenizer
files (T5: spiece.model and tokenizer_config.json for T5Tokenizer). A T5
policy loads as T5ForConditionalGeneration (models.hf_t5), a decoder-only
one as its family's causal LM (models.hf_decoder). A LoRA run's policy is
exported merged (W + scale · A B), or with --peft as a PEFT adapter folder
(adapter_config.json, adapter_model.safetensors) for
peft.PeftModel.from_pretrained on its base (models.hf_peft).

The folder appears whole or not at all: it is written beside OUT_DIR and
renamed into place at the end (models.hf_files.staged_directory). An
OUT_DIR that exists and is not empty is refused unless --overwrite. Bad
input (no run, no checkpoint, a missing step, a non-empty OUT_DIR) is one
line on stderr and exit status 2, with nothing written.

Only the policy parameters are read (training.runs), never the optimizer
states; no trainer is built.
"""

from __future__ import annotations

import os
import shutil

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from dro_fast import cli
from dro_fast import fileio
from dro_fast import models
from dro_fast import runtime
from dro_fast.evaluation import evaluate
from dro_fast.models import hf_files
from dro_fast.models import hf_t5
from dro_fast.models import lora
from dro_fast.models import pretrained
from dro_fast.training import checkpointing
from dro_fast.training import runs

def _define_flags() -> None:
  """The CLI's flags, defined when it runs, not when a library imports it
  (export() is called from other programs, which have flags of their own)."""
  flags.DEFINE_enum(
      "dtype", None, list(hf_t5.DTYPES), "The weights' dtype in OUT_DIR "
      "(default: the parameters' own, float32 for T5).")
  flags.DEFINE_integer(
      "max_shard_bytes", 2**30, "The most tensor bytes in one safetensors "
      "file; past it the weights are sharded with an index.", lower_bound=1)
  flags.DEFINE_boolean(
      "overwrite", False, "Replace an OUT_DIR that exists and is not empty.")
  flags.DEFINE_boolean(
      "peft", False, "A LoRA run's adapters as a PEFT adapter folder "
      "(adapter_config.json, adapter_model.safetensors) for "
      "peft.PeftModel.from_pretrained on its base model, instead of the "
      "merged weights.")

USAGE = ("usage: python -m dro_fast.export WORKDIR[:STEP] OUT_DIR "
         "[--dtype=bfloat16] [--max_shard_bytes=N] [--overwrite] [--peft]")

# Tokenizer files of a Hugging Face tokenizer folder, copied as they are.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "tokenizer.model",
                       "added_tokens.json", "chat_template.jinja",
                       "vocab.json", "merges.txt")


# A user error: printed as one line, exit status 2.
ExportError = hf_files.ExportError


def parse_source(spec: str) -> tuple[str, int | str | None]:
  """WORKDIR -> (WORKDIR, None); WORKDIR:STEP; WORKDIR:init."""
  return evaluate.parse_policy(spec)


def _steps(workdir: str) -> list[int]:
  """The run's checkpoint steps; reading them creates no folder."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return []
  return runs.checkpoint_steps(workdir)


def load(spec: str):
  """(run, params as numpy, description) of WORKDIR[:STEP|:init].

  Raises:
    ExportError: no run there, no checkpoint, or no checkpoint at STEP
      (naming the steps there are).
  """
  workdir, which = parse_source(spec)
  run = runs.read_run_config(workdir)
  if which == "init":
    params, described = runs.load_initial_policy(workdir), f"{workdir}:init"
  else:
    steps = _steps(workdir)
    if not steps:
      raise ExportError(
          f"{workdir} has no checkpoints (in {workdir}/checkpoints): train "
          f"first, or export the initial policy as {workdir}:init.")
    if which is not None and which not in steps:
      raise ExportError(f"{workdir} has no checkpoint for step {which}; it "
                        f"has steps {steps}.")
    params, step = runs.load_policy(workdir, which)
    described = f"{workdir}:{step}"
  return run, jax.tree.map(np.asarray, jax.device_get(params)), described


def _copy_tokenizer_folder(source: str, out_dir: str) -> None:
  """A Hugging Face tokenizer's files (source: its folder, or a file in it)."""
  folder = source if os.path.isdir(source) else os.path.dirname(source)
  found = [name for name in _HF_TOKENIZER_FILES
           if os.path.isfile(os.path.join(folder, name))]
  if not found:
    names = ", ".join(_HF_TOKENIZER_FILES[:4])
    raise ExportError(f"{source}: no tokenizer files ({names}, ...) to "
                      "export beside the model.")
  for name in found:
    shutil.copyfile(os.path.join(folder, name), os.path.join(out_dir, name))


def _writer(run, params, workdir: str, spec: str, *, dtype: str | None,
            max_shard_bytes: int, peft: bool = False):
  """write(folder) for the run's model family, its inputs checked first."""
  config = run.model
  if peft:
    if config.lora is None:
      raise ExportError(f"{spec} trained every parameter (its model has no "
                        "`lora`): there are no adapters to export; drop "
                        "`peft`.")
    from dro_fast.models import hf_peft  # pylint: disable=g-import-not-at-top
    base = run.init_checkpoint or f"{workdir}:init"
    return lambda folder: hf_peft.export_peft_adapters(config, params,
                                                       folder, base)
  if config.lora is not None:
    # The adapted model as plain float32 weights (W + scale · A B; the
    # frozen base's bfloat16 values exactly).
    params = jax.tree.map(lambda x: np.asarray(x, np.float32),
                          lora.merge(params, config.lora))
    config = config.replace(lora=None)
  if isinstance(config, models.T5Config):
    try:
      tokenizer = runs.tokenizer(run, workdir)
    except (FileNotFoundError, ValueError) as e:
      raise ExportError(f"the run's tokenizer "
                        f"{run.tokenizer_path(workdir)}: {e}") from None
    return lambda folder: hf_t5.export_hf_t5(
        config, params, folder, tokenizer=tokenizer,
        max_shard_bytes=max_shard_bytes, dtype=dtype)
  # Decoder-only policies (models.DecoderConfig); imported here so that a
  # T5 export needs none of it.
  from dro_fast.models import hf_decoder  # pylint: disable=g-import-not-at-top
  if not isinstance(config, models.DecoderConfig):
    raise ExportError(f"{spec}: a {type(config).__name__} policy; dro_fast "
                      "exports T5Config and DecoderConfig ones.")

  def write(folder):
    hf_decoder.export_hf_decoder(config, params, folder,
                                 max_shard_bytes=max_shard_bytes, dtype=dtype)
    _copy_tokenizer_folder(run.tokenizer_path(workdir), folder)
    # The source model's sampling defaults and end-of-turn ids (Qwen lists
    # two EOS ids) rather than those config.json alone implies.
    source = run.init_checkpoint and os.path.join(run.init_checkpoint,
                                                  "generation_config.json")
    if source and os.path.isfile(source):
      shutil.copyfile(source, os.path.join(folder, "generation_config.json"))
  return write


def export(spec: str, out_dir: str, *, dtype: str | None = None,
           max_shard_bytes: int = 2**30, overwrite: bool = False,
           peft: bool = False) -> dict:
  """Writes the policy `spec` (WORKDIR[:STEP|:init]) as an HF folder.

  A LoRA run's policy is written with its adapters merged into the
  weights, or with `peft` as a PEFT adapter folder (models.hf_peft).

  Returns:
    {"source": WORKDIR:STEP, "out_dir", "files": names written,
    "weight_bytes": the safetensors files' size}.

  Raises:
    ExportError, runs.RunError: bad input; nothing is written.
  """
  workdir = parse_source(spec)[0]
  target = os.path.abspath(out_dir)
  inside = os.path.abspath(workdir)
  if inside == target or inside.startswith(target + os.sep):
    raise ExportError(f"{out_dir} holds the run {workdir} itself; name a "
                      "folder outside the workdir.")
  hf_files.check_out_dir(out_dir, overwrite)     # before the slow reads
  run, params, described = load(spec)
  write = _writer(run, params, workdir, spec, dtype=dtype,
                  max_shard_bytes=max_shard_bytes, peft=peft)
  with hf_files.staged_directory(out_dir, overwrite) as staging:
    write(staging)
    files = sorted(os.listdir(staging))
    weight_bytes = sum(os.path.getsize(os.path.join(staging, name))
                       for name in files if name.endswith(".safetensors"))
  return {"source": described, "out_dir": target, "files": files,
          "weight_bytes": weight_bytes}


def main(argv):
  if len(argv) != 3:
    cli.user_error(f"expected two arguments, WORKDIR[:STEP] and OUT_DIR; "
                   f"got {argv[1:]}. {USAGE}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cli.speak_in_flags(flags.FLAGS)
  runtime.hide_absent_tpu()
  spec, out_dir = argv[1], argv[2]
  try:
    result = export(spec, out_dir, dtype=flags.FLAGS.dtype,
                    max_shard_bytes=flags.FLAGS.max_shard_bytes,
                    overwrite=flags.FLAGS.overwrite,
                    peft=flags.FLAGS.peft)
  except (ExportError, runs.RunError,
          pretrained.CheckpointError, checkpointing.CorruptCheckpointError,
          checkpointing.TemplateMismatchError) as e:
    cli.user_error(cli.flag_terms(str(e), flags.FLAGS))
  except fileio.WriteError as e:
    cli.user_error(str(e), e.exit_code)
  except OSError as e:
    line = cli.refusal(e, "Nothing was exported.")
    if line is None:
      raise
    cli.user_error(line)
  weights = sum(name.endswith(".safetensors") for name in result["files"])
  print(f"exported {result['source']} to {result['out_dir']}: {weights} "
        f"safetensors file{'s' if weights > 1 else ''}, "
        f"{result['weight_bytes'] / 2**20:.1f} MiB of weights, "
        f"{len(result['files'])} files.")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, its errors as user errors (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    cli.user_error(f"{e}. {USAGE}")


def run() -> None:
  """The `dro-fast-export` console script (and `python -m dro_fast.export`)."""
  _define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
