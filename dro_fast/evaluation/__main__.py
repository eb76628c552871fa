"""`python -m dro_fast.evaluation`: the side-by-side evaluation CLI."""

from absl import app

from dro_fast.evaluation import evaluate

if __name__ == "__main__":
  app.run(evaluate.main)
