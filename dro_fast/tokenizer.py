"""SentencePiece tokenizer with T5's special ids (pad 0, eos 1, unk 2).

Loads a user's `spiece.model` (T5's own vocabulary) or trains a new one on
a text corpus with the same layout, and encodes text to fixed-length id
arrays with a validity mask, as the models and trainer expect. T5 has no
BOS token: sequences end with EOS and are right-padded with the pad id.

The data pipeline's tokenizer protocol (shared with
dro_fast.hf_tokenizer.HFTokenizer): `encode_prompts(prompts, max_length)` and
`encode_completions(prompts, completions, max_length)`, where a prompt or
completion is a string or a conversation (a tuple of {"role", "content"}
messages, dro_fast.chat_template.Message). T5 has no chat template: a
conversational prompt becomes the text "<role>: <content>" per message
joined by `message_separator` (a newline by default), a conversational
completion the contents of its messages (one assistant message, as the
readers check), and the text is encoded as any other: EOS appended, right
truncation with EOS kept last, pad 0. `prompt_ids` and `completion_ids` give
one row's ids untruncated.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
import io
import os
import re

from absl import logging
import numpy as np
import sentencepiece as spm

from dro_fast import fileio

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

_MIN_VOCAB_SIZE = 4  # The three special pieces and at least one character.
_TOO_HIGH = "Vocabulary size too high"
_TOO_HIGH_LIMIT = re.compile(r"Please set it to a value <= (\d+)")
_TOO_FEW_CHARS = "Vocabulary size is smaller than required_chars"

# A prompt or completion: text, or a conversation of {"role", "content"}
# messages (dro_fast.chat_template.Message or any such mapping).
Text = str | Sequence[Mapping[str, str]]


def as_text(value: Text, separator: str = "\n", *,
            completion: bool = False) -> str:
  """A prompt or completion as T5 reads it: text unchanged, messages joined.

  Args:
    value: text, or a sequence of {"role", "content"} messages.
    separator: joins a prompt's "<role>: <content>" lines.
    completion: the value is a completion: its messages' contents, joined by
      `separator` (a completion holds one assistant message).

  Returns:
    The text.
  """
  if isinstance(value, str):
    return value
  if completion:
    return separator.join(message["content"] for message in value)
  return separator.join(f"{message['role']}: {message['content']}"
                        for message in value)


class Tokenizer:
  """Text <-> ids with T5's special ids: pad 0, eos 1, unk 2, no bos."""

  def __init__(self, processor: spm.SentencePieceProcessor,
               path: str | os.PathLike | None = None, *,
               message_separator: str = "\n"):
    """Wraps a loaded SentencePiece model.

    Args:
      processor: a loaded SentencePiece model whose pad, eos and unk ids are
        0, 1 and 2 (T5's layout).
      path: the file the model came from, for messages; None if unknown.
      message_separator: joins a conversational prompt's messages (see the
        module docstring); also the `message_separator` attribute.

    Raises:
      ValueError: the model's special ids are not T5's.
    """
    self._sp = processor
    self._path = None if path is None else os.fspath(path)
    self.message_separator = message_separator
    found = (processor.pad_id(), processor.eos_id(), processor.unk_id())
    if found != (PAD_ID, EOS_ID, UNK_ID):
      source = ("the SentencePiece model" if self._path is None
                else f"SentencePiece model {self._path!r}")
      raise ValueError(
          f"{source} has pad/eos/unk ids {found[0]}/{found[1]}/{found[2]}, "
          f"but T5 needs {PAD_ID}/{EOS_ID}/{UNK_ID}. Use T5's spiece.model "
          "or train one with dro_fast.tokenizer.train_sentencepiece.")

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece model file such as T5's `spiece.model`.

    Args:
      path: the `.model` file.

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: `path` is not an existing file.
      ValueError: the file is not a SentencePiece model, or its special ids
        are not T5's.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"SentencePiece model {path!r} does not exist or is not a file. "
          "Pass the path to a .model file, e.g. T5's spiece.model.")
    with open(path, "rb") as f:
      proto = f.read()
    processor = spm.SentencePieceProcessor()
    try:
      processor.load_from_serialized_proto(proto)
    except RuntimeError as e:
      raise ValueError(
          f"{path!r} is not a valid SentencePiece model ({e}). Pass a .model "
          "file, e.g. T5's spiece.model, not the .vocab file or another "
          "format.") from e
    return cls(processor, path)

  @property
  def vocab_size(self) -> int:
    """Number of pieces in the model, special pieces included."""
    return self._sp.get_piece_size()

  @property
  def pad_id(self) -> int:
    """Id used for padding (0)."""
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    """Id that ends every encoded sequence (1)."""
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int:
    """Id of text the vocabulary cannot represent (2)."""
    return self._sp.unk_id()

  @property
  def path(self) -> str | None:
    """The model file this tokenizer came from, or None if not saved."""
    return self._path

  def serialized_model(self) -> bytes:
    """The SentencePiece model proto, the bytes `save` writes."""
    return self._sp.serialized_model_proto()

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to `path` atomically; it becomes `self.path`.

    Args:
      path: the `.model` file to write; missing parent directories are
        created.
    """
    path = os.fspath(path)
    fileio.atomic_write_bytes(path, self.serialized_model())
    self._path = path

  def encode(self, text: str, max_length: int | None = None,
             add_eos: bool = True) -> list[int]:
    """Encodes one string.

    Args:
      text: the string.
      max_length: if given, keep at most this many ids. With `add_eos` the
        EOS id stays last after truncation.
      add_eos: whether to end the ids with the EOS id.

    Returns:
      The ids.

    Raises:
      ValueError: `max_length` is below 1.
    """
    if max_length is not None and max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}.")
    ids = self._sp.encode(text, out_type=int)
    if add_eos:
      if max_length is not None:
        ids = ids[:max_length - 1]
      return ids + [self.eos_id]
    return ids if max_length is None else ids[:max_length]

  def encode_batch(self, texts: Sequence[str], max_length: int,
                   add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Encodes strings into a right-padded id array, truncating as `encode`.

    Args:
      texts: B strings.
      max_length: L, the length of every row.
      add_eos: whether to end each row's ids with the EOS id.

    Returns:
      (ids, mask): ids is an int32 [B, L] array padded with the pad id; mask
      is a bool [B, L] array, True where ids holds a token (EOS included).
    """
    ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    for row, text in enumerate(texts):
      encoded = self.encode(text, max_length, add_eos)
      ids[row, :len(encoded)] = encoded
      lengths[row] = len(encoded)
    mask = np.arange(max_length)[None, :] < lengths[:, None]
    return ids, mask

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes ids up to the first EOS, skipping pad ids.

    Args:
      ids: token ids, e.g. one row of `encode_batch` or of a model's output.

    Returns:
      The text.
    """
    kept = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i != self.pad_id:
        kept.append(i)
    return self._sp.decode(kept)

  def decode_batch(self, ids: Sequence[Sequence[int]] | np.ndarray
                   ) -> list[str]:
    """Decodes each row of a [B, L] id array as `decode` does.

    Args:
      ids: B rows of token ids.

    Returns:
      B strings.
    """
    return [self.decode(row) for row in ids]

  def prompt_ids(self, prompt: Text) -> list[int]:
    """One prompt's ids, untruncated: its text (as_text) with EOS."""
    return self.encode(as_text(prompt, self.message_separator))

  def completion_ids(self, prompt: Text, completion: Text) -> list[int]:
    """One completion's ids, untruncated, with EOS; T5 ignores the prompt."""
    del prompt  # The encoder reads it; the completion is encoded alone.
    return self.encode(as_text(completion, self.message_separator,
                               completion=True))

  def encode_prompts(self, prompts: Sequence[Text], max_length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as encode_batch encodes their texts (see as_text).

    Returns:
      (ids int32 [N, max_length] padded with 0, mask bool [N, max_length]).
    """
    return self.encode_batch(
        [as_text(p, self.message_separator) for p in prompts], max_length)

  def encode_completions(self, prompts: Sequence[Text],
                         completions: Sequence[Text], max_length: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Completions as encode_batch encodes their texts; prompts unused.

    Returns:
      (ids int32 [N, max_length] padded with 0, mask bool [N, max_length]).

    Raises:
      ValueError: prompts and completions differ in number.
    """
    if len(prompts) != len(completions):
      raise ValueError(f"encode_completions got {len(prompts)} prompts and "
                       f"{len(completions)} completions; pass one prompt "
                       "per completion.")
    return self.encode_batch(
        [as_text(c, self.message_separator, completion=True)
         for c in completions], max_length)


def _train_model_proto(texts: list[str], vocab_size: int,
                       hard_vocab_limit: bool, **options) -> bytes:
  """Trains a SentencePiece model in memory and returns its bytes."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=writer,
      vocab_size=vocab_size, hard_vocab_limit=hard_vocab_limit,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      minloglevel=2, **options)
  return writer.getvalue()


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        path: str | os.PathLike | None, *,
                        model_type: str = "unigram",
                        character_coverage: float = 1.0,
                        num_threads: int = 1) -> Tokenizer:
  """Trains a SentencePiece model with T5's special ids and writes it.

  Training runs in memory and the model is moved into place only when
  complete, so a failure leaves no partial file and no temporary files.
  The same texts and arguments give a byte-identical model.

  If the corpus cannot supply `vocab_size` pieces, the largest vocabulary it
  allows is used instead and a warning says so.

  Args:
    texts: the corpus, one sentence or document per string.
    vocab_size: number of pieces wanted, the three special pieces included.
    path: where to write the `.model` file (missing parent directories are
      created); None to keep it in memory only, for `Tokenizer.save` to
      write later.
    model_type: SentencePiece's model type: "unigram" (T5's), "bpe", "char"
      or "word".
    character_coverage: fraction of characters the vocabulary must cover;
      the rest map to unk.
    num_threads: training threads.

  Returns:
    The tokenizer for the written model.

  Raises:
    ValueError: `vocab_size` is below 4, the corpus has no text, or
      `vocab_size` is too small for the corpus's characters.
  """
  if vocab_size < _MIN_VOCAB_SIZE:
    raise ValueError(
        f"vocab_size must be >= {_MIN_VOCAB_SIZE} (pad, eos, unk and at "
        f"least one character), got {vocab_size}.")
  texts = list(texts)
  if not any(text.strip() for text in texts):
    raise ValueError("Cannot train a SentencePiece model on an empty corpus: "
                     "texts holds no non-blank string.")
  options = dict(model_type=model_type,
                 character_coverage=character_coverage,
                 num_threads=num_threads)
  attempt = vocab_size
  hard_vocab_limit = True
  while True:
    try:
      proto = _train_model_proto(texts, attempt, hard_vocab_limit, **options)
      break
    except RuntimeError as e:
      message = str(e)
      if _TOO_FEW_CHARS in message:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for the corpus's "
            f"characters ({message}). Increase vocab_size or lower "
            "character_coverage.") from e
      if _TOO_HIGH not in message or not hard_vocab_limit:
        raise
      limit = _TOO_HIGH_LIMIT.search(message)
      if limit is not None and int(limit.group(1)) < attempt:
        attempt = int(limit.group(1))
      else:
        hard_vocab_limit = False
  processor = spm.SentencePieceProcessor()
  processor.load_from_serialized_proto(proto)
  if processor.get_piece_size() != vocab_size:
    logging.warning(
        "SentencePiece vocabulary reduced from %d to %d pieces: the corpus "
        "cannot supply more.", vocab_size, processor.get_piece_size())
  if path is None:
    return Tokenizer(processor)
  path = os.fspath(path)
  fileio.atomic_write_bytes(path, proto)
  return Tokenizer(processor, path)


class DecoderOnlyTokenizer:
  """A SentencePiece Tokenizer in the decoder-only batch layout.

  For a decoder-only model trained with a SentencePiece model of its own
  (the `tiny_decoder` demo) rather than a Hugging Face folder's tokenizer
  (dro_fast.hf_tokenizer.HFTokenizer, whose layout this is): a prompt is
  its text's ids without EOS (the completion follows it in one sequence),
  the last max_length kept; a completion is its text's ids with EOS, the
  first max_length kept; rows are right-padded with -1 (`pad_id`), so that
  the mask (ids >= 0) never depends on a vocabulary id. Conversations are
  joined as T5 joins them (as_text). Everything else is the wrapped
  Tokenizer's.
  """

  pad_id = -1
  chat_template = None       # prompts are read as text (HFTokenizer's API)

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer

  def __getattr__(self, name: str):
    return getattr(self._tokenizer, name)

  @property
  def tokenizer(self) -> Tokenizer:
    """The wrapped T5-layout Tokenizer (its file is what is saved)."""
    return self._tokenizer

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """The ids that end a generated completion."""
    return (self._tokenizer.eos_id,)

  def prompt_ids(self, prompt: Text) -> list[int]:
    """One prompt's ids, untruncated, without EOS."""
    return self._tokenizer.encode(
        as_text(prompt, self._tokenizer.message_separator), add_eos=False)

  def completion_ids(self, prompt: Text, completion: Text) -> list[int]:
    """One completion's ids, untruncated, with EOS."""
    del prompt
    return self._tokenizer.encode(as_text(
        completion, self._tokenizer.message_separator, completion=True))

  @staticmethod
  def _pad(rows: list[list[int]], max_length: int
           ) -> tuple[np.ndarray, np.ndarray]:
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}.")
    ids = np.full((len(rows), max_length), -1, dtype=np.int32)
    for row, values in enumerate(rows):
      ids[row, :len(values)] = values
    return ids, ids >= 0

  def encode_prompts(self, prompts: Sequence[Text], max_length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, max_length], mask): each prompt's last ids, -1 after."""
    return self._pad([self.prompt_ids(p)[-max_length:] for p in prompts],
                     max_length)

  def encode_completions(self, prompts: Sequence[Text],
                         completions: Sequence[Text], max_length: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N, max_length], mask): each completion's first ids."""
    if len(prompts) != len(completions):
      raise ValueError(f"encode_completions got {len(prompts)} prompts and "
                       f"{len(completions)} completions; pass one prompt "
                       "per completion.")
    return self._pad([self.completion_ids(p, c)[:max_length]
                      for p, c in zip(prompts, completions)], max_length)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Decodes up to the first EOS, skipping padding (-1)."""
    return self._tokenizer.decode([i for i in ids if i >= 0])

  def decode_batch(self, ids) -> list[str]:
    return [self.decode(row) for row in ids]
