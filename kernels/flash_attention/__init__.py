"""T5 attention with the relative-position bias as a flash attention op.

relative_bias.py: T5's bucket rule and the factored bias (RelativeBias).
config.py: BlockSizes and one call's statics.
reference.py: the materialised computation (pure jnp), the contract.
pallas_tpu.py: the Mosaic kernels (the TPU simulator on other platforms).
ops.py: the public op (custom VJP) and IMPLEMENTATIONS.
"""

from dro_fast.kernels.flash_attention.config import BlockSizes
from dro_fast.kernels.flash_attention.ops import flash_attention
from dro_fast.kernels.flash_attention.ops import Implementation
from dro_fast.kernels.flash_attention.ops import IMPLEMENTATIONS
from dro_fast.kernels.flash_attention.relative_bias import RelativeBias

__all__ = ["BlockSizes", "IMPLEMENTATIONS", "Implementation", "RelativeBias",
           "flash_attention"]
