"""Static configuration shared by every kernel implementation.

Glossary: N rows (= B·T flattened token positions), V vocabulary, D hidden width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

# A finite stand-in for -inf: keeps `exp(x - m)` NaN-free when a whole tile is
# masked (−inf − (−inf) is NaN, MIN − MIN is 0).
NEG_LARGE = float(jax.numpy.finfo(jax.numpy.float32).min)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of one kernel call; a hashable static argument.

  Attributes:
    rows: token positions per tile (TPU: a multiple of 8; GPU: a power of 2).
    vocab: vocabulary entries per tile (TPU: a multiple of 128; GPU: a power
      of 2). V need not be a multiple: the tail tile is masked.
    hidden: hidden-width chunk for the fused matmul on GPU (power of 2);
      ignored elsewhere (TPU holds the whole D in one tile, so its rows and
      vocab shrink with D: linear_logprobs.pallas_tpu.default_block_sizes).
    vocab_chunk: vocabulary entries per chunk for "chunked_xla" and the GPU
      linear backward: the peak temporary is rows x vocab_chunk floats.
    num_warps: warps per Triton program (GPU only; a power of 2).
    num_stages: Triton software-pipelining depth of the loops (GPU only).
    vocab_splits: programs that share one row tile's vocabulary in the GPU
      forwards, each reducing a slice to a partial log-sum-exp that a tiny
      XLA step combines (split-K style: more work in flight for few rows);
      0 picks enough slices for ~512 programs.
  """

  rows: int = 256
  vocab: int = 2048
  hidden: int = 64
  vocab_chunk: int = 2048
  num_warps: int = 4
  num_stages: int = 2
  vocab_splits: int = 1

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      least = 0 if field.name == "vocab_splits" else 1
      if not isinstance(value, int) or value < least:
        raise ValueError(
            f"BlockSizes.{field.name} must be an int >= {least}, got "
            f"{value!r}.")

  def check_tpu(self):
    if self.rows % 8 or self.vocab % 128:
      raise ValueError(
          f"pallas_tpu needs BlockSizes.rows % 8 == 0 and vocab % 128 == 0 "
          f"(Mosaic tiles are (8, 128)); got rows={self.rows}, "
          f"vocab={self.vocab}.")

  def check_gpu(self):
    for name in ("rows", "vocab", "hidden", "num_warps"):
      value = getattr(self, name)
      if value & (value - 1):
        raise ValueError(
            f"pallas_gpu needs power-of-2 block sizes (Triton); got "
            f"BlockSizes.{name}={value}.")


@dataclasses.dataclass(frozen=True)
class CallConfig:
  """Everything static about one op call: a single hashable custom_vjp
  argument (not a positional nondiff_argnums list)."""
  implementation: str
  block_sizes: BlockSizes | None
  interpret: Any


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def fit_rows(block_rows: int, n_rows: int, multiple: int) -> int:
  """Shrinks a row tile for short inputs, keeping the layout multiple."""
  return max(multiple, min(block_rows, round_up(n_rows, multiple)))


def tpu_interpret(interpret: Any) -> Any:
  """`interpret` for a Mosaic kernel: simulate the TPU unless on one."""
  if interpret is None:
    if jax.default_backend() == "tpu":
      return False
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.InterpretParams()
  return interpret


def gpu_interpret(interpret: Any) -> Any:
  """`interpret` for a Triton kernel: the generic interpreter unless on a GPU."""
  if interpret is None:
    return jax.default_backend() != "gpu"
  return interpret
