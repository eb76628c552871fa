"""Static configuration of flash_attention: its tiles and one call's statics."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from dro_fast.kernels import config
from dro_fast.kernels.flash_attention.relative_bias import RelativeBias


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the flash attention kernels; a hashable static argument.

  Inputs shorter than a block shrink it to their length rounded up to 128;
  lengths need not be multiples (tails are padded and masked).

  Attributes:
    block_q: queries per tile (a multiple of 128: the tile's rows are also
      the lanes of its transpose in the backward).
    block_k: keys per tile (a multiple of 128, Mosaic's lane width).
  """
  block_q: int = 128
  block_k: int = 128

  def __post_init__(self):
    config.check_sizes(self, multiple=128, why=" (Mosaic's lane width)")


@dataclasses.dataclass(frozen=True)
class CallConfig:
  """Everything static about one call: the custom_vjp's nondiff argument.

  Attributes:
    implementation: the key of ops.IMPLEMENTATIONS that runs the call.
    causal: query i sees keys j <= i only.
    bidirectional: the bias's bucket rule; None: no bias.
    max_distance: the bias's last-bucket distance (0 without a bias).
    block_sizes: the tiles.
    interpret: pallas_call's interpret.
    residual_names: checkpoint_name tags of the saved output and
      log-sum-exp, or None.
  """
  implementation: str
  causal: bool
  bidirectional: bool | None
  max_distance: int
  block_sizes: BlockSizes
  interpret: Any
  residual_names: tuple[str, str] | None

  def relative_bias(self, table: jax.Array | None) -> RelativeBias | None:
    """The bias of `table` [H, buckets] under this call's rule (None: none)."""
    if table is None:
      return None
    return RelativeBias(table, self.bidirectional, self.max_distance)
