"""Side-by-side evaluation of two policies, as the paper reports its results.

Both policies answer the same prompts; the judge compares each pair twice
with the positions swapped (position bias cancels; a disagreement is a tie).
The win rate of A (ties count half) is reported as mean ± std over folds, with
a JSONL of every judged pair (appended as verdicts arrive, so a rerun asks
only the missing pairs: evaluation.pairs), win_rate.json and a bar chart.
best_checkpoint compares every checkpoint of a run with its initial policy
(the paper's checkpoint selection, §4). A run is read back through its
run_config.json (training.runs): only the policy parameters are restored.

A policy is a training run's (T5 or decoder-only) or a Hugging Face folder
(`hf:DIR`), read by dro_fast.scoring.resolve. A decoder-only policy's
prompts go through its tokenizer's chat template when it has one (a prompt
string becomes a one-user-message conversation, with the generation
prompt); it stops at its EOS or end-of-turn ids, and its responses are
decoded without special tokens.

The CLI (`python -m dro_fast.evaluation`, evaluation/__main__.py) reads the
flags and passes an EvalConfig; other code calls compare() directly.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dro_fast import decoding
from dro_fast import fileio
from dro_fast import models
from dro_fast import scoring
from dro_fast.evaluation import judges
from dro_fast.evaluation import pairs
from dro_fast.data import synthetic
from dro_fast.models import pretrained
from dro_fast.training import runs

@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How an evaluation samples, folds and judges (the CLI's flags).

  prompts: a JSONL file of prompts (field prompt_field); None: held-out
  prompts of the synthetic demo task. judge_concurrency: pairs judged at
  once; None: 8 for http: judges, 1 for reward: judges.
  max_input_length, max_target_length: prompt tokens kept and response
  tokens decoded; None: the policy's run's (required for hf: policies).
  """
  prompts: str | None = None
  prompt_field: str = "prompt"
  folds: int = 5
  prompts_per_fold: int = 1000
  temperature: float = 0.0
  top_p: float = 1.0
  batch_size: int = 64
  seed: int = 0
  judge_concurrency: int | None = None
  max_input_length: int | None = None
  max_target_length: int | None = None

  def __post_init__(self):
    if self.folds < 1 or self.prompts_per_fold < 1:
      raise EvalError("`folds` and `prompts_per_fold` must be >= 1.")
    if self.judge_concurrency is not None and self.judge_concurrency < 1:
      raise EvalError("`judge_concurrency` must be >= 1.")
    if self.batch_size < 1:
      raise EvalError("`batch_size` must be >= 1.")
    for name in ("max_input_length", "max_target_length"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise EvalError(f"`{name}` must be >= 1.")


class EvalError(Exception):
  """A user error: printed without a traceback."""


def parse_policy(spec: str) -> tuple[str, str | int | None]:
  """"dir" -> (dir, None); "dir:120" -> (dir, 120); "dir:init"; "hf:DIR"."""
  _, path, which = scoring.parse_spec(spec)
  return path, which


def run_of(spec: str) -> runs.RunConfig | None:
  """The training run a spec names; None for a Hugging Face folder."""
  kind, path, _ = scoring.parse_spec(spec)
  if kind == "hf":
    return None
  try:
    return runs.read_run_config(path)
  except runs.RunError as e:
    raise EvalError(f"policy {spec!r}: {e}") from None


def load(spec: str, platform: str) -> scoring.Policy:
  """A policy spec's model, parameters and tokenizer, for `platform`.

  A run's checkpoint is read without its optimizer states
  (runs.load_policy).
  """
  try:
    return scoring.resolve(spec, platform)
  except (runs.RunError, pretrained.CheckpointError, FileNotFoundError,
          ValueError) as e:
    raise EvalError(f"policy {spec!r}: {e}") from None


def lengths(policy: scoring.Policy, cfg: EvalConfig) -> tuple[int, int]:
  """(prompt tokens kept, response tokens decoded) for a policy."""
  max_input, max_target = cfg.max_input_length, cfg.max_target_length
  if policy.run is not None:
    max_input = max_input or policy.run.data.max_input_length
    max_target = max_target or policy.run.data.max_target_length
  if max_input is None or max_target is None:
    raise EvalError(f"policy {policy.name!r} is no training run: give "
                    "`max_input_length` and `max_target_length`.")
  return max_input, max_target


def prompts_for(run: runs.RunConfig | None, cfg: EvalConfig) -> list[str]:
  """The evaluation's prompts, folds × per-fold of them, in a seeded order.

  `run`: the run whose synthetic task gives prompts when cfg.prompts is
  unset; None (two Hugging Face policies): cfg.prompts is required.
  """
  needed = cfg.folds * cfg.prompts_per_fold
  if cfg.prompts:
    rows = _read_prompts(cfg.prompts, cfg.prompt_field)
  elif run is not None and run.data.synthetic_task:
    rows = [t.prompt for t in synthetic.make_triplets(needed, seed=10**6)]
  else:
    raise EvalError("`prompts` is required for runs not trained on the "
                    "synthetic demo task.")
  if len(rows) < needed:
    raise EvalError(f"{cfg.prompts or 'the prompt set'} has {len(rows)} "
                    f"prompts; `folds`={cfg.folds} x `prompts_per_fold`="
                    f"{cfg.prompts_per_fold} needs {needed}.")
  order = np.random.default_rng(cfg.seed).permutation(len(rows))[:needed]
  return [rows[i] for i in order]


def _read_prompts(path: str, field: str) -> list[str]:
  prompts = []
  try:
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          value = json.loads(line)[field]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise EvalError(f"{path} line {line_number}: no JSON field "
                          f"{field!r}.") from None
        prompts.append(str(value))
  except OSError as e:
    raise EvalError(f"`prompts`: {e}") from None
  return prompts


def generate(policy: scoring.Policy, prompts: list[str], max_input: int,
             max_target: int, rng, cfg: EvalConfig) -> list[str]:
  """Responses of one policy to every prompt, in batches."""
  sampling = decoding.SamplingConfig(temperature=cfg.temperature,
                                     top_p=cfg.top_p)
  t5 = isinstance(policy.config, models.T5Config)
  tokenizer = policy.tokenizer
  responses = []
  for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="decode",
                    disable=None, leave=False):
    chunk = prompts[start:start + cfg.batch_size]
    padded = chunk + [chunk[0]] * (cfg.batch_size - len(chunk))
    if t5:
      inputs, _ = tokenizer.encode_batch(padded, max_input)
    else:
      inputs, _ = tokenizer.encode_prompts(
          [chat_prompt(tokenizer, p) for p in padded], max_input)
    tokens = decoding.generate(
        policy.params, jnp.asarray(inputs), config=policy.config,
        max_length=max_target, sampling=sampling,
        rng=None if sampling.greedy else jax.random.fold_in(rng, start),
        stop_ids=() if t5 else tokenizer.eos_ids)
    # Each row up to its EOS / end-of-turn id, without special tokens.
    responses += tokenizer.decode_batch(np.asarray(tokens)[:len(chunk)])
  return responses


def chat_prompt(tokenizer, prompt: str):
  """A prompt as a decoder-only policy reads it.

  With a chat template: a one-user-message conversation (the tokenizer
  renders it with the generation prompt); without: the string itself.
  """
  if tokenizer.chat_template is None:
    return prompt
  return ({"role": "user", "content": prompt},)


def judge_concurrency(judge, cfg: EvalConfig) -> int:
  """cfg.judge_concurrency, or its default for the judge's kind."""
  if cfg.judge_concurrency is not None:
    return cfg.judge_concurrency
  return 8 if isinstance(judge, judges.HttpJudge) else 1


def fold_win_rates(rows: list[dict], folds: int) -> list[float]:
  scores = np.array([r["score_a"] for r in rows]).reshape(folds, -1)
  return [float(x) for x in scores.mean(axis=1)]


def compare(spec_a: str, spec_b: str, output_dir: str, judge,
            cfg: EvalConfig, *, platform: str) -> dict:
  """Judges policy A against B; writes pairs, table and chart; returns stats.

  The policies decode on `platform` (kernels.target_platform(), which the
  CLI reads): runs.model_config resolves each policy's model for it. The
  prompts are cfg.prompts, else held-out prompts of A's (else B's) run's
  synthetic task.
  """
  run_a, run_b = run_of(spec_a), run_of(spec_b)
  prompts = prompts_for(run_a or run_b, cfg)
  rng = jax.random.PRNGKey(cfg.seed)
  responses = []
  for i, spec in enumerate((spec_a, spec_b)):
    policy = load(spec, platform)
    logging.info("decoding with %s", policy.name)
    responses.append(generate(policy, prompts, *lengths(policy, cfg),
                              jax.random.fold_in(rng, i), cfg))
    del policy
  os.makedirs(output_dir, exist_ok=True)
  # Appends each verdict to pairs.jsonl as it arrives and resumes from it.
  rows = pairs.side_by_side(
      judge, prompts, *responses,
      path=os.path.join(output_dir, pairs.PAIRS_FILE),
      fold_size=cfg.prompts_per_fold, concurrency=judge_concurrency(judge, cfg))
  folds = fold_win_rates(rows, cfg.folds)
  result = {"policy_a": spec_a, "policy_b": spec_b, "judge": judge.name,
            "win_rate_mean": float(np.mean(folds)),
            "win_rate_std": float(np.std(folds)), "folds": folds,
            "prompts": len(prompts)}
  fileio.atomic_write_json(os.path.join(output_dir, "win_rate.json"), result)
  chart = win_rate_figure(result)
  fileio.atomic_write(os.path.join(output_dir, "win_rate.png"),
                      lambda f: chart.savefig(f, format="png", dpi=100))
  return result


def win_rate_figure(result: dict):
  """A bar chart of the per-fold win rates of A, with their mean ± std.

  Args:
    result: what compare returns (folds, win_rate_mean, win_rate_std,
      policy_a, policy_b).

  Returns:
    A matplotlib Figure on an Agg canvas (no pyplot), its labels laid out
    inside it.
  """
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
  fig = figure.Figure(figsize=(5, 3.5), layout="constrained")
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.add_subplot()
  folds = result["folds"]
  axes.bar(range(len(folds)), folds, color="tab:blue")
  axes.axhline(result["win_rate_mean"], color="k", linestyle="--",
               label=f"mean {result['win_rate_mean']:.3f} ± "
                     f"{result['win_rate_std']:.3f}")
  axes.axhline(0.5, color="gray", linewidth=0.8)
  # Folds are numbered as in the table and pairs.jsonl, from 0; a single
  # fold still gets its integer tick (min_n_ticks).
  axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True,
                                                  min_n_ticks=1))
  axes.set_xlabel("fold")
  axes.set_ylabel("win rate of A")
  axes.set_ylim(0, 1)
  axes.set_title(f"{os.path.basename(result['policy_a'])} vs "
                 f"{os.path.basename(result['policy_b'])}", fontsize=9)
  axes.legend(fontsize=8)
  return fig


def table(result: dict) -> str:
  lines = [f"{result['policy_a']}  vs  {result['policy_b']}  "
           f"(judge {result['judge']})", "fold  win rate of A"]
  lines += [f"{i:4d}  {w:.3f}" for i, w in enumerate(result["folds"])]
  lines.append(f"mean  {result['win_rate_mean']:.3f} ± "
               f"{result['win_rate_std']:.3f} over {len(result['folds'])} "
               f"folds of {result['prompts'] // len(result['folds'])}")
  return "\n".join(lines)


def best_checkpoint(workdir: str, judge, cfg: EvalConfig, *,
                    platform: str) -> dict:
  """Every checkpoint vs the initial policy; the best is recorded.

  Each comparison is compare()'s, decoding on `platform`.
  """
  run_steps = runs.checkpoint_steps(workdir)
  if not run_steps:
    raise EvalError(f"{workdir}: no checkpoints to compare.")
  results = {}
  for step in run_steps:
    result = compare(f"{workdir}:{step}", f"{workdir}:init",
                     os.path.join(workdir, "eval", f"step_{step}_vs_init"),
                     judge, cfg, platform=platform)
    results[step] = result["win_rate_mean"]
    print(table(result))
  best = max(results, key=results.get)
  record = {"best_step": best, "win_rate_vs_init": results[best],
            "win_rates": {str(k): v for k, v in results.items()},
            "judge": judge.name}
  fileio.atomic_write_json(os.path.join(workdir, "best_checkpoint.json"),
                           record)
  return record
