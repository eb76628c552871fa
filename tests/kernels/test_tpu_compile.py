"""The Mosaic kernels compile for a real TPU on this host (deviceless).

libtpu's XLA:TPU and Mosaic compilers build each op's forward and backward
for one v5e chip at a realistic shape (T5-L's D = 1024, T = 128, B = 2,
V = 32128), and at decoder LLMs' widths and vocabularies (T = 512, V not a
multiple of the vocabulary tile), with the default tiles: a VMEM overflow
or a Mosaic error fails here, where interpret mode (test_tpu_interpret.py)
and lowering (test_lowering.py) cannot see it. The whole matrix of
generations, widths and lengths is benchmarks/tpu_kernels.py (--shapes=llm
for the LLMs'). The vocabulary-parallel op (kernels.vocab_parallel) compiles
per shard under shard_map on a v5e:2x2 mesh with a model axis. Without
libtpu these tests fail with the install line: they are not skipped.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import tpu_kernels
from benchmarks.lib import timing
from benchmarks.lib import tpu
from dro_fast import kernels
from dro_fast.kernels.linear_logprobs import pallas_tpu as linear_pallas_tpu

DTYPES = ("float32", "bfloat16")


def _case(op, dtype, *, d=1024, generation="v5e", pass_="bwd"):
  return tpu_kernels.Case(op=op, pass_=pass_, generation=generation,
                          d=d if op == "linear_sequence_logprobs" else None,
                          t=128, batch=2, dtype=dtype)


def _assert_compiles(case):
  record = tpu_kernels.run_case(case)
  assert record["ok"], record.get("error")
  return record


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", tpu_kernels.OPS)
def test_forward_and_backward_compile_for_v5e(op, dtype):
  # value_and_grad holds the forward kernel and every backward kernel; the
  # record checks one tpu_custom_call per launch (interpret mode has none).
  tpu.require_libtpu()
  record = _assert_compiles(_case(op, dtype))
  assert record["ops_default_blocks"]
  assert record["tpu_custom_calls"] == tpu_kernels.LAUNCHES[(op, "bwd")]
  # The kernels' cost estimates reach XLA's cost analysis.
  if op == "linear_sequence_logprobs":
    n, v, d = 2 * 128, tpu_kernels.VOCAB, 1024
    assert record["flops"] >= 5 * 2 * n * d * v


@pytest.mark.parametrize("op, dtype, model", [
    ("linear_sequence_logprobs", "bfloat16", "qwen3_8b"),
    ("linear_sequence_logprobs", "float32", "gemma3_4b"),
    ("sequence_logprobs", "float32", "llama3_8b")])
def test_llm_shapes_compile_forward_and_backward_for_v5e(op, dtype, model):
  # Qwen3-8B's V = 151936 is 593.5 vocabulary tiles of 256 and Llama 3's
  # 128256 is 62.6 tiles of 2048: the last tile is ragged and masked.
  # Gemma 3 4B's float32 weight and its gradient take 5 GiB of the 16.
  tpu.require_libtpu()
  d, v = tpu_kernels.LLM_SHAPES[model]
  case = tpu_kernels.Case(op, "bwd", "v5e",
                          d if op == "linear_sequence_logprobs" else None,
                          t=512, batch=2, dtype=dtype, v=v, model=model)
  record = _assert_compiles(case)
  assert record["tpu_custom_calls"] == tpu_kernels.LAUNCHES[(op, "bwd")]
  assert record["fits_hbm"]
  assert record["vocab_tail"] == {"qwen3_8b": 128, "gemma3_4b": 0,
                                  "llama3_8b": 128256 % 2048}[model]
  if op == "linear_sequence_logprobs":
    # The weight's gradient is an output, no temporary: nothing [N, V].
    assert record["temp_bytes"] < 2 * 512 * v * 4
    assert record["output_bytes"] >= d * v * jnp.dtype(dtype).itemsize


def test_mosaic_vmem_need_is_the_least_limit_that_compiles():
  # Gemma 3 4B's forward (D = 2560, bfloat16, 256 x 512 tiles): the
  # measured need compiles (it is the limit it was found under) and 3% less
  # does not; it is under the kernels' limit.
  tpu.require_libtpu()
  d, v = tpu_kernels.LLM_SHAPES["gemma3_4b"]
  case = tpu_kernels.Case("linear_sequence_logprobs", "fwd", "v5e", d,
                          t=512, batch=2, dtype="bfloat16", v=v)
  devices = tpu.devices("v5e:2x2")
  need = tpu_kernels.mosaic_vmem_need(case, devices)["fwd"]
  assert 2**20 < need < linear_pallas_tpu.VMEM_LIMIT_BYTES
  with mock.patch.object(linear_pallas_tpu, "VMEM_LIMIT_BYTES",
                         int(need * 0.97)):
    jax.clear_caches()
    try:
      with pytest.raises(Exception, match="vmem|VMEM"):
        tpu_kernels.lower(case, devices).compile()
    finally:
      jax.clear_caches()


def test_xxl_width_compiles_for_v4_with_its_tiles():
  # v4 has 16 MiB of VMEM per core: default_block_sizes(..., "v4") fits it.
  tpu.require_libtpu()
  record = _assert_compiles(_case("linear_sequence_logprobs", "bfloat16",
                                  d=4096, generation="v4"))
  assert not record["ops_default_blocks"]


def test_vmem_overflow_is_a_failure():
  # Positive control: a float32 [256, 8192] logits tile, double-buffered,
  # fills v5e's default 16 MiB scoped VMEM on its own; Mosaic refuses it.
  tpu.require_libtpu()
  case = _case("sequence_logprobs", "float32", pass_="fwd")
  lowered = tpu_kernels.lower(case, tpu.devices("v5e:2x2"),
                              kernels.BlockSizes(rows=256, vocab=8192))
  with pytest.raises(Exception, match="vmem|VMEM"):
    lowered.compile()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("generation", [None, "v4", "v5e", "v5p", "v6e"])
def test_default_linear_tiles_fit_the_budget(generation, dtype):
  budget = (linear_pallas_tpu.VMEM_BUDGET_BYTES[generation or "v5e"])
  itemsize = jnp.dtype(dtype).itemsize
  for d in (512, 768, 1024, 2048, 4096):
    blocks = linear_pallas_tpu.default_block_sizes(d, dtype, generation)
    blocks.check_tpu()
    assert linear_pallas_tpu.vmem_bytes(d, itemsize, blocks.rows,
                                        blocks.vocab) <= budget
    if generation in ("v5e", "v5p", "v6e"):    # what the ops use
      assert blocks == linear_pallas_tpu.default_block_sizes(d, dtype)


def test_default_linear_tiles_by_width():
  tiles = lambda d, dtype: (lambda b: (b.rows, b.vocab))(
      linear_pallas_tpu.default_block_sizes(d, dtype))
  assert [tiles(d, "bfloat16") for d in (512, 1024, 2048, 4096)] == [
      (256, 512), (256, 512), (256, 512), (256, 256)]
  assert [tiles(d, "float32") for d in (1024, 2048, 4096)] == [
      (256, 512), (256, 256), (128, 128)]
  with pytest.raises(ValueError, match="generation"):
    linear_pallas_tpu.default_block_sizes(1024, "bfloat16", "v9")
  with pytest.raises(ValueError, match="chunked_xla"):
    linear_pallas_tpu.default_block_sizes(2 ** 20, "float32")


@pytest.mark.parametrize("data, model, dtype", [(1, 4, "bfloat16"),
                                                (2, 2, "float32")])
def test_vocab_parallel_compiles_per_shard_for_v5e(data, model, dtype):
  # The projection split over V on "model" of v5e:2x2 (T5's V = 32128:
  # 8032 or 16064 columns per chip, a ragged last vocabulary tile): each
  # chip's program holds the forward and both backward Mosaic kernels on
  # its own slice, all-reduces [N] values (and d(hidden), d(weight) over
  # the batch axis), and never gathers the weight or holds [N, V / M]
  # float32 logits.
  tpu.require_libtpu()
  devices = tpu.devices("v5e:2x2")
  mesh = jax.sharding.Mesh(
      np.array(devices).reshape(data, model), ("data", "model"),
      axis_types=(jax.sharding.AxisType.Auto,) * 2)
  b, t, d, v = 2 * data, 128, 1024, tpu_kernels.VOCAB
  spec = lambda shape, dt, *axes: jax.ShapeDtypeStruct(
      shape, jnp.dtype(dt), sharding=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(*axes)))
  fn = kernels.vocab_parallel(mesh, vocab_axis="model", batch_axes=("data",),
                              implementation="pallas_tpu", interpret=False)

  def program(hidden, weight, targets, mask):
    loss = lambda h, w: jnp.sum(fn(h, w, targets, mask))
    return jax.value_and_grad(loss, argnums=(0, 1))(hidden, weight)

  compiled = jax.jit(program).lower(
      spec((b, t, d), dtype, "data"), spec((d, v), dtype, None, "model"),
      spec((b, t), "int32", "data"), spec((b, t), "bool", "data")).compile()
  hlo = compiled.as_text()
  assert tpu.custom_call_targets(compiled).count("tpu_custom_call") == (
      tpu_kernels.LAUNCHES[("linear_sequence_logprobs", "bwd")])
  assert "all-reduce" in hlo and "all-gather" not in hlo
  memory = timing.compiled_peak_bytes(compiled)
  n, v_shard = (b // data) * t, v // model
  itemsize = jnp.dtype(dtype).itemsize
  # Over data > 1 the shard's d(weight) is a temporary until the data axis'
  # all-reduce; besides it, less than one float32 [N, V / M].
  summed = d * v_shard * itemsize if data > 1 else 0
  assert memory["temp_bytes"] - summed < n * v_shard * 4
  assert d * v_shard * itemsize <= memory["output_bytes"] < d * v * itemsize
