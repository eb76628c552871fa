r"""Side-by-side evaluation of two policies, as the paper reports its results.

  python -m dro_fast.evaluation --policy_a=runs/dro_v --policy_b=runs/dro_v:init \
      --prompts=test_prompts.jsonl --judge_model=MODEL \
      --judge=http:http://127.0.0.1:8000/v1/chat/completions

A policy is WORKDIR (its newest checkpoint), WORKDIR:STEP, or WORKDIR:init
(the run's initial, SFT policy). Both policies answer the same prompts
(sampled with --temperature, or greedy at 0); the judge compares each pair
twice with the positions swapped (position bias cancels; a disagreement is a
tie). The win rate of A (ties count half) is reported as mean ± std over
--folds folds of --prompts_per_fold prompts, with a per-fold table, a JSONL
of every judged pair and a bar chart, in --output_dir.

--best_checkpoint=WORKDIR instead compares every checkpoint of a run with its
initial policy and records the best one in WORKDIR/best_checkpoint.json (the
paper's checkpoint selection, §4).

Judges (--judge): reward:MODULE:FUNCTION (a callable r(prompt, response);
higher wins) or http:URL (an OpenAI-compatible chat endpoint asked the
paper's side-by-side prompt for --judge_model; its API key comes from
$DRO_FAST_JUDGE_API_KEY). An http: judge is asked --judge_concurrency pairs
at a time, each request waiting up to --judge_timeout seconds; 408, 429 and
5xx answers and lost connections are retried --judge_retries times, waiting
as a 429/503's Retry-After asks (at most 60 s) or backing off 1, 2, 4... s.
Without --prompts, a run trained on the synthetic demo task is evaluated on
held-out synthetic prompts with its known reward as the default judge.

Each verdict is appended to pairs.jsonl as it arrives, so a run stopped
partway (a failing judge, a kill) keeps what it got: rerun the same command
and only the pairs not yet judged are asked (a verdict is reused only for
the same judge, prompt and responses; see evaluation.pairs).

A run is read back through its run_config.json (training.runs): only the
policy parameters are restored, never the optimizer states, and no trainer
is built.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dro_fast import data
from dro_fast import fileio
from dro_fast import decoding
from dro_fast import runtime
from dro_fast.evaluation import judges
from dro_fast.evaluation import pairs
from dro_fast.data import synthetic
from dro_fast.training import checkpointing
from dro_fast.training import runs

_POLICY_A = flags.DEFINE_string("policy_a", None, "WORKDIR, WORKDIR:STEP or "
                                "WORKDIR:init.")
_POLICY_B = flags.DEFINE_string("policy_b", None, "Default: policy_a's run's "
                                "initial (SFT) policy, WORKDIR:init.")
_BEST = flags.DEFINE_string("best_checkpoint", None, "Compare every "
                            "checkpoint of this run with its initial policy "
                            "and mark the best.")
_PROMPTS = flags.DEFINE_string("prompts", None, "JSONL of prompts "
                               "(field --prompt_field). Unset: held-out "
                               "prompts of the synthetic demo task.")
_PROMPT_FIELD = flags.DEFINE_string("prompt_field", "prompt", "Prompt field.")
_JUDGE = flags.DEFINE_string(
    "judge", None, "reward:MODULE:FUNCTION or http:URL (default for the "
    "synthetic task: reward:dro_fast.data.synthetic:reward).")
_JUDGE_MODEL = flags.DEFINE_string(
    "judge_model", None, "The model an http: judge asks for (the request's "
    "\"model\"; required for http: judges, e.g. a name the server's "
    "/v1/models lists).")
_JUDGE_CONCURRENCY = flags.DEFINE_integer(
    "judge_concurrency", None, "Pairs judged at once (each pair is two "
    "requests, one after the other). Default: 8 for http: judges, 1 for "
    "reward: judges (a reward function must be thread-safe for more).")
_JUDGE_TIMEOUT = flags.DEFINE_float(
    "judge_timeout", 60.0, "Seconds an http: judge waits for each request.")
_JUDGE_RETRIES = flags.DEFINE_integer(
    "judge_retries", 5, "Further attempts of an http: judge's request after "
    "a transient failure (timeout, lost connection, 408, 429, 5xx).")
_FOLDS = flags.DEFINE_integer("folds", 5, "Evaluation folds.")
_PER_FOLD = flags.DEFINE_integer("prompts_per_fold", 1000, "Prompts per fold.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0,
                                  "Sampling temperature (0: greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts decoded at once.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and prompt-order seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go "
                                  "(default: <policy_a workdir>/eval).")


class EvalError(Exception):
  """A user error: printed without a traceback."""


def parse_policy(spec: str) -> tuple[str, str | int | None]:
  """"dir" -> (dir, None); "dir:120" -> (dir, 120); "dir:init"."""
  workdir, sep, which = spec.rpartition(":")
  if not sep or (which != "init" and not which.isdigit()):
    return spec, None
  return workdir, which if which == "init" else int(which)


def load(spec: str):
  """(params, description) of a policy spec: the policy parameters alone
  (runs.load_policy reads no optimizer state)."""
  workdir, which = parse_policy(spec)
  try:
    if which == "init":
      return runs.load_initial_policy(workdir), f"{workdir}:init"
    params, step = runs.load_policy(workdir, which)
    return params, f"{workdir}:{step}"
  except (runs.RunError, FileNotFoundError, ValueError) as e:
    raise EvalError(f"policy {spec!r}: {e}") from None


def prompts_for(run: runs.RunConfig) -> list[str]:
  needed = _FOLDS.value * _PER_FOLD.value
  if _PROMPTS.value:
    rows = _read_prompts(_PROMPTS.value)
  elif run.data.synthetic_task:
    rows = [t.prompt for t in synthetic.make_triplets(needed, seed=10**6)]
  else:
    raise EvalError("--prompts is required for runs not trained on the "
                    "synthetic demo task.")
  if len(rows) < needed:
    raise EvalError(f"{_PROMPTS.value or 'the prompt set'} has {len(rows)} "
                    f"prompts; --folds={_FOLDS.value} x --prompts_per_fold="
                    f"{_PER_FOLD.value} needs {needed}.")
  order = np.random.default_rng(_SEED.value).permutation(len(rows))[:needed]
  return [rows[i] for i in order]


def _read_prompts(path: str) -> list[str]:
  prompts = []
  try:
    with open(path) as f:
      for line_number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          value = json.loads(line)[_PROMPT_FIELD.value]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise EvalError(f"{path} line {line_number}: no JSON field "
                          f"{_PROMPT_FIELD.value!r}.") from None
        prompts.append(str(value))
  except OSError as e:
    raise EvalError(f"--prompts: {e}") from None
  return prompts


def generate(params, config, tokenizer, prompts, max_input, max_target,
             rng) -> list[str]:
  """Responses of one policy to every prompt, in batches."""
  sampling = decoding.SamplingConfig(temperature=_TEMPERATURE.value,
                                     top_p=_TOP_P.value)
  responses = []
  for start in tqdm(range(0, len(prompts), _BATCH.value), desc="decode",
                    disable=None, leave=False):
    chunk = prompts[start:start + _BATCH.value]
    padded = chunk + [chunk[0]] * (_BATCH.value - len(chunk))
    inputs, _ = tokenizer.encode_batch(padded, max_input)
    tokens = decoding.generate(
        params, jnp.asarray(inputs), config=config, max_length=max_target,
        sampling=sampling,
        rng=None if sampling.greedy else jax.random.fold_in(rng, start))
    responses += tokenizer.decode_batch(np.asarray(tokens))[:len(chunk)]
  return responses


def judge_concurrency(judge) -> int:
  """--judge_concurrency, or its default for the judge's kind."""
  if _JUDGE_CONCURRENCY.value is not None:
    return _JUDGE_CONCURRENCY.value
  return 8 if isinstance(judge, judges.HttpJudge) else 1


def fold_win_rates(rows: list[dict], folds: int) -> list[float]:
  scores = np.array([r["score_a"] for r in rows]).reshape(folds, -1)
  return [float(x) for x in scores.mean(axis=1)]


def compare(spec_a: str, spec_b: str, output_dir: str, judge) -> dict:
  """Judges policy A against B; writes pairs, table and chart; returns stats."""
  workdir_a, _ = parse_policy(spec_a)
  run = runs.read_run_config(workdir_a)
  config = runs.model_config(run)
  tokenizer = runs.tokenizer(run, workdir_a)
  prompts = prompts_for(run)
  rng = jax.random.PRNGKey(_SEED.value)
  responses = []
  for i, spec in enumerate((spec_a, spec_b)):
    params, name = load(spec)
    logging.info("decoding with %s", name)
    responses.append(generate(params, config, tokenizer, prompts,
                              run.data.max_input_length,
                              run.data.max_target_length,
                              jax.random.fold_in(rng, i)))
  os.makedirs(output_dir, exist_ok=True)
  # Appends each verdict to pairs.jsonl as it arrives and resumes from it.
  rows = pairs.side_by_side(
      judge, prompts, *responses,
      path=os.path.join(output_dir, pairs.PAIRS_FILE),
      fold_size=_PER_FOLD.value, concurrency=judge_concurrency(judge))
  folds = fold_win_rates(rows, _FOLDS.value)
  result = {"policy_a": spec_a, "policy_b": spec_b, "judge": judge.name,
            "win_rate_mean": float(np.mean(folds)),
            "win_rate_std": float(np.std(folds)), "folds": folds,
            "prompts": len(prompts)}
  fileio.atomic_write_json(os.path.join(output_dir, "win_rate.json"), result)
  _bar_chart(result, os.path.join(output_dir, "win_rate.png"))
  return result


def _bar_chart(result: dict, path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(5, 3.5))
  axes = figure.add_subplot()
  folds = result["folds"]
  axes.bar(range(len(folds)), folds, color="tab:blue")
  axes.axhline(result["win_rate_mean"], color="k", linestyle="--",
               label=f"mean {result['win_rate_mean']:.3f} ± "
                     f"{result['win_rate_std']:.3f}")
  axes.axhline(0.5, color="gray", linewidth=0.8)
  axes.set_xlabel("fold")
  axes.set_ylabel("win rate of A")
  axes.set_ylim(0, 1)
  axes.set_title(f"{os.path.basename(result['policy_a'])} vs "
                 f"{os.path.basename(result['policy_b'])}", fontsize=9)
  axes.legend(fontsize=8)
  FigureCanvasAgg(figure)
  tmp = f"{path}.tmp.png"
  figure.savefig(tmp, dpi=100)
  os.replace(tmp, path)


def table(result: dict) -> str:
  lines = [f"{result['policy_a']}  vs  {result['policy_b']}  "
           f"(judge {result['judge']})", "fold  win rate of A"]
  lines += [f"{i:4d}  {w:.3f}" for i, w in enumerate(result["folds"])]
  lines.append(f"mean  {result['win_rate_mean']:.3f} ± "
               f"{result['win_rate_std']:.3f} over {len(result['folds'])} "
               f"folds of {result['prompts'] // len(result['folds'])}")
  return "\n".join(lines)


def best_checkpoint(workdir: str, judge) -> dict:
  """Every checkpoint vs the initial policy; the best is recorded."""
  run_steps = runs.checkpoint_steps(workdir)
  if not run_steps:
    raise EvalError(f"{workdir}: no checkpoints to compare.")
  results = {}
  for step in run_steps:
    result = compare(f"{workdir}:{step}", f"{workdir}:init",
                     os.path.join(workdir, "eval", f"step_{step}_vs_init"),
                     judge)
    results[step] = result["win_rate_mean"]
    print(table(result))
  best = max(results, key=results.get)
  record = {"best_step": best, "win_rate_vs_init": results[best],
            "win_rates": {str(k): v for k, v in results.items()},
            "judge": judge.name}
  fileio.atomic_write_json(os.path.join(workdir, "best_checkpoint.json"),
                           record)
  return record


def _judge(workdir: str):
  spec = _JUDGE.value
  if spec is None:
    if not runs.read_run_config(workdir).data.synthetic_task:
      raise EvalError("--judge is required (reward:MODULE:FUNCTION or "
                      "http:URL).")
    spec = "reward:dro_fast.data.synthetic:reward"
  try:
    return judges.make_judge(spec, model=_JUDGE_MODEL.value,
                             timeout_s=_JUDGE_TIMEOUT.value,
                             retries=_JUDGE_RETRIES.value)
  except (ValueError, judges.JudgeError) as e:
    raise EvalError(f"--judge: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  runtime.hide_absent_tpu()
  try:
    if _FOLDS.value < 1 or _PER_FOLD.value < 1:
      raise EvalError("--folds and --prompts_per_fold must be >= 1.")
    if _JUDGE_CONCURRENCY.value is not None and _JUDGE_CONCURRENCY.value < 1:
      raise EvalError("--judge_concurrency must be >= 1.")
    if not _JUDGE_TIMEOUT.value > 0 or _JUDGE_RETRIES.value < 0:
      raise EvalError("--judge_timeout must be > 0 and --judge_retries >= 0.")
    if _BEST.value:
      record = best_checkpoint(_BEST.value, _judge(_BEST.value))
      print(json.dumps(record, indent=2))
      return
    if not _POLICY_A.value:
      raise EvalError("give --policy_a (and optionally --policy_b), or "
                      "--best_checkpoint.")
    workdir_a, _ = parse_policy(_POLICY_A.value)
    spec_b = _POLICY_B.value or f"{workdir_a}:init"
    result = compare(_POLICY_A.value, spec_b,
                     _OUTPUT_DIR.value or os.path.join(workdir_a, "eval"),
                     _judge(workdir_a))
    print(table(result))
  except (EvalError, runs.RunError, judges.JudgeError, data.DataError,
          checkpointing.CorruptCheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

