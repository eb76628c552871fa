"""The Mosaic kernels under TPU interpret mode with race detection.

The interpreter keeps one race record per kernel launch, so each kernel is
launched and checked on its own. float32 and bfloat16 inputs, against the
float64 reference with the dtype's tolerance (cases.TOLERANCES).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from benchmarks.lib import numpy_reference as ref
from dro_fast import kernels
from dro_fast.kernels.linear_logprobs import pallas_tpu as linear_pallas_tpu
from tests.kernels import cases

RACES = pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)
IMPL = kernels.IMPLEMENTATIONS["pallas_tpu"]


def _races_found(outputs) -> bool:
  jax.block_until_ready(outputs)
  return interpret_pallas_call.races.races_found


def test_detector_flags_a_racy_kernel():
  # Positive control: two parallel programs write the same output block.
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  racy = pl.pallas_call(
      kernel, grid=(2,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=RACES)
  assert _races_found(racy(jnp.ones((16, 128))))


# The linear kernels round dlogits to the operand dtype before each
# contraction (as the MXU takes it), so bfloat16 gradients carry ~2**-8
# relative error of the largest terms (test_linear_logprobs.py).
LINEAR_GRAD_TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5),
                         "bfloat16": dict(rtol=3e-2, atol=3e-2)}
DTYPES = pytest.mark.parametrize("dtype", cases.DTYPES,
                                 ids=lambda d: d.__name__)


@DTYPES
def test_sequence_kernels_are_race_free(dtype):
  logits, targets, mask, g = cases.random_inputs(20, 2, 9, 300, dtype)
  rows, flat_targets = logits.reshape(18, 300), targets.reshape(18)
  logprobs, lse = IMPL.token_logprobs(rows, flat_targets, cases.SMALL_BLOCKS,
                                      RACES)
  assert not _races_found((logprobs, lse))
  g_rows = jnp.repeat(g, 9) * mask.reshape(18)
  dlogits = IMPL.token_logprobs_bwd(rows, flat_targets, lse, g_rows,
                                    cases.SMALL_BLOCKS, RACES)
  assert not _races_found(dlogits)
  assert logprobs.dtype == lse.dtype == jnp.float32
  assert dlogits.dtype == dtype
  expected, _ = ref.token_logprobs(logits, targets)
  cases.close(logprobs, expected.reshape(18), **cases.tolerance(dtype,
                                                                "value"))
  cases.close(dlogits.reshape(logits.shape),
              ref.sequence_logprobs_vjp(logits, targets, mask, g),
              **cases.tolerance(dtype, "grad"))


@DTYPES
def test_linear_kernels_are_race_free(dtype):
  _, targets, mask, g = cases.random_inputs(21, 2, 9, 300, dtype)
  rng = np.random.default_rng(21)
  hidden = jnp.asarray(rng.normal(size=(18, 16)), dtype)
  weight = jnp.asarray(rng.normal(size=(16, 300)) / 2, dtype)
  flat_targets = targets.reshape(18)
  logprobs, lse = IMPL.linear_token_logprobs(hidden, weight, flat_targets,
                                             cases.SMALL_BLOCKS, RACES)
  assert not _races_found((logprobs, lse))
  g_rows = jnp.repeat(g, 9) * mask.reshape(18)
  args = (hidden, weight, flat_targets, lse, g_rows, cases.SMALL_BLOCKS,
          RACES)
  dhidden = linear_pallas_tpu.linear_dhidden(*args)
  assert not _races_found(dhidden)
  dweight = linear_pallas_tpu.linear_dweight(*args)
  assert not _races_found(dweight)
  assert dhidden.dtype == dweight.dtype == dtype
  expected, _ = ref.token_logprobs(
      np.asarray(hidden.astype(jnp.float32), np.float64)
      @ np.asarray(weight.astype(jnp.float32), np.float64),
      flat_targets)
  cases.close(logprobs, expected, **cases.tolerance(dtype, "value"))
  dh_ref, dw_ref = ref.linear_sequence_logprobs_vjp(
      hidden.reshape(2, 9, 16), weight, targets, mask, g)
  tol = LINEAR_GRAD_TOLERANCE[jnp.dtype(dtype).name]
  cases.close(dhidden, dh_ref.reshape(18, 16), **tol)
  cases.close(dweight, dw_ref, **tol)
