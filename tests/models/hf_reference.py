"""Random-weight Hugging Face T5 models (PyTorch) written with save_pretrained:
the independent implementation the Haiku model is checked against."""

from __future__ import annotations

import torch
import transformers

# Small but not trivial: 2 encoder / 3 decoder layers, 4 heads, d_kv != d_model
# / heads, and sequences longer than 16 so the logarithmic relative-position
# buckets are used (exact buckets end at distance 8 in the encoder).
HF_KWARGS = dict(vocab_size=97, d_model=48, d_kv=16, d_ff=80, num_heads=4,
                 num_layers=2, num_decoder_layers=3,
                 relative_attention_num_buckets=32,
                 relative_attention_max_distance=128, dropout_rate=0.0,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)

VARIANTS = {
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


def build(variant: str, seed: int = 0):
  """A random T5ForConditionalGeneration in eval mode."""
  torch.manual_seed(seed)
  config = transformers.T5Config(**HF_KWARGS, **VARIANTS[variant])
  model = transformers.T5ForConditionalGeneration(config).eval()
  # Spread the weights so that the outputs are far from uniform (a random
  # init's logits are nearly flat, which would hide errors).
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "relative_attention_bias" in name:
        param.normal_(0.0, 1.0)
      elif "layer_norm" in name:
        param.uniform_(0.5, 1.5)
  return model
