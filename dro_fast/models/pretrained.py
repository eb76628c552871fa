"""Loading real T5 checkpoints: T5X (msgpack + TensorStore) and Hugging Face.

Both produce (T5Config, params) with params in dro_fast.models' Haiku layout,
whose paths are T5X's: {"encoder/layers_0/attention/query": {"kernel": ...}}.
A tensor whose shape disagrees with the config, a tensor the model does not
have, or one the model needs but the checkpoint lacks is a CheckpointError
naming it.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dro_fast import models

Params = dict[str, dict[str, Any]]


class CheckpointError(ValueError):
  """A checkpoint that cannot be read into the model; the message says why."""


# ---------------------------------------------------------------------------
# The model's own layout.


def flatten(params: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """{"a/b": {"kernel": x}} -> {"a/b/kernel": x}."""
  return {f"{module}/{name}": value for module, leaves in params.items()
          for name, value in leaves.items()}


def unflatten(flat: Mapping[str, Any]) -> Params:
  params: Params = {}
  for path, value in flat.items():
    module, name = path.rsplit("/", 1)
    params.setdefault(module, {})[name] = value
  return params


def expected_shapes(config: models.T5Config) -> dict[str, tuple[int, ...]]:
  """Flat parameter path -> shape, per-layer (unstacked) layout."""
  config = config.replace(scan_layers=False)
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(models.t5(config).init, jax.random.key(0), tokens,
                          tokens)
  return {path: tuple(x.shape) for path, x in flatten(shapes).items()}


def stack_layers(params: Params, config: models.T5Config) -> Params:
  """Per-layer params ("encoder/layers_3/...") to the scan_layers layout
  ("encoder/layers/...", leading [L] axis); a no-op without scan_layers."""
  if not config.scan_layers:
    return params
  out: Params = {}
  stacked: dict[str, list[tuple[int, dict[str, Any]]]] = {}
  for module, leaves in params.items():
    match = re.fullmatch(r"(encoder|decoder)/layers_(\d+)/(.*)", module)
    if match:
      key = f"{match[1]}/layers/{match[3]}"
      stacked.setdefault(key, []).append((int(match[2]), leaves))
    else:
      out[module] = leaves
  for module, items in stacked.items():
    items.sort(key=lambda item: item[0])
    out[module] = {name: np.stack([leaves[name] for _, leaves in items])
                   for name in items[0][1]}
  return out


def check_and_build(flat: Mapping[str, np.ndarray], config: models.T5Config,
                    source: str, names: Mapping[str, str] | None = None,
                    transposed: frozenset[str] = frozenset()) -> Params:
  """Checks flat params against the config's shapes; returns Haiku params.

  Args:
    flat: our flat path -> array.
    config: the model configuration.
    source: the checkpoint path, for messages.
    names: our flat path -> the checkpoint's own name, for messages.
    transposed: our paths whose arrays the checkpoint stores transposed;
      messages give their shapes as stored.

  Raises:
    CheckpointError: naming each mismatched, unknown or missing tensor.
  """
  names = names or {}
  expected = expected_shapes(config)

  def stored(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if path in transposed else shape

  problems = []
  for path in sorted(set(flat) - set(expected)):
    problems.append(f"unknown tensor {names.get(path, path)!r} (the "
                    f"{config.variant} model has no {path!r})")
  for path in sorted(set(expected) - set(flat)):
    problems.append(f"missing tensor {names.get(path, path)!r} (shape "
                    f"{stored(path, expected[path])})")
  for path in sorted(set(expected) & set(flat)):
    if tuple(flat[path].shape) != expected[path]:
      problems.append(
          f"tensor {names.get(path, path)!r} has shape "
          f"{stored(path, tuple(flat[path].shape))}, expected "
          f"{stored(path, expected[path])}")
  if problems:
    raise CheckpointError(
        f"{source}: " + "; ".join(problems) + ". The weights do not match "
        "the model their config describes: check that the config "
        "(config.json; for T5X, inferred from the shapes) and the weights "
        "come from the same T5 checkpoint, and that it was copied "
        "completely.")
  params = unflatten({path: np.asarray(value, np.float32)
                      for path, value in flat.items()})
  return stack_layers(params, config)


# ---------------------------------------------------------------------------
# Hugging Face transformers (config.json + model.safetensors / .bin).

_HF_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
_HF_SUBLAYERS = {
    "encoder": ["attention", "mlp"],
    "decoder": ["self_attention", "encoder_decoder_attention", "mlp"],
}
_HF_NORMS = {
    "attention": "pre_attention_layer_norm",
    "self_attention": "pre_self_attention_layer_norm",
    "encoder_decoder_attention": "pre_cross_attention_layer_norm",
    "mlp": "pre_mlp_layer_norm",
}
_HF_ATTENTION_MODULE = {"attention": "SelfAttention",
                        "self_attention": "SelfAttention",
                        "encoder_decoder_attention": "EncDecAttention"}


def hf_name_map(config: models.T5Config) -> dict[str, tuple[str, bool]]:
  """HF tensor name -> (our flat path, transpose?)."""
  names = {"shared.weight": ("token_embedder/embedding", False)}
  if not config.tied_embeddings:
    names["lm_head.weight"] = ("decoder/logits_dense/kernel", True)
  mlp = ["wi_0", "wi_1", "wo"] if config.gated else ["wi", "wo"]
  for stack, layers in (("encoder", config.num_encoder_layers),
                        ("decoder", config.num_decoder_layers)):
    norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
    names[f"{stack}.final_layer_norm.weight"] = (f"{stack}/{norm}/scale",
                                                 False)
    names[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
          ".weight"] = (f"{stack}/relpos_bias/rel_embedding", True)
    for i in range(layers):
      for j, sublayer in enumerate(_HF_SUBLAYERS[stack]):
        hf = f"{stack}.block.{i}.layer.{j}"
        ours = f"{stack}/layers_{i}"
        names[f"{hf}.layer_norm.weight"] = (
            f"{ours}/{_HF_NORMS[sublayer]}/scale", False)
        if sublayer == "mlp":
          for w in mlp:
            names[f"{hf}.DenseReluDense.{w}.weight"] = (
                f"{ours}/mlp/{w}/kernel", True)
        else:
          for hf_w, w in _HF_ATTENTION.items():
            names[f"{hf}.{_HF_ATTENTION_MODULE[sublayer]}.{hf_w}.weight"] = (
                f"{ours}/{sublayer}/{w}/kernel", True)
  return names


# Tensors HF stores as copies of others (tied) or as buffers.
_HF_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def config_from_hf(hf: Mapping[str, Any], source: str) -> models.T5Config:
  """T5Config from a transformers T5 config.json dict.

  transformers 4 marks v1.1 with tie_word_embeddings=false (no logits scale,
  its own lm_head); transformers 5 always ties in memory and records the
  scale as scale_decoder_outputs. A v1.1 checkpoint without lm_head.weight
  uses the shared embedding as its output projection.
  """
  activation = hf.get("feed_forward_proj", "relu")
  scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
  if activation == "gated-gelu" and not scaled:
    variant = "v1_1"
  elif activation == "relu" and scaled:
    variant = "v1_0"
  else:
    raise CheckpointError(
        f"{source}: feed_forward_proj={activation!r} with scaled decoder "
        f"outputs={scaled} is not a T5 variant dro_fast supports (v1.1: "
        f"'gated-gelu', unscaled; v1.0: 'relu', scaled by d_model^-0.5).")
  try:
    return models.T5Config(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"],
        d_ff=hf["d_ff"], num_heads=hf["num_heads"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        relative_attention_num_buckets=hf.get(
            "relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get(
            "relative_attention_max_distance", 128),
        dropout_rate=hf.get("dropout_rate", 0.1),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        variant=variant, pad_id=hf.get("pad_token_id", 0),
        eos_id=hf.get("eos_token_id", 1), name=hf.get("_name_or_path", ""))
  except KeyError as e:
    raise CheckpointError(f"{source}: config.json lacks the field {e}; is "
                          f"this a T5 config?") from None


def _read_hf_tensors(path: str) -> dict[str, np.ndarray]:
  safetensors_file = os.path.join(path, "model.safetensors")
  bin_file = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(safetensors_file):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(safetensors_file))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"{safetensors_file}: not a readable safetensors file ({e}); it is "
          "damaged or incomplete: copy it again, or save the model again "
          "with save_pretrained.") from e
  if os.path.exists(bin_file):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise CheckpointError(
          f"{bin_file}: reading pytorch_model.bin needs torch (pip install "
          f"'dro_fast[hf]'), or convert the checkpoint to model.safetensors."
      ) from None
    try:
      # weights_only: a checkpoint must never run code.
      state = torch.load(bin_file, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"{bin_file}: not a readable PyTorch state dict ({e}); it is "
          "damaged, incomplete or not a plain state dict: copy it again, or "
          "save the model again with save_pretrained.") from e
    return {name: tensor.float().numpy() for name, tensor in state.items()}
  raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin; "
                        f"is this a Hugging Face checkpoint directory?")


def load_hf(path: str | os.PathLike) -> tuple[models.T5Config, Params]:
  """Loads a Hugging Face T5 directory (config.json + weights).

  Args:
    path: a directory written by transformers' save_pretrained.

  Returns:
    (config, params) in dro_fast.models' layout, float32.
  """
  path = os.fspath(path)
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise CheckpointError(f"{path}: no config.json; pass a directory written "
                          f"by save_pretrained.")
  with open(config_file) as f:
    try:
      hf_config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{config_file}: invalid JSON ({e}); copy it "
                            "again or save the model again.") from None
  if not isinstance(hf_config, dict):
    raise CheckpointError(f"{config_file}: holds a JSON "
                          f"{type(hf_config).__name__}, not a config object; "
                          "is this a Hugging Face T5 checkpoint?")
  config = config_from_hf(hf_config, config_file)
  tensors = _read_hf_tensors(path)
  if config.tied_embeddings:
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(lm_head,
                                                  tensors.get("shared.weight")):
      raise CheckpointError(f"{path}: a v1.0 (relu) T5 ties lm_head.weight to "
                            f"shared.weight, but they differ here.")
  elif "lm_head.weight" not in tensors and "shared.weight" in tensors:
    tensors["lm_head.weight"] = tensors["shared.weight"]   # tied in the file
  name_map = hf_name_map(config)
  names = {ours: name for name, (ours, _) in name_map.items()}
  transposed = frozenset(ours for ours, transpose in name_map.values()
                         if transpose)
  flat = {}
  for name, value in tensors.items():
    if name in name_map:
      ours, transpose = name_map[name]
      flat[ours] = value.T if transpose else value
    elif name not in _HF_ALIASES:
      flat[name] = value            # reported as unknown by check_and_build
  return config, check_and_build(flat, config, path, names, transposed)


# ---------------------------------------------------------------------------
# T5X (checkpoint_<step>/checkpoint msgpack + TensorStore arrays).

_MSGPACK_NDARRAY = 1      # flax.serialization's msgpack ext type codes
_MSGPACK_NPSCALAR = 3


def _msgpack_ext_hook(code: int, data: bytes):
  import msgpack  # pylint: disable=g-import-not-at-top
  if code in (_MSGPACK_NDARRAY, _MSGPACK_NPSCALAR):
    shape, dtype, buffer = msgpack.unpackb(data, raw=False)
    if dtype == "bfloat16":
      dtype = jnp.bfloat16
    array = np.frombuffer(buffer, dtype=np.dtype(dtype))
    return array.reshape(shape) if code == _MSGPACK_NDARRAY else array[0]
  return msgpack.ExtType(code, data)


def _is_tensorstore_spec(value) -> bool:
  return isinstance(value, dict) and {"driver", "kvstore"} <= set(value)


def _read_tensorstore(spec: dict, directory: str, name: str) -> np.ndarray:
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = json.loads(json.dumps(spec))
  kvstore = spec["kvstore"]
  if kvstore.get("driver") not in ("file", "gfile", "gcs"):
    raise CheckpointError(f"{directory}: tensor {name!r} uses the unsupported "
                          f"TensorStore kvstore {kvstore.get('driver')!r}.")
  # T5X stores paths relative to the checkpoint directory.
  spec["kvstore"] = {"driver": "file",
                     "path": os.path.join(directory, kvstore["path"])}
  try:
    return np.asarray(ts.open(spec).result().read().result())
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{directory}: cannot read tensor {name!r} from "
                          f"{spec['kvstore']['path']} ({e}).") from e


def _flatten_tree(tree: Mapping[str, Any], prefix: str = ""
                  ) -> Iterable[tuple[str, Any]]:
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict) and not _is_tensorstore_spec(value):
      yield from _flatten_tree(value, path)
    else:
      yield path, value


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]],
                       source: str) -> models.T5Config:
  """Infers a T5Config from T5X parameter shapes."""
  def shape(path):
    if path not in shapes:
      raise CheckpointError(f"{source}: cannot infer the config: no tensor "
                            f"{path!r}; pass config= explicitly.")
    return shapes[path]

  vocab, d_model = shape("token_embedder/embedding")
  heads, buckets = shape("encoder/relpos_bias/rel_embedding")
  gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
  d_ff = shape("encoder/layers_0/mlp/wi_0/kernel" if gated
               else "encoder/layers_0/mlp/wi/kernel")[1]
  layers = {stack: len({m[1] for p in shapes for m in [re.match(
      rf"{stack}/layers_(\d+)/", p)] if m}) for stack in ("encoder", "decoder")}
  return models.T5Config(
      vocab_size=vocab, d_model=d_model,
      d_kv=shape("encoder/layers_0/attention/query/kernel")[1] // heads,
      d_ff=d_ff, num_heads=heads, num_encoder_layers=layers["encoder"],
      num_decoder_layers=layers["decoder"],
      relative_attention_num_buckets=buckets,
      variant="v1_1" if gated else "v1_0", name=os.path.basename(source))


def load_t5x(path: str | os.PathLike,
             config: models.T5Config | None = None
             ) -> tuple[models.T5Config, Params]:
  """Loads a T5X checkpoint directory (e.g. .../checkpoint_1000000).

  Args:
    path: the directory holding the msgpack file `checkpoint` and the
      TensorStore arrays it refers to.
    config: the model configuration; inferred from the shapes when None
      (dropout and epsilon then take T5's defaults).

  Returns:
    (config, params) in dro_fast.models' layout, float32.
  """
  import msgpack  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  index = os.path.join(path, "checkpoint")
  if not os.path.isfile(index):
    raise CheckpointError(f"{path}: no `checkpoint` msgpack file; pass a T5X "
                          f"checkpoint_<step> directory.")
  with open(index, "rb") as f:
    try:
      contents = msgpack.unpackb(f.read(), ext_hook=_msgpack_ext_hook,
                                 raw=False, strict_map_key=False)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{index}: not a T5X msgpack checkpoint "
                            f"({e}).") from None
  try:
    target = contents["optimizer"]["target"]
  except (KeyError, TypeError):
    raise CheckpointError(f"{index}: no optimizer/target tree; is this a T5X "
                          f"checkpoint?") from None
  leaves = dict(_flatten_tree(target))
  flat = {}
  for name, value in leaves.items():
    if _is_tensorstore_spec(value):
      value = _read_tensorstore(value, path, name)
    elif isinstance(value, dict) and "__msgpack_chunked_array__" in value:
      raise CheckpointError(f"{index}: tensor {name!r} is a chunked msgpack "
                            f"array, which dro_fast does not read yet.")
    flat[name] = np.asarray(value)
  if config is None:
    config = config_from_shapes({k: v.shape for k, v in flat.items()}, path)
  return config, check_and_build(flat, config, path)


def load(path: str | os.PathLike) -> tuple[models.T5Config, Params]:
  """A T5X directory (it holds a `checkpoint` file) or a Hugging Face one.

  Args:
    path: the checkpoint directory.

  Returns:
    (config, params) in dro_fast.models' layout, float32.

  Raises:
    CheckpointError: `path` is not a directory, holds neither kind of
      checkpoint, or its checkpoint cannot be read into the model.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist. Check the path (relative "
                          f"paths start from {os.getcwd()}).")
  if not os.path.isdir(path):
    raise CheckpointError(
        f"{path} is a file; pass the checkpoint directory holding it (a "
        "T5X checkpoint_<step> directory or a Hugging Face one).")
  if os.path.isfile(os.path.join(path, "checkpoint")):
    return load_t5x(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return load_hf(path)
  entries = sorted(os.listdir(path))
  holds = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
  raise CheckpointError(
      f"{path} is not a checkpoint: it has neither T5X's `checkpoint` file "
      "nor Hugging Face's config.json (it holds "
      f"{holds or 'nothing'}). Pass a T5X checkpoint_<step> directory or a "
      "directory written by save_pretrained.")
