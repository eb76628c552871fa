"""A Hugging Face model folder's tokenizer and chat template, as TRL uses them.

`HFTokenizer.load(folder)` reads what transformers' AutoTokenizer reads:
  * tokenizer.json (the `tokenizers` library), or else tokenizer.model (a
    SentencePiece model: BOS added to plain text unless add_bos_token is
    false, as transformers' SentencePiece tokenizers do);
  * tokenizer_config.json: the named special tokens (bos_token, eos_token,
    pad_token, ...; a string or an {"content": ...} object),
    add_bos_token / add_eos_token (when given, they decide whether plain
    text gets BOS / EOS, as transformers rebuilds the post-processor; when
    not, tokenizer.json's post-processor decides), added_tokens_decoder
    (tokens missing from tokenizer.json are added) and chat_template (a
    string, or a list of {"name", "template"}: "default" is used);
  * special_tokens_map.json for special tokens tokenizer_config.json lacks;
  * chat_template.jinja (transformers 5 writes the template there; it wins
    over tokenizer_config.json's, as in transformers);
  * generation_config.json and config.json for further end-of-sequence ids
    (eos_token_id, an int or a list).

The batch layout (design "Batch layout"): ids are int32, right-padded with
-1 (`pad_id`; the tokenizer's own pad token is `pad_token_id`), masks are
ids >= 0; prompts are truncated from the left (the end next to the
completion is kept, TRL's keep_end), completions from the right.

Tokenisation, TRL's rules (REFERENCE.md §9; TRL's DPO/KTO trainers):
  * conversational rows (the prompt is a tuple of {"role", "content"}
    messages): prompt text = the chat template over the prompt with
    add_generation_prompt=True; completion text = the template over prompt
    + completion (a str completion is one assistant message), without the
    generation prompt, minus its first len(prompt text) characters. Each
    text is tokenised without adding special tokens: the template writes
    them (BOS, end-of-turn). TRL's current trainers tokenise prompt +
    completion whole and split the ids at len(prompt ids); the two agree
    whenever no token spans the boundary, which the templates' special
    tokens and newlines ensure; the text split keeps the prompt's ids
    identical in encode_prompts and encode_completions.
  * plain-text rows (the prompt is a str): the prompt is tokenised with the
    tokenizer's special tokens (BOS when the tokenizer adds one); the
    completion without them, with the EOS token's text appended unless it
    already ends with it (TRL's add_eos), so its ids end with EOS. A
    completion given as messages reads as its contents.
The rendering is transformers' apply_chat_template (dro_fast.chat_template);
`render` exposes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import hashlib
import json
import os
import re
from typing import Any

from absl import logging
import numpy as np

from dro_fast import chat_template
from dro_fast import fileio

PAD = -1  # The layout's padding id (models.decoder_config.PAD).

# The files `save` copies, as transformers reads them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model",
                   "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")
_TEMPLATE_DIR = "additional_chat_templates"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token",
                  "pad_token", "cls_token", "mask_token")
# Tokens that end an assistant turn in the families' templates (Llama 3,
# Qwen / ChatML, Gemma, Phi): generation stops at them when the template
# writes them.
_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>",
                "<|end|>")


class TokenizerFilesError(ValueError):
  """A tokenizer folder is missing or has an unreadable file."""


def _read_json(folder: str, name: str) -> dict[str, Any]:
  """folder/name as a JSON object, or {} when the file is absent."""
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    raise TokenizerFilesError(f"{path} cannot be read as JSON ({e}); "
                              "restore it from the model's files.") from None
  if not isinstance(value, dict):
    raise TokenizerFilesError(f"{path} must hold a JSON object, got "
                              f"{type(value).__name__}.")
  return value


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: str or object."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
  """An eos_token_id value (int, list of ints or null) as a list."""
  if isinstance(value, bool):
    return []
  if isinstance(value, int):
    return [value]
  if isinstance(value, list):
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
  return []


def _chat_template(folder: str, config: Mapping[str, Any]) -> str | None:
  """The folder's default chat template, as transformers chooses it."""
  path = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {item.get("name"): item.get("template") for item in template
             if isinstance(item, dict)}
    if "default" not in named:
      raise TokenizerFilesError(
          f"{os.path.join(folder, 'tokenizer_config.json')} has chat "
          f"templates {sorted(map(str, named))} but none named 'default'; "
          "name the one to train with 'default'.")
    template = named["default"]
  return template if isinstance(template, str) else None


class _TokenizersBackend:
  """tokenizer.json through the `tokenizers` library."""

  def __init__(self, path: str, config: Mapping[str, Any],
               special: Mapping[str, str]):
    import tokenizers  # pylint: disable=g-import-not-at-top
    from tokenizers import processors  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise TokenizerFilesError(
          f"{path} is not a tokenizers file ({e}); pass a Hugging Face "
          "model folder with its tokenizer.json.") from None
    # As transformers: a token tokenizer_config.json names that the
    # tokenizer.json lacks is added (special when it says so).
    added = []
    for entry in (config.get("added_tokens_decoder") or {}).values():
      content = _token_text(entry)
      if content is not None and self._tok.token_to_id(content) is None:
        added.append(tokenizers.AddedToken(
            content, special=bool(entry.get("special", True)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", False)),
            single_word=bool(entry.get("single_word", False))))
    for content in special.values():
      if self._tok.token_to_id(content) is None and content not in [
          str(a.content) for a in added]:
        added.append(tokenizers.AddedToken(content, special=True,
                                           normalized=False))
    if added:
      self._tok.add_tokens(added)
    # Explicit add_bos_token / add_eos_token rebuild the post-processor
    # (transformers' update_post_processor); otherwise tokenizer.json's
    # post-processor decides what plain text gets.
    if ("add_bos_token" in config or "add_eos_token" in config
        or self._tok.post_processor is None):
      pieces, tokens = [], []
      bos, eos = special.get("bos_token"), special.get("eos_token")
      if config.get("add_bos_token") and bos is not None:
        pieces.append(f"{bos}:0")
        tokens.append((bos, self._tok.token_to_id(bos)))
      pieces.append("$A:0")
      if config.get("add_eos_token") and eos is not None:
        pieces.append(f"{eos}:0")
        tokens.append((eos, self._tok.token_to_id(eos)))
      single = " ".join(pieces)
      self._tok.post_processor = processors.TemplateProcessing(
          single=single, pair=f"{single} {single.replace(':0', ':1')}"
          .replace("$A:1", "$B:1"), special_tokens=tokens)

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)

  def token_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
  """tokenizer.model (SentencePiece), its added tokens matched as text."""

  def __init__(self, path: str, config: Mapping[str, Any],
               special: Mapping[str, str]):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.load(path)
    except (OSError, RuntimeError) as e:
      raise TokenizerFilesError(f"{path} is not a SentencePiece model ({e})."
                                ) from None
    self._added: dict[str, int] = {}
    self._special: set[int] = set()
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
      content = _token_text(entry)
      if content is not None and str(key).isdigit():
        self._added[content] = int(key)
        if entry.get("special", True):
          self._special.add(int(key))
    for content in special.values():
      piece = self._sp.piece_to_id(content)
      if content not in self._added and self._sp.id_to_piece(piece) == content:
        self._added[content] = piece
        self._special.add(piece)
    self._split = (re.compile("(" + "|".join(
        re.escape(t) for t in sorted(self._added, key=len, reverse=True))
                              + ")") if self._added else None)
    bos = special.get("bos_token")
    self._bos = (self.token_id(bos) if bos is not None
                 and config.get("add_bos_token", True) else None)
    eos = special.get("eos_token")
    self._eos = (self.token_id(eos) if eos is not None
                 and config.get("add_eos_token", False) else None)

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    ids = []
    pieces = self._split.split(text) if self._split else [text]
    for piece in pieces:
      if piece in self._added:
        ids.append(self._added[piece])
      elif piece:
        ids.extend(self._sp.encode(piece, out_type=int))
    if add_special_tokens:
      ids = ([self._bos] if self._bos is not None else []) + ids + (
          [self._eos] if self._eos is not None else [])
    return ids

  def decode(self, ids: list[int]) -> str:
    return self._sp.decode([i for i in ids if i not in self._special
                            and not self._sp.is_control(i)])

  def token_id(self, token: str) -> int | None:
    if token in self._added:
      return self._added[token]
    piece = self._sp.piece_to_id(token)
    return piece if self._sp.id_to_piece(piece) == token else None

  @property
  def vocab_size(self) -> int:
    return max([self._sp.get_piece_size(),
                *(i + 1 for i in self._added.values())])


class HFTokenizer:
  """A decoder-only model's tokenizer and chat template (module docstring)."""

  def __init__(self, folder: str, backend, special: Mapping[str, str],
               template: str | None, extra_eos: Sequence[int]):
    """Use HFTokenizer.load."""
    self._folder = folder
    self._backend = backend
    self._special = dict(special)
    self._template = template
    eos = [self.eos_id] if self.eos_id is not None else []
    ends = [backend.token_id(t) for t in _END_OF_TURN
            if template is not None and t in template]
    self._eos_ids = tuple(dict.fromkeys(
        i for i in [*eos, *extra_eos, *ends] if i is not None))
    self._mismatches = 0

  @classmethod
  def load(cls, folder: str | os.PathLike) -> HFTokenizer:
    """Reads a Hugging Face model folder's tokenizer (module docstring).

    Raises:
      TokenizerFilesError: the folder has neither tokenizer.json nor
        tokenizer.model, or a file cannot be read.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
      raise TokenizerFilesError(
          f"tokenizer folder {folder!r} does not exist; pass a Hugging Face "
          "model folder holding tokenizer.json (or tokenizer.model).")
    config = _read_json(folder, "tokenizer_config.json")
    special_map = _read_json(folder, "special_tokens_map.json")
    special = {}
    for name in _SPECIAL_NAMES:
      text = _token_text(config.get(name))
      if text is None and name not in config:
        text = _token_text(special_map.get(name))
      if text is not None:
        special[name] = text
    json_path = os.path.join(folder, "tokenizer.json")
    model_path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(json_path):
      backend = _TokenizersBackend(json_path, config, special)
    elif os.path.isfile(model_path):
      backend = _SentencePieceBackend(model_path, config, special)
    else:
      raise TokenizerFilesError(
          f"{folder} has no tokenizer.json or tokenizer.model; pass the "
          "model folder that holds its tokenizer files.")
    extra_eos = [*_ids(_read_json(folder, "generation_config.json")
                       .get("eos_token_id")),
                 *_ids(_read_json(folder, "config.json").get("eos_token_id"))]
    return cls(folder, backend, special,
               _chat_template(folder, config), extra_eos)

  @property
  def path(self) -> str:
    """The folder the tokenizer was read from."""
    return self._folder

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer can produce, added tokens included."""
    return self._backend.vocab_size

  @property
  def pad_id(self) -> int:
    """The batch layout's padding id, -1 (never a vocabulary id)."""
    return PAD

  def _id(self, name: str) -> int | None:
    token = self._special.get(name)
    return None if token is None else self._backend.token_id(token)

  @property
  def pad_token_id(self) -> int | None:
    """The tokenizer's own pad token's id (Qwen: its EOS), or None."""
    return self._id("pad_token")

  @property
  def bos_id(self) -> int | None:
    """The BOS token's id, or None (Qwen has none)."""
    return self._id("bos_token")

  @property
  def eos_id(self) -> int | None:
    """The tokenizer's EOS token's id (appended to plain completions)."""
    return self._id("eos_token")

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every id that ends generation, eos_id first.

    eos_id, generation_config.json's and config.json's eos_token_id, and
    the end-of-turn tokens the chat template writes (<|eot_id|>,
    <|im_end|>, <end_of_turn>, ...).
    """
    return self._eos_ids

  @property
  def special_tokens(self) -> dict[str, str]:
    """The named special tokens, e.g. {"bos_token": "<s>", ...}."""
    return dict(self._special)

  @property
  def chat_template(self) -> str | None:
    """The default chat template, or None (a base model may have none)."""
    return self._template

  def render(self, conversation: Sequence[Mapping[str, str]], *,
             add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """The chat template over `conversation`, as apply_chat_template.

    Raises:
      ValueError: the folder has no chat template.
      chat_template.ChatTemplateError: the template fails.
    """
    if self._template is None:
      raise ValueError(
          f"{self._folder} has no chat template (tokenizer_config.json "
          "chat_template or chat_template.jinja), so conversational rows "
          "cannot be tokenised; use an instruct model's tokenizer or "
          "plain-text rows.")
    return chat_template.render(
        self._template, conversation,
        add_generation_prompt=add_generation_prompt,
        special_tokens=self._special, **kwargs)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """`text`'s ids; special-token texts in it become their ids."""
    return self._backend.encode(text, add_special_tokens)

  def prompt_ids(self, prompt: chat_template.Text) -> list[int]:
    """One prompt's ids, untruncated (TRL's rules, module docstring)."""
    if isinstance(prompt, str):
      return self.encode(prompt, add_special_tokens=True)
    return self.encode(self.render(prompt, add_generation_prompt=True))

  def completion_ids(self, prompt: chat_template.Text,
                     completion: chat_template.Text) -> list[int]:
    """One completion's ids after `prompt`, untruncated (TRL's rules)."""
    if isinstance(prompt, str):
      text = (completion if isinstance(completion, str) else "\n".join(
          message["content"] for message in completion))
      eos = self._special.get("eos_token")
      if eos is not None and not text.endswith(eos):
        text += eos
      return self.encode(text)
    if isinstance(completion, str):
      completion = (chat_template.Message("assistant", completion),)
    prompt_text = self.render(prompt, add_generation_prompt=True)
    full = self.render(tuple(prompt) + tuple(completion))
    if not full.startswith(prompt_text):
      self._mismatches += 1
      if self._mismatches == 1:
        logging.warning(
            "%s: the chat template renders a prompt differently alone "
            "(with the generation prompt) and followed by its completion; "
            "the completion is the full text after len(prompt text) "
            "characters, as TRL does. First prompt: %r", self._folder,
            prompt_text[-200:])
    return self.encode(full[len(prompt_text):])

  def _pad(self, rows: list[list[int]], max_length: int
           ) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), max_length), PAD, dtype=np.int32)
    for row, values in enumerate(rows):
      ids[row, :len(values)] = values
    return ids, ids >= 0

  def encode_prompts(self, prompts: Sequence[chat_template.Text],
                     max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts' ids, the last max_length of each, right-padded with -1.

    Returns:
      (ids int32 [N, max_length], mask bool [N, max_length] = ids >= 0).
    """
    _check(max_length)
    return self._pad([self.prompt_ids(p)[-max_length:] for p in prompts],
                     max_length)

  def encode_completions(self,
                         prompts: Sequence[chat_template.Text],
                         completions: Sequence[chat_template.Text],
                         max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Completions' ids, the first max_length of each, padded with -1.

    Returns:
      (ids int32 [N, max_length], mask bool [N, max_length] = ids >= 0).

    Raises:
      ValueError: prompts and completions differ in number, or max_length
        is below 1.
    """
    _check(max_length)
    if len(prompts) != len(completions):
      raise ValueError(f"encode_completions got {len(prompts)} prompts and "
                       f"{len(completions)} completions; pass one prompt "
                       "per completion.")
    return self._pad([self.completion_ids(p, c)[:max_length]
                      for p, c in zip(prompts, completions)], max_length)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids` up to the first of eos_ids, without special tokens.

    Negative ids (padding) are dropped.
    """
    kept = []
    stops = set(self._eos_ids)
    for i in ids:
      i = int(i)
      if i in stops:
        break
      if i >= 0:
        kept.append(i)
    return self._backend.decode(kept)

  def decode_batch(self, ids: Sequence[Sequence[int]] | np.ndarray
                   ) -> list[str]:
    """decode of each row."""
    return [self.decode(row) for row in ids]

  def _files(self) -> list[str]:
    """The tokenizer files of the folder, relative, sorted."""
    found = [name for name in TOKENIZER_FILES
             if os.path.isfile(os.path.join(self._folder, name))]
    extra = os.path.join(self._folder, _TEMPLATE_DIR)
    if os.path.isdir(extra):
      found += sorted(os.path.join(_TEMPLATE_DIR, name)
                      for name in os.listdir(extra)
                      if name.endswith(".jinja"))
    return sorted(found)

  def fingerprint(self) -> str:
    """SHA-256 over the tokenizer files' names and bytes (cache keys)."""
    digest = hashlib.sha256()
    for name in self._files():
      with open(os.path.join(self._folder, name), "rb") as f:
        data = f.read()
      digest.update(f"{name}\0{len(data)}\0".encode())
      digest.update(data)
    return digest.hexdigest()

  def save(self, folder: str | os.PathLike) -> None:
    """Copies the tokenizer files into `folder` (an exported model's).

    Each file is written atomically; missing folders are created.
    """
    folder = os.fspath(folder)
    for name in self._files():
      with open(os.path.join(self._folder, name), "rb") as f:
        fileio.atomic_write_bytes(os.path.join(folder, name), f.read())


def _check(max_length: int) -> None:
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}.")
