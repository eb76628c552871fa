"""Vocabulary-parallel linear_sequence_logprobs on 8 simulated CPU devices.

On a data:2,model:4 and a data:2,fsdp:2,model:2 mesh, kernels.vocab_parallel
(the projection split over V on "model", the batch over the other axes)
gives the values and the gradients (hidden and weight) of the unsharded
linear_sequence_logprobs and of a float64 NumPy reference on the
materialised logits, for every implementation (float32; bfloat16 for
chunked_xla); its output is the same on every device of the model axis.

The simulated devices need XLA_FLAGS before JAX starts, so the sharded
programs run in a subprocess started with them: this file run as a script
(`python -m tests.kernels.test_vocab_parallel GROUP OUT.npz`) computes one
group of cases and saves the arrays; the tests compare them here.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from benchmarks.lib import numpy_reference as ref
from dro_fast import kernels

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

# name -> (axis sizes, batch axes, (B, T, D, V)); every mesh has 8 devices.
MESHES = {
    "data2_model4": ({"data": 2, "model": 4}, ("data",), (4, 3, 16, 64)),
    "data2_fsdp2_model2": ({"data": 2, "fsdp": 2, "model": 2},
                           ("data", "fsdp"), (4, 5, 32, 96)),
}
# The Pallas kernels run in interpret mode on the CPU (slow).
GROUPS = {"fast": ("xla", "chunked_xla"), "pallas": ("pallas_tpu",
                                                     "pallas_gpu")}
GRAD_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def inputs(mesh_name: str) -> dict[str, np.ndarray]:
  """Random inputs whose unmasked targets fall in every vocabulary shard.

  The last row is fully masked; the cotangent g is never zero.
  """
  sizes, _, (b, t, d, v) = MESHES[mesh_name]
  shards = sizes["model"]
  rng = np.random.default_rng(sum(map(ord, mesh_name)))
  mask = rng.random((b, t)) < 0.7
  targets = rng.integers(0, v, (b, t))
  # One unmasked position per shard, in the rows before the masked one.
  for s, pos in enumerate(rng.permutation((b - 1) * t)[:shards]):
    mask.flat[pos] = True
    targets.flat[pos] = s * (v // shards) + rng.integers(v // shards)
  mask[-1] = False
  return {
      "hidden": rng.normal(size=(b, t, d)).astype(np.float32),
      "weight": (rng.normal(size=(d, v)) * 2 / np.sqrt(d)).astype(
          np.float32),
      "targets": targets.astype(np.int32), "mask": mask,
      "g": (rng.normal(size=(b,)) + 1.5).astype(np.float32)}


def _vjp(fn, x):
  """(value, d hidden, d weight) of the jitted fn(hidden, weight) at x."""
  value, pullback = jax.vjp(jax.jit(fn), jnp.asarray(x["hidden"]),
                            jnp.asarray(x["weight"]))
  return (value, *pullback(jnp.asarray(x["g"])))


def _per_shard(mesh, batch_axes, *, check_vma, copies, **options):
  """vocab_parallel_linear_sequence_logprobs under a shard_map of the mesh.

  copies: return every model shard's own output, [B, M].
  """
  rows = P(batch_axes)

  def fn(hidden, weight, targets, mask):
    out = kernels.vocab_parallel_linear_sequence_logprobs(
        hidden, weight, targets, mask, axis_name="model", **options)
    return out[:, None] if copies else out
  return jax.shard_map(fn, mesh=mesh,
                       in_specs=(rows, P(None, "model"), rows, rows),
                       out_specs=P(batch_axes, "model") if copies else rows,
                       check_vma=check_vma)


def _compute(group: str, out_path: str) -> None:
  """The subprocess: every (mesh, implementation) case of `group`."""
  assert jax.device_count() == 8, jax.devices()
  # Tiles that split each shard's slice: two row tiles per device on the
  # data:2,model:4 mesh, and chunked_xla's (and the GPU backward's) two
  # vocabulary chunks of 12 (the last one shifted) per 16-column slice.
  blocks = kernels.BlockSizes(rows=8, vocab=128, hidden=16, vocab_chunk=12)
  out = {}
  for mesh_name, (sizes, batch_axes, _) in MESHES.items():
    mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))
    x = inputs(mesh_name)
    rest = (jnp.asarray(x["targets"]), jnp.asarray(x["mask"]))
    for implementation in GROUPS[group]:
      options = dict(implementation=implementation, block_sizes=blocks)
      key = f"{mesh_name}/{implementation}"
      sharded = kernels.vocab_parallel(mesh, vocab_axis="model",
                                       batch_axes=batch_axes, **options)
      unsharded = functools.partial(kernels.linear_sequence_logprobs,
                                    **options)
      results = (_vjp(lambda h, w, f=sharded: f(h, w, *rest), x)
                 + _vjp(lambda h, w, f=unsharded: f(h, w, *rest), x))
      for name, value in zip(("value", "dhidden", "dweight", "value_unsharded",
                              "dhidden_unsharded", "dweight_unsharded"),
                             results):
        out[f"{key}/{name}"] = np.asarray(value)
      copies = _per_shard(mesh, batch_axes, check_vma=False, copies=True,
                          **options)
      out[f"{key}/per_shard"] = np.asarray(jax.jit(copies)(
          x["hidden"], x["weight"], *rest))

    if group == "fast":
      # bfloat16 operands, chunked_xla: rounded d(hidden) partials summed.
      options = dict(implementation="chunked_xla", block_sizes=blocks)
      sharded = kernels.vocab_parallel(mesh, vocab_axis="model",
                                       batch_axes=batch_axes, **options)
      low = dict(x, hidden=x["hidden"].astype(jnp.bfloat16),
                 weight=x["weight"].astype(jnp.bfloat16))
      results = _vjp(lambda h, w, f=sharded: f(h, w, *rest), low)
      for name, value in zip(("value", "dhidden", "dweight"), results):
        out[f"{mesh_name}/bfloat16/{name}"] = np.asarray(value, np.float32)

      # check_vma=True: "xla" is differentiated by JAX through its psum; a
      # custom-VJP implementation refuses with a message.
      for implementation in ("xla", "chunked_xla"):
        key = f"{mesh_name}/{implementation}/check_vma"
        fn = _per_shard(mesh, batch_axes, check_vma=True, copies=False,
                        implementation=implementation)
        try:
          results = _vjp(lambda h, w, f=fn: f(h, w, *rest), x)
        except ValueError as e:
          out[f"{key}_error"] = np.asarray(str(e))
          continue
        for name, value in zip(("value", "dhidden", "dweight"), results):
          out[f"{key}_{name}"] = np.asarray(value)
  np.savez(out_path, **out)


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
  """group -> the subprocess's arrays, each group computed once."""
  cache = {}

  def get(group):
    if group not in cache:
      path = str(tmp_path_factory.mktemp("vocab_parallel") / "out.npz")
      env = dict(os.environ, PYTHONPATH=REPO,
                 XLA_FLAGS="--xla_force_host_platform_device_count=8",
                 JAX_PLATFORMS="cpu")
      result = subprocess.run(
          [sys.executable, "-m", "tests.kernels.test_vocab_parallel", group,
           path], cwd=REPO, env=env, capture_output=True, text=True,
          timeout=900, check=False)
      assert result.returncode == 0, result.stderr[-3000:]
      with np.load(path) as data:
        cache[group] = dict(data)
    return cache[group]
  return get


def _float64_reference(mesh_name):
  x = inputs(mesh_name)
  args = (x["hidden"], x["weight"], x["targets"], x["mask"])
  return (ref.linear_sequence_logprobs(*args),
          *ref.linear_sequence_logprobs_vjp(*args, x["g"]))


def _check_case(data, mesh_name, implementation):
  key = f"{mesh_name}/{implementation}"
  value, dh, dw = (data[f"{key}/{n}"] for n in ("value", "dhidden",
                                                  "dweight"))
  value_ref, dh_ref, dw_ref = _float64_reference(mesh_name)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=5e-4)
  np.testing.assert_allclose(dh, dh_ref, **GRAD_TOLERANCE)
  np.testing.assert_allclose(dw, dw_ref, **GRAD_TOLERANCE)
  # The unsharded op, same implementation: only summation order differs.
  np.testing.assert_allclose(value, data[f"{key}/value_unsharded"],
                             rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(dh, data[f"{key}/dhidden_unsharded"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dw, data[f"{key}/dweight_unsharded"],
                             rtol=1e-5, atol=1e-6)
  # The fully masked last row: log-prob 0, no gradient.
  assert value[-1] == 0.0 and not np.any(dh[-1])
  assert np.all(value[:-1] < 0)
  # Every model shard holds the same output.
  copies = data[f"{key}/per_shard"]
  assert copies.shape == (value.shape[0], MESHES[mesh_name][0]["model"])
  np.testing.assert_array_equal(copies, np.repeat(copies[:, :1],
                                                  copies.shape[1], axis=1))
  np.testing.assert_allclose(copies[:, 0], value, rtol=1e-6, atol=1e-6)


def test_inputs_put_targets_in_every_shard():
  for mesh_name, (sizes, _, (_, _, _, v)) in MESHES.items():
    x = inputs(mesh_name)
    shards = set((x["targets"][x["mask"]] // (v // sizes["model"])).tolist())
    assert shards == set(range(sizes["model"])), mesh_name
    assert not x["mask"].all() and not x["mask"][-1].any()


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("implementation", GROUPS["fast"])
def test_matches_unsharded_and_float64(computed, mesh_name, implementation):
  _check_case(computed("fast"), mesh_name, implementation)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("implementation", GROUPS["pallas"])
def test_pallas_kernels_per_shard_in_interpret_mode(computed, mesh_name,
                                                    implementation):
  _check_case(computed("pallas"), mesh_name, implementation)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_bfloat16_matches_float64(computed, mesh_name):
  # The float64 reference takes the bfloat16-rounded operands; dlogits and
  # each shard's d(hidden) partial are rounded to bfloat16.
  data = computed("fast")
  x = inputs(mesh_name)
  rounded = {k: np.asarray(jnp.asarray(x[k], jnp.bfloat16), np.float64)
             for k in ("hidden", "weight")}
  args = (rounded["hidden"], rounded["weight"], x["targets"], x["mask"])
  value_ref = ref.linear_sequence_logprobs(*args)
  dh_ref, dw_ref = ref.linear_sequence_logprobs_vjp(*args, x["g"])
  key = f"{mesh_name}/bfloat16"
  np.testing.assert_allclose(data[f"{key}/value"], value_ref, rtol=1e-5,
                             atol=5e-4)
  np.testing.assert_allclose(data[f"{key}/dhidden"], dh_ref, rtol=3e-2,
                             atol=3e-2)
  np.testing.assert_allclose(data[f"{key}/dweight"], dw_ref, rtol=3e-2,
                             atol=3e-2)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_check_vma(computed, mesh_name):
  # "xla" under check_vma=True: JAX's own transpose of its psum (no 1/M
  # cotangent split) gives the same gradients as the custom VJP's
  # convention under check_vma=False.
  data = computed("fast")
  value_ref, dh_ref, dw_ref = _float64_reference(mesh_name)
  key = f"{mesh_name}/xla/check_vma"
  np.testing.assert_allclose(data[f"{key}_value"], value_ref, rtol=1e-5,
                             atol=5e-4)
  np.testing.assert_allclose(data[f"{key}_dhidden"], dh_ref, **GRAD_TOLERANCE)
  np.testing.assert_allclose(data[f"{key}_dweight"], dw_ref, **GRAD_TOLERANCE)
  message = str(data[f"{mesh_name}/chunked_xla/check_vma_error"])
  assert "check_vma=False" in message and "chunked_xla" in message


def _abstract_mesh(**sizes):
  return jax.sharding.AbstractMesh(
      tuple(sizes.values()), tuple(sizes),
      axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


@pytest.mark.parametrize("sizes, options, message", [
    (dict(data=2, model=4), {}, r"V = 90 .* size 4.*\[1, 2, 3, 5, 6, 9"),
    (dict(data=2, fsdp=4), {}, r"vocab_axis 'model' is not an axis"),
    (dict(data=2, model=4), dict(batch_axes=("fsdp",)),
     r"batch_axes \['fsdp'\] are not mesh axes"),
])
def test_bad_mesh_is_named(sizes, options, message):
  fn = kernels.vocab_parallel(_abstract_mesh(**sizes), **options)
  with pytest.raises(ValueError, match=message):
    fn(jnp.zeros((8, 2, 4)), jnp.zeros((4, 90)), jnp.zeros((8, 2), jnp.int32),
       jnp.ones((8, 2), bool))


def test_without_a_mesh_is_named():
  with pytest.raises(ValueError, match="needs a mesh"):
    kernels.vocab_parallel()(jnp.zeros((2, 2, 4)), jnp.zeros((4, 8)),
                             jnp.zeros((2, 2), jnp.int32),
                             jnp.ones((2, 2), bool))


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] not in GROUPS:
    sys.exit(f"usage: python -m tests.kernels.test_vocab_parallel "
             f"{{{','.join(GROUPS)}}} OUT.npz")
  _compute(sys.argv[1], sys.argv[2])
  print(json.dumps({"group": sys.argv[1], "out": sys.argv[2]}))
