"""Exporting a T5 policy as a Hugging Face T5ForConditionalGeneration folder.

The inverse of models.pretrained.load_hf, through the same tables
(pretrained.hf_name_map, and config_from_hf read backwards): a folder
written by export_hf_t5 loads back through pretrained.load_hf to the same
(config, params), and through transformers' from_pretrained to a model that
computes the same log-probabilities.

The folder holds config.json (transformers' T5Config fields; v1.1 is written
as transformers 4 and the hub's FLAN-T5 write it, tie_word_embeddings
false, which transformers 5 reads as unscaled logits with their own
lm_head), generation_config.json (decoder start = pad, eos), the weights as
save_pretrained shards them (models.hf_files), and with a tokenizer its
SentencePiece model (spiece.model) and tokenizer_config.json for
transformers' T5Tokenizer.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from dro_fast import models
from dro_fast.models import hf_files
from dro_fast.models import pretrained
from dro_fast.tokenizer import Tokenizer

DTYPES = ("float32", "bfloat16", "float16")
# T5's own tokenizer appends this many sentinels (<extra_id_0> is the last
# id) after the SentencePiece pieces, where the vocabulary has room.
T5_EXTRA_IDS = 100


def unstack_layers(params: pretrained.Params,
                   config: models.T5Config) -> pretrained.Params:
  """The scan_layers layout back to per-layer params; a no-op without it.

  "encoder/layers/..." with a leading [L] axis becomes
  "encoder/layers_{i}/..." (the inverse of pretrained.stack_layers).
  """
  if not config.scan_layers:
    return dict(params)
  out: pretrained.Params = {}
  for module, leaves in params.items():
    match = re.fullmatch(r"(encoder|decoder)/layers/(.*)", module)
    if not match:
      out[module] = leaves
      continue
    for name, value in leaves.items():
      for i in range(value.shape[0]):
        out.setdefault(f"{match[1]}/layers_{i}/{match[2]}", {})[name] = (
            value[i])
  return out


def _numpy_dtype(dtype: str):
  if dtype not in DTYPES:
    raise hf_files.ExportError(f"`dtype` must be one of {DTYPES}, got "
                               f"{dtype!r}.")
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _dtype_name(params: pretrained.Params) -> str:
  """The parameters' dtype as config.json names it (float32 for T5)."""
  dtypes = {np.dtype(x.dtype).name for leaves in params.values()
            for x in leaves.values()}
  return dtypes.pop() if len(dtypes) == 1 else "float32"


def hf_state_dict(config: models.T5Config, params: pretrained.Params,
                  dtype: str | None = None) -> dict[str, np.ndarray]:
  """HF T5ForConditionalGeneration tensors from dro_fast params.

  Args:
    config: the model configuration (its scan_layers says the layout).
    params: dro_fast.models' parameters, stacked or per layer.
    dtype: the tensors' dtype, one of DTYPES; None: the parameters' own.

  Returns:
    HF name -> array, in hf_name_map's order (embedding first, then each
    stack by layer). The tied copies (encoder/decoder.embed_tokens) are not
    written: from_pretrained ties them to shared.weight.

  Raises:
    pretrained.CheckpointError: params lack a tensor the config needs, or
      have one of another shape.
  """
  flat = pretrained.flatten(unstack_layers(params, config))
  expected = pretrained.expected_shapes(config)
  problems = sorted(set(expected) ^ set(flat)) + sorted(
      path for path in set(expected) & set(flat)
      if tuple(np.shape(flat[path])) != expected[path])
  if problems:
    raise pretrained.CheckpointError(
        f"the parameters do not match the {config.variant} T5Config at "
        f"{problems[:3]}" + (" and more" if len(problems) > 3 else "")
        + "; export the config the parameters were trained with.")
  target = None if dtype is None else _numpy_dtype(dtype)
  tensors = {}
  for name, (ours, transpose) in pretrained.hf_name_map(config).items():
    value = np.asarray(flat[ours])
    value = value.T if transpose else value
    tensors[name] = np.ascontiguousarray(
        value if target is None else value.astype(target))
  return tensors


def hf_config(config: models.T5Config, dtype: str = "float32"
              ) -> dict[str, Any]:
  """config.json for transformers' T5Config (read back by config_from_hf)."""
  v1_1 = config.variant == "v1_1"
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "is_encoder_decoder": True,
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance":
          config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "feed_forward_proj": "gated-gelu" if v1_1 else "relu",
      "dense_act_fn": "gelu_new" if v1_1 else "relu",
      "is_gated_act": v1_1,
      # v1.0 ties lm_head to the embedding and scales the decoder output by
      # d_model^-1/2; v1.1 does neither (transformers 5's name for the
      # scale is scale_decoder_outputs, 4's is tie_word_embeddings).
      "tie_word_embeddings": not v1_1,
      "scale_decoder_outputs": not v1_1,
      "pad_token_id": config.pad_id,
      "eos_token_id": config.eos_id,
      "decoder_start_token_id": config.decoder_start_id,
      "use_cache": True,
      "dtype": dtype,
  }


def generation_config(config: models.T5Config) -> dict[str, Any]:
  """generation_config.json: T5 decodes from pad and stops at eos."""
  return {"decoder_start_token_id": config.decoder_start_id,
          "eos_token_id": config.eos_id, "pad_token_id": config.pad_id}


def tokenizer_files(tokenizer: Tokenizer, vocab_size: int
                    ) -> dict[str, bytes | dict]:
  """spiece.model and tokenizer_config.json for transformers' T5Tokenizer.

  The sentinels <extra_id_0..99> follow the pieces as in T5's own tokenizer
  (T5's 32000 pieces + 100 in a 32128-row embedding) when the model's
  vocabulary has room for them, and are left out otherwise (a vocabulary
  trained by dro_fast fills the embedding). Text without sentinels encodes
  to the ids dro_fast's Tokenizer gives it, EOS appended.
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  proto = tokenizer.serialized_model()
  processor = spm.SentencePieceProcessor()
  processor.load_from_serialized_proto(proto)
  pieces = processor.get_piece_size()
  extra_ids = T5_EXTRA_IDS if pieces + T5_EXTRA_IDS <= vocab_size else 0
  special = {"pad_token": processor.id_to_piece(tokenizer.pad_id),
             "eos_token": processor.id_to_piece(tokenizer.eos_id),
             "unk_token": processor.id_to_piece(tokenizer.unk_id)}
  return {"spiece.model": proto,
          "tokenizer_config.json": {"tokenizer_class": "T5Tokenizer",
                                    "extra_ids": extra_ids, **special},
          "special_tokens_map.json": special}


def write_files(files: Mapping[str, bytes | dict], out_dir: str) -> None:
  """Each name -> bytes (as is) or dict (as JSON) into out_dir."""
  for name, content in files.items():
    path = os.path.join(out_dir, name)
    if isinstance(content, bytes):
      with open(path, "wb") as f:
        f.write(content)
    else:
      hf_files.write_json(path, content)


def export_hf_t5(config: models.T5Config, params: pretrained.Params,
                 out_dir: str | os.PathLike, *,
                 tokenizer: Tokenizer | None = None,
                 max_shard_bytes: int = 2**30,
                 dtype: str | None = None) -> dict:
  """Writes a folder T5ForConditionalGeneration.from_pretrained loads.

  Args:
    config: the policy's T5Config.
    params: its parameters (dro_fast.models' layout, stacked or not).
    out_dir: an existing, empty folder (dro_fast.export stages one with
      hf_files.staged_directory, so that a failed export leaves nothing).
    tokenizer: the run's tokenizer; None writes no tokenizer files.
    max_shard_bytes: the most tensor bytes in one safetensors file.
    dtype: the weights' dtype (DTYPES); None: the parameters' own.

  Returns:
    The weights' index (hf_files.write_safetensors_shards).
  """
  out_dir = os.fspath(out_dir)
  tensors = hf_state_dict(config, params, dtype)
  index = hf_files.write_safetensors_shards(tensors, out_dir, max_shard_bytes)
  written = dtype or _dtype_name(params)
  hf_files.write_json(os.path.join(out_dir, "config.json"),
                      hf_config(config, written))
  hf_files.write_json(os.path.join(out_dir, "generation_config.json"),
                      generation_config(config))
  if tokenizer is not None:
    write_files(tokenizer_files(tokenizer, config.vocab_size), out_dir)
  return index
