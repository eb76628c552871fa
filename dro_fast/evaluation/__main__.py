"""`python -m dro_fast.evaluation` (or `dro-fast-evaluate`): the side-by-side
evaluation CLI."""

from absl import app

from dro_fast.evaluation import evaluate


def run() -> None:
  """The `dro-fast-evaluate` console script."""
  app.run(evaluate.main)


if __name__ == "__main__":
  run()
