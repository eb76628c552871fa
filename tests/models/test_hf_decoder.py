"""Decoder-only families against transformers: load, logits, export.

For each family a tiny random transformers model (its weights perturbed so
that every norm and bias matters) is saved with save_pretrained, loaded with
hf_decoder.load_hf_decoder and compared with transformers run on each row
unpadded (float32): logits, completion log-probabilities, cached greedy
decoding, and the round trip export_hf_decoder -> from_pretrained.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import models
from dro_fast.models import hf_decoder
from dro_fast.models import pretrained
from tests.hf_folders import hf_model_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 128


def _hf_config(family):
  # Gemma 3: three layers (sliding, full, sliding) with windows of 4, shorter
  # than the sequences below, and a final soft-cap.
  extra = {"final_logit_softcapping": 3.0} if family == "gemma3" else {}
  return hf_model_config(family, VOCAB, **extra)


FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
  """(name, transformers model, its folder, our config, our params)."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      _hf_config(request.param), attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn_like(p) if p.ndim == 1 else
             0.05 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(folder, safe_serialization=True)
  config, params = hf_decoder.load_hf_decoder(folder)
  return request.param, model, folder, config, params


# Prompts and completions right-padded with -1, rows of different lengths.
INPUTS = np.asarray([[5, 17, 33, 9, 2, 41],
                     [7, 3, -1, -1, -1, -1],
                     [11, 12, 13, 14, -1, -1]], np.int32)
TARGETS = np.asarray([[8, 19, 100, -1, -1],
                      [23, 24, 25, 26, 27],
                      [60, -1, -1, -1, -1]], np.int32)


def _row(b):
  prompt = [t for t in INPUTS[b] if t >= 0]
  completion = [t for t in TARGETS[b] if t >= 0]
  return prompt, completion


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].double().numpy()


def _hf_row_logits(model, b):
  """transformers' logits [c, V] predicting row b's completion tokens."""
  prompt, completion = _row(b)
  logits = _hf_logits(model, prompt + completion)
  return logits[len(prompt) - 1:len(prompt) - 1 + len(completion)]


def _logprob_sums(logits, targets):
  """Sum over the valid targets of log_softmax(logits) [B, T, V]."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(axis=-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None],
                              axis=-1)[..., 0]
  return np.sum(np.where(targets >= 0, picked, 0.0), axis=1)


@functools.lru_cache(maxsize=None)
def _jit(config, function, *static):
  """A jitted DecoderApply function, compiled once per config and shape."""
  return jax.jit(getattr(models.decoder(config).apply, function),
                 static_argnums=static)


def test_config_from_hf_reads_the_family(family):
  name, model, _, config, _ = family
  assert config.family == name
  assert config.num_layers == model.config.num_hidden_layers
  if name == "gemma3":
    assert config.layer_types == ("sliding_attention", "full_attention",
                                  "sliding_attention")
    assert config.sliding_window == 4 and config.embed_scale
    assert dict(config.rope_scaling) == {"rope_type": "linear",
                                         "factor": 8.0}
    assert config.rope_local_theta == 10000.0
  if name == "llama":
    assert dict(config.rope_scaling)["rope_type"] == "llama3"
  assert config.attention_bias == (name == "qwen2")


def test_parameter_count_is_transformers(family):
  _, model, _, config, params = family
  assert config.parameter_count == sum(p.size for p in
                                       jax.tree.leaves(params))
  assert config.parameter_count == model.num_parameters()


def test_logits_and_logprobs_match_transformers(family):
  _, model, _, config, params = family
  logits = np.asarray(_jit(config, "logits")(params, None, INPUTS,
                                                 TARGETS))
  assert logits.shape == (3, TARGETS.shape[1], VOCAB)
  ours, theirs = [], []
  for b in range(3):
    reference = _hf_row_logits(model, b)
    got = logits[b, :len(reference)]
    scale = np.abs(reference).max()
    np.testing.assert_allclose(got / scale, reference / scale, atol=1e-4)
    _, completion = _row(b)
    theirs.append(_logprob_sums(reference[None],
                                np.asarray([completion]))[0])
  ours = _logprob_sums(logits, TARGETS)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-5)


def test_decode_states_give_the_same_logits(family):
  _, _, _, config, params = family
  states = _jit(config, "decode")(params, None, INPUTS, TARGETS)
  assert states.hidden.shape == (3, TARGETS.shape[1], config.hidden_size)
  assert states.encoded.shape == (3, config.hidden_size)
  np.testing.assert_array_equal(states.encoded, states.hidden[:, 0])
  logits = states.hidden @ states.weight
  cap = config.final_logit_softcapping
  if cap:
    logits = jnp.tanh(logits / cap) * cap
  np.testing.assert_allclose(
      logits, _jit(config, "logits")(params, None, INPUTS, TARGETS),
      atol=1e-5)


def test_scan_layers_equals_unscanned(family):
  _, _, folder, config, params = family
  scanned_config = config.replace(scan_layers=True)
  _, scanned = hf_decoder.load_hf_decoder(folder, scanned_config)
  assert "model/layers/self_attn/q_proj" in scanned
  assert scanned["model/layers/self_attn/q_proj"]["kernel"].shape[0] == (
      config.num_layers)
  np.testing.assert_allclose(
      _jit(scanned_config, "logits")(scanned, None, INPUTS, TARGETS),
      _jit(config, "logits")(params, None, INPUTS, TARGETS),
      rtol=1e-5, atol=1e-5)


def test_cached_greedy_decoding_matches_the_full_forward(family):
  _, model, _, config, params = family
  steps = 6
  step = _jit(config, "prefill", 3)(params, None, INPUTS, steps)
  decode_step = _jit(config, "decode_step")
  tokens, step_logits = [], []
  for _ in range(steps):
    token = jnp.argmax(step.logits, axis=-1).astype(jnp.int32)
    tokens.append(token)
    step_logits.append(step.logits)
    step = decode_step(params, None, token, step.cache)
  tokens = np.stack(tokens, axis=1)                               # [B, steps]
  step_logits = np.stack(step_logits, axis=1)                     # [B,steps,V]
  full = _jit(config, "logits")(params, None, INPUTS, tokens)
  np.testing.assert_allclose(step_logits, full, atol=2e-5, rtol=1e-5)
  # And transformers agrees on the greedy tokens' logits (past the window).
  for b in range(3):
    prompt, _ = _row(b)
    reference = _hf_logits(model, prompt + list(tokens[b]))[len(prompt) - 1:]
    scale = np.abs(reference).max()
    np.testing.assert_allclose(step_logits[b] / scale,
                               reference[:steps] / scale, atol=1e-4)


def test_export_round_trips_through_transformers(family, tmp_path):
  name, model, _, config, params = family
  out = tmp_path / "export"
  # Small shards: the export is sharded with an index.
  hf_decoder.export_hf_decoder(config, params, out, max_shard_bytes=40_000)
  assert (out / "model.safetensors.index.json").is_file()
  generation = json.loads((out / "generation_config.json").read_text())
  if name == "gemma3":
    assert generation["bos_token_id"] == 2
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  assert type(loaded) is type(model)
  for b in range(3):
    prompt, completion = _row(b)
    ids = prompt + completion
    np.testing.assert_allclose(_hf_logits(loaded, ids),
                               _hf_logits(model, ids), atol=1e-5, rtol=1e-5)
  # And back: the same config and parameters.
  config2, params2 = pretrained.load(out)
  assert config2.replace(name="") == config.replace(name="")
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_unsupported_model_type_is_one_line(tmp_path):
  with pytest.raises(pretrained.CheckpointError,
                     match=r"model_type 'mistral' .*llama, qwen2, qwen3, "
                     r"gemma3_text, gemma3") as e:
    hf_decoder.config_from_hf({"model_type": "mistral"}, "x/config.json")
  assert "\n" not in str(e.value)


def test_wrongly_shaped_tensor_is_named(family, tmp_path):
  name, _, folder, _, _ = family
  if name != "llama":
    pytest.skip("one family is enough")
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64),
                                                          np.float32)
  del tensors["model.norm.weight"]
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((folder / "config.json").read_text())
  safetensors.numpy.save_file(tensors, str(broken / "model.safetensors"))
  with pytest.raises(pretrained.CheckpointError) as e:
    pretrained.load(broken)
  message = str(e.value)
  assert "\n" not in message
  assert ("'model.layers.1.mlp.up_proj.weight' has shape (95, 64), "
          "expected (96, 64)") in message
  assert "missing tensor 'model.norm.weight' (expected shape (64,))" in (
      message)


def _legacy(hf):
  """A transformers 5 config.json dict in transformers 4's form (the hub's
  Llama 3.1 / Gemma 3 files): rope_theta, rope_scaling, rope_local_base_freq,
  sliding_window_pattern without layer_types."""
  hf = dict(hf)
  rope = hf.pop("rope_parameters")
  if hf["model_type"] == "gemma3_text":
    hf["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    rope = dict(rope["full_attention"])
    del hf["layer_types"]
  hf["rope_theta"] = rope.pop("rope_theta")
  hf["rope_scaling"] = None if rope == {"rope_type": "default"} else rope
  return hf


def test_transformers_4_config_files_read_the_same(family):
  _, _, folder, config, _ = family
  hf = json.loads((folder / "config.json").read_text())
  assert hf_decoder.config_from_hf(_legacy(hf), "legacy") == config


def test_multimodal_gemma3_folder_loads_its_text_model(family, tmp_path):
  name, _, folder, config, params = family
  if name != "gemma3":
    pytest.skip("Gemma 3 only")
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  text = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(
      {"model_type": "gemma3", "architectures": [
          "Gemma3ForConditionalGeneration"], "text_config": text}))
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  tensors = {name.replace("model.", "model.language_model.", 1): value
             for name, value in tensors.items()}
  tensors["model.vision_tower.patch.weight"] = np.zeros((2, 2), np.float32)
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  loaded_config, loaded = pretrained.load(tmp_path)
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_bfloat16_export_reads_back_rounded(family, tmp_path):
  name, _, _, config, params = family
  if name != "llama":
    pytest.skip("one family is enough")
  hf_decoder.export_hf_decoder(config, params, tmp_path / "bf16",
                               dtype="bfloat16")
  assert (tmp_path / "bf16" / "model.safetensors").is_file()
  hf = json.loads((tmp_path / "bf16" / "config.json").read_text())
  assert hf["dtype"] == "bfloat16"
  _, loaded = hf_decoder.load_hf_decoder(tmp_path / "bf16")
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      a, np.asarray(b).astype(jnp.bfloat16).astype(np.float32)),
               loaded, params)
