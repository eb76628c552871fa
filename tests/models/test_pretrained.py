"""load_t5x and load_hf: exact round trips, sharded and URL forms, and named
errors."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file
import torch

from dro_fast.models import pretrained
from dro_fast import models
from tests.models import hf_reference
from tests.models import t5x_writer


def _random_params(config, seed=0):
  tokens = jnp.ones((1, 3), jnp.int32)
  params = models.t5(config).init(jax.random.key(seed), tokens, tokens)
  # Perturb the ones-initialised norms so every tensor is distinctive.
  rng = np.random.default_rng(seed)
  return {path: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32)
          * 0.1 for path, x in pretrained.flatten(params).items()}


@pytest.mark.parametrize("variant", ["v1_1", "v1_0"])
def test_t5x_round_trip_is_exact(tmp_path, variant):
  config = models.preset("tiny", variant=variant, num_decoder_layers=3)
  flat = _random_params(config)
  directory = str(tmp_path / "checkpoint_1000")
  t5x_writer.write(directory, flat)
  assert os.path.isdir(os.path.join(
      directory, "target.encoder.layers_0.attention.query.kernel"))

  loaded_config, params = pretrained.load_t5x(directory)
  assert loaded_config.replace(name="tiny") == config.replace(
      dropout_rate=loaded_config.dropout_rate)
  loaded = pretrained.flatten(params)
  assert sorted(loaded) == sorted(flat)
  for path, value in flat.items():
    np.testing.assert_array_equal(loaded[path], value, err_msg=path)

  scanned_config, scanned = pretrained.load_t5x(
      directory, config.replace(scan_layers=True))
  assert scanned_config.scan_layers
  np.testing.assert_array_equal(
      scanned["encoder/layers/attention/query"]["kernel"][1],
      flat["encoder/layers_1/attention/query/kernel"])


def test_t5x_errors_name_the_problem(tmp_path):
  config = models.preset("tiny")
  flat = _random_params(config)
  with pytest.raises(pretrained.CheckpointError, match="no `checkpoint`"):
    pretrained.load_t5x(tmp_path)
  (tmp_path / "checkpoint").write_bytes(b"\xc1not msgpack")
  with pytest.raises(pretrained.CheckpointError, match="not a T5X msgpack"):
    pretrained.load_t5x(tmp_path)

  bad = dict(flat)
  bad["encoder/layers_0/mlp/wo/kernel"] = np.zeros((64, 31), np.float32)
  t5x_writer.write(str(tmp_path / "shape"), bad)
  with pytest.raises(pretrained.CheckpointError,
                     match=r"encoder/layers_0/mlp/wo/kernel' has shape "
                           r"\(64, 31\), expected \(64, 32\)"):
    pretrained.load_t5x(tmp_path / "shape", config)

  missing = {k: v for k, v in flat.items() if "decoder_norm" not in k}
  t5x_writer.write(str(tmp_path / "missing"), missing)
  with pytest.raises(pretrained.CheckpointError,
                     match="missing tensor 'decoder/decoder_norm/scale'"):
    pretrained.load_t5x(tmp_path / "missing", config)

  extra = dict(flat, **{"encoder/extra_bias/b": np.ones(40, np.float32)})
  t5x_writer.write(str(tmp_path / "extra"), extra)
  with pytest.raises(pretrained.CheckpointError,
                     match="unknown tensor 'encoder/extra_bias/b'"):
    pretrained.load_t5x(tmp_path / "extra", config)

  t5x_writer.write(str(tmp_path / "gone"), flat)
  shutil.rmtree(tmp_path / "gone" / "target.token_embedder.embedding")
  with pytest.raises(pretrained.CheckpointError,
                     match="cannot read tensor 'token_embedder/embedding'"):
    pretrained.load_t5x(tmp_path / "gone", config)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf")
  hf_reference.build("v1_1").save_pretrained(directory)
  return directory


def _copy(hf_dir, tmp_path):
  target = tmp_path / "copy"
  shutil.copytree(hf_dir, target)
  return target


def test_hf_bin_loads_like_safetensors(hf_dir, tmp_path):
  config, params = pretrained.load_hf(hf_dir)
  target = _copy(hf_dir, tmp_path)
  tensors = load_file(target / "model.safetensors")
  os.remove(target / "model.safetensors")
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
             target / "pytorch_model.bin")
  config2, params2 = pretrained.load_hf(target)
  assert config2 == config
  for path, value in pretrained.flatten(params).items():
    np.testing.assert_array_equal(pretrained.flatten(params2)[path], value)


def test_hf_untied_lm_head_is_used(hf_dir, tmp_path):
  target = _copy(hf_dir, tmp_path)
  tensors = load_file(target / "model.safetensors")
  head = np.random.default_rng(1).normal(
      size=tensors["shared.weight"].shape).astype(np.float32)
  save_file(dict(tensors, **{"lm_head.weight": head}),
            target / "model.safetensors")
  _, params = pretrained.load_hf(target)
  np.testing.assert_array_equal(params["decoder/logits_dense"]["kernel"],
                                head.T)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.__setitem__("encoder.block.1.layer.1.DenseReluDense.wo"
                             ".weight", np.zeros((48, 7), np.float32)),
     # Shapes as the file stores them ([out, in]), not transposed.
     r"tensor 'encoder.block.1.layer.1.DenseReluDense.wo.weight' has shape "
     r"\(48, 7\), expected \(48, 80\)"),
    (lambda t: t.pop("decoder.final_layer_norm.weight"),
     r"missing tensor 'decoder.final_layer_norm.weight' \(shape \(48,\)\)"),
    (lambda t: t.__setitem__("encoder.block.0.adapter.weight",
                             np.ones(3, np.float32)),
     "unknown tensor 'encoder.block.0.adapter.weight'"),
])
def test_hf_errors_name_the_tensor(hf_dir, tmp_path, edit, message):
  target = _copy(hf_dir, tmp_path)
  tensors = load_file(target / "model.safetensors")
  edit(tensors)
  save_file(tensors, target / "model.safetensors")
  with pytest.raises(pretrained.CheckpointError, match=message):
    pretrained.load_hf(target)


def test_hf_directory_errors(hf_dir, tmp_path):
  with pytest.raises(pretrained.CheckpointError, match="no config.json"):
    pretrained.load_hf(tmp_path)
  with pytest.raises(pretrained.CheckpointError,
                     match="neither T5X's `checkpoint` file nor Hugging "
                           "Face's config.json"):
    pretrained.load(tmp_path)
  with pytest.raises(pretrained.CheckpointError, match="does not exist"):
    pretrained.load(tmp_path / "absent")
  target = _copy(hf_dir, tmp_path)
  os.remove(target / "model.safetensors")
  with pytest.raises(pretrained.CheckpointError,
                     match=r"no weights \(model.safetensors, "
                           r"pytorch_model.bin, or their sharded"):
    pretrained.load_hf(target)
  config = json.loads((target / "config.json").read_text())
  (target / "config.json").write_text(json.dumps(
      dict(config, feed_forward_proj="gated-silu")))
  with pytest.raises(pretrained.CheckpointError, match="gated-silu"):
    pretrained.load_hf(target)
  (target / "config.json").write_text("{not json")
  with pytest.raises(pretrained.CheckpointError, match="invalid JSON"):
    pretrained.load_hf(target)


# ---------------------------------------------------------------------------
# Checkpoints as they are published: sharded, copied from GCS, behind URLs.


def _assert_same_params(actual, expected):
  actual, expected = pretrained.flatten(actual), pretrained.flatten(expected)
  assert sorted(actual) == sorted(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(actual[path], value, err_msg=path)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
  """flan-t5-xl's hub layout: model.safetensors.index.json + shards."""
  directory = tmp_path_factory.mktemp("hf_sharded")
  hf_reference.build("v1_1").save_pretrained(directory, max_shard_size="50KB")
  return directory


def test_hf_sharded_safetensors_match_the_model(sharded_dir, hf_dir):
  shards = sorted(sharded_dir.glob("model-*-of-*.safetensors"))
  assert len(shards) > 2
  assert (sharded_dir / "model.safetensors.index.json").is_file()
  assert not (sharded_dir / "model.safetensors").exists()
  config, params = pretrained.load_hf(sharded_dir)
  whole_config, whole = pretrained.load_hf(hf_dir)
  assert config == whole_config
  _assert_same_params(params, whole)
  # A remote shard (gs://) is read whole, not memory-mapped: same tensors.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pretrained, "_is_local", lambda path: False)
    _assert_same_params(pretrained.load_hf(sharded_dir)[1], whole)

  # The loaded model computes what the PyTorch model does.
  hf_model = hf_reference.build("v1_1")
  rng = np.random.default_rng(0)
  encoder_tokens = rng.integers(2, 97, (2, 19))
  targets = rng.integers(2, 97, (2, 5))
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(encoder_tokens),
                        labels=torch.tensor(targets)).logits.numpy()
  logits = models.t5(config).apply.logits(
      params, None, jnp.asarray(encoder_tokens, jnp.int32),
      jnp.asarray(targets, jnp.int32))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_hf_sharded_bin_loads_like_safetensors(sharded_dir, tmp_path):
  target = _copy(sharded_dir, tmp_path)
  index = json.loads((target / "model.safetensors.index.json").read_text())
  weight_map = {}
  for shard in sorted(set(index["weight_map"].values())):
    tensors = load_file(target / shard)
    name = shard.replace("model-", "pytorch_model-").replace(".safetensors",
                                                             ".bin")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
               target / name)
    weight_map.update(dict.fromkeys(tensors, name))
    os.remove(target / shard)
  os.remove(target / "model.safetensors.index.json")
  (target / "pytorch_model.bin.index.json").write_text(json.dumps(
      {"metadata": index["metadata"], "weight_map": weight_map}))
  _assert_same_params(pretrained.load_hf(target)[1],
                      pretrained.load_hf(sharded_dir)[1])


def test_hf_sharded_errors_name_the_file(sharded_dir, tmp_path):
  target = _copy(sharded_dir, tmp_path)
  index_file = target / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  name, shard = sorted(index["weight_map"].items())[0]

  os.rename(target / shard, target / "moved")
  with pytest.raises(pretrained.CheckpointError,
                     match=rf"{shard}: missing, but model.safetensors.index"
                           r".json puts \d+ tensors there; copy every shard"):
    pretrained.load_hf(target)
  os.rename(target / "moved", target / shard)

  tensors = load_file(target / shard)
  save_file({k: v for k, v in tensors.items() if k != name}, target / shard)
  with pytest.raises(pretrained.CheckpointError,
                     match=rf"{shard}: lacks '{name}'"):
    pretrained.load_hf(target)

  index_file.write_text(json.dumps({"metadata": {}}))
  with pytest.raises(pretrained.CheckpointError,
                     match="not a sharded-checkpoint index .*weight_map"):
    pretrained.load_hf(target)


def test_file_urls_read_like_local_paths(hf_dir, tmp_path):
  config = models.preset("tiny")
  flat = _random_params(config)
  t5x = tmp_path / "checkpoint_1000"
  t5x_writer.write(str(t5x), flat)
  for url in (f"file://{t5x}", f"file://localhost{t5x}"):
    _, params = pretrained.load_t5x(url)
    _assert_same_params(params, pretrained.unflatten(flat))
    _assert_same_params(pretrained.load(url)[1], params)
  _, params = pretrained.load_hf(f"file://{hf_dir}")
  _assert_same_params(params, pretrained.load_hf(hf_dir)[1])
  _assert_same_params(pretrained.load(f"file://{hf_dir}")[1], params)
  with pytest.raises(pretrained.CheckpointError,
                     match=f"file://{tmp_path}/absent does not exist"):
    pretrained.load(f"file://{tmp_path}/absent")


@pytest.mark.parametrize("recorded_kvstore, legacy_path",
                         [("gcs", False), ("file", True), ("gcs", True)])
def test_t5x_copied_from_gcs_reads_locally(tmp_path, recorded_kvstore,
                                           legacy_path):
  """Published T5X checkpoints record the gcs kvstore (bucket and all), and
  older ones the pre-0.1.14 spec form; a local copy reads from its own
  directory."""
  config = models.preset("tiny")
  flat = _random_params(config)
  t5x_writer.write(str(tmp_path / "copy"), flat,
                   recorded_kvstore=recorded_kvstore, legacy_path=legacy_path)
  _, params = pretrained.load_t5x(tmp_path / "copy")
  _assert_same_params(params, pretrained.unflatten(flat))


def test_gs_paths_use_tensorstore_gcs_driver(monkeypatch):
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  directory = "gs://t5-data/pretrained_models/t5x/flan_t5_xl/checkpoint_1138000"
  kvstore = pretrained.tensorstore_kvstore(f"{directory}/target.x")
  assert kvstore == {"driver": "gcs", "bucket": "t5-data", "path":
                     "pretrained_models/t5x/flan_t5_xl/checkpoint_1138000/"
                     "target.x"}
  ts.Spec({"driver": "zarr", "kvstore": kvstore})      # a valid spec
  assert pretrained.tensorstore_kvstore("s3://bucket-1/a/b")["driver"] == "s3"
  assert pretrained.tensorstore_kvstore("rel/dir") == {
      "driver": "file", "path": os.path.abspath("rel/dir")}
  assert pretrained.tensorstore_kvstore("file:///a/b") == {"driver": "file",
                                                           "path": "/a/b"}
  with pytest.raises(pretrained.CheckpointError,
                     match="cannot read T5X arrays from http://"):
    pretrained.tensorstore_kvstore("http://host/x")

  # What _read_tensorstore opens for a checkpoint read from GCS, as T5X
  # recorded it ("gcs" with its bucket) and as a local run recorded it.
  opened = []

  def fake_open(spec):
    opened.append(spec)
    raise RuntimeError("no network in tests")

  monkeypatch.setattr(ts, "open", fake_open)
  for recorded in ({"driver": "gcs", "bucket": "elsewhere",
                    "path": "target.encoder.x"},
                   {"driver": "file", "path": "target.encoder.x"}):
    with pytest.raises(pretrained.CheckpointError,
                       match=f"cannot read tensor 'encoder/x' from "
                             f"{directory}/target.encoder.x"):
      pretrained._read_tensorstore(  # pylint: disable=protected-access
          {"driver": "zarr", "kvstore": recorded}, directory, "encoder/x")
    assert opened.pop()["kvstore"] == {
        "driver": "gcs", "bucket": "t5-data",
        "path": "pretrained_models/t5x/flan_t5_xl/checkpoint_1138000/"
                "target.encoder.x"}


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                    reason="gcsfs installed: gs:// would reach the network")
def test_gs_without_gcsfs_says_what_is_missing():
  for load in (pretrained.load, pretrained.load_hf, pretrained.load_t5x):
    with pytest.raises(pretrained.CheckpointError,
                       match=r"gs://t5-data/x: reading gs:// paths needs a "
                             r"package that is not installed \(.*gcsfs"):
      load("gs://t5-data/x")
