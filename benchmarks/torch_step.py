r"""The DRO-V train step in PyTorch on Hugging Face's models: the baseline.

Written the way a user of transformers would write it, with nothing fused.
T5 (DroVStep):

  - policy: transformers.T5ForConditionalGeneration; log π(y|x) from its
    [B, T, V] logits (cross-entropy per token, masked sum over T);
  - value: a separate network, transformers.T5EncoderModel (started from the
    policy's encoder, as dro_fast.models.value.init_from_policy does), masked
    mean pooling over the prompt and a linear head;
  - reference log-probs read from the batch (cached, no per-step cost);
  - the loss of dro_fast/losses/dro_v.py, with DRO-V's 1/τ rescale of the
    gradient that flows into log π (paper §3.3):
      δ_i = r_i − V(x_i) − τ · (log π(y_i|x_i) − log π_ref(y_i|x_i)),
      L = ½ · mean_i δ_i²;
  - transformers' Adafactor for each network, configured as the paper trains:
    β₂ decay exponent 0.8 (transformers writes it as decay_rate=-0.8, β₂_t =
    1 − t^-0.8), no relative step, no warm-up init, and the update scaled
    by each parameter's RMS (scale_parameter=True), as optax.adafactor's
    parameter-RMS scaling does in our step (T5X's default). The
    learning rate warms up linearly from 0 over `warmup_steps` (the paper's
    150) by a LambdaLR schedule, as dro_fast.training.optim's does.

Decoder-only LLMs (DecoderDroVStep, a models.DecoderConfig: Llama, Qwen 2 /
3, Gemma 3 text), the same loss and optimizers over:

  - policy: transformers' *ForCausalLM of the config (AutoModelForCausalLM
    of dro_fast.models.hf_decoder.hf_config's config.json); each row is
    its prompt followed directly by its completion, right-padded, with an
    attention mask over the valid tokens and positions 0, 1, ... (the
    layout dro_fast.models.decoder builds from the same batch); the hidden
    states at prompt_len - 1 + t go through lm_head (only the T positions
    that predict completion tokens, as ours: no [B, S + T, V] logits);
  - value: a separate trunk of the same architecture (AutoModel, started as
    a copy of the policy's, as init_from_policy does) over the prompt, a
    linear head on the final-normed hidden state at the last prompt token.

Mixed precision (`autocast=torch.bfloat16`): the loss's forward runs under
torch.autocast("cpu", dtype=torch.bfloat16), PyTorch's recipe for bfloat16
compute with float32 parameters, gradients and optimizer state; it matches
our step with compute dtype bfloat16.

Batches are the dicts of benchmarks/lib/step.py (NumPy arrays); `to_torch`
converts one. Decoder-only batches pad prompts and completions with -1
(models.decoder_config.PAD). Shapes: B batch, S prompt length, T completion
length, D model width, V vocabulary.
"""

from __future__ import annotations

import copy
from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
import transformers
from transformers import optimization

from dro_fast import models
from dro_fast.models import hf_decoder

# Which transformers options give each dro_fast T5 variant. transformers 5
# reads tie_word_embeddings=False as "do not scale the decoder output by
# d_model^-½" (v1.1) and then ties lm_head to the embedding anyway; DroVStep
# unties it (v1.1 has its own output projection).
_VARIANTS = {
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


def hf_config(config: models.T5Config) -> transformers.T5Config:
  """The transformers.T5Config of the same architecture as `config`."""
  return transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
      d_ff=config.d_ff, num_heads=config.num_heads,
      num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      dropout_rate=config.dropout_rate,
      layer_norm_epsilon=config.layer_norm_epsilon,
      pad_token_id=config.pad_id, eos_token_id=config.eos_id,
      decoder_start_token_id=config.decoder_start_id, use_cache=False,
      **_VARIANTS[config.variant])


class ValueNetwork(nn.Module):
  """V(x): a T5 encoder, masked mean pooling over x, a linear head."""

  def __init__(self, config: transformers.T5Config):
    super().__init__()
    # T5EncoderModel edits the config it is given; hand it a copy.
    self.encoder = transformers.T5EncoderModel(copy.deepcopy(config))
    self.head = nn.Linear(config.d_model, 1)
    self.pad_id = config.pad_token_id

  def forward(self, inputs: torch.Tensor) -> torch.Tensor:
    """inputs [B, S] int64 -> values [B] float32."""
    mask = inputs != self.pad_id                                    # [B, S]
    encoded = self.encoder(input_ids=inputs,
                           attention_mask=mask).last_hidden_state   # [B, S, D]
    weights = mask.to(encoded.dtype).unsqueeze(-1)                  # [B, S, 1]
    pooled = (encoded * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return self.head(pooled).squeeze(-1)


class _ScaleGradient(torch.autograd.Function):
  """Identity forward; multiplies the incoming gradient by `scale`."""

  @staticmethod
  def forward(ctx, x, scale):  # pylint: disable=arguments-differ
    ctx.scale = scale
    return x.view_as(x)

  @staticmethod
  def backward(ctx, g):  # pylint: disable=arguments-differ
    return g * ctx.scale, None


def sequence_logprobs(policy: transformers.T5ForConditionalGeneration,
                      inputs: torch.Tensor, targets: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
  """log π(targets | inputs) [B]: masked sum of per-token log-probs."""
  decoder_inputs = policy.prepare_decoder_input_ids_from_labels(
      labels=targets)                                               # [B, T]
  attention_mask = inputs != policy.config.pad_token_id              # [B, S]
  logits = policy(input_ids=inputs, attention_mask=attention_mask,
                  decoder_input_ids=decoder_inputs).logits        # [B, T, V]
  token_logprobs = -F.cross_entropy(logits.flatten(0, 1),
                                    targets.flatten(),
                                    reduction="none").view_as(targets)  # [B, T]
  return torch.where(mask, token_logprobs, 0.0).sum(-1)


def dro_v_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               values: torch.Tensor, rewards: torch.Tensor, *, tau: float,
               rescale_policy_grad: bool = True) -> torch.Tensor:
  """½ · mean δ², the gradient into logprobs scaled by 1/τ (DRO-V).

  Args:
    logprobs: [B] log π_θ(y|x).
    ref_logprobs: [B] log π_ref(y|x), a constant.
    values: [B] V_φ(x).
    rewards: [B] rewards.
    tau: τ > 0.
    rescale_policy_grad: scale the gradient into logprobs by 1/τ.

  Returns:
    The scalar loss.
  """
  if rescale_policy_grad:
    logprobs = _ScaleGradient.apply(logprobs, 1.0 / tau)
  residual = rewards - values - tau * (logprobs - ref_logprobs.detach())
  return 0.5 * residual.square().mean()


def adafactor(parameters, learning_rate: float) -> optimization.Adafactor:
  """transformers' Adafactor as the paper configures it (see module doc)."""
  return optimization.Adafactor(parameters, lr=learning_rate, decay_rate=-0.8,
                                relative_step=False, scale_parameter=True,
                                warmup_init=False)


def to_torch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """A step_time batch (NumPy) as torch tensors (token ids int64)."""
  return {k: torch.from_numpy(np.asarray(v, np.int64) if v.dtype == np.int32
                              else np.asarray(v)) for k, v in batch.items()}


class DroVStep:
  """Policy, value network and their optimizers; a call is one train step.

  Attributes:
    policy: the T5ForConditionalGeneration being trained.
    value: the ValueNetwork being trained.
    tau: τ.
  """

  def __init__(self, config: models.T5Config, *, tau: float = 1.0,
               learning_rate: float = 1e-4, warmup_steps: int = 150,
               seed: int = 0, autocast: torch.dtype | None = None):
    torch.manual_seed(seed)
    self.autocast = autocast
    self.policy, self.value = self._networks(config)
    self.tau = tau
    self.policy_optimizer = adafactor(self.policy.parameters(), learning_rate)
    self.value_optimizer = adafactor(self.value.parameters(), learning_rate)
    # Update k runs at learning_rate · min(1, k / warmup_steps), k from 0:
    # optax.linear_schedule's values in make_optimizer.
    warmup = lambda k: min(1.0, k / warmup_steps) if warmup_steps > 0 else 1.0
    self.schedules = [
        torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        for optimizer in (self.policy_optimizer, self.value_optimizer)]

  def _networks(self, config: models.T5Config
                ) -> tuple[nn.Module, nn.Module]:
    """The policy and the value network, freshly drawn, in train mode."""
    hf = hf_config(config)
    policy = transformers.T5ForConditionalGeneration(hf).train()
    if not config.tied_embeddings:
      # Its own output projection, drawn as dro_fast's logits_dense is
      # (variance scaling, fan_in: std d_model^-½), so both steps start at
      # the same loss scale (a copy of the std-1 embedding would give logits
      # √D times ours).
      policy.lm_head.weight = nn.Parameter(
          policy.shared.weight.detach().clone() * hf.d_model**-0.5)
    value = ValueNetwork(hf).train()
    # The value encoder starts as a copy of the policy's (embedding included).
    own = value.encoder.state_dict()
    value.encoder.load_state_dict(
        {k: v for k, v in policy.state_dict().items() if k in own})
    return policy, value

  def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The DRO-V loss of one batch (differentiable)."""
    logprobs = sequence_logprobs(self.policy, batch["inputs"],
                                 batch["targets"], batch["target_mask"])
    values = self.value(batch["inputs"])
    return dro_v_loss(logprobs, batch["ref_logprobs"], values,
                      batch["rewards"], tau=self.tau)

  def backward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Clears the gradients, back-propagates the loss; returns the loss."""
    self.policy_optimizer.zero_grad(set_to_none=True)
    self.value_optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=self.autocast,
                        enabled=self.autocast is not None):
      loss = self.loss(batch)
    loss.backward()
    return loss.detach()

  def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One train step: forward, backward, both Adafactor updates."""
    loss = self.backward(batch)
    self.policy_optimizer.step()
    self.value_optimizer.step()
    for schedule in self.schedules:
      schedule.step()
    return loss


# ---------------------------------------------------------------------------
# Decoder-only LLMs.


def decoder_hf_config(config: models.DecoderConfig
                      ) -> transformers.PretrainedConfig:
  """The transformers config of the same architecture as `config`.

  Read from the config.json that dro_fast.models.hf_decoder.export_hf_decoder
  writes, so both sides agree on every field; no KV cache (training).
  """
  fields = hf_decoder.hf_config(config)
  hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  hf.use_cache = False
  return hf


def join_prompt_completion(inputs: torch.Tensor, targets: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor,
                                      torch.Tensor]:
  """Each row's prompt followed by its completion, for a causal LM.

  Args:
    inputs: [B, S] prompts, right-padded with -1.
    targets: [B, T] completions, right-padded with -1.

  Returns:
    (ids [B, S + T] with padding as 0, attention_mask [B, S + T] int64 of
    the valid tokens, index [B, T]: the position whose hidden state
    predicts targets[:, t], prompt_len - 1 + t).
  """
  s, t = inputs.shape[1], targets.shape[1]
  lengths = (inputs >= 0).sum(1, keepdim=True)                       # [B, 1]
  position = torch.arange(s + t).unsqueeze(0)                        # [1, n]
  offset = position - lengths                                        # [B, n]
  completion = targets.gather(1, offset.clamp(0, t - 1))
  ids = torch.where(position < lengths, F.pad(inputs, (0, t), value=-1),
                    torch.where(offset < t, completion, -1))
  index = (lengths - 1).clamp(min=0) + torch.arange(t).unsqueeze(0)
  return ids.clamp(min=0), (ids >= 0).long(), index


def decoder_sequence_logprobs(policy: transformers.PreTrainedModel,
                              inputs: torch.Tensor, targets: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
  """log π(targets | inputs) [B] of a causal LM (masked sum over T)."""
  ids, attention_mask, index = join_prompt_completion(inputs, targets)
  hidden = policy.model(input_ids=ids,
                        attention_mask=attention_mask).last_hidden_state
  hidden = hidden.gather(                                        # [B, T, D]
      1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
  logits = policy.lm_head(hidden)                                # [B, T, V]
  cap = getattr(policy.config, "final_logit_softcapping", None)
  if cap:
    logits = cap * torch.tanh(logits / cap)
  token_logprobs = -F.cross_entropy(
      logits.flatten(0, 1).float(), targets.clamp(min=0).flatten(),
      reduction="none").view_as(targets)                         # [B, T]
  return torch.where(mask, token_logprobs, 0.0).sum(-1)


class DecoderValueNetwork(nn.Module):
  """V(x): a decoder trunk over the prompt, a linear head on its
  final-normed hidden state at the last prompt token."""

  def __init__(self, config: transformers.PretrainedConfig):
    super().__init__()
    self.trunk = transformers.AutoModel.from_config(copy.deepcopy(config))
    self.head = nn.Linear(config.hidden_size, 1)

  def forward(self, inputs: torch.Tensor) -> torch.Tensor:
    """inputs [B, S] int64, right-padded with -1 -> values [B] float32."""
    mask = inputs >= 0
    hidden = self.trunk(input_ids=inputs.clamp(min=0),
                        attention_mask=mask.long()).last_hidden_state
    last = (mask.sum(1) - 1).clamp(min=0)                             # [B]
    pooled = hidden[torch.arange(len(inputs)), last]                 # [B, D]
    return self.head(pooled.float()).squeeze(-1)


class DecoderDroVStep(DroVStep):
  """DroVStep for a decoder-only LLM (a models.DecoderConfig).

  Attributes:
    policy: the *ForCausalLM being trained.
    value: the DecoderValueNetwork being trained.
    tau: τ.
  """

  def _networks(self, config: models.DecoderConfig
                ) -> tuple[nn.Module, nn.Module]:
    hf = decoder_hf_config(config)
    policy = transformers.AutoModelForCausalLM.from_config(hf).train()
    value = DecoderValueNetwork(hf).train()
    # The value trunk starts as a copy of the policy's.
    value.trunk.load_state_dict(policy.model.state_dict())
    return policy, value

  def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The DRO-V loss of one batch (differentiable)."""
    logprobs = decoder_sequence_logprobs(
        self.policy, batch["inputs"], batch["targets"], batch["target_mask"])
    values = self.value(batch["inputs"])
    return dro_v_loss(logprobs, batch["ref_logprobs"], values,
                      batch["rewards"], tau=self.tau)


def step_for(config: models.T5Config | models.DecoderConfig,
             **kwargs) -> DroVStep:
  """DroVStep (T5) or DecoderDroVStep (decoder-only) by the config."""
  if isinstance(config, models.DecoderConfig):
    return DecoderDroVStep(config, **kwargs)
  return DroVStep(config, **kwargs)
