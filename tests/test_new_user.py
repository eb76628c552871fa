"""A new user's first run, offline: a FLAN-T5-style checkpoint saved sharded
by transformers, TRL-style thumbs-up/down data exported by `datasets` as
Parquet shards, the installed `dro-fast-train` with a packaged flagfile from
another directory, then `dro-fast-evaluate` with a reward function as the
judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

JUDGE = '''
def reward(prompt, response):
  """Longer answers win: any function of (prompt, response) will do."""
  return float(len(response.split()))
'''


def _rows(n: int) -> list[dict]:
  words = "apple pear plum fig kiwi lime date".split()
  rows = []
  for i in range(n):
    topic = words[i % len(words)]
    rows.append({
        "prompt": [{"role": "system", "content": "Answer briefly."},
                   {"role": "user", "content": f"Tell me about {topic}."}],
        "completion": [{"role": "assistant",
                        "content": f"{topic} " * (1 + i % 4)}],
        "label": bool(i % 2)})
  return rows


def _run(*argv, cwd, **env) -> subprocess.CompletedProcess:
  result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                          timeout=900, check=False,
                          env=dict(os.environ, **env))
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.mark.slow
def test_sharded_checkpoint_unpaired_shards_train_then_evaluate(tmp_path):
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from tests.models import hf_reference  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.T5Config(**dict(hf_reference.HF_KWARGS,
                                        vocab_size=97),
                                 **hf_reference.VARIANTS["v1_1"])
  checkpoint = tmp_path / "flan-t5-tiny"
  transformers.T5ForConditionalGeneration(config).save_pretrained(
      checkpoint, max_shard_size="50KB")
  assert (checkpoint / "model.safetensors.index.json").exists()
  assert not (checkpoint / "model.safetensors").exists()

  data = tmp_path / "data"
  data.mkdir()
  dataset = datasets.Dataset.from_list(_rows(48))
  for i in range(3):
    dataset.shard(3, i).to_parquet(str(data / f"train-{i:05d}-of-00003.parquet"))

  home = tmp_path / "elsewhere"            # not the repository
  home.mkdir()
  (home / "my_judge.py").write_text(JUDGE)
  _run(os.path.join(BIN, "dro-fast-train"), "--flagfile=tiny.flags",
       f"--train_data={data}", "--data_format=unpaired",
       f"--init_checkpoint={checkpoint}", "--tokenizer_vocab_size=48",
       "--workdir=run", "--batch_size=8", "--train_steps=4",
       "--checkpoint_every=2", "--log_every=2", cwd=home)
  summary = json.loads((home / "run" / "summary.json").read_text())
  assert summary["final_step"] == 4
  assert summary["model"]["vocab_size"] == 97      # the checkpoint's

  prompts = home / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}."})
                             + "\n" for w in ("fig", "kiwi", "lime", "date")))
  _run(os.path.join(BIN, "dro-fast-evaluate"), "--policy_a=run",
       f"--prompts={prompts}", "--judge=reward:my_judge:reward",
       "--folds=1", "--prompts_per_fold=4", "--batch_size=4",
       "--output_dir=eval", cwd=home, PYTHONPATH=str(home))
  result = json.loads((home / "eval" / "win_rate.json").read_text())
  assert result["judge"] == "reward:my_judge:reward"
  pairs = (home / "eval" / "pairs.jsonl").read_text().splitlines()
  assert len(pairs) == 4
