"""Best-checkpoint selection after training (the paper's §4).

Runs `python -m dro_fast.evaluation --best_checkpoint=WORKDIR` as a
subprocess: the evaluator has flags of its own (--batch_size, --seed...)
that would clash with the trainer's in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

from tqdm import tqdm

# For the demo task: 1 fold of 200 held-out prompts, its reward as judge.
DEFAULT_EVAL_FLAGS = ("--folds=1", "--prompts_per_fold=200")


class SelectionError(RuntimeError):
  """The evaluator failed; the message says how to rerun it."""


def select_best(workdir: str, eval_flags: Sequence[str] = ()) -> dict:
  """Judges every checkpoint of the run against its initial policy.

  Args:
    workdir: the run's folder.
    eval_flags: flags for the evaluator (e.g. --judge=http:URL); without a
      --folds or --prompts_per_fold flag, DEFAULT_EVAL_FLAGS are added.

  Returns:
    The record the evaluator wrote to <workdir>/best_checkpoint.json.
  """
  extra = list(eval_flags)
  if not any(f.startswith(("--folds", "--prompts_per_fold")) for f in extra):
    extra += DEFAULT_EVAL_FLAGS
  command = [sys.executable, "-m", "dro_fast.evaluation",
             f"--best_checkpoint={workdir}", *extra]
  tqdm.write("Selecting the best checkpoint: " + " ".join(command[1:]))
  result = subprocess.run(command, capture_output=True, text=True,
                          check=False)
  if result.returncode:
    raise SelectionError(
        f"training finished and its checkpoints are saved in {workdir}/"
        f"checkpoints, but --select_best failed:\n"
        f"{result.stderr.strip()[-2000:]}\nFix the --eval_flag values and "
        f"run {' '.join(command[1:])} yourself.")
  with open(os.path.join(workdir, "best_checkpoint.json")) as f:
    return json.load(f)
