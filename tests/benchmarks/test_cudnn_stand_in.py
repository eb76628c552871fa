"""benchmarks/cudnn_stand_in.py: cuDNN attention's memory stand-in computes
T5 attention, and keeps for the backward what cuDNN keeps."""

from __future__ import annotations

import jax
import pytest

from benchmarks import cudnn_stand_in
from dro_fast import models
from dro_fast.models import attention
from tests.models import attention_cases
from tests.models.attention_cases import B, CONFIG, S, T


@pytest.fixture
def stand_in():
  """T5Config.attention that runs the stand-in."""
  return cudnn_stand_in.IMPLEMENTATION


def test_the_config_takes_the_stand_in_by_value():
  stand_in_entry = cudnn_stand_in.IMPLEMENTATION
  assert stand_in_entry.name == cudnn_stand_in.NAME
  assert stand_in_entry.fn is cudnn_stand_in.stand_in_attention
  assert not attention.takes_relative_bias(stand_in_entry)
  assert cudnn_stand_in.NAME not in attention.IMPLEMENTATIONS
  config = CONFIG.replace(attention=stand_in_entry)
  assert config.attention is stand_in_entry


@pytest.mark.parametrize("causal", [False, True], ids=["padded", "causal"])
def test_stand_in_matches_a_float64_reference(causal):
  attention_cases.check_against_reference(cudnn_stand_in.stand_in_attention,
                                          causal)


def test_model_with_the_stand_in_matches_the_materialised_one(stand_in):
  encoder, targets = attention_cases.tokens()
  params = models.t5(CONFIG).init(jax.random.key(0), encoder, targets)
  attention_cases.check_matches_materialised(
      CONFIG.replace(attention=stand_in), params)


@pytest.mark.parametrize("remat", ["dots", "dots_except_mlp_hidden", "full"])
def test_stand_in_keeps_what_cudnn_keeps(stand_in, remat):
  # Under the "dots" policies the stand-in's output and log-sum-exp are
  # saved for the backward, as cuDNN's are; the [B, H, q, k] logits are
  # not, under any of these policies.
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  encoder, targets = attention_cases.tokens()
  attentions = CONFIG.num_encoder_layers + 2 * CONFIG.num_decoder_layers
  model = models.t5(CONFIG.replace(attention=stand_in, matmul="xla",
                                   remat=remat))
  params = model.init(jax.random.key(0), encoder, targets)
  residuals = saved_residuals(
      lambda p: model.apply.logits(p, None, encoder, targets).sum(), params)
  tagged = sum("fused_attention_" in description
               for _, description in residuals)
  assert tagged == (0 if remat == "full" else 2 * attentions)
  # (The [1, H, q, k] relative-position bias is kept, as cuDNN keeps it.)
  assert not any(a.ndim == 4 and a.shape[0] == B
                 and a.shape[-2:] in ((S, S), (T, T), (T, S))
                 for a, _ in residuals)
