"""dro_fast.score against log-probabilities computed independently.

A tiny Qwen3ForCausalLM saved with save_pretrained, with a word-level
tokenizer built here (the `tokenizers` library) and a ChatML template:
score() equals transformers' log-softmax of the same rows, tokenised by
transformers' own tokenizer of the folder (TRL's rule: plain prompts with
the special tokens, completions + EOS; conversations through
apply_chat_template). A short T5 training run: score(WORKDIR:STEP) equals
the masked sum of log-softmax(logits) of the restored policy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import dro_fast
from dro_fast import scoring

WORDS = ("the cat dog sat on mat a is red blue what colour sky sea why "
         "because yes no user assistant").split()
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(folder):
  """A word-level tokenizer.json + tokenizer_config.json with ChatML.

  Words split at whitespace (dropped); no BOS. Returns the vocabulary size.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models as tok_models  # pylint: disable=g-import-not-at-top,line-too-long
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  vocab = {w: i for i, w in enumerate(("[UNK]",) + SPECIAL + tuple(WORDS))}
  tokenizer = tokenizers.Tokenizer(tok_models.WordLevel(vocab, "[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(
      tokenizers.Regex(r"\s+"), behavior="removed")
  tokenizer.add_special_tokens(list(SPECIAL))
  tokenizer.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast",
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "unk_token": "[UNK]", "chat_template": CHATML}))
  return len(vocab)


def save_tiny_qwen3(folder):
  """A tiny random Qwen3ForCausalLM and write_tokenizer's files in folder."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True, exist_ok=True)
  vocab = write_tokenizer(folder)
  torch.manual_seed(0)
  config = transformers.Qwen3Config(
      vocab_size=vocab, hidden_size=16, intermediate_size=32,
      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
      head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
      eos_token_id=SPECIAL.index("<|im_end|>") + 1)
  model = transformers.Qwen3ForCausalLM(config)
  with torch.no_grad():   # Larger weights than the init's: distinct rows.
    for p in model.parameters():
      p.mul_(8.0 if p.ndim == 2 else 1.0)
  model.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
  return save_tiny_qwen3(tmp_path_factory.mktemp("qwen3"))


def trl_ids(folder, prompt, completion):
  """(prompt ids, completion ids) by transformers' tokenizer, TRL's rule."""
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  if isinstance(prompt, str):
    return (tok(prompt, add_special_tokens=True)["input_ids"],
            tok(completion + tok.eos_token, add_special_tokens=False)[
                "input_ids"])
  if isinstance(completion, str):
    completion = [{"role": "assistant", "content": completion}]
  p_text = tok.apply_chat_template(prompt, tokenize=False,
                                   add_generation_prompt=True)
  full = tok.apply_chat_template(prompt + completion, tokenize=False)
  assert full.startswith(p_text)
  return (tok(p_text, add_special_tokens=False)["input_ids"],
          tok(full[len(p_text):], add_special_tokens=False)["input_ids"])


def transformers_logprob(folder, prompt_ids, completion_ids):
  """Σ log p(completion | prompt) by transformers, in float64 softmax."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32).eval()
  ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
  with torch.no_grad():
    logits = model(input_ids=ids).logits[0].double()
  logp = torch.log_softmax(logits, dim=-1)
  start = len(prompt_ids)
  return sum(float(logp[start + i - 1, t])
             for i, t in enumerate(completion_ids))


ROWS = [
    ("the cat sat on the mat", "yes the cat is red"),
    ("why is the sky blue", "because"),
    ([{"role": "user", "content": "what colour is the sea"}],
     "the sea is blue"),
    ([{"role": "user", "content": "is the dog red"}],
     [{"role": "assistant", "content": "no the dog is blue"}]),
    ("a dog", "sat on a red mat because the cat sat on the blue mat"),
]


@pytest.mark.parametrize("spec", ["hf:{}", "{}"])
def test_score_of_a_hugging_face_decoder_equals_transformers(qwen3_folder,
                                                             spec):
  prompts, completions = zip(*ROWS)
  expected = [transformers_logprob(qwen3_folder,
                                   *trl_ids(qwen3_folder, p, c))
              for p, c in ROWS]
  got = dro_fast.score(spec.format(qwen3_folder), list(prompts),
                       list(completions), batch_size=2)
  assert got.dtype == np.float32 and got.shape == (len(ROWS),)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_score_truncates_prompts_left_and_completions_right(qwen3_folder):
  prompt, completion = "the cat sat on", "the red mat"
  p, c = trl_ids(qwen3_folder, prompt, completion)
  assert len(p) == 4 and len(c) == 4     # 3 words + EOS
  got = dro_fast.score(str(qwen3_folder), [prompt], [completion],
                       max_input_length=2, max_target_length=3)
  np.testing.assert_allclose(
      got, [transformers_logprob(qwen3_folder, p[-2:], c[:3])],
      rtol=1e-5, atol=1e-4)


def test_score_refuses_bad_arguments(qwen3_folder):
  with pytest.raises(ValueError, match="one completion per prompt"):
    dro_fast.score(str(qwen3_folder), ["a", "b"], ["a"])
  with pytest.raises(ValueError, match="batch_size"):
    dro_fast.score(str(qwen3_folder), ["a"], ["a"], batch_size=0)


def test_policy_specs():
  assert scoring.parse_spec("hf:/m") == ("hf", "/m", None)
  assert scoring.parse_spec("runs/a:120") == ("run", "runs/a", 120)
  assert scoring.parse_spec("runs/a:init") == ("run", "runs/a", "init")
  assert scoring.parse_spec("runs/a") == ("run", "runs/a", None)


@pytest.mark.slow
def test_score_of_a_t5_run_equals_its_logits(tmp_path):
  """score(WORKDIR:STEP) of a short T5 run: its policy's log-softmax sums."""
  import jax  # pylint: disable=g-import-not-at-top
  from dro_fast import models  # pylint: disable=g-import-not-at-top
  from dro_fast.training import runs  # pylint: disable=g-import-not-at-top
  from tests import test_train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  test_train.train(workdir, "--train_steps=4")
  prompts = ["the cat sat", "why is the sky blue on a long summer day", "a"]
  completions = ["yes", "because the sea is blue and so it is", "no no"]
  got = dro_fast.score(f"{workdir}:4", prompts, completions, batch_size=2)
  run = runs.read_run_config(str(workdir))
  params, _ = runs.load_policy(str(workdir), 4)
  tokenizer = runs.tokenizer(run, str(workdir))
  # The run's lengths (12 and 8): the longest rows are truncated.
  inputs, _ = tokenizer.encode_batch(prompts, run.data.max_input_length)
  targets, mask = tokenizer.encode_batch(completions,
                                         run.data.max_target_length)
  logits = models.t5(runs.model_config(run, "cpu")).apply.logits(
      params, None, inputs, targets)
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  expected = (np.take_along_axis(np.asarray(logp), targets[..., None],
                                 -1)[..., 0] * mask).sum(-1)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  assert mask[1].all(), "the long completion must be truncated"
