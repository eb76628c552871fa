r"""A reward function used as the side-by-side judge of an evaluation.

  python examples/custom_judge.py           # from any directory

The paper compares two policies by asking a judge which of two responses to
a prompt is better (§4). Any function r(prompt, response) -> float can be
that judge: `judges.RewardJudge(reward)` prefers the response with the higher
reward (1.0: A, 0.0: B, 0.5: equal). The evaluation CLI builds the same judge
from a spec string naming a file (absolute, or relative to the current
directory) and the function in it:

  dro-fast-evaluate --policy_a=runs/dro_v --policy_b=runs/dro_v:init \
      --prompts=test_prompts.jsonl \
      --judge=reward:examples/custom_judge.py:reward

The module form, --judge=reward:examples.custom_judge:reward, works with
`python -m dro_fast.evaluation` run from the repository root, which it puts
first on sys.path. A reward judge is asked one pair at a time unless
--judge_concurrency says otherwise; the function must then be thread-safe.

`judges.judge_swapped` asks a judge both orders and averages, so that a
preference for one position cancels (verdicts that disagree count as a tie).
A RewardJudge has no position bias; `FirstUnlessClearlyWorse` below has one,
to show what the swap does.
"""

from __future__ import annotations

from collections.abc import Callable
import os

from dro_fast.evaluation import judges

# This file's reward as --judge names it; a path, so that it is found from
# any directory.
JUDGE_SPEC = f"reward:{os.path.abspath(__file__)}:reward"

_STOPWORDS = frozenset(
    "a an and are as at be by does for from how i in is it of on or so that "
    "the this to what when where which who why with".split())
# Words a response may use before each further word costs _LENGTH_PENALTY.
_FREE_WORDS = 30
_LENGTH_PENALTY = 0.01


def _content_words(text: str) -> set[str]:
  words = {w.strip(".,;:!?\"'()").lower() for w in text.split()}
  return words - _STOPWORDS - {""}


def reward(prompt: str, response: str) -> float:
  """How much of the prompt's content the response covers, for its length.

  The fraction of the prompt's content words the response uses, minus 0.01
  per word past 30; -1 for an empty response. Deterministic and thread-safe,
  as a judge's reward must be.
  """
  words = response.split()
  if not words:
    return -1.0
  wanted = _content_words(prompt)
  coverage = len(wanted & _content_words(response)) / max(len(wanted), 1)
  return coverage - _LENGTH_PENALTY * max(0, len(words) - _FREE_WORDS)


class FirstUnlessClearlyWorse:
  """A judge with a position bias: response A unless B is clearly better.

  Prefers A unless B's reward is higher by more than `margin`. Any object
  with `name` and `judge` is a judges.Judge.
  """

  def __init__(self, reward_fn: Callable[[str, str], float],
               margin: float = 0.25):
    self._reward_fn = reward_fn
    self._margin = margin
    self.name = f"first_unless_clearly_worse(margin={margin})"

  def judge(self, prompt: str, response_a: str, response_b: str) -> float:
    worse = (self._reward_fn(prompt, response_b)
             > self._reward_fn(prompt, response_a) + self._margin)
    return 0.0 if worse else 1.0


# (prompt, response_1, response_2): a clear winner, a tie, a long response
# paying its length penalty, and two close responses.
PAIRS = (
    ("Name the three primary colours.",
     "Red, blue and yellow are the three primary colours.",
     "I like painting."),
    ("Why is the sky blue?",
     "Sunlight scatters off air molecules and blue light scatters most, so "
     "the sky looks blue.",
     "The sky is blue because of scattering."),
    ("Define entropy.",
     "Entropy measures how many microstates fit a macrostate.",
     "Entropy " + "is a concept that people often find rather hard " * 8),
    ("List two prime numbers below ten.",
     "Two prime numbers below ten: 3 and 7.",
     "Prime numbers below ten include 3 and 7."),
)


def main() -> list[dict[str, object]]:
  """Judges PAIRS; returns one row of rewards and verdicts per pair."""
  judge = judges.make_judge(JUDGE_SPEC)   # as --judge=... builds it
  biased = FirstUnlessClearlyWorse(reward)
  rows = []
  print(f"{'r1':>6} {'r2':>6}  {'judge':>5} {'swapped':>7}  "
        f"{'biased':>6} {'swapped':>7}  prompt")
  for prompt, response_1, response_2 in PAIRS:
    row = {"prompt": prompt,
           "reward_1": reward(prompt, response_1),
           "reward_2": reward(prompt, response_2),
           "verdict": judge.judge(prompt, response_1, response_2),
           "swapped": judges.judge_swapped(judge, prompt, response_1,
                                           response_2),
           "biased": biased.judge(prompt, response_1, response_2),
           "biased_swapped": judges.judge_swapped(biased, prompt, response_1,
                                                  response_2)}
    rows.append(row)
    print(f"{row['reward_1']:6.2f} {row['reward_2']:6.2f}  "
          f"{row['verdict']:5.1f} {row['swapped']:7.2f}  "
          f"{row['biased']:6.1f} {row['biased_swapped']:7.2f}  {prompt}")
  print(f"judge: {judge.name}")
  return rows


if __name__ == "__main__":
  main()
