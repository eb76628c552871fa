"""LoRA parameters: adapters apart from the frozen base, and merged back.

A model config with `lora` (models.LoraConfig) builds its targeted Dense
layers with `lora_a` [in, r] and `lora_b` [r, out] beside their `kernel`
(models/layers.py). Its parameters split into the adapters, which train,
and the base (every other parameter), which is frozen, held in
LoraConfig.base_dtype and never checkpointed: a run rebuilds it from its
init_checkpoint (or seed) and restores only the adapters.

Under scan_layers the adapters are stacked like their kernels: lora_a [L,
in, r], lora_b [L, r, out].
"""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from dro_fast.models.config import LoraConfig
from dro_fast.models.layers import LORA_A
from dro_fast.models.layers import LORA_B

ADAPTERS = (LORA_A, LORA_B)


def _is_adapter(module_name: str, name: str, value: Any) -> bool:
  del module_name, value
  return name in ADAPTERS


def split(params: Any) -> tuple[dict, dict]:
  """(adapters, base) of a LoRA model's parameters (Haiku's layout)."""
  adapters, base = hk.data_structures.partition(_is_adapter, params)
  return dict(adapters), dict(base)


def combine(adapters: Any, base: Any) -> dict:
  """The model's parameters from split's two halves."""
  return dict(hk.data_structures.merge(base, adapters))


def freeze(base: Any, lora: LoraConfig) -> Any:
  """The base's floating-point parameters in lora.base_dtype."""
  dtype = jnp.dtype(lora.base_dtype)
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, base)


def has_adapters(params: Any) -> bool:
  return any(name in ADAPTERS for module in params.values()
             for name in module)


def with_adapters(params: Any, fresh: Any, lora: LoraConfig) -> dict:
  """`params` of the model without adapters (a pretrained checkpoint), its
  base frozen (`freeze`), with the adapters of `fresh` (the adapted model's
  own initialisation) added.

  Raises ValueError when `fresh` has a module `params` lacks (not the same
  model).
  """
  adapters, _ = split(fresh)
  missing = sorted(set(adapters) - set(params))
  if missing:
    raise ValueError(f"LoRA adapters for {missing[0]}, which the parameters "
                     "lack: not the same model.")
  _, base = split(params)
  return combine(adapters, freeze(base, lora))


def merge(params: Any, lora: LoraConfig) -> dict:
  """The adapted model as plain weights: kernel + scale · lora_a @ lora_b.

  Merged kernels are float32; every other parameter is as it is, and the
  adapters are dropped. The result is the model without `lora`.
  """
  out = {}
  for module, leaves in params.items():
    leaves = dict(leaves)
    if LORA_A in leaves:
      a = leaves.pop(LORA_A).astype(jnp.float32)
      b = leaves.pop(LORA_B).astype(jnp.float32)
      delta = jnp.einsum("...ir,...ro->...io", a, b,
                         precision=jax.lax.Precision.HIGHEST)
      leaves["kernel"] = leaves["kernel"].astype(jnp.float32) + (
          lora.scale * delta)
    out[module] = leaves
  return out


def adapter_tensors(params: Any) -> tuple[dict, dict]:
  """({module: {"kernel": lora_a}}, {module: {"kernel": lora_b}}).

  Each adapter in the place of its layer's kernel, [in, r] and [r, out]
  (stacked [L, ...] under scan_layers): an exporter that writes a kernel
  [in, out] as the Hugging Face weight [out, in] writes them as PEFT's
  lora_A.weight [r, in] and lora_B.weight [out, r].
  """
  a_tree, b_tree = {}, {}
  for module, leaves in params.items():
    if LORA_A in leaves:
      a_tree[module] = {"kernel": leaves[LORA_A]}
      b_tree[module] = {"kernel": leaves[LORA_B]}
  return a_tree, b_tree
