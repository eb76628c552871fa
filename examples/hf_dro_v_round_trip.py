r"""DRO-V from a Hugging Face LLM folder, exported, scored by transformers.

  python examples/hf_dro_v_round_trip.py --model=HF_DIR --data=ROWS.jsonl \
      [--steps=3] [--workdir=DIR] [--out=DIR] [--rows=2]

HF_DIR is a decoder-only causal LM folder of a family dro_fast reads (Llama
3, Qwen 2.5, Qwen 3, Gemma 3: config.json, safetensors weights, the
tokenizer and its chat template); ROWS.jsonl holds TRL unpaired rows
({"prompt", "completion", "label"}, conversational or plain). The script

  1. trains --steps DRO-V steps from HF_DIR through the library: the
     RunConfig that `python -m dro_fast.train --init_checkpoint=HF_DIR
     --train_data=ROWS.jsonl --data_format=unpaired` builds (the folder's
     config.json decides the architecture, its tokenizer and chat template
     the tokens), run by dro_fast.training.loop.train;
  2. exports the trained policy with dro_fast.export (the library form of
     `python -m dro_fast.export WORKDIR OUT`): a transformers folder;
  3. scores the first --rows rows twice: with transformers alone
     (AutoModelForCausalLM and AutoTokenizer from the export, tokenised by
     TRL's rule) and with dro_fast.score on the workdir, and prints both
     log π(y|x) and their difference.

TRL's rule (REFERENCE.md §9, dro_fast.hf_tokenizer): a conversational row's
prompt text is the chat template over the prompt with the generation
prompt; its completion text is the template over prompt + completion minus
the prompt text's characters; each is tokenised without special tokens (the
template writes them). A plain row's prompt is tokenised with the
tokenizer's special tokens, its completion without them, EOS appended.
log π(y|x) sums log-softmax over the completion's tokens.

Both sides run in float32; on a CPU they agree to about 1e-5 per row. The
scored rows must fit --max_input_length / --max_target_length, which the
training (and so dro_fast.score on the run) truncates to; a longer row is
refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np

import dro_fast
from dro_fast import backend
from dro_fast import export
from dro_fast import kernels
from dro_fast import models
from dro_fast import runtime
from dro_fast.data.config import DataConfig
from dro_fast.models import pretrained
from dro_fast.training import loop
from dro_fast.training.config import AlgorithmConfig
from dro_fast.training.config import OptimizerConfig
from dro_fast.training.run_config import RunConfig


@dataclasses.dataclass(frozen=True)
class Config:
  """The script's settings (its command-line flags, same names).

  model: the Hugging Face folder trained from (--init_checkpoint).
  data: TRL unpaired rows, JSON Lines (--train_data).
  workdir: the run's folder; None: a new temporary one.
  out: the export; None: "hf" beside the workdir.
  steps, batch_size, learning_rate, max_input_length, max_target_length:
    the trainer's --train_steps, --batch_size, --policy_lr and --value_lr,
    and lengths.
  rows: how many of the data's first rows to score.
  """
  model: str
  data: str
  workdir: str | None = None
  out: str | None = None
  steps: int = 3
  batch_size: int = 4
  learning_rate: float = 1e-3
  max_input_length: int = 64
  max_target_length: int = 32
  rows: int = 2


def run_config(cfg: Config, workdir: str) -> RunConfig:
  """The RunConfig `python -m dro_fast.train` builds for these settings."""
  if pretrained.decoder_family(cfg.model) is None:
    raise ValueError(f"--model={cfg.model}: no decoder-only Hugging Face "
                     "folder there (config.json of a Llama, Qwen 2 / 3 or "
                     "Gemma 3 causal LM).")
  folder = os.path.abspath(cfg.model)
  optimizer = OptimizerConfig(learning_rate=cfg.learning_rate,
                              warmup_steps=1)
  run = RunConfig(
      workdir=workdir,
      data=DataConfig(train_data=os.path.abspath(cfg.data),
                      data_format="unpaired",
                      max_input_length=cfg.max_input_length,
                      max_target_length=cfg.max_target_length,
                      tokenizer=folder, decoder_only=True),
      # The preset's architecture is replaced by the folder's config.json;
      # what it sets is how the model runs (dtype, attention, remat).
      model=models.decoder_preset("tiny_decoder", dtype="float32"),
      algorithm=AlgorithmConfig(algo="dro_v"),
      policy_optimizer=optimizer, value_optimizer=optimizer,
      init_checkpoint=folder, batch_size=cfg.batch_size,
      train_steps=cfg.steps, checkpoint_every=cfg.steps, log_every=1)
  # The backend fields (kernels, matmul, checkpoint writing) for the
  # platform JAX runs on, as the trainer decides them.
  return backend.resolve(run, kernels.target_platform())


def trl_ids(tokenizer, prompt, completion) -> tuple[list[int], list[int]]:
  """(prompt ids, completion ids) of a TRL row, by TRL's rule (docstring)."""
  if isinstance(prompt, str):
    text = (completion if isinstance(completion, str) else "\n".join(
        message["content"] for message in completion))
    if not text.endswith(tokenizer.eos_token):
      text += tokenizer.eos_token
    return (tokenizer(prompt)["input_ids"],
            tokenizer(text, add_special_tokens=False)["input_ids"])
  if isinstance(completion, str):
    completion = [{"role": "assistant", "content": completion}]
  prompt_text = tokenizer.apply_chat_template(
      prompt, add_generation_prompt=True, tokenize=False)
  full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
  return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
          tokenizer(full[len(prompt_text):],
                    add_special_tokens=False)["input_ids"])


def transformers_logprobs(folder: str, rows: list[dict],
                          cfg: Config) -> np.ndarray:
  """log π(y|x) of each row by transformers from the exported folder."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager").eval()
  out = []
  for row in rows:
    prompt_ids, completion_ids = trl_ids(tokenizer, row["prompt"],
                                         row["completion"])
    if (len(prompt_ids) > cfg.max_input_length
        or len(completion_ids) > cfg.max_target_length):
      raise ValueError(
          f"{cfg.data}: a scored row has {len(prompt_ids)} prompt and "
          f"{len(completion_ids)} completion tokens, more than "
          f"--max_input_length={cfg.max_input_length} or "
          f"--max_target_length={cfg.max_target_length}; raise them.")
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
      logits = model(input_ids=ids).logits[0].double()
    # Position t predicts token t + 1: the completion's tokens are
    # predicted from positions P - 1 ... P + C - 2.
    start = len(prompt_ids) - 1
    logp = torch.log_softmax(logits[start:start + len(completion_ids)], -1)
    picked = logp.gather(-1, torch.tensor(completion_ids)[:, None])
    out.append(float(picked.sum()))
  return np.asarray(out)


def main(cfg: Config) -> dict:
  """Trains, exports and scores; returns what it printed.

  Returns:
    {"workdir", "export", "final_step", "transformers": [N],
    "dro_fast": [N], "max_abs_difference"}.
  """
  root = None
  if cfg.workdir is None or cfg.out is None:
    root = tempfile.mkdtemp(prefix="dro_v_round_trip.")
  workdir = os.path.abspath(cfg.workdir or os.path.join(root, "run"))
  out = os.path.abspath(cfg.out or os.path.join(
      os.path.dirname(workdir) if cfg.workdir else root, "hf"))

  summary = loop.train(run_config(cfg, workdir))
  print(f"trained {summary['final_step']} DRO-V steps in {workdir}: loss "
        f"{summary['final_metrics']['loss']:.4f}")
  exported = export.export(workdir, out)
  print(f"exported {exported['source']} to {exported['out_dir']}")

  with open(cfg.data) as f:
    rows = [json.loads(line) for line in f if line.strip()][:cfg.rows]
  by_transformers = transformers_logprobs(out, rows, cfg)
  by_dro_fast = dro_fast.score(workdir, [r["prompt"] for r in rows],
                               [r["completion"] for r in rows])
  difference = by_transformers - by_dro_fast
  for i, (a, b, d) in enumerate(zip(by_transformers, by_dro_fast,
                                    difference)):
    print(f"row {i}: log π(y|x) transformers {a:.6f}  dro_fast {b:.6f}  "
          f"difference {d:+.2e}")
  worst = float(np.abs(difference).max())
  print(f"max |difference| {worst:.2e} over {len(rows)} rows")
  return {"workdir": workdir, "export": out,
          "final_step": summary["final_step"],
          "transformers": by_transformers.tolist(),
          "dro_fast": by_dro_fast.tolist(), "max_abs_difference": worst}


def parse_args(argv: list[str] | None = None) -> Config:
  """The command line as a Config."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for field in dataclasses.fields(Config):
    required = field.default is dataclasses.MISSING
    kind = {"int": int, "float": float}.get(str(field.type), str)
    parser.add_argument(f"--{field.name}", type=kind, required=required,
                        default=None if required else field.default)
  return Config(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
  runtime.hide_absent_tpu()   # quiet libtpu's warnings on a host with no TPU
  try:
    main(parse_args())
  except (ValueError, loop.TrainingError) as e:   # bad input: one line
    sys.exit(f"error: {e}")
