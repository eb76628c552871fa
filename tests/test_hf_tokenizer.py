"""HFTokenizer and chat templates against transformers and TRL's rules.

Each family's tokenizer is built here (a byte-level BPE trained on a few
sentences plus the family's special tokens) and saved as a transformers
folder with a chat template written from the family's documented format;
HFTokenizer's ids must equal those of transformers' AutoTokenizer with
apply_chat_template and TRL's tokenisation rule (computed in the test).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from dro_fast import chat_template
from dro_fast import hf_tokenizer
from dro_fast import tokenizer as t5_tokenizer
from dro_fast.chat_template import Message
from dro_fast.data import prepare
from dro_fast.data.config import DataConfig
from tests.hf_folders import CHATML
from tests.hf_folders import CORPUS
from tests.hf_folders import TOKENIZER_FAMILIES
from tests.hf_folders import build_tokenizer as _build

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

def _user(text):
  return {"role": "user", "content": text}


def _assistant(text):
  return {"role": "assistant", "content": text}


_CONVERSATIONS = [
    # system + user prompt, assistant completion
    ([{"role": "system", "content": "You are a helpful assistant."},
      _user("What is the capital of France?")],
     [_assistant("Paris is the capital.")]),
    # multi-turn prompt
    ([_user("say hello"), _assistant("hello there"), _user("again")],
     [_assistant("hello again, and again")]),
    # one user turn, non-ASCII text
    ([_user("Ünïcödé – “quotes”")], [_assistant("The sky is blue.")]),
]

_PLAIN = [("The sky is", " blue today."),
          ("Count: one two", " three four five"),
          ("What is the capital of France?", " Paris.")]


def _trl_reference(hf, prompt, completion):
  """TRL's prompt and completion ids for one row, with transformers."""
  if isinstance(prompt, str):
    prompt_ids = hf(prompt)["input_ids"]
    text = completion
    if not text.endswith(hf.eos_token):
      text += hf.eos_token
    completion_ids = hf(text, add_special_tokens=False)["input_ids"]
    # TRL's current trainers split prompt + completion's ids instead: the
    # same ids on these rows.
    whole = hf(prompt + text)["input_ids"]
  else:
    prompt_text = hf.apply_chat_template(prompt, add_generation_prompt=True,
                                         tokenize=False)
    full_text = hf.apply_chat_template(prompt + completion, tokenize=False)
    assert full_text.startswith(prompt_text)
    prompt_ids = hf(prompt_text, add_special_tokens=False)["input_ids"]
    completion_ids = hf(full_text[len(prompt_text):],
                        add_special_tokens=False)["input_ids"]
    whole = hf.apply_chat_template(prompt + completion,
                                   tokenize=True)["input_ids"]
  assert whole == prompt_ids + completion_ids
  return prompt_ids, completion_ids


def _frozen(value):
  return value if isinstance(value, str) else chat_template.messages(value)


@pytest.mark.parametrize("family", sorted(TOKENIZER_FAMILIES))
def test_ids_equal_transformers_and_trl(tmp_path, family):
  folder = _build(tmp_path, family)
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  rows = _CONVERSATIONS + _PLAIN
  expected = [_trl_reference(hf, p, c) for p, c in rows]
  prompts = [_frozen(p) for p, _ in rows]
  completions = [_frozen(c) for _, c in rows]
  for (prompt, completion), (want_p, want_c) in zip(
      zip(prompts, completions), expected):
    assert tok.prompt_ids(prompt) == want_p
    assert tok.completion_ids(prompt, completion) == want_c
  # The plain-text prompts get BOS exactly when the family adds it.
  first = [p[0] for p, _ in expected[len(_CONVERSATIONS):]]
  if family == "qwen":  # No BOS.
    assert not set(first) & set(hf.all_special_ids)
  else:
    assert first == [hf.bos_token_id] * len(_PLAIN)
  # Batches: -1 padding, masks ids >= 0.
  width = max(len(p) for p, _ in expected) + 2
  ids, mask = tok.encode_prompts(prompts, width)
  want = np.full((len(rows), width), -1, np.int32)
  for row, (p, _) in enumerate(expected):
    want[row, :len(p)] = p
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_array_equal(mask, want >= 0)
  assert ids.dtype == np.int32 and mask.dtype == bool
  width = max(len(c) for _, c in expected)
  ids, mask = tok.encode_completions(prompts, completions, width)
  for row, (_, c) in enumerate(expected):
    assert ids[row, :len(c)].tolist() == c
    assert not mask[row, len(c):].any() and mask[row, :len(c)].all()
  # A str completion after a conversation is one assistant message.
  prompt, completion = _CONVERSATIONS[0]
  assert tok.completion_ids(_frozen(prompt), completion[0]["content"]) == (
      expected[0][1])


@pytest.mark.parametrize("family", sorted(TOKENIZER_FAMILIES))
def test_special_ids(tmp_path, family):
  folder = _build(tmp_path, family)
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  assert tok.vocab_size == len(hf)
  assert tok.pad_id == -1
  assert tok.pad_token_id == hf.pad_token_id
  assert tok.bos_id == hf.bos_token_id
  assert tok.eos_id == hf.eos_token_id
  generation_eos = [hf.convert_tokens_to_ids(t)
                    for t in TOKENIZER_FAMILIES[family][5]]
  assert tok.eos_ids[0] == hf.eos_token_id
  assert set(tok.eos_ids) == {hf.eos_token_id, *generation_eos}
  assert tok.special_tokens == hf.special_tokens_map


def test_end_of_turn_ids_from_the_template(tmp_path):
  folder = _build(tmp_path, "llama3")
  os.remove(os.path.join(folder, "generation_config.json"))
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    config = json.load(f)
  config["eos_token"] = "<|end_of_text|>"
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  assert tok.eos_ids == tuple(hf.convert_tokens_to_ids(
      ["<|end_of_text|>", "<|eot_id|>"]))


@pytest.mark.parametrize("family", sorted(TOKENIZER_FAMILIES))
def test_decode_skips_special_tokens(tmp_path, family):
  folder = _build(tmp_path, family)
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  prompt, completion = _CONVERSATIONS[1]
  prompt_ids = tok.prompt_ids(_frozen(prompt))
  assert tok.decode(prompt_ids, stop_at_eos=False) == hf.decode(
      prompt_ids, skip_special_tokens=True)
  assert "again" in tok.decode(prompt_ids, stop_at_eos=False)
  # A completion row: up to its end of turn, padding dropped.
  ids, _ = tok.encode_completions([_frozen(prompt)], [_frozen(completion)],
                                  32)
  assert tok.decode_batch(ids) == ["hello again, and again"]
  assert tok.decode([*hf("one two")["input_ids"], tok.eos_ids[-1],
                     *hf(" three")["input_ids"], -1, -1]).strip() == (
                         "one two")


def test_left_truncation_and_right_truncation(tmp_path):
  tok = hf_tokenizer.HFTokenizer.load(_build(tmp_path, "qwen"))
  prompt = _frozen(_CONVERSATIONS[0][0])
  completion = _frozen(_CONVERSATIONS[0][1])
  full_prompt = tok.prompt_ids(prompt)
  full_completion = tok.completion_ids(prompt, completion)
  ids, mask = tok.encode_prompts([prompt], 5)
  assert ids[0].tolist() == full_prompt[-5:]  # The generation prompt kept.
  assert mask.all()
  ids, mask = tok.encode_completions([prompt], [completion], 3)
  assert ids[0].tolist() == full_completion[:3]
  short = tok.prompt_ids("The sky")
  ids, _ = tok.encode_prompts([prompt, "The sky"], len(full_prompt))
  assert ids[1].tolist() == short + [-1] * (len(full_prompt) - len(short))
  with pytest.raises(ValueError, match="max_length must be >= 1"):
    tok.encode_prompts([prompt], 0)
  with pytest.raises(ValueError, match="2 prompts and 1 completions"):
    tok.encode_completions([prompt, prompt], [completion], 4)


def test_raise_exception_in_a_template(tmp_path):
  folder = _build(tmp_path, "gemma3")
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  bad = [_user("one"), _user("two")]
  with pytest.raises(Exception, match="roles must alternate"):
    hf.apply_chat_template(bad, tokenize=False)
  with pytest.raises(chat_template.ChatTemplateError,
                     match="raised: Conversation roles must alternate"):
    tok.prompt_ids(_frozen(bad))


# Template features beyond the families': tojson (not HTML-escaped, non-ASCII
# kept), namespace, loop controls, the {% generation %} block, dict, and a
# template variable passed through (enable_thinking).
_FEATURES = """{%- set ns = namespace(count=0) -%}
{%- for message in messages -%}
    {%- if message.role == 'skip' -%}{%- continue -%}{%- endif -%}
    {%- set ns.count = ns.count + 1 -%}
    {{ message | tojson }}{{ dict(n=ns.count) | tojson(sort_keys=True) }}
    {%- if message.role == 'assistant' -%}
        {% generation %}[{{ message.content }}]{% endgeneration %}
    {%- endif %}
    {% if loop.index > 5 %}{% break %}{% endif %}
{% endfor -%}
{%- if enable_thinking is defined and not enable_thinking -%}
    <no-think>
{%- endif %}
{%- if add_generation_prompt %}<gen>{{ eos_token }}{% endif %}"""


def test_template_features_render_as_transformers(tmp_path):
  folder = _build(tmp_path, "qwen", template=_FEATURES)
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  conversation = [_user("<b>a & b</b> – ü"), {"role": "skip", "content": "x"},
                  _assistant("done")]
  for generation in (False, True):
    for extra in ({}, {"enable_thinking": False}):
      want = hf.apply_chat_template(conversation, tokenize=False,
                                    add_generation_prompt=generation,
                                    **extra)
      assert tok.render(_frozen(conversation),
                        add_generation_prompt=generation, **extra) == want
  assert "ü" in want and "<b>" in want and "<no-think><gen><|im_end|>" in want


def test_template_from_tokenizer_config_list_and_errors(tmp_path):
  folder = _build(tmp_path, "qwen")
  os.remove(os.path.join(folder, "chat_template.jinja"))
  path = os.path.join(folder, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  config["chat_template"] = [{"name": "tool_use", "template": "x"},
                             {"name": "default", "template": CHATML}]
  with open(path, "w") as f:
    json.dump(config, f)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  assert tok.chat_template == CHATML
  config["chat_template"] = [{"name": "tool_use", "template": "x"}]
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(hf_tokenizer.TokenizerFilesError,
                     match="none named 'default'"):
    hf_tokenizer.HFTokenizer.load(folder)
  del config["chat_template"]
  with open(path, "w") as f:
    json.dump(config, f)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  assert tok.chat_template is None
  assert tok.prompt_ids("The sky") == tok.encode("The sky")
  with pytest.raises(ValueError, match="has no chat template"):
    tok.prompt_ids(_frozen([_user("hi")]))
  with pytest.raises(hf_tokenizer.TokenizerFilesError,
                     match="no tokenizer.json or tokenizer.model"):
    hf_tokenizer.HFTokenizer.load(_empty(tmp_path))
  with pytest.raises(chat_template.ChatTemplateError, match="not compile"):
    chat_template.render("{% if %}", [])


def _empty(tmp_path):
  folder = tmp_path / "empty"
  folder.mkdir()
  return folder


def test_save_copies_the_tokenizer(tmp_path):
  tok = hf_tokenizer.HFTokenizer.load(_build(tmp_path / "a", "llama3"))
  tok.save(tmp_path / "b")
  copy = hf_tokenizer.HFTokenizer.load(tmp_path / "b")
  prompt = _frozen(_CONVERSATIONS[1][0])
  assert copy.prompt_ids(prompt) == tok.prompt_ids(prompt)
  assert copy.fingerprint() == tok.fingerprint()
  assert not os.path.exists(tmp_path / "b" / "generation_config.json")
  hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
  assert hf.apply_chat_template(list(prompt), tokenize=False) == (
      tok.render(prompt))


def test_messages_are_frozen_mappings():
  message = Message("user", "hi")
  assert message == {"role": "user", "content": "hi"}
  assert dict(message) == {"role": "user", "content": "hi"}
  assert hash(message) == hash(Message("user", "hi"))
  assert message != Message("user", "ho")
  with pytest.raises(AttributeError):
    message.role = "x"
  assert chat_template.messages([{"role": "a", "content": "b",
                                  "name": "n"}]) == (Message("a", "b"),)
  with pytest.raises(TypeError, match="message 0"):
    chat_template.messages([{"role": "a"}])


def test_t5_protocol_keeps_its_ids(tmp_path):
  tok = t5_tokenizer.train_sentencepiece(CORPUS * 4, 60, None)
  tok.message_separator = " | "
  prompts = ["The sky is blue", _frozen(_CONVERSATIONS[1][0])]
  completions = ["one two", _frozen(_CONVERSATIONS[1][1])]
  texts = ["The sky is blue",
           "user: say hello | assistant: hello there | user: again"]
  for got, want in zip(tok.encode_prompts(prompts, 9),
                       tok.encode_batch(texts, 9)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(
      tok.encode_completions(prompts, completions, 6),
      tok.encode_batch(["one two", "hello again, and again"], 6)):
    np.testing.assert_array_equal(got, want)
  assert tok.prompt_ids(prompts[1]) == tok.encode(texts[1])
  assert tok.pad_id == 0


@pytest.mark.parametrize("add_bos", [True, False])
def test_tokenizer_json_decides_bos_over_the_config(tmp_path, add_bos):
  # transformers 5 ignores add_bos_token / add_eos_token when tokenizer.json
  # exists: its post-processor (here: BOS, no EOS) decides.
  folder = _build(tmp_path, "llama3")
  path = os.path.join(folder, "tokenizer_config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(add_bos_token=add_bos, add_eos_token=True)
  with open(path, "w") as f:
    json.dump(config, f)
  hf = transformers.AutoTokenizer.from_pretrained(folder)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  for prompt, completion in _PLAIN:
    want = hf(prompt)["input_ids"]
    assert want[0] == hf.bos_token_id and want[-1] != hf.eos_token_id
    assert tok.prompt_ids(prompt) == want
    assert tok.completion_ids(prompt, completion) == hf(
        completion + hf.eos_token, add_special_tokens=False)["input_ids"]


def test_sentencepiece_folder_without_tokenizer_json(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=60,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<s>", "eos_token": {"content": "</s>"},
      "chat_template": CHATML,
      "added_tokens_decoder": {
          "60": {"content": "<|im_start|>", "special": True},
          "61": {"content": "<|im_end|>", "special": True}}}))
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  tok = hf_tokenizer.HFTokenizer.load(tmp_path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (62, 1, 2)
  assert tok.eos_ids == (2, 61)  # </s>, and <|im_end|> the template writes
  assert tok.prompt_ids("The sky") == [1] + sp.encode("The sky")
  assert tok.completion_ids("The sky", " is blue") == (
      sp.encode(" is blue") + [2])
  prompt = _frozen([_user("say hello")])
  ids = tok.prompt_ids(prompt)
  assert ids == [60, *sp.encode("system\nYou are a helpful assistant."), 61,
                 *sp.encode("\n"), 60, *sp.encode("user\nsay hello"), 61,
                 *sp.encode("\n"), 60, *sp.encode("assistant\n")]
  assert tok.decode(ids, stop_at_eos=False) == sp.decode(
      [i for i in ids if i < 60])


def test_prepare_reads_a_hugging_face_tokenizer_folder(tmp_path):
  folder = _build(tmp_path / "model", "qwen")
  rows = [{"prompt": p, "completion": c, "reward": float(i)}
          for i, (p, c) in enumerate(_CONVERSATIONS + _PLAIN)]
  data_path = tmp_path / "train.jsonl"
  data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  config = DataConfig(train_data=str(data_path), tokenizer=folder,
                      decoder_only=True,
                      max_input_length=40, max_target_length=12)
  workdir = tmp_path / "run"
  workdir.mkdir()
  dataset = prepare.load_dataset(str(workdir), config, "dro", 0)
  tok = hf_tokenizer.HFTokenizer.load(folder)
  prompts = [_frozen(r["prompt"]) for r in rows]
  completions = [_frozen(r["completion"]) for r in rows]
  inputs, _ = tok.encode_prompts(prompts, 40)
  targets, mask = tok.encode_completions(prompts, completions, 12)
  np.testing.assert_array_equal(dataset.arrays["inputs"], inputs)
  np.testing.assert_array_equal(dataset.arrays["targets"], targets)
  np.testing.assert_array_equal(dataset.arrays["target_mask"], mask)
  assert (inputs == -1).any() and (targets == -1).any()
  assert dataset.fingerprints["tokenizer"] == tok.fingerprint()
  prepare.save_inputs(str(workdir), dataset)
  assert not (workdir / "spiece.model").exists()
  long = config.replace(max_input_length=8, long_rows="error")
  with pytest.raises(prepare.DataError, match=r"the prompt has \d+ tokens, "
                     "more than `max_input_length`=8"):
    prepare.load_dataset(str(tmp_path / "run2"), long, "dro", 0)


def test_a_prompt_without_tokens_is_refused_by_its_row(tmp_path):
  """A decoder-only row needs a prompt token to predict the completion
  from; an empty plain prompt (a tokenizer that adds no BOS) is named."""
  from dro_fast.data import pipeline  # pylint: disable=g-import-not-at-top
  from dro_fast.data.records import Triplet  # pylint: disable=g-import-not-at-top
  from dro_fast.data.rows import DataError  # pylint: disable=g-import-not-at-top
  tok = hf_tokenizer.HFTokenizer.load(_build(tmp_path / "qwen", "qwen"))
  rows = [Triplet("Hi", " there", 1.0, "d.jsonl:1"),
          Triplet("", " there", 0.0, "d.jsonl:2")]
  with pytest.raises(DataError, match="d.jsonl:2: the prompt has no tokens"):
    pipeline.tokenize_triplets(rows, tok, 8, 8)
  arrays = pipeline.tokenize_triplets(rows[:1], tok, 8, 8)
  assert (arrays["inputs"][0] >= 0).sum() > 0
