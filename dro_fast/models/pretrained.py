"""Loading real T5 checkpoints: T5X (msgpack + TensorStore) and Hugging Face.

Both produce (T5Config, params) with params in dro_fast.models' Haiku layout,
whose paths are T5X's: {"encoder/layers_0/attention/query": {"kernel": ...}}.
A tensor whose shape disagrees with the config, a tensor the model does not
have, or one the model needs but the checkpoint lacks is a CheckpointError
naming it.

Paths go through dro_fast.fileio.as_path (etils.epath): a local path, a
file:// URL or a gs:// URL (gs:// needs gcsfs). T5X's TensorStore arrays are
read with TensorStore's own kvstore drivers ("file", "gcs"), found relative
to the directory the checkpoint is read from.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dro_fast import fileio
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
  """Per-layer params to the scan_layers layout; a no-op without it.

  "encoder/layers_3/..." becomes "encoder/layers/..." with a leading [L]
  axis.
  """
  if not config.scan_layers:
    return params
  return stack_layer_modules(params, "encoder|decoder")


def stack_layer_modules(params: Params, stacks: str) -> Params:
  """Modules "<stack>/layers_<i>/<rest>" as one "<stack>/layers/<rest>".

  Each leaf gains a leading [L] axis in layer order; `stacks` is a regular
  expression of the stacks' names (T5: "encoder|decoder", a decoder-only
  model: "model"). Other modules are kept as they are.
  """
  out: Params = {}
  stacked: dict[str, list[tuple[int, Mapping[str, Any]]]] = {}
  for module, leaves in params.items():
    match = re.fullmatch(rf"({stacks})/layers_(\d+)/(.*)", module)
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
# Hugging Face transformers (config.json + model.safetensors / .bin, whole
# or sharded through an index file).

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


def _is_local(path) -> bool:
  return fileio.url_scheme(str(path)) is None


def _read_safetensors(file) -> dict[str, np.ndarray]:
  """One safetensors file: memory-mapped when local, else read whole."""
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    if _is_local(file):
      with safetensors.safe_open(str(file), framework="numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}
    return dict(safetensors.numpy.load(file.read_bytes()))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{file}: not a readable safetensors file ({e}); it is damaged or "
        "incomplete: copy it again, or save the model again with "
        "save_pretrained.") from e


def _read_torch(file) -> dict[str, np.ndarray]:
  """One pytorch_model*.bin state dict, loaded without running code."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        f"{file}: reading pytorch_model.bin needs torch (pip install "
        "'dro_fast[hf]'), or convert the checkpoint to model.safetensors."
    ) from None
  try:
    with file.open("rb") as f:
      # weights_only: a checkpoint must never run code.
      state = torch.load(f, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"{file}: not a readable PyTorch state dict ({e}); it is damaged, "
        "incomplete or not a plain state dict: copy it again, or save the "
        "model again with save_pretrained.") from e
  return {name: tensor.float().numpy() for name, tensor in state.items()}


def _read_sharded(index, read_shard: Callable[[Any], dict[str, np.ndarray]]
                  ) -> dict[str, np.ndarray]:
  """A sharded checkpoint through its index file, one shard at a time.

  The index ({"weight_map": {tensor: shard file}}) is what save_pretrained
  writes past max_shard_size (flan-t5-xl and -xxl on the hub); each shard is
  read once, and every tensor the index names must be in its shard.
  """
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
      shards.setdefault(shard, set()).add(name)
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
          AttributeError) as e:
    raise CheckpointError(
        f"{index}: not a sharded-checkpoint index ({type(e).__name__}: {e}; "
        "it needs a weight_map of tensor -> shard file): copy it again or "
        "save the model again with save_pretrained.") from None
  tensors: dict[str, np.ndarray] = {}
  for shard in sorted(shards):
    file = index.parent / shard
    if not file.is_file():
      raise CheckpointError(
          f"{file}: missing, but {index.name} puts {len(shards[shard])} "
          "tensors there; copy every shard the index names.")
    contents = read_shard(file)
    absent = sorted(shards[shard] - set(contents))
    if absent:
      raise CheckpointError(
          f"{file}: lacks {absent[0]!r}"
          + (f" and {len(absent) - 1} more" if len(absent) > 1 else "")
          + f" that {index.name} places there; the shard is damaged or from "
          "another save: copy it again.")
    tensors.update(contents)
  return tensors


# transformers' own order of preference.
_HF_WEIGHTS = (("model.safetensors", _read_safetensors, False),
               ("model.safetensors.index.json", _read_safetensors, True),
               ("pytorch_model.bin", _read_torch, False),
               ("pytorch_model.bin.index.json", _read_torch, True))


def _read_hf_tensors(directory) -> dict[str, np.ndarray]:
  for name, read, sharded in _HF_WEIGHTS:
    file = directory / name
    if file.is_file():
      return _read_sharded(file, read) if sharded else read(file)
  raise CheckpointError(
      f"{directory}: no weights (model.safetensors, pytorch_model.bin, or "
      "their sharded .index.json); is this a Hugging Face checkpoint "
      "directory?")


@contextlib.contextmanager
def _remote_errors(path: str) -> Iterator[None]:
  """A URL whose file system's package is absent: one line, what to do."""
  try:
    yield
  except ImportError as e:
    scheme = fileio.url_scheme(path)
    if scheme is None:
      raise
    raise CheckpointError(f"{path}: reading {scheme}:// paths needs a "
                          f"package that is not installed ({e}).") from None


def load_hf(path: str | os.PathLike) -> tuple[models.T5Config, Params]:
  """Loads a Hugging Face T5 directory (config.json + weights).

  Args:
    path: a directory written by transformers' save_pretrained: a local
      path, file:// or gs:// URL. Its weights are model.safetensors,
      pytorch_model.bin, or either sharded (model.safetensors.index.json +
      model-0000k-of-0000n.safetensors).

  Returns:
    (config, params) in dro_fast.models' layout, float32.
  """
  path = os.fspath(path)
  with _remote_errors(path):
    return _load_hf(path, fileio.as_path(path))


def read_hf_config(path: str, directory) -> tuple[dict[str, Any], str]:
  """(a Hugging Face folder's config.json as a dict, the file's name).

  Raises:
    CheckpointError: no config.json, invalid JSON, or not a JSON object.
  """
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{path}: no config.json; pass a directory written "
                          f"by save_pretrained.")
  try:
    hf_config = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{config_file}: invalid JSON ({e}); copy it "
                          "again or save the model again.") from None
  if not isinstance(hf_config, dict):
    raise CheckpointError(f"{config_file}: holds a JSON "
                          f"{type(hf_config).__name__}, not a config object; "
                          "is this a Hugging Face checkpoint?")
  return hf_config, str(config_file)


def _load_hf(path: str, directory) -> tuple[models.T5Config, Params]:
  hf_config, config_file = read_hf_config(path, directory)
  config = config_from_hf(hf_config, config_file)
  tensors = _read_hf_tensors(directory)
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


def tensorstore_kvstore(location: str) -> dict[str, str]:
  """The TensorStore kvstore spec of a local path or a URL.

  Local, file://, gs:// or s3://: TensorStore reads remote arrays itself,
  without epath.
  """
  scheme = fileio.url_scheme(location)
  if scheme in (None, "file"):
    return {"driver": "file",
            "path": os.path.abspath(os.fspath(fileio.as_path(location)))}
  if scheme in ("gs", "s3"):
    bucket, _, key = location.split("://", 1)[1].partition("/")
    return {"driver": "gcs" if scheme == "gs" else "s3", "bucket": bucket,
            "path": key}
  raise CheckpointError(
      f"{location}: TensorStore cannot read T5X arrays from {scheme}:// "
      "here; copy the checkpoint to a local path, gs:// or s3://.")


def _read_tensorstore(spec: dict, directory: str, name: str) -> np.ndarray:
  """One T5X array; its spec's path is relative to `directory`.

  T5X records the kvstore it wrote to ("file", "gcs" with a bucket); the
  array is read from where the checkpoint is now, with the kvstore driver of
  `directory`'s own scheme, so that a copied checkpoint reads the same.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  spec = json.loads(json.dumps(spec))
  kvstore = spec["kvstore"]
  if kvstore.get("driver") not in ("file", "gfile", "gcs"):
    raise CheckpointError(f"{directory}: tensor {name!r} uses the unsupported "
                          f"TensorStore kvstore {kvstore.get('driver')!r}.")
  # tensorstore < 0.1.14 (older T5X checkpoints) kept the path in the spec.
  relative = kvstore.get("path") or spec.pop("path", None)
  spec.pop("path", None)
  if not isinstance(relative, str):
    raise CheckpointError(f"{directory}: tensor {name!r} has a TensorStore "
                          "spec without a path; is the checkpoint damaged?")
  location = posixpath.join(directory, relative)
  spec["kvstore"] = tensorstore_kvstore(location)
  try:
    return np.asarray(ts.open(spec).result().read().result())
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{directory}: cannot read tensor {name!r} from "
                          f"{location} ({e}).") from e


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
      TensorStore arrays it refers to: a local path, file:// or gs:// URL
      (e.g. gs://t5-data/pretrained_models/t5x/flan_t5_xl/checkpoint_1138000).
    config: the model configuration; inferred from the shapes when None
      (dropout and epsilon then take T5's defaults).

  Returns:
    (config, params) in dro_fast.models' layout, float32.
  """
  path = os.fspath(path)
  with _remote_errors(path):
    return _load_t5x(path, fileio.as_path(path), config)


def _load_t5x(path: str, directory, config: models.T5Config | None
              ) -> tuple[models.T5Config, Params]:
  import msgpack  # pylint: disable=g-import-not-at-top
  index = directory / "checkpoint"
  if not index.is_file():
    raise CheckpointError(f"{path}: no `checkpoint` msgpack file; pass a T5X "
                          f"checkpoint_<step> directory.")
  try:
    contents = msgpack.unpackb(index.read_bytes(), ext_hook=_msgpack_ext_hook,
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
      value = _read_tensorstore(value, str(directory), name)
    elif isinstance(value, dict) and "__msgpack_chunked_array__" in value:
      raise CheckpointError(f"{index}: tensor {name!r} is a chunked msgpack "
                            f"array, which dro_fast does not read yet.")
    flat[name] = np.asarray(value)
  if config is None:
    config = config_from_shapes({k: v.shape for k, v in flat.items()},
                                path.rstrip("/"))
  return config, check_and_build(flat, config, path)


def _read_config(directory) -> dict[str, Any]:
  """config.json as a dict; {} where it is not a JSON object (load_hf then
  reports it)."""
  try:
    hf_config = json.loads((directory / "config.json").read_text())
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}
  return hf_config if isinstance(hf_config, dict) else {}


def load(path: str | os.PathLike
         ) -> tuple[models.T5Config | models.DecoderConfig, Params]:
  """A T5X directory (it holds a `checkpoint` file) or a Hugging Face one.

  A Hugging Face folder whose config.json names a decoder-only family
  (hf_decoder.SUPPORTED: llama, qwen2, qwen3, gemma3_text, gemma3) loads
  through hf_decoder.load_hf_decoder into a DecoderConfig; any other
  through load_hf (T5).

  Args:
    path: the checkpoint directory: a local path, file:// or gs:// URL.

  Returns:
    (config, params) in dro_fast.models' layout, float32.

  Raises:
    CheckpointError: `path` is not a directory, holds neither kind of
      checkpoint, or its checkpoint cannot be read into the model.
  """
  path = os.fspath(path)
  with _remote_errors(path):
    directory = fileio.as_path(path)
    if not directory.exists():
      where = ("" if fileio.url_scheme(path) else
               f" (relative paths start from {os.getcwd()})")
      raise CheckpointError(f"{path} does not exist. Check the path{where}.")
    if not directory.is_dir():
      raise CheckpointError(
          f"{path} is a file; pass the checkpoint directory holding it (a "
          "T5X checkpoint_<step> directory or a Hugging Face one).")
    if (directory / "checkpoint").is_file():
      return load_t5x(path)
    if (directory / "config.json").is_file():
      # Imported here: hf_decoder imports this module.
      # pylint: disable-next=g-import-not-at-top
      from dro_fast.models import hf_decoder
      if hf_decoder.is_decoder_config(_read_config(directory)):
        return hf_decoder.load_hf_decoder(path)
      return load_hf(path)
    entries = sorted(entry.name for entry in directory.iterdir())
  holds = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
  raise CheckpointError(
      f"{path} is not a checkpoint: it has neither T5X's `checkpoint` file "
      "nor Hugging Face's config.json (it holds "
      f"{holds or 'nothing'}). Pass a T5X checkpoint_<step> directory or a "
      "directory written by save_pretrained.")


def decoder_family(path: str | os.PathLike | None) -> str | None:
  """The model_type of a decoder-only Hugging Face folder at `path`.

  None for no path, a T5X or T5 checkpoint, or a folder without a readable
  config.json (loading it then says what is wrong): the CLI asks this to
  decide the batch layout and the tokenizer before anything is loaded.
  """
  if not path:
    return None
  from dro_fast.models import hf_decoder  # pylint: disable=g-import-not-at-top
  try:
    directory = fileio.as_path(os.fspath(path))
    if not (directory / "config.json").is_file():
      return None
    config = _read_config(directory)
  except OSError:
    return None
  return config.get("model_type") if hf_decoder.is_decoder_config(
      config) else None
