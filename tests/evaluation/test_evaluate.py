"""`python -m dro_fast.evaluation` end to end, and its wiring of the judge.

End to end on a short demo run; the wiring (pairs.jsonl, resume) on a faked
run; a judge of one's own from any directory; the win-rate chart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

from dro_fast import scoring
from dro_fast.evaluation import evaluate as evaluation
from dro_fast.evaluation import judges
from tests import test_train
from tests.evaluation import stub_judge

REPO = test_train.REPO
# The two ways a user runs the evaluation, from any directory.
ENTRY_POINTS = {
    "python -m": [sys.executable, "-m", "dro_fast.evaluation"],
    "console script": [os.path.join(os.path.dirname(sys.executable),
                                    "dro-fast-evaluate")],
}
# A user's judge: records which name it was imported under, and prefers the
# longer response.
MY_JUDGE = """
with open("imported.txt", "a") as f:
  f.write(__name__ + "\\n")


def score(prompt, response):
  return float(len(response))
"""


def evaluate(*flags, check=True):
  result = subprocess.run([sys.executable, "-m", "dro_fast.evaluation", *flags],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("eval") / "run"
  test_train.train(workdir, "--train_steps=8", "--sft_steps=20",
                   "--select_best", "--eval_flag=--folds=1",
                   "--eval_flag=--prompts_per_fold=8")
  return workdir


@pytest.mark.slow
def test_trainer_selects_the_best_checkpoint_at_the_end(run_dir):
  summary = json.loads((run_dir / "summary.json").read_text())
  record = summary["best_checkpoint"]
  assert set(record["win_rates"]) == {"4", "8"}
  assert record["best_step"] in (4, 8)
  assert (run_dir / "eval" / "step_8_vs_init" / "win_rate.json").is_file()


@pytest.mark.slow
def test_side_by_side_against_the_initial_policy(run_dir, tmp_path):
  out = tmp_path / "out"
  result = evaluate(f"--policy_a={run_dir}", "--folds=3",
                    "--prompts_per_fold=16", "--temperature=0.7",
                    f"--output_dir={out}")
  assert "mean" in result.stdout and "over 3 folds of 16" in result.stdout
  summary = json.loads((out / "win_rate.json").read_text())
  assert summary["policy_b"] == f"{run_dir}:init"
  assert len(summary["folds"]) == 3
  assert 0.0 <= summary["win_rate_mean"] <= 1.0
  pairs = [json.loads(line) for line in (out / "pairs.jsonl").open()]
  assert len(pairs) == 48 and {p["fold"] for p in pairs} == {0, 1, 2}
  assert all(p["score_a"] in (0.0, 0.5, 1.0) for p in pairs)
  assert (out / "win_rate.png").read_bytes()[:4] == b"\x89PNG"
  # A policy against itself (same samples, same seed) ties everywhere.
  same = evaluate(f"--policy_a={run_dir}:8", f"--policy_b={run_dir}:8",
                  "--folds=1", "--prompts_per_fold=8",
                  f"--output_dir={tmp_path / 'same'}")
  assert "0.500" in same.stdout


@pytest.mark.slow
def test_best_checkpoint_is_recorded(run_dir):
  evaluate(f"--best_checkpoint={run_dir}", "--folds=1",
           "--prompts_per_fold=8")
  record = json.loads((run_dir / "best_checkpoint.json").read_text())
  assert set(record["win_rates"]) == {"4", "8"}
  assert record["best_step"] in (4, 8)
  assert record["win_rate_vs_init"] == max(record["win_rates"].values())


@pytest.mark.parametrize("flags, message", [
    (["--policy_a=/nonexistent/run"], "no run_config.json"),
    ([], "give --policy_a"),
    (["--folds=0", "--policy_a=x"], "--folds and --prompts_per_fold"),
    (["--policy_a=x", "--judge=http:http://127.0.0.1:1/v1/chat/completions"],
     "--judge_model=NAME"),
    (["--judge_concurrency=0", "--policy_a=x"], "--judge_concurrency"),
])
def test_user_errors_exit_2(flags, message):
  result = evaluate(*flags, check=False)
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_judge_and_too_few_prompts(run_dir, tmp_path):
  result = evaluate(f"--policy_a={run_dir}", "--judge=oracle:x",
                    check=False)
  assert result.returncode == 2 and "--judge" in result.stderr
  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "repeat: fox"}\n')
  result = evaluate(f"--policy_a={run_dir}", f"--prompts={prompts}",
                    "--folds=2", "--prompts_per_fold=4", check=False)
  assert result.returncode == 2 and "has 1 prompts" in result.stderr


def test_compare_resumes_a_failed_judging_run(stub, tmp_path, monkeypatch):
  """compare() with an http: judge keeps verdicts through a failure.

  Only the missing pairs are asked again, and the outputs written at the end.
  The run, decoding and JAX are faked: the wiring is under test, not the
  models.
  """
  prompts = [f"prompt {i}" for i in range(6)]
  run = types.SimpleNamespace(data=types.SimpleNamespace(
      max_input_length=4, max_target_length=4))
  runs = evaluation.runs
  monkeypatch.setattr(runs, "read_run_config", lambda workdir: run)
  monkeypatch.setattr(evaluation, "prompts_for", lambda run, cfg: prompts)
  monkeypatch.setattr(evaluation, "load", lambda spec, platform: (
      scoring.Policy(spec, None, spec, None, run)))
  monkeypatch.setattr(evaluation, "jax", types.SimpleNamespace(
      random=types.SimpleNamespace(PRNGKey=lambda seed: seed,
                                   fold_in=lambda rng, i: (rng, i))))

  def generate(policy, *args):
    """Policy A answers longer than B on every third prompt; else a tie."""
    del args
    return ["aa" if policy.params == "run_a" and i % 3 == 0 else "a"
            for i in range(len(prompts))]

  monkeypatch.setattr(evaluation, "generate", generate)
  judge = judges.make_judge(f"http:{stub.url}", model="m", timeout_s=5.0,
                            retries=1, backoff_s=0.0)
  out = tmp_path / "out"
  assert evaluation.judge_concurrency(
      judge, evaluation.EvalConfig()) == 8  # The http: default.
  cfg = evaluation.EvalConfig(folds=2, prompts_per_fold=3,
                                judge_concurrency=2)
  stub.respond = stub_judge.LengthJudging("m", fail_after=5, delay_s=0.01)
  with pytest.raises(judges.JudgeError, match="quota exhausted"):
    evaluation.compare("run_a", "run_b", str(out), judge, cfg,
                       platform="cpu")
  kept = [json.loads(line) for line in (out / "pairs.jsonl").open()]
  assert 1 <= len(kept) <= 2 and not (out / "win_rate.json").exists()
  stub.respond = counter = stub_judge.LengthJudging("m", delay_s=0.01)
  result = evaluation.compare("run_a", "run_b", str(out), judge, cfg,
                              platform="cpu")
  assert counter.count == 2 * (6 - len(kept))
  assert stub.max_in_flight == 2
  assert result["folds"] == pytest.approx([2 / 3, 2 / 3])
  assert result["judge"] == judge.name
  rows = [json.loads(line) for line in (out / "pairs.jsonl").open()]
  assert [(r["index"], r["fold"], r["score_a"]) for r in rows] == [
      (i, i // 3, 1.0 if i % 3 == 0 else 0.5) for i in range(6)]
  assert json.loads((out / "win_rate.json").read_text()) == result
  assert (out / "win_rate.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("folds", [[0.75], [0.5, 0.625, 0.25],
                                   [0.5] * 2 + [0.75] * 9])
def test_win_rate_chart_has_integer_fold_ticks_and_labels_inside(folds):
  fig = evaluation.win_rate_figure({
      "folds": folds, "win_rate_mean": 0.5, "win_rate_std": 0.125,
      "policy_a": "/runs/a_rather_long_run_name:120",
      "policy_b": "/runs/a_rather_long_run_name:init"})
  fig.canvas.draw()
  axes, = fig.axes

  def shown(axis, low, high):
    """The tick labels drawn: those of ticks inside the view limits."""
    return [(tick.get_loc(), tick.label1) for tick in axis.get_major_ticks()
            if low <= tick.get_loc() <= high]

  x_ticks = shown(axes.xaxis, *axes.get_xlim())
  assert x_ticks and all(float(x).is_integer() for x, _ in x_ticks), x_ticks
  renderer = fig.canvas.get_renderer()
  box = fig.bbox
  labels = [label for _, label in x_ticks + shown(axes.yaxis,
                                                  *axes.get_ylim())]
  for text in (axes.xaxis.label, axes.yaxis.label, axes.title, *labels):
    extent = text.get_window_extent(renderer)
    assert (box.x0 <= extent.x0 and extent.x1 <= box.x1 and
            box.y0 <= extent.y0 and extent.y1 <= box.y1), (
                text.get_text(), extent, box)


def evaluate_in(directory, entry_point, *flags):
  """Runs the evaluation CLI in `directory`, the repository off sys.path."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([*ENTRY_POINTS[entry_point], *flags], cwd=directory,
                        env=env, capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("spec, imported_as", [
    ("reward:my_judge.py:score", "dro_fast_judge_"),
    ("reward:my_judge:score", "my_judge"),
])
def test_a_judge_in_the_current_directory(tmp_path, entry_point, spec,
                                          imported_as):
  (tmp_path / "my_judge.py").write_text(MY_JUDGE)
  # The judge is built before the run is read: the absent run is the error.
  result = evaluate_in(tmp_path, entry_point, "--policy_a=no_run",
                       f"--judge={spec}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "no run_config.json" in result.stderr, result.stderr[-2000:]
  assert (tmp_path / "imported.txt").read_text().startswith(imported_as)


@pytest.mark.parametrize("spec, message", [
    ("reward:missing.py:score", "no file "),
    ("reward:my_judge.py:missing", "has no 'missing'"),
    ("reward:missing_judge:score", "no module named 'missing_judge'"),
])
def test_judge_errors_in_one_line_from_the_console_script(tmp_path, spec,
                                                          message):
  (tmp_path / "my_judge.py").write_text(MY_JUDGE)
  result = evaluate_in(tmp_path, "console script", "--policy_a=no_run",
                       f"--judge={spec}")
  assert result.returncode == 2, result.stderr[-2000:]
  error, = result.stderr.strip().splitlines()
  assert error.startswith("error: --judge: judge spec") and message in error


@pytest.mark.slow
def test_a_judge_file_judges_the_pairs(run_dir, tmp_path):
  (tmp_path / "my_judge.py").write_text(MY_JUDGE)
  result = evaluate_in(tmp_path, "console script", f"--policy_a={run_dir}",
                       "--judge=reward:my_judge.py:score", "--folds=1",
                       "--prompts_per_fold=8", "--output_dir=out")
  assert result.returncode == 0, result.stderr[-4000:]
  summary = json.loads((tmp_path / "out" / "win_rate.json").read_text())
  assert summary["judge"] == f"reward:{tmp_path / 'my_judge.py'}:score"
  rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl")
          .open()]
  assert len(rows) == 8
  for row in rows:
    a, b = len(row["response_a"]), len(row["response_b"])
    assert row["score_a"] == (0.5 if a == b else float(a > b)), row
