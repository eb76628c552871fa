r"""The evaluation CLI: two policies side by side, as the paper reports them.

`python -m dro_fast.evaluation`, or the `dro-fast-evaluate` script
(evaluate.py does the work):

  python -m dro_fast.evaluation --policy_a=runs/dro_v --policy_b=runs/dro_v:init \
      --prompts=test_prompts.jsonl --judge_model=MODEL \
      --judge=http:http://127.0.0.1:8000/v1/chat/completions

A policy is WORKDIR (its newest checkpoint), WORKDIR:STEP, WORKDIR:init (the
run's initial, SFT policy), or hf:DIR (a Hugging Face folder: T5 or a decoder-
only model with its tokenizer; give --max_input_length and --max_target_length,
and --judge, --prompts and --output_dir when no policy is a run). A decoder-
only policy reads each prompt through its chat template when its tokenizer has
one, as a one-user-message conversation, stops at its EOS or end-of-turn
tokens, and answers without special tokens. Both policies answer the same
prompts (sampled with --temperature, or greedy at 0); the judge compares each
pair twice with the positions swapped (position bias cancels; a disagreement is
a tie). The win rate of A (ties count half) is reported as mean ± std over
--folds folds of --prompts_per_fold prompts, with a per-fold table, a JSONL of
every judged pair and a bar chart, in --output_dir.

--best_checkpoint=WORKDIR instead compares every checkpoint of a run with its
initial policy and records the best one in WORKDIR/best_checkpoint.json (the
paper's checkpoint selection, §4).

Judges (--judge): reward:PATH/TO/FILE.py:FUNCTION or reward:MODULE:FUNCTION
(a callable r(prompt, response); higher wins; the file's path is absolute or
relative to the current directory, and MODULE is imported from sys.path or
else from the current directory) or http:URL (an OpenAI-compatible chat
endpoint asked the paper's side-by-side prompt for --judge_model; its API
key comes from $DRO_FAST_JUDGE_API_KEY). An http: judge is asked
--judge_concurrency pairs at a time, each request waiting up to
--judge_timeout seconds; 408, 429 and 5xx answers and lost connections are
retried --judge_retries times, waiting as a 429/503's Retry-After asks (at
most 60 s) or backing off 1, 2, 4... s.
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

from absl import app
from absl import flags
from absl import logging

from dro_fast import cli
from dro_fast import data
from dro_fast import kernels
from dro_fast import runtime
from dro_fast.evaluation import evaluate
from dro_fast.evaluation import judges
from dro_fast.training import checkpointing
from dro_fast.training import runs

_POLICY_A = flags.DEFINE_string("policy_a", None, "WORKDIR, WORKDIR:STEP, "
                                "WORKDIR:init or hf:DIR.")
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
    "judge", None, "reward:PATH/TO/FILE.py:FUNCTION, reward:MODULE:FUNCTION "
    "or http:URL (default for the synthetic task: "
    "reward:dro_fast.data.synthetic:reward).")
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
_MAX_INPUT = flags.DEFINE_integer(
    "max_input_length", None, "Prompt tokens kept (decoder-only: the last "
    "ones). Default: the policy's run's; required for hf: policies.")
_MAX_TARGET = flags.DEFINE_integer(
    "max_target_length", None, "Most response tokens decoded. Default: the "
    "policy's run's; required for hf: policies.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and prompt-order seed.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results go "
                                  "(default: <policy_a workdir>/eval).")


def _judge(policy: str):
  spec = _JUDGE.value
  if spec is None:
    run = evaluate.run_of(policy)
    if run is None or not run.data.synthetic_task:
      raise evaluate.EvalError("--judge is required (reward:PATH/TO/FILE.py:"
                               "FUNCTION, reward:MODULE:FUNCTION or "
                               "http:URL).")
    spec = "reward:dro_fast.data.synthetic:reward"
  try:
    return judges.make_judge(spec, model=_JUDGE_MODEL.value,
                             timeout_s=_JUDGE_TIMEOUT.value,
                             retries=_JUDGE_RETRIES.value)
  except (ValueError, judges.JudgeError) as e:
    raise evaluate.EvalError(f"--judge: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cli.speak_in_flags(flags.FLAGS)
  runtime.hide_absent_tpu()
  try:
    cfg = evaluate.EvalConfig(
        prompts=_PROMPTS.value, prompt_field=_PROMPT_FIELD.value,
        folds=_FOLDS.value, prompts_per_fold=_PER_FOLD.value,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
        batch_size=_BATCH.value, seed=_SEED.value,
        judge_concurrency=_JUDGE_CONCURRENCY.value,
        max_input_length=_MAX_INPUT.value,
        max_target_length=_MAX_TARGET.value)
    if not _JUDGE_TIMEOUT.value > 0 or _JUDGE_RETRIES.value < 0:
      raise evaluate.EvalError("--judge_timeout must be > 0 and "
                               "--judge_retries >= 0.")
    platform = kernels.target_platform()    # what the policies decode on
    if _BEST.value:
      record = evaluate.best_checkpoint(_BEST.value, _judge(_BEST.value), cfg,
                                        platform=platform)
      print(json.dumps(record, indent=2))
      return
    if not _POLICY_A.value:
      raise evaluate.EvalError("give --policy_a (and optionally --policy_b), "
                               "or --best_checkpoint.")
    judge = _judge(_POLICY_A.value)
    workdir_a, _ = evaluate.parse_policy(_POLICY_A.value)
    if (evaluate.run_of(_POLICY_A.value) is None
        and not (_POLICY_B.value and _OUTPUT_DIR.value)):
      raise evaluate.EvalError("--policy_a is a Hugging Face folder: give "
                               "--policy_b and --output_dir too.")
    spec_b = _POLICY_B.value or f"{workdir_a}:init"
    result = evaluate.compare(
        _POLICY_A.value, spec_b,
        _OUTPUT_DIR.value or os.path.join(workdir_a, "eval"), judge, cfg,
        platform=platform)
    print(evaluate.table(result))
  except (evaluate.EvalError, runs.RunError, judges.JudgeError,
          data.DataError, checkpointing.CorruptCheckpointError) as e:
    # EvalConfig's fields are the flags of the same names.
    cli.user_error(cli.flag_terms(str(e), flags.FLAGS))
  except OSError as e:
    line = cli.refusal(e, "Nothing was judged.")
    if line is None:
      raise
    cli.user_error(line)


def run() -> None:
  """The `dro-fast-evaluate` console script."""
  app.run(main)


if __name__ == "__main__":
  run()
