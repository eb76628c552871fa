"""Static configuration shared by every kernel implementation.

Glossary: N rows (= B·T flattened token positions), V vocabulary, D hidden
width.

Every op (sequence_logprobs, linear_logprobs, flash_attention) takes from
here: NEG_LARGE, the block-size check (`check_sizes`), the tile arithmetic
(`round_up`, `fit_rows`) and the interpret-mode choice (`interpret_mode`,
`interpret_for`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from dro_fast.kernels import platform as platform_lib

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
    check_sizes(self, least={"vocab_splits": 0})

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
  """Everything static about one op call: one hashable custom_vjp argument."""
  implementation: str
  block_sizes: BlockSizes | None
  interpret: Any


def check_sizes(sizes: Any, *, least: dict[str, int] | None = None,
                multiple: int = 1, why: str = "") -> None:
  """Checks each field of a block-size dataclass: an int >= least, a multiple.

  Args:
    sizes: a dataclass instance whose fields are all tile sizes.
    least: per-field lower bounds (default 1).
    multiple: every field must be a multiple of this.
    why: the reason for `multiple`, appended to the message.

  Raises:
    ValueError: naming the first bad field, e.g. "BlockSizes.rows must be an
      int >= 1, got 0."
  """
  for field in dataclasses.fields(sizes):
    value = getattr(sizes, field.name)
    bound = (least or {}).get(field.name, 1)
    if (not isinstance(value, int) or isinstance(value, bool) or value < bound
        or value % multiple):
      rule = f"an int >= {bound}"
      if multiple > 1:
        rule += f" and a multiple of {multiple}{why}"
      raise ValueError(f"{type(sizes).__name__}.{field.name} must be {rule}, "
                       f"got {value!r}.")


def round_up(x: int, multiple: int) -> int:
  """The least multiple of `multiple` that is >= x."""
  return -(-x // multiple) * multiple


def fit_rows(block_rows: int, n_rows: int, multiple: int) -> int:
  """Shrinks a row tile for short inputs, keeping the layout multiple."""
  return max(multiple, min(block_rows, round_up(n_rows, multiple)))


def interpret_mode(native: str, interpret: bool) -> Any:
  """pallas_call's `interpret` for a `native` kernel, compiled or interpreted.

  Args:
    native: the platform the kernel is written for: "tpu" (Mosaic) or "gpu"
      (Triton).
    interpret: whether to interpret it (the program compiles for another
      platform than `native`).

  Returns:
    False (compile the kernel); when interpreted, the TPU simulator
    (pltpu.InterpretParams()) for Mosaic, Pallas's generic interpreter
    (True) for Triton.
  """
  if not interpret:
    return False
  if native == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.InterpretParams()
  return True


def interpret_for(native: str, platform: str) -> Any:
  """interpret_mode for a `native` kernel in a program for `platform`.

  Args:
    native: as for interpret_mode.
    platform: the platform the program compiles for ("cpu", "gpu", "tpu"),
      which its caller knows (dro_fast.backend's fields, a mesh's devices:
      platform.target_platform).
  """
  return interpret_mode(native, platform != native)


def resolve_interpret(interpret: Any, native: str) -> Any:
  """`interpret` as given, or for None interpret_for the target platform."""
  if interpret is None:
    return interpret_for(native, platform_lib.target_platform())
  return interpret
