"""kernels/flash_attention: T5 attention with the relative-position bias.

Every implementation (the materialised "xla" reference and the Mosaic
"pallas_tpu" kernels, run here in the TPU simulator) against a float64
numpy attention, values and gradients; the same under jax_enable_x64. The
Mosaic kernels themselves are compiled for a TPU v5e without one
(deviceless, through libtpu): a block shape, lowering or VMEM error fails
that test, and so does a missing libtpu. The model's attention "flash" is
tested in tests/models/test_fused_attention.py.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import kernels
from dro_fast.kernels.flash_attention import BlockSizes
from dro_fast.kernels.flash_attention import ops
from dro_fast.kernels.flash_attention import pallas_tpu
from dro_fast.kernels.flash_attention import RelativeBias
from dro_fast.kernels.flash_attention import relative_bias

SIMULATOR = kernels.interpret_for("tpu", "cpu")
NUM_BUCKETS, MAX_DISTANCE = 32, 128


def _buckets(relative: np.ndarray, bidirectional: bool) -> np.ndarray:
  return np.asarray(relative_bias.relative_position_bucket(
      jnp.asarray(relative), bidirectional, NUM_BUCKETS, MAX_DISTANCE))


def reference(q, k, v, table, lengths, causal, bidirectional, cotangent):
  """float64 output and gradients (q, k, v, table) of T5 attention with the
  bias table[h, bucket(j − i)] (table None: no bias); a query that sees no
  key gets output 0."""
  q, k, v, cotangent = (np.asarray(a, np.float64) for a in
                        (q, k, v, cotangent))
  q_len, k_len = q.shape[1], k.shape[1]
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if table is not None:
    buckets = _buckets(np.arange(k_len)[None, :] - np.arange(q_len)[:, None],
                       bidirectional)                             # [q, k]
    logits = logits + np.asarray(table, np.float64)[:, buckets][None]
  keys = np.arange(k_len)
  visible = keys[None, None, None, :] < lengths[:, None, None, None]
  if causal:
    visible = visible & (keys[None, :] <= np.arange(q_len)[:, None])
  logits = np.where(visible, logits, -np.inf)
  peak = logits.max(-1, keepdims=True)
  weights = np.exp(logits - np.where(np.isfinite(peak), peak, 0.0))
  total = weights.sum(-1, keepdims=True)
  weights /= np.where(total == 0, 1.0, total)
  out = np.einsum("bhqk,bkhd->bqhd", weights, v)
  d_weights = np.einsum("bqhd,bkhd->bhqk", cotangent, v)
  d_logits = weights * (d_weights - (d_weights * weights).sum(-1,
                                                              keepdims=True))
  grads = [np.einsum("bhqk,bkhd->bqhd", d_logits, k),
           np.einsum("bhqk,bqhd->bkhd", d_logits, q),
           np.einsum("bhqk,bqhd->bkhd", weights, cotangent)]
  if table is not None:
    d_table = np.zeros(np.shape(table))
    for bucket in range(NUM_BUCKETS):
      d_table[:, bucket] = d_logits[:, :, buckets == bucket].sum((0, 2))
    grads.append(d_table)
  return out, grads


# (name, q_len, k_len, lengths, causal, bidirectional or None for no bias):
# lengths that are not block multiples, two q and k tiles at 128.
CASES = [
    ("encoder", 200, 200, [200, 70], False, True),
    ("decoder", 200, 200, [200, 200], True, False),
    ("cross", 72, 140, [0, 100], False, None),
]


def check_against_reference(implementation, q_len, k_len, lengths, causal,
                            bidirectional):
  """The op's float32 output and VJP (random cotangent) against float64."""
  rng = np.random.default_rng(3)
  b, h, d = 2, 3, 8
  q, k, v, cotangent = (rng.normal(size=shape).astype(np.float32) for shape in
                        ((b, q_len, h, d), (b, k_len, h, d), (b, k_len, h, d),
                         (b, q_len, h, d)))
  table = (None if bidirectional is None else
           rng.normal(size=(h, NUM_BUCKETS)).astype(np.float32))
  lengths = np.asarray(lengths, np.int32)

  def loss(q, k, v, table):
    bias = None if table is None else RelativeBias(table, bidirectional,
                                                   MAX_DISTANCE)
    out = kernels.flash_attention(q, k, v, relative_bias=bias,
                                  lengths=jnp.asarray(lengths), causal=causal,
                                  implementation=implementation,
                                  interpret=SIMULATOR)
    return jnp.sum(out * cotangent), out

  argnums = (0, 1, 2) if table is None else (0, 1, 2, 3)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
      q, k, v, table)
  want_out, want_grads = reference(q, k, v, table, lengths, causal,
                                   bidirectional, cotangent)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for grad_name, got, want in zip("q k v table".split(), grads, want_grads):
    assert got.dtype == jnp.float32, grad_name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                               err_msg=grad_name)


@pytest.mark.parametrize("implementation", sorted(ops.IMPLEMENTATIONS))
@pytest.mark.parametrize("name, q_len, k_len, lengths, causal, bidirectional",
                         CASES, ids=[case[0] for case in CASES])
def test_flash_matches_a_float64_reference(implementation, name, q_len, k_len,
                                           lengths, causal, bidirectional):
  del name
  check_against_reference(implementation, q_len, k_len, lengths, causal,
                          bidirectional)


def test_registry_is_fixed_and_holds_the_kernel():
  assert set(ops.IMPLEMENTATIONS) == {"xla", "pallas_tpu"}
  assert ops.IMPLEMENTATIONS["pallas_tpu"].native_backend == "tpu"
  with pytest.raises(TypeError):
    ops.IMPLEMENTATIONS["mine"] = ops.IMPLEMENTATIONS["xla"]
  with pytest.raises(ValueError, match="choose one of"):
    kernels.flash_attention(jnp.ones((1, 2, 1, 8)), jnp.ones((1, 2, 1, 8)),
                            jnp.ones((1, 2, 1, 8)), relative_bias=None,
                            lengths=None, implementation="pallas_gpu")


@pytest.mark.parametrize("implementation", sorted(ops.IMPLEMENTATIONS))
def test_flash_runs_under_x64(implementation):
  # float32 inputs with jax_enable_x64 on: Python ints become int64 there,
  # which the kernels' int32 index arithmetic must not meet.
  with jax.enable_x64(True):
    check_against_reference(implementation, 9, 9, [9, 4], True, False)


@pytest.mark.parametrize("block_q, block_k", [(128, 128), (256, 128),
                                              (128, 256), (384, 256)])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("q_len, k_len", [(1000, 1000), (130, 900)])
def test_bias_tiles_equal_the_bias_of_every_grid_tile(block_q, block_k,
                                                      bidirectional, q_len,
                                                      k_len):
  # The kernels read tile tile_index(i, j) of the nd distinct ones; that
  # tile must hold the buckets of grid tile (i, j), far tiles included.
  far = max(MAX_DISTANCE, NUM_BUCKETS)
  tiles = pallas_tpu.tiling(BlockSizes(block_q, block_k), q_len, k_len,
                            causal=False,
                            constant_from=far if bidirectional else 0,
                            constant_below=-far)
  distinct = _buckets(tiles.relative_positions(), bidirectional)
  assert tiles.num_tiles <= 2 + 2 * (far + block_q + block_k) // tiles.step
  bq, bk = tiles.block_q, tiles.block_k
  rows, cols = np.arange(tiles.q_len), np.arange(tiles.k_len)
  everywhere = _buckets(cols[None, :] - rows[:, None], bidirectional)
  for i in range(tiles.grid_q):
    for j in range(tiles.grid_k):
      np.testing.assert_array_equal(
          distinct[int(tiles.tile_index(i, j))],
          everywhere[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk],
          err_msg=f"tile ({i}, {j})")


@pytest.mark.parametrize("changes", [dict(block_q=64), dict(block_k=8),
                                     dict(block_q=0), dict(block_k=128.0)])
def test_block_sizes_are_validated(changes):
  with pytest.raises(ValueError, match=r"BlockSizes\.block_. must be an int "
                     r">= 1 and a multiple of 128 \(Mosaic's lane width\)"):
    BlockSizes(**changes)


def _v5e_chip():
  """One TPU v5e chip of a deviceless v5e:2x2 topology (libtpu)."""
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("deviceless TPU compilation needs libtpu: pip install -e "
                "\".[tpu]\" (the `tpu` extra).")
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")
  # Several processes may compile at once (libtpu's host lock file).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  topology = topologies.get_topology_desc(platform="tpu",
                                          topology_name="v5e:2x2")
  return topology.devices[0]


def test_mosaic_compiles_forward_and_backward_for_v5e():
  # T5-L's per-chip attention: B 2, S 512, H 16, K 64, bfloat16; encoder
  # (bidirectional bias, padded keys), decoder (causal bias) and cross
  # attention (no bias), forward and backward, as Mosaic kernels.
  chip = _v5e_chip()
  mesh = jax.sharding.Mesh(np.array([chip]), ("chip",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  b, s, t, h, d = 2, 512, 256, 16, 64

  def spec(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

  def loss(x, y, encoder_table, decoder_table, lengths):
    run = lambda q, k, v, **kw: kernels.flash_attention(  # noqa: E731
        q, k, v, interpret=False, **kw)
    encoded = run(x, x, x, lengths=lengths, relative_bias=RelativeBias(
        encoder_table, True, MAX_DISTANCE))
    decoded = run(y, y, y, lengths=None, causal=True,
                  relative_bias=RelativeBias(decoder_table, False,
                                             MAX_DISTANCE))
    crossed = run(decoded, encoded, encoded, lengths=lengths,
                  relative_bias=None)
    return jnp.sum(crossed.astype(jnp.float32))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
      spec((b, s, h, d)), spec((b, t, h, d)), spec((h, 32), jnp.float32),
      spec((h, 32), jnp.float32), spec((b,), jnp.int32)).compile()
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') == 6
  memory = compiled.memory_analysis()
  # No [B, H, S, S] float32 logits (32 MiB) anywhere.
  assert memory.temp_size_in_bytes < b * h * s * s * 4, memory
