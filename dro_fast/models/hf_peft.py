"""A LoRA policy's adapters as a PEFT adapter folder.

export_peft_adapters writes adapter_config.json and
adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base,
folder)` loads onto the Hugging Face base model: transformers'
T5ForConditionalGeneration (models.hf_t5) or the family's causal LM
(models.hf_decoder). PEFT's LoRA computes W x + (lora_alpha / r) · B A x
with A = lora_A.weight [r, in] and B = lora_B.weight [out, r], which are
our lora_a [in, r] and lora_b [r, out] transposed
(models/layers.py: Dense).

The base must be the one the adapters were trained on: the run's
init_checkpoint, or, exactly (the frozen base in LoraConfig.base_dtype),
`python -m dro_fast.export WORKDIR:init BASE_DIR`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from dro_fast.models import hf_decoder
from dro_fast.models import hf_t5
from dro_fast.models import lora
from dro_fast.models import pretrained
from dro_fast.models.config import T5Config
from dro_fast.models.decoder_config import DecoderConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Our T5 Dense names -> transformers' T5 module names (PEFT's targets).
_T5_MODULES = {"query": "q", "key": "k", "value": "v", "out": "o"}


def _kernel_names(config: T5Config | DecoderConfig, tree: Any
                  ) -> dict[str, np.ndarray]:
  """{HF weight name: our kernel-shaped array} of a {module: {"kernel"}}."""
  tree = jax.device_get(tree)
  if isinstance(config, DecoderConfig):
    if config.scan_layers:
      tree = hf_decoder.unstack_layers(tree)
    return {hf_decoder.hf_name(path)[0]: np.asarray(value)
            for path, value in pretrained.flatten(tree).items()}
  ours = {path: hf for hf, (path, _) in pretrained.hf_name_map(
      config).items()}
  return {ours[path]: np.asarray(value) for path, value in
          pretrained.flatten(hf_t5.unstack_layers(tree, config)).items()}


def peft_tensors(config: T5Config | DecoderConfig, params: Any
                 ) -> dict[str, np.ndarray]:
  """PEFT's saved tensor names -> float32 arrays, for `params` with adapters.

  Names are base_model.model.<module>.lora_A.weight / lora_B.weight, as
  peft.get_peft_model_state_dict saves them.
  """
  a_tree, b_tree = lora.adapter_tensors(params)
  tensors = {}
  for tree, which in ((a_tree, "lora_A"), (b_tree, "lora_B")):
    for name, value in _kernel_names(config, tree).items():
      module = name[:-len(".weight")]
      tensors[f"base_model.model.{module}.{which}.weight"] = (
          np.ascontiguousarray(value.astype(np.float32).T))
  return tensors


def adapter_config(config: T5Config | DecoderConfig,
                   base_model: str | None) -> dict:
  """adapter_config.json of `config`'s LoRA for PEFT's LoraConfig."""
  spec = config.lora
  targets = sorted(_T5_MODULES.get(name, name) if isinstance(
      config, T5Config) else name for name in config.lora_modules)
  return {
      "peft_type": "LORA",
      "task_type": ("SEQ_2_SEQ_LM" if isinstance(config, T5Config)
                    else "CAUSAL_LM"),
      "base_model_name_or_path": base_model,
      "r": spec.rank,
      "lora_alpha": spec.alpha,
      "lora_dropout": 0.0,
      "target_modules": targets,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
  }


def export_peft_adapters(config: T5Config | DecoderConfig, params: Any,
                         out_dir: str | os.PathLike,
                         base_model: str | None = None) -> None:
  """Writes the adapters of `params` (config.lora's) as a PEFT folder.

  Args:
    config: the adapted model's config (its `lora` is set).
    params: its parameters with adapters (either layer layout).
    out_dir: an existing folder to write the two files into.
    base_model: what adapter_config.json names as the base
      (base_model_name_or_path); informational.

  Raises:
    ValueError: config has no `lora`.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  if config.lora is None:
    raise ValueError("the model has no LoRA adapters to export (its config "
                     "has no `lora`).")
  safetensors.numpy.save_file(peft_tensors(config, params),
                              os.path.join(out_dir, ADAPTER_WEIGHTS),
                              metadata={"format": "pt"})
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(adapter_config(config, base_model), f, indent=2,
              sort_keys=True)
    f.write("\n")
