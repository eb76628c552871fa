"""dro_fast: DRO / DRO-V alignment from single-trajectory feedback, in JAX.

Layers, each importing only the ones before it:
kernels (dro_fast.kernels) -> data, models -> losses -> training -> CLIs.

`dro_fast.score(policy, prompts, completions)` (dro_fast.scoring.score):
log π(y | x) of a Hugging Face folder or a training run's policy. It is
imported on first use, so that `import dro_fast` imports no JAX.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  if name == "score":
    from dro_fast import scoring  # pylint: disable=g-import-not-at-top
    return scoring.score
  raise AttributeError(f"module 'dro_fast' has no attribute {name!r}")
