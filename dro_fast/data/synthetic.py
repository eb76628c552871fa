"""A synthetic single-trajectory task for the demo, tests and benchmarks.

Prompts ask to repeat some words: "repeat: fox red tree". A completion is a
few words; its reward is the fraction of its words that appear in the prompt
minus the fraction that do not, in [-1, 1] (`reward`). The behaviour policy
μ that produced the data draws each completion word from the prompt with a
per-example probability p ~ U(0, 1), else from the rest of the vocabulary, so
rewards cover the whole range and a policy can improve on μ. `reward` is a
plain function, usable as a judge (reward:dro_fast.data.synthetic:reward).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from dro_fast import fileio
from dro_fast.data.records import Pair
from dro_fast.data.records import Triplet

WORDS = ("red", "blue", "green", "gold", "fox", "owl", "cat", "bee", "tree",
         "rock", "lake", "hill", "sun", "moon", "star", "rain", "snow", "wind",
         "boat", "road", "lamp", "book", "key", "bell")
PREFIX = "repeat:"


def reward(prompt: str, completion: str) -> float:
  """+1 per completion word found in the prompt, −1 per other word, averaged."""
  wanted = set(prompt.split()[1:])
  words = completion.split()
  if not words:
    return -1.0
  return float(sum(1 if w in wanted else -1 for w in words) / len(words))


def _prompt(rng: np.random.Generator) -> list[str]:
  return list(rng.choice(WORDS, size=rng.integers(2, 5), replace=False))


def _completion(rng: np.random.Generator, prompt_words: list[str]) -> str:
  p = rng.uniform()
  others = [w for w in WORDS if w not in prompt_words]
  words = [rng.choice(prompt_words) if rng.uniform() < p else rng.choice(others)
           for _ in range(rng.integers(2, 7))]
  return " ".join(words)


def make_triplets(num: int, seed: int = 0) -> list[Triplet]:
  """num (prompt, completion, reward) triplets sampled from μ."""
  rng = np.random.default_rng(seed)
  triplets = []
  for i in range(num):
    words = _prompt(rng)
    prompt = " ".join([PREFIX] + words)
    completion = _completion(rng, words)
    triplets.append(Triplet(prompt, completion, reward(prompt, completion),
                            f"synthetic:{i + 1}"))
  return triplets


def make_pairs(num: int, seed: int = 0) -> list[Pair]:
  """num (prompt, chosen, rejected) pairs: two μ samples ranked by reward."""
  rng = np.random.default_rng(seed)
  pairs = []
  while len(pairs) < num:
    words = _prompt(rng)
    prompt = " ".join([PREFIX] + words)
    a, b = _completion(rng, words), _completion(rng, words)
    if reward(prompt, a) == reward(prompt, b):
      continue
    chosen, rejected = (a, b) if reward(prompt, a) > reward(prompt, b) else (
        b, a)
    pairs.append(Pair(prompt, chosen, rejected, f"synthetic:{len(pairs) + 1}"))
  return pairs


def corpus() -> list[str]:
  """Every word of the task in context, for training its tokenizer."""
  triplets = make_triplets(400, seed=12345)
  return [t.prompt for t in triplets] + [t.completion for t in triplets]


def write_jsonl(path: str, rows: Iterable[Triplet | Pair]) -> None:
  """Writes rows as JSONL, atomically.

  Triplets as prompt, completion, reward; pairs as prompt, chosen,
  rejected.
  """
  records = []
  for row in rows:
    if isinstance(row, Triplet):
      records.append({"prompt": row.prompt, "completion": row.completion,
                      "reward": row.reward})
    else:
      records.append({"prompt": row.prompt, "chosen": row.chosen,
                      "rejected": row.rejected})
  fileio.atomic_write_lines(path, records)
