r"""Theorem 1 on a tabular bandit: DRO-V, single-value DRO-V and KTO.

  python experiments/theorem1.py [--num_prompts=6 --num_responses=5 --tau=1.0
      --steps=2000 --batch_size=32 --learning_rate=0.02 --seed=0]
      [--png_out=docs/theorem1.png] [--json_out=PATH]

Trains each learner of experiments/tabular.py on one random problem, prints the
final mean KL(π* || π) and max |V − V*| per learner, plots the KL over
training steps and optionally writes the results (with the per-step KL) as
JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import tabular  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 6, "Prompts K.")
_NUM_RESPONSES = flags.DEFINE_integer("num_responses", 5, "Responses M.")
_TAU = flags.DEFINE_float("tau", 1.0, "Regularisation τ (KTO's β).")
_STEPS = flags.DEFINE_integer("steps", 2000, "Optimiser steps per learner.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Triplets per minibatch.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 0.02,
                                    "Adam's step size.")
_SEED = flags.DEFINE_integer("seed", 0, "Problem and minibatch seed.")
_PNG_OUT = flags.DEFINE_string("png_out", "docs/theorem1.png",
                               "Where to write the KL-over-steps plot.")
_JSON_OUT = flags.DEFINE_string("json_out", None,
                                "Optionally write the results here as JSON.")


def main(argv):
  del argv
  settings = {"num_prompts": _NUM_PROMPTS.value,
              "num_responses": _NUM_RESPONSES.value, "tau": _TAU.value,
              "steps": _STEPS.value, "batch_size": _BATCH.value,
              "learning_rate": _LEARNING_RATE.value, "seed": _SEED.value}
  start = time.perf_counter()
  results = tabular.run(**settings)
  seconds = time.perf_counter() - start
  print(", ".join(f"{k}={v}" for k, v in settings.items()))
  print(tabular.table(results))
  print(f"{seconds:.1f} s for {len(results)} learners")
  tabular.plot({k: r["kl_history"] for k, r in results.items()},
               _PNG_OUT.value)
  print(f"wrote {_PNG_OUT.value}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump({"settings": settings, "seconds": seconds,
                 "results": results}, f)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
  app.run(main)
