"""Value networks V(x) for DRO-V (paper §3.3 and Figure 5).

"separate" (the paper's default, "double net"): a T5 encoder of its own with
masked mean pooling and a linear head. Its parameters sit at the same paths
as the policy's encoder (token_embedder, encoder/...) plus value_head, so
`init_from_policy` copies the policy's encoder into it.

"shared" ("single net"): only the pooling and head, applied to the policy's
own encoder output, so the value shares the policy's encoder parameters.

For a decoder-only policy (a DecoderConfig) the trunk is the decoder and
the pooled state is the final-normed hidden state at the last prompt token
(DecoderStates.encoded, [B, D]): "separate" runs a decoder of its own over
the prompt (parameters at the policy's model/... paths, no lm_head),
"shared" puts the head on the policy's `encoded`.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from dro_fast.models.decoder import encode_prompt
from dro_fast.models.config import T5Config
from dro_fast.models.config import VALUE_NETS
from dro_fast.models.decoder_config import DecoderConfig
from dro_fast.models.network import T5

KINDS = VALUE_NETS


def masked_mean(encoded: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of encoded [B, S, D] over positions where mask [B, S] is true."""
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(encoded.astype(jnp.float32) * weights, axis=1)
  return total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)      # [B, D]


def _head(pooled: jax.Array) -> jax.Array:
  # Haiku's default (truncated normal) weights, zero bias. Not all zeros:
  # Adafactor scales updates by the parameter's RMS, so an all-zero head
  # would hardly move.
  return hk.Linear(1, name="value_head")(pooled.astype(jnp.float32))[:, 0]


def value_network(config: T5Config | DecoderConfig,
                  kind: str = "separate") -> hk.Transformed:
  """The value network of either kind as an hk.Transformed.

  apply(params, rng, encoder_tokens [B, S], policy_encoded [B, S, D], *,
        is_training=False) -> [B] float32, where policy_encoded is the
  policy's encoder output for encoder_tokens (t5(config)'s encode, or
  DecoderStates.encoded). "shared" pools policy_encoded; "separate" ignores
  it (None will do) and encodes encoder_tokens with its own encoder, with
  dropout when is_training. init takes the same arguments.

  With a DecoderConfig: encoder_tokens are the prompts [B, S] (right-padded
  with PAD) and policy_encoded is DecoderStates.encoded [B, D].

  A value network has no LoRA adapters (config.lora is ignored): a
  "separate" one trains all its parameters.
  """
  if kind not in KINDS:
    raise ValueError(f"value network kind must be one of {KINDS}, got "
                     f"{kind!r}.")
  if config.lora is not None:
    config = config.replace(lora=None)

  if isinstance(config, DecoderConfig):
    def decoder_values(inputs, policy_encoded, *, is_training=False):
      del is_training        # no dropout in these families
      if kind == "shared":
        pooled = policy_encoded
      else:
        pooled = encode_prompt(config, inputs)
      return _head(pooled)

    return hk.transform(decoder_values)

  def values(encoder_tokens, policy_encoded, *, is_training=False):
    if kind == "shared":
      encoded = policy_encoded
    else:
      model = T5(config)
      encoded = model.encode(encoder_tokens, model.embedder(), is_training)
    return _head(masked_mean(encoded, encoder_tokens != config.pad_id))

  return hk.transform(values)


def init_from_policy(value_params: dict, policy_params: dict) -> dict:
  """The separate value network's params with the policy's encoder in them.

  token_embedder and encoder/* (a decoder-only policy: model/*) are copied
  (without a LoRA policy's adapters, as float32 from a bfloat16 base);
  value_head is kept as initialised.
  """
  missing = [k for k in value_params if k != "value_head"
             and k not in policy_params]
  if missing:
    raise ValueError(f"policy params lack {missing[:3]}...: is the value "
                     f"network built from the same T5Config (or "
                     f"DecoderConfig)?")
  # Copies: the two networks train apart (and donated buffers must not
  # alias); only the parameters the value network has (a LoRA policy's
  # adapters stay behind), in the value network's dtype.
  return {k: (v if k == "value_head" else
              {name: jnp.array(policy_params[k][name], v[name].dtype)
               for name in v})
          for k, v in value_params.items()}
