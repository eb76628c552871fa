"""dro_fast.kernels: fused log-probability kernels for sequence-level RL losses.

Usable without the rest of dro_fast (no Haiku, no T5):

  from dro_fast import kernels
  logp = kernels.sequence_logprobs(logits, targets, mask)          # [B]
  delta, logp = kernels.dro_residual(logits, targets, mask, rewards,
                                     values, ref_logprobs, tau=1.0)
  logp = kernels.linear_sequence_logprobs(hidden, weight, targets, mask)
  # The projection split over V on a mesh axis (no weight gathered):
  logp = kernels.vocab_parallel(mesh, vocab_axis="model")(
      hidden, weight, targets, mask)
  out = kernels.flash_attention(q, k, v, relative_bias=bias, lengths=lengths,
                                interpret=kernels.interpret_for("tpu", "cpu"))

For the log-prob ops `implementation=` picks a key of IMPLEMENTATIONS
("xla", "chunked_xla", "pallas_tpu", "pallas_gpu"); None picks by the
platform the program compiles for (`target_platform`, the one function that
asks JAX), as `interpret=None` does.
flash_attention (T5 attention with its relative-position bias) has its own
table, IMPLEMENTATIONS of dro_fast.kernels.flash_attention.ops ("xla",
"pallas_tpu"). Every table is fixed at import. One folder per op:
reference.py, the backends, ops.py.
"""

from dro_fast.kernels.config import BlockSizes
from dro_fast.kernels.config import interpret_for
from dro_fast.kernels.config import interpret_mode
from dro_fast.kernels.flash_attention.ops import flash_attention
from dro_fast.kernels.linear_logprobs.ops import linear_sequence_logprobs
from dro_fast.kernels.linear_logprobs.ops import linear_token_logprobs
from dro_fast.kernels.linear_logprobs import vocab_parallel as _vp
from dro_fast.kernels.platform import target_platform
from dro_fast.kernels.registry import default_implementation
from dro_fast.kernels.registry import implementation_for
from dro_fast.kernels.registry import Implementation
from dro_fast.kernels.registry import IMPLEMENTATIONS
from dro_fast.kernels.sequence_logprobs.ops import dro_residual
from dro_fast.kernels.sequence_logprobs.ops import masked_sum
from dro_fast.kernels.sequence_logprobs.ops import sequence_logprobs
from dro_fast.kernels.sequence_logprobs.ops import token_logprobs

vocab_parallel = _vp.vocab_parallel
vocab_parallel_linear_sequence_logprobs = (
    _vp.vocab_parallel_linear_sequence_logprobs)
vocab_parallel_linear_token_logprobs = _vp.vocab_parallel_linear_token_logprobs

__all__ = [
    "BlockSizes", "IMPLEMENTATIONS", "Implementation", "default_implementation",
    "dro_residual", "flash_attention", "implementation_for", "interpret_for",
    "interpret_mode", "linear_sequence_logprobs", "linear_token_logprobs",
    "masked_sum", "sequence_logprobs", "target_platform", "token_logprobs",
    "vocab_parallel", "vocab_parallel_linear_sequence_logprobs",
    "vocab_parallel_linear_token_logprobs",
]
