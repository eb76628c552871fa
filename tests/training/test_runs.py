"""dro_fast.training.runs: rebuilding a run from its run_config.json."""

from __future__ import annotations

import dataclasses

from dro_fast import models
from dro_fast.training import runs


def test_evaluation_rebuilds_a_cudnn_run_with_materialised_attention():
  # run_config.json of a run trained with --attention=cudnn on a GPU; its
  # evaluation may run anywhere.
  config = models.preset("tiny", dtype="bfloat16", remat="dots")
  run = {"model": dataclasses.asdict(config.replace(attention="cudnn"))}
  assert runs.model_config(run) == config
