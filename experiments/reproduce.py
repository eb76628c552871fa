r"""Reproduces the shape of the paper's side-by-side results on the demo task.

  python experiments/reproduce.py --quick   # the main table
  python experiments/reproduce.py           # + the τ, learning-rate and
                                            #   sharing sweeps (Figures 3-5)

Wall times on the 2-core CPU: docs/EXPERIMENTS.md.

Every run trains a tiny T5 on the synthetic task (dro_fast.data.synthetic)
from the same SFT warm start, then is judged side by side against that SFT
policy with the task's reward as the judge (positions swapped, ties half),
over --folds folds of --prompts_per_fold prompts. As in the paper: KTO at
its best β of {0.1, 1, 5}, DRO-V at τ = 1 without search; then DRO-V
against the best KTO. The full mode adds the paper's ablations (§4): DRO-V's
τ in {0.1, 1, 5}; the learning rate of policy and value jointly, and of the
value alone, at the paper's ratios to its default (0.1x, 0.5x, 1x, 5x of
our default 1e-3, as the paper's 1e-5, 5e-5, 1e-4, 5e-4); and the four
parameter-sharing variants of Figure 5, with the paper's direct comparison
of per-example against per-batch values. Results: a Markdown table on
stdout, with each row's wall time, and JSON lines in --json_out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_QUICK = flags.DEFINE_bool("quick", False, "Only the main table.")
_SWEEPS = flags.DEFINE_multi_enum("sweeps", ["tau", "lr", "sharing"],
                                  ["tau", "lr", "sharing"],
                                  "Ablations run after the main table "
                                  "(ignored with --quick).")
_LR = flags.DEFINE_float("lr", 1e-3, "Learning rate of every run's SFT warm "
                         "start, policy and value (the demo's default, "
                         "1e-3); the "
                         "learning-rate sweep scales it by 0.1, 0.5 and 5.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/reproduce", "Run folders.")
_STEPS = flags.DEFINE_integer("train_steps", 300, "Steps per run.")
_FOLDS = flags.DEFINE_integer("folds", 5, "Evaluation folds.")
_PER_FOLD = flags.DEFINE_integer("prompts_per_fold", 200, "Prompts per fold.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature "
                                  "of the evaluated policies.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append JSON lines here.")

_START = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, *args: str) -> str:
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
  if result.returncode:
    sys.exit(f"{module} {' '.join(args)} failed:\n{result.stderr[-3000:]}")
  return result.stdout


def train(name: str, *args: str) -> str:
  workdir = os.path.join(_WORKDIR.value, name)
  lrs = [f"--sft_lr={_LR.value:g}", f"--policy_lr={_LR.value:g}",
         f"--value_lr={_LR.value:g}"]
  _run("dro_fast.train", f"--workdir={workdir}",
       f"--train_steps={_STEPS.value}", *lrs, *args)   # later flags win
  return workdir


def compare(policy_a: str, policy_b: str, label: str) -> dict:
  start = time.perf_counter()
  output = os.path.join(_WORKDIR.value, "eval", label)
  _run("dro_fast.evaluation", f"--policy_a={policy_a}",
       f"--policy_b={policy_b}", f"--folds={_FOLDS.value}",
       f"--prompts_per_fold={_PER_FOLD.value}", f"--temperature={_TEMPERATURE.value}", f"--output_dir={output}")
  with open(os.path.join(output, "win_rate.json")) as f:
    result = json.load(f)
  result["label"] = label
  result["eval_seconds"] = round(time.perf_counter() - start, 1)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "a") as f:
      f.write(json.dumps(result) + "\n")
  print(f"| {label} | {100 * result['win_rate_mean']:.1f}% ± "
        f"{100 * result['win_rate_std']:.1f}% | "
        f"{time.perf_counter() - _START:.0f} s |", flush=True)
  return result


def main(argv):
  del argv
  print("| comparison (first over second) | win rate | elapsed |\n"
        "|---|---|---|", flush=True)
  dro_v = train("dro_v_tau1", "--algo=dro_v", "--tau=1.0")
  sft = f"{dro_v}:init"
  dro_v_vs_sft = compare(dro_v, sft, "DRO-V (τ=1) vs SFT")
  kto = {}
  for beta in ("0.1", "1.0", "5.0"):
    workdir = train(f"kto_beta{beta}", "--algo=kto", f"--beta={beta}")
    kto[beta] = (workdir, compare(workdir, sft, f"KTO (β={beta}) vs SFT"))
  best = max(kto, key=lambda b: kto[b][1]["win_rate_mean"])
  compare(dro_v, kto[best][0], f"DRO-V (τ=1) vs KTO (β={best})")
  if _QUICK.value:
    return
  if "tau" in _SWEEPS.value:
    tau_sweep(dro_v, dro_v_vs_sft, sft, kto[best][0], best)
  if "lr" in _SWEEPS.value:
    lr_sweep(sft)
  if "sharing" in _SWEEPS.value:
    sharing_sweep(dro_v, sft)


def tau_sweep(dro_v: str, dro_v_vs_sft: dict, sft: str, best_kto: str,
              best_beta: str) -> None:
  """Figure 4 (left): DRO-V's τ in {0.1, 1, 5}."""
  taus = {"1.0": (dro_v, dro_v_vs_sft)}
  for tau in ("0.1", "5.0"):
    workdir = train(f"dro_v_tau{tau}", "--algo=dro_v", f"--tau={tau}")
    taus[tau] = (workdir, compare(workdir, sft, f"DRO-V (τ={tau}) vs SFT"))
  # Not in the paper: DRO-V given the same τ search as KTO.
  best_tau = max(taus, key=lambda t: taus[t][1]["win_rate_mean"])
  if best_tau != "1.0":
    compare(taus[best_tau][0], best_kto,
            f"DRO-V (best τ={best_tau}) vs KTO (β={best_beta})")


def lr_sweep(sft: str) -> None:
  """Figure 3: policy and value learning rates jointly, then the value's.

  Every run keeps --sft_lr at --lr, so all start from the same SFT policy.
  """
  for lr in (f"{_LR.value * x:g}" for x in (0.1, 0.5, 5)):  # 1x: the main run
    compare(train(f"dro_v_lr{lr}", f"--policy_lr={lr}", f"--value_lr={lr}"),
            sft, f"DRO-V (policy and value lr {lr}) vs SFT")
    compare(train(f"dro_v_vlr{lr}", f"--value_lr={lr}"), sft,
            f"DRO-V (value lr {lr}) vs SFT")


def sharing_sweep(dro_v: str, sft: str) -> None:
  """Figure 5: one or two networks, one value per batch or per example."""
  variants = {("separate", "per_example"): dro_v}       # the main DRO-V run
  for net in ("separate", "shared"):
    for granularity in ("per_batch", "per_example"):
      if (net, granularity) in variants:
        continue
      variants[net, granularity] = train(
          f"dro_v_{net}_{granularity}", f"--value_net={net}",
          f"--value_granularity={granularity}")
      compare(variants[net, granularity], sft,
              f"DRO-V ({net} net, {granularity} value) vs SFT")
  compare(variants["separate", "per_example"],
          variants["separate", "per_batch"],
          "DRO-V separate net: per-example vs per-batch value")


if __name__ == "__main__":
  app.run(main)
