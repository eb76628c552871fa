"""T5 attention with the relative-position bias as a Pallas TPU (Mosaic)
flash attention: T5Config.attention "flash".

reference.py: the materialised computation (pure jnp), the contract.
pallas_tpu.py: the Mosaic kernels (TPU simulator on other backends).
ops.py: the differentiable op (custom VJP) over them.
"""

from dro_fast.models.flash_attention.ops import flash_attention
from dro_fast.models.flash_attention.pallas_tpu import BlockSizes

__all__ = ["BlockSizes", "flash_attention"]
