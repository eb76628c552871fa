"""Sequence-level alignment losses on per-example log-probabilities.

Usable by any JAX trainer: each takes [B] arrays (sums of token log-probs,
e.g. from dro_fast.kernels.sequence_logprobs) and returns (loss, metrics).
"""

from dro_fast.losses.dro_v import dro_v_loss
from dro_fast.losses.dro_v import scale_gradient
from dro_fast.losses.kto import kto_loss
from dro_fast.losses.kto import mismatched_indices
from dro_fast.losses.pairwise import pairwise_loss
from dro_fast.losses.pairwise import PAIRWISE_KINDS

__all__ = ["dro_v_loss", "kto_loss", "mismatched_indices", "pairwise_loss",
           "PAIRWISE_KINDS", "scale_gradient"]
