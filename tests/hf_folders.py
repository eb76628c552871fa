"""Tiny Hugging Face folders of each decoder-only family, built in tests.

`build_tokenizer(folder, family)` trains a byte-level BPE on a few
sentences, adds the family's special tokens and saves it as a transformers
folder with a chat template written from the family's documented format;
`build_model_folder(folder, family)` adds a tiny random transformers model
of that family (config.json + model.safetensors), so that the folder is
what a user passes as --init_checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

CORPUS = [
    "The sky is blue today and the sun is warm.",
    "Count: one two three four five six seven.",
    "You are a helpful assistant. Be brief.",
    "What is the capital of France? Paris is the capital.",
    "say hello again, hello there, again and again",
    "Ünïcödé text – and “quotes” too",
]

# Chat templates written from each family's documented format, with the
# indentation and {%- -%} of the published ones (trim_blocks and
# lstrip_blocks matter).
_LLAMA3 = """{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML = """{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content }}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/"
                           "assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n'
       + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# family: (special tokens, named tokens, template, BOS added to plain text
# by tokenizer.json's post-processor, tokenizer_config extras,
# generation_config eos ids as token names).
TOKENIZER_FAMILIES = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               _LLAMA3, "<|begin_of_text|>", {},
               ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
             CHATML, None, {}, ["<|im_end|>", "<|endoftext|>"]),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<start_of_turn>",
                "<end_of_turn>"],
               {"bos_token": "<bos>", "eos_token": "<eos>",
                "pad_token": "<pad>"},
               _GEMMA3, None, {"add_bos_token": True, "add_eos_token": False},
               ["<eos>", "<end_of_turn>"]),
}


def build_tokenizer(folder, family, template=None):
  """A tiny tokenizer of `family` saved as a transformers folder."""
  specials, named, default_template, bos, extra, gen_eos = TOKENIZER_FAMILIES[family]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True,
                                                normalized=False)
                          for s in specials])
  if bos is not None:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, chat_template=template or default_template,
      **named, **extra)
  fast.save_pretrained(folder)
  with open(os.path.join(folder, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [tok.token_to_id(t) for t in gen_eos]}, f)
  return str(folder)


# The model families and the tokenizer of each.
MODEL_FAMILIES = {"llama": "llama3", "qwen2": "qwen", "qwen3": "qwen",
                  "gemma3": "gemma3"}


def hf_model_config(family, vocab_size, **changes):
  """A tiny transformers config of `family` (2 layers; Gemma 3: 3, sliding
  and full layers interleaved, sequences longer than the window)."""
  common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16)
  common.update(changes)
  if family == "llama":
    return transformers.LlamaConfig(
        **common, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})
  if family == "qwen2":
    return transformers.Qwen2Config(**common, tie_word_embeddings=True)
  if family == "qwen3":
    return transformers.Qwen3Config(**common)
  common["num_hidden_layers"] = changes.get("num_hidden_layers", 3)
  return transformers.Gemma3TextConfig(
      **common, sliding_window=4,
      sliding_window_pattern=2, query_pre_attn_scalar=24,
      rope_scaling={"rope_type": "linear", "factor": 8.0})


def build_model_folder(folder, family, *, seed=0, perturb=True):
  """A complete folder of `family`: tokenizer, chat template and a tiny
  random model (its weights perturbed so every norm and bias matters)."""
  build_tokenizer(folder, MODEL_FAMILIES[family])
  vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      hf_model_config(family, -(-vocab // 8) * 8),
      attn_implementation="eager").eval()
  if perturb:
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.3 * torch.randn_like(p) if p.ndim == 1 else
               0.05 * torch.randn_like(p))
  model.save_pretrained(folder, safe_serialization=True)
  return str(folder)
