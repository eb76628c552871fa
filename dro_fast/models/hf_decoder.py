"""Hugging Face folders of decoder-only LLMs: config, load and export.

Families (config.json's model_type): llama (Llama 3.x, rope_type "llama3"),
qwen2 (Qwen 2.5), qwen3, gemma3_text, and gemma3 (its text_config; the
vision tower's tensors are left out). Both config.json forms are read:
transformers 5's rope_parameters (per layer type for Gemma 3) and the older
rope_theta / rope_scaling / rope_local_base_freq.

Tensor names map 1:1 to dro_fast.models.decoder's parameter paths:
"model.layers.3.self_attn.q_proj.weight" [H·K, D] is
params["model/layers_3/self_attn/q_proj"]["kernel"] [D, H·K] (Linear
weights transposed; norms, biases and the embedding as they are). A tensor
the config needs but the folder lacks, or one whose shape disagrees with
config.json, is a CheckpointError naming it, its shape and the expected
one. Reading goes through models.pretrained's readers (model.safetensors,
its sharded index, pytorch_model.bin; local, file:// or gs://).

export_hf_decoder writes a folder that transformers' from_pretrained loads:
config.json, model.safetensors (or model-0000k-of-0000n.safetensors and
model.safetensors.index.json past max_shard_bytes), generation_config.json,
written to a temporary folder beside out_dir and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dro_fast import fileio
from dro_fast.models.decoder import decoder as build_decoder
from dro_fast.models import pretrained
from dro_fast.models.decoder_config import DecoderConfig
from dro_fast.models.pretrained import CheckpointError

Params = dict[str, dict[str, Any]]

SUPPORTED = ("llama", "qwen2", "qwen3", "gemma3_text", "gemma3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                "gemma3": "gemma3_text"}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_tanh": "gelu_tanh"}
_ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings")


def is_decoder_config(hf: Mapping[str, Any]) -> bool:
  """Whether a config.json dict names a decoder-only family read here."""
  return hf.get("model_type") in SUPPORTED


def _rope(hf: Mapping[str, Any], layer_type: str | None, source: str
          ) -> tuple[float | None, tuple]:
  """(theta, scaling items) of config.json for a layer type (or the model)."""
  params = hf.get("rope_parameters")
  if isinstance(params, dict) and layer_type in params:
    params = params[layer_type]
  if not isinstance(params, dict):
    params = dict(hf.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
      params["rope_type"] = params["type"]
    if layer_type == "sliding_attention":
      params = {"rope_theta": hf.get("rope_local_base_freq")}
    else:
      params.setdefault("rope_theta", hf.get("rope_theta"))
  kind = params.get("rope_type", "default")
  if kind not in ("default", "linear", "llama3"):
    raise CheckpointError(f"{source}: rope_type {kind!r} is not supported "
                          f"(default, linear, llama3).")
  scaling = () if kind == "default" else tuple(sorted(
      (k, params[k]) for k in _ROPE_KEYS if k in params))
  return params.get("rope_theta"), scaling


def config_from_hf(hf: Mapping[str, Any], source: str) -> DecoderConfig:
  """DecoderConfig from a transformers config.json dict.

  Raises:
    CheckpointError: an unsupported model_type or rope_type, or a missing
      field (one line naming it).
  """
  model_type = hf.get("model_type")
  if model_type == "gemma3":
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "gemma3_text")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id",
                "tie_word_embeddings"):
      if key in hf and key not in text:
        text[key] = hf[key]
    hf, model_type = text, "gemma3_text"
  if model_type not in SUPPORTED:
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not a decoder-only family "
        f"dro_fast supports ({', '.join(SUPPORTED)}).")
  gemma = model_type == "gemma3_text"
  family = "gemma3" if gemma else model_type
  # transformers' defaults where a config.json leaves a field out.
  defaults = dict(
      rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
      attention_bias=False, max_position_embeddings=2048, rope_theta=10000.0)
  if gemma:
    defaults.update(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216,
        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
        head_dim=256, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1e6,
        rope_local_base_freq=10000.0, tie_word_embeddings=True,
        max_position_embeddings=131072, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)
  hf = {**defaults, **{k: v for k, v in hf.items() if v is not None or k in (
      "sliding_window", "final_logit_softcapping", "attn_logit_softcapping")}}
  try:
    layers = hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    layer_types = hf.get("layer_types")
    if layer_types is None and gemma:
      pattern = hf.get("sliding_window_pattern", 6)
      layer_types = ["sliding_attention" if (i + 1) % pattern else
                     "full_attention" for i in range(layers)]
    elif layer_types is None and hf.get("use_sliding_window"):
      start = hf.get("max_window_layers", layers)
      layer_types = ["sliding_attention" if i >= start else "full_attention"
                     for i in range(layers)]
    layer_types = tuple(layer_types or ())
    sliding = "sliding_attention" in layer_types
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
      layer_types, sliding = (), False
    theta, scaling = _rope(hf, "full_attention" if gemma else None, source)
    local_theta = (_rope(hf, "sliding_attention", source)[0] if gemma
                   else None)
    activation = hf.get("hidden_activation") or hf.get("hidden_act")
    if activation not in _ACTIVATIONS:
      raise CheckpointError(f"{source}: activation {activation!r} is not "
                            f"supported ({', '.join(_ACTIVATIONS)}).")
    if hf.get("mlp_bias"):
      raise CheckpointError(f"{source}: mlp_bias=true is not supported.")
    eos = hf.get("eos_token_id")
    return DecoderConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hidden,
        num_layers=layers, num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf["rms_norm_eps"],
        rope_theta=float(theta if theta is not None else hf["rope_theta"]),
        rope_scaling=scaling,
        rope_local_theta=None if local_theta is None else float(local_theta),
        sliding_window=hf.get("sliding_window") if sliding else None,
        layer_types=layer_types,
        attention_bias=(model_type == "qwen2"
                        or bool(hf.get("attention_bias"))),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        norm_plus_one=gemma, post_norms=gemma, embed_scale=gemma,
        query_pre_attn_scalar=(hf["query_pre_attn_scalar"] if gemma
                               else None),
        hidden_act=_ACTIVATIONS[activation],
        tie_word_embeddings=bool(hf["tie_word_embeddings"]),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        attn_logit_softcapping=hf.get("attn_logit_softcapping"),
        max_position_embeddings=hf["max_position_embeddings"],
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        name=str(hf.get("_name_or_path") or family))
  except KeyError as e:
    raise CheckpointError(f"{source}: config.json lacks the field {e}; is "
                          f"this a {model_type} config?") from None
  except ValueError as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{source}: {e}") from None


# ---------------------------------------------------------------------------
# Names and shapes.


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """Flat path ("model/norm/scale") -> shape, per-layer (unstacked) layout."""
  config = config.replace(scan_layers=False)
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(build_decoder(config).init,
                          jax.random.key(0), tokens, tokens)
  return {path: tuple(x.shape)
          for path, x in pretrained.flatten(shapes).items()}


def hf_name(path: str) -> tuple[str, bool]:
  """Our flat path -> (transformers' tensor name, stored transposed?)."""
  module, leaf = path.rsplit("/", 1)
  module = re.sub(r"/layers_(\d+)(?=/)", r"/layers.\1", module)
  name = module.replace("/", ".")
  if leaf == "bias":
    return f"{name}.bias", False
  return f"{name}.weight", leaf == "kernel"


def _strip_prefix(name: str) -> str | None:
  """A multimodal Gemma 3 tensor name in the text model's form, or None."""
  for prefix in ("model.language_model.", "language_model.model."):
    if name.startswith(prefix):
      return "model." + name[len(prefix):]
  if name.startswith("language_model.lm_head."):
    return name[len("language_model."):]
  if name.startswith(("model.vision_tower.", "vision_tower.",
                      "model.multi_modal_projector.",
                      "multi_modal_projector.")):
    return None
  return name


def unstack_layers(params: Params) -> Params:
  """scan_layers params ("model/layers/...", [L, ...]) to per-layer ones."""
  out: Params = {}
  for module, leaves in params.items():
    if module.startswith("model/layers/"):
      rest = module[len("model/layers/"):]
      count = len(next(iter(leaves.values())))
      for i in range(count):
        out[f"model/layers_{i}/{rest}"] = {k: v[i] for k, v in leaves.items()}
    else:
      out[module] = leaves
  return out


def stack_layers(params: Params) -> Params:
  """Per-layer params to the scan_layers layout (a leading [L] axis)."""
  return pretrained.stack_layer_modules(params, "model")


# ---------------------------------------------------------------------------
# Loading.


def load_hf_decoder(path: str | os.PathLike,
                    config: DecoderConfig | None = None
                    ) -> tuple[DecoderConfig, Params]:
  """Loads a transformers decoder-only folder (config.json + weights).

  Args:
    path: a folder written by save_pretrained (or export_hf_decoder): a
      local path, file:// or gs:// URL.
    config: the DecoderConfig to load into (e.g. with scan_layers or a
      compute dtype set); None: config_from_hf of its config.json.
      Architecture fields must agree with the weights.

  Returns:
    (config, params) in dro_fast.models.decoder's layout, float32 numpy
    arrays (stacked when config.scan_layers).
  """
  path = os.fspath(path)
  with pretrained._remote_errors(path):  # pylint: disable=protected-access
    directory = fileio.as_path(path)
    hf, config_file = pretrained.read_hf_config(path, directory)
    if config is None:
      config = config_from_hf(hf, config_file)
    # pylint: disable-next=protected-access
    tensors = pretrained._read_hf_tensors(directory)
  return config, _build(tensors, config, path)


def _build(tensors: Mapping[str, np.ndarray], config: DecoderConfig,
           source: str) -> Params:
  expected = expected_shapes(config)
  names = {hf_name(p)[0]: p for p in expected}
  renamed = {}
  for name, value in tensors.items():
    name = _strip_prefix(name)
    if name is not None:
      renamed[name] = value
  if config.tie_word_embeddings:
    renamed.pop("lm_head.weight", None)
  elif ("lm_head.weight" not in renamed
        and "model.embed_tokens.weight" in renamed):
    renamed["lm_head.weight"] = renamed["model.embed_tokens.weight"]
  problems = []
  flat = {}
  for name, path in sorted(names.items()):
    transposed = hf_name(path)[1]
    want = expected[path][::-1] if transposed else expected[path]
    if name not in renamed:
      problems.append(f"missing tensor {name!r} (expected shape {want})")
      continue
    value = np.asarray(renamed[name])
    if tuple(value.shape) != want:
      problems.append(f"tensor {name!r} has shape {tuple(value.shape)}, "
                      f"expected {want}")
      continue
    flat[path] = (value.T if transposed else value).astype(np.float32)
  unknown = sorted(set(renamed) - set(names) - {"lm_head.weight"})
  problems += [f"unknown tensor {name!r}" for name in unknown[:3]]
  if problems:
    raise CheckpointError(
        f"{source}: " + "; ".join(problems) + ". The weights do not match "
        "the model config.json describes: check that both come from the "
        "same checkpoint and that it was copied completely.")
  params = pretrained.unflatten(flat)
  return stack_layers(params) if config.scan_layers else params


# ---------------------------------------------------------------------------
# Export.


def _as_int_if_whole(value: float | None) -> float | int | None:
  return int(value) if value is not None and value == int(value) else value


def hf_config(config: DecoderConfig, dtype: str = "float32"
              ) -> dict[str, Any]:
  """The config.json dict transformers reads back into the same model."""
  family = config.family
  eos = config.eos_token_id
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[family]],
      "model_type": _MODEL_TYPES[family],
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings,
      "bos_token_id": config.bos_token_id,
      "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
      "pad_token_id": config.pad_token_id,
      "attention_dropout": 0.0,
      "dtype": dtype,
  }
  full = {"rope_type": "default", **dict(config.rope_scaling),
          "rope_theta": config.rope_theta}
  if family == "gemma3":
    out.update(
        hidden_activation="gelu_pytorch_tanh",
        # An int in transformers' Gemma3TextConfig, which refuses 24.0
        # (run_config.json reads the field back as a float).
        query_pre_attn_scalar=_as_int_if_whole(config.query_pre_attn_scalar),
        sliding_window=config.sliding_window,
        layer_types=list(config.layer_types) or (
            ["full_attention"] * config.num_layers),
        final_logit_softcapping=config.final_logit_softcapping,
        attn_logit_softcapping=config.attn_logit_softcapping,
        attention_bias=config.attention_bias,
        rope_parameters={
            "full_attention": full,
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": (config.rope_local_theta
                               if config.rope_local_theta is not None
                               else config.rope_theta)}})
  else:
    out.update(hidden_act="silu", rope_parameters=full)
    if family in ("llama", "qwen3"):
      out["attention_bias"] = config.attention_bias
    if family == "llama":
      out["mlp_bias"] = False
    else:
      out.update(use_sliding_window=config.any_sliding,
                 sliding_window=config.sliding_window,
                 max_window_layers=config.num_layers,
                 layer_types=list(config.layer_types) or (
                     ["full_attention"] * config.num_layers))
  return out


def _hf_tensors(config: DecoderConfig, params: Params, dtype
                ) -> dict[str, np.ndarray]:
  params = jax.device_get(params)
  if config.scan_layers:
    params = unstack_layers(params)
  tensors = {}
  for path, value in pretrained.flatten(params).items():
    name, transposed = hf_name(path)
    value = np.asarray(value, np.float32)
    tensors[name] = np.ascontiguousarray(
        (value.T if transposed else value).astype(dtype))
  return tensors


def export_hf_decoder(config: DecoderConfig, params: Params,
                      out_dir: str | os.PathLike, *,
                      max_shard_bytes: int = 2 ** 30,
                      dtype: str | None = None) -> None:
  """Writes params as a transformers folder that from_pretrained loads.

  Args:
    config: the model's config.
    params: its parameters (either layout).
    out_dir: the folder to write (local path or file:// URL); replaced
      whole if it exists.
    max_shard_bytes: past this many bytes, shards
      model-0000k-of-0000n.safetensors + model.safetensors.index.json.
    dtype: "float32" or "bfloat16" tensors; None: config.param_dtype.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  dtype = dtype or config.param_dtype
  np_dtype = jnp.dtype(dtype)       # bfloat16 through ml_dtypes
  tensors = _hf_tensors(config, params, np_dtype)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  out_dir = os.path.abspath(fileio.require_local(out_dir, "export folder"))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.")
  try:
    def write_json(name, obj):
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

    metadata = {"format": "pt"}
    if len(shards) == 1:
      safetensors.numpy.save_file(shards[0],
                                  os.path.join(tmp, "model.safetensors"),
                                  metadata=metadata)
    else:
      weight_map = {}
      for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, os.path.join(tmp, file),
                                    metadata=metadata)
        weight_map.update({name: file for name in shard})
      write_json("model.safetensors.index.json", {
          "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
          "weight_map": weight_map})
    write_json("config.json", hf_config(config, dtype))
    generation = {"bos_token_id": config.bos_token_id,
                  "eos_token_id": (list(config.eos_token_id)
                                   if isinstance(config.eos_token_id, tuple)
                                   else config.eos_token_id),
                  "pad_token_id": config.pad_token_id}
    write_json("generation_config.json",
               {k: v for k, v in generation.items() if v is not None})
    old = None
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(dir=parent,
                             prefix=f".{os.path.basename(out_dir)}.old.")
      os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    tmp = None
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except OSError as e:
    fault = fileio.as_write_error(out_dir, e)
    if fault is None:
      raise
    raise fault from e
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
