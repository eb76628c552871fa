"""dro_fast.kernels: fused log-probability kernels for sequence-level RL losses.

Usable without the rest of dro_fast (no Haiku, no T5):

  from dro_fast import kernels
  logp = kernels.sequence_logprobs(logits, targets, mask)          # [B]
  delta, logp = kernels.dro_residual(logits, targets, mask, rewards,
                                     values, ref_logprobs, tau=1.0)
  logp = kernels.linear_sequence_logprobs(hidden, weight, targets, mask)

`implementation=` picks a key of IMPLEMENTATIONS ("xla", "chunked_xla",
"pallas_tpu", "pallas_gpu"); None picks by backend.
"""

from dro_fast.kernels.config import BlockSizes
from dro_fast.kernels.linear_logprobs.ops import linear_sequence_logprobs
from dro_fast.kernels.linear_logprobs.ops import linear_token_logprobs
from dro_fast.kernels.registry import default_implementation
from dro_fast.kernels.registry import implementation_for
from dro_fast.kernels.registry import Implementation
from dro_fast.kernels.registry import IMPLEMENTATIONS
from dro_fast.kernels.sequence_logprobs.ops import dro_residual
from dro_fast.kernels.sequence_logprobs.ops import masked_sum
from dro_fast.kernels.sequence_logprobs.ops import sequence_logprobs
from dro_fast.kernels.sequence_logprobs.ops import token_logprobs

__all__ = [
    "BlockSizes", "IMPLEMENTATIONS", "Implementation", "default_implementation",
    "dro_residual", "linear_sequence_logprobs", "linear_token_logprobs",
    "implementation_for", "masked_sum", "sequence_logprobs", "token_logprobs",
]
