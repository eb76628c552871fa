"""T5Config.attention="flash": the Pallas TPU flash attention with T5's
relative-position bias (dro_fast/models/flash_attention).

On the CPU the kernels run in the TPU simulator (pltpu.InterpretParams):
values and gradients against a float64 numpy attention, and the model
against attention "xla". The Mosaic kernels themselves are compiled for a
TPU v5e without one (deviceless, through libtpu): a block shape, lowering or
VMEM error fails that test, and so does a missing libtpu.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.models import attention
from dro_fast.models.flash_attention import BlockSizes
from dro_fast.models.flash_attention import ops
from dro_fast.models.flash_attention import pallas_tpu
from dro_fast.models.layers import relative_position_bucket
from dro_fast.models.layers import RelativeBias
from tests.models import attention_cases

NUM_BUCKETS, MAX_DISTANCE = 32, 128


def _buckets(relative: np.ndarray, bidirectional: bool) -> np.ndarray:
  return np.asarray(relative_position_bucket(
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


@pytest.mark.parametrize("name, q_len, k_len, lengths, causal, bidirectional",
                         CASES, ids=[case[0] for case in CASES])
def test_flash_matches_a_float64_reference(name, q_len, k_len, lengths,
                                           causal, bidirectional):
  del name
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
    out = ops.flash_attention(q, k, v, relative_bias=bias,
                              lengths=jnp.asarray(lengths), causal=causal,
                              interpret=pallas_tpu.interpret_params("cpu"))
    return jnp.sum(out * cotangent), out

  argnums = (0, 1, 2) if table is None else (0, 1, 2, 3)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
      q, k, v, table)
  want_out, want_grads = reference(q, k, v, table, lengths, causal,
                                   bidirectional, cotangent)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for grad_name, got, want in zip("q k v table".split(), grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                               err_msg=grad_name)


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
  with pytest.raises(ValueError, match="multiple of 128"):
    BlockSizes(**changes)


# The tiny model, its layers scanned so that each stack's attention is
# traced (and simulated) once.
FLASH_CONFIG = attention_cases.CONFIG.replace(attention="flash",
                                              scan_layers=True)


def test_flash_model_matches_the_materialised_one():
  # bfloat16 compute on both sides; the two differ in summation order and
  # where the probabilities are rounded.
  encoder, targets = attention_cases.tokens()
  params = models.t5(FLASH_CONFIG).init(jax.random.key(0), encoder, targets)
  flash = attention_cases.logits_and_grads(FLASH_CONFIG, params, encoder,
                                           targets)
  xla = attention_cases.logits_and_grads(
      FLASH_CONFIG.replace(attention="xla"), params, encoder, targets)
  scale = float(jnp.max(jnp.abs(xla[0])))
  np.testing.assert_allclose(flash[0], xla[0], atol=0.02 * scale)
  flat_flash = dict(jax.tree_util.tree_leaves_with_path(flash[1]))
  for path, want in jax.tree_util.tree_leaves_with_path(xla[1]):
    got = flat_flash[path]
    assert float(jnp.max(jnp.abs(want))) > 0, path
    error = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert error < 0.05, (jax.tree_util.keystr(path), error)


@pytest.mark.parametrize("remat", ["none", "dots", "dots_except_mlp_hidden",
                                   "full"])
def test_remat_keeps_the_flash_residuals(remat):
  # Under the "dots" policies the output and log-sum-exp (FUSED_RESIDUALS)
  # are saved, so no forward kernel runs twice; "full" saves neither. No
  # [B, H, q, k] array (bias or logits) is a residual under any policy.
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=g-import-not-at-top
  encoder, targets = attention_cases.tokens()
  config = FLASH_CONFIG.replace(platform="tpu", remat=remat,
                                scan_layers=False)
  model = models.t5(config)
  params = jax.eval_shape(model.init, jax.random.key(0), encoder, targets)
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
  residuals = saved_residuals(
      lambda p: model.apply.logits(p, None, encoder, targets).sum(), params)
  attentions = config.num_encoder_layers + 2 * config.num_decoder_layers
  tagged = sum("fused_attention_" in description
               for _, description in residuals)
  assert tagged == (0 if remat == "full" else 2 * attentions)
  b, s, t = attention_cases.B, attention_cases.S, attention_cases.T
  assert not any(a.ndim == 4 and a.shape[-2:] in ((s, s), (t, t), (t, s))
                 for a, _ in residuals)


def test_flash_config_checks():
  with pytest.raises(ValueError, match="applies no dropout"):
    models.preset("tiny", attention="flash", dropout_rate=0.1)
  with pytest.raises(ValueError, match="Pallas TPU"):
    models.t5(FLASH_CONFIG.replace(platform="gpu"))
  assert FLASH_CONFIG.replace(platform="tpu").resolved().platform == "tpu"
  assert attention.takes_relative_bias("flash")
  assert not attention.takes_relative_bias("xla")


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
    run = lambda q, k, v, **kw: ops.flash_attention(  # noqa: E731
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
