"""load_t5x and load_hf: exact round trips and named errors."""

from __future__ import annotations

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
                     match="no model.safetensors or pytorch_model.bin"):
    pretrained.load_hf(target)
  config = json.loads((target / "config.json").read_text())
  (target / "config.json").write_text(json.dumps(
      dict(config, feed_forward_proj="gated-silu")))
  with pytest.raises(pretrained.CheckpointError, match="gated-silu"):
    pretrained.load_hf(target)
  (target / "config.json").write_text("{not json")
  with pytest.raises(pretrained.CheckpointError, match="invalid JSON"):
    pretrained.load_hf(target)
