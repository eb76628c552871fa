"""Tests for dro_fast.tokenizer on a small synthetic corpus."""

import io
import logging
import os
import random

import numpy as np
import pytest
import sentencepiece as spm

from dro_fast import tokenizer as tokenizer_lib

_WORDS = ("the cat dog sat on a mat ran fast slow big small red blue green "
          "house tree bird flew over under river stone light dark").split()


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
          for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "spiece.model"
  return tokenizer_lib.train_sentencepiece(_corpus(), 40, path)


def test_train_writes_only_the_model(tmp_path):
  path = tmp_path / "sub" / "spiece.model"
  tok = tokenizer_lib.train_sentencepiece(_corpus(), 40, path)
  assert os.listdir(tmp_path / "sub") == ["spiece.model"]
  assert tok.path == str(path)
  assert tok.vocab_size == 40
  loaded = tokenizer_lib.Tokenizer.load(path)
  assert loaded.vocab_size == 40
  sentence = _corpus()[7]
  assert loaded.encode(sentence) == tok.encode(sentence)


def test_train_in_memory_then_save(tmp_path):
  tok = tokenizer_lib.train_sentencepiece(_corpus(), 40, None)
  assert tok.path is None
  assert not os.listdir(tmp_path)
  path = tmp_path / "sub" / "spiece.model"
  tok.save(path)
  assert tok.path == str(path)
  assert os.listdir(tmp_path / "sub") == ["spiece.model"]
  # The bytes written are those a direct training run writes.
  direct = tmp_path / "direct.model"
  tokenizer_lib.train_sentencepiece(_corpus(), 40, direct)
  assert path.read_bytes() == direct.read_bytes() == tok.serialized_model()


def test_special_ids(trained):
  assert (trained.pad_id, trained.eos_id, trained.unk_id) == (0, 1, 2)
  ids = trained.encode("the cat sat")
  assert ids[-1] == 1
  assert 0 not in ids[:-1] and 1 not in ids[:-1]
  assert trained.encode("the cat sat", add_eos=False) == ids[:-1]
  # Characters outside the corpus map to unk.
  assert 2 in trained.encode("QZX", add_eos=False)


def test_round_trip(trained):
  for sentence in _corpus()[:50]:
    assert trained.decode(trained.encode(sentence)) == sentence
  ids, _ = trained.encode_batch(_corpus()[:20], max_length=64)
  assert trained.decode_batch(ids) == _corpus()[:20]


def test_encode_truncation_keeps_eos(trained):
  sentence = " ".join(_WORDS)
  full = trained.encode(sentence)
  assert len(full) > 6
  short = trained.encode(sentence, max_length=5)
  assert short == full[:4] + [1]
  assert trained.encode(sentence, max_length=5, add_eos=False) == full[:5]
  assert trained.encode("cat", max_length=50) == trained.encode("cat")
  with pytest.raises(ValueError, match="max_length"):
    trained.encode(sentence, max_length=0)


def test_encode_batch_padding_and_truncation(trained):
  texts = ["cat", " ".join(_WORDS), ""]
  ids, mask = trained.encode_batch(texts, max_length=6)
  assert ids.shape == (3, 6) and ids.dtype == np.int32
  assert mask.shape == (3, 6) and mask.dtype == np.bool_
  for row, text in enumerate(texts):
    expected = trained.encode(text, max_length=6)
    n = len(expected)
    np.testing.assert_array_equal(ids[row, :n], expected)
    np.testing.assert_array_equal(ids[row, n:], 0)
    np.testing.assert_array_equal(mask[row], np.arange(6) < n)
  # The long row is truncated to full length with EOS last.
  assert mask[1].all() and ids[1, -1] == 1
  # The empty string is just EOS.
  np.testing.assert_array_equal(mask[2], [True] + [False] * 5)
  assert ids[2, 0] == 1

  no_eos, no_eos_mask = trained.encode_batch(texts, 6, add_eos=False)
  assert 1 not in no_eos
  assert not no_eos_mask[2].any()


def test_decode_skips_pad_and_stops_at_eos(trained):
  body = trained.encode("red house", add_eos=False)
  assert trained.decode(body + [1, 0, 0]) == "red house"
  assert trained.decode([0] + body + [0]) == "red house"
  assert trained.decode(body + [1] + trained.encode("cat")) == "red house"
  assert trained.decode(np.array(body + [1, 0], dtype=np.int32)) == "red house"
  assert trained.decode_batch(np.zeros((2, 4), np.int32)) == ["", ""]


def test_vocab_too_high_is_reduced_with_warning(tmp_path, caplog):
  path = tmp_path / "big.model"
  with caplog.at_level(logging.WARNING):
    tok = tokenizer_lib.train_sentencepiece(_corpus(100), 50000, path)
  assert 4 <= tok.vocab_size < 50000
  assert tokenizer_lib.Tokenizer.load(path).vocab_size == tok.vocab_size
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  messages = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any(f"from 50000 to {tok.vocab_size}" in m for m in messages), (
      messages)
  sentence = _corpus(100)[3]
  assert tok.decode(tok.encode(sentence)) == sentence


@pytest.mark.parametrize("model_type", ["bpe", "word"])
def test_vocab_too_high_other_model_types(tmp_path, model_type):
  tok = tokenizer_lib.train_sentencepiece(
      _corpus(100), 50000, tmp_path / "m.model", model_type=model_type)
  assert 4 <= tok.vocab_size < 50000


def test_training_is_deterministic(tmp_path):
  a = tmp_path / "a" / "spiece.model"
  b = tmp_path / "b" / "spiece.model"
  tokenizer_lib.train_sentencepiece(iter(_corpus()), 40, a)
  tokenizer_lib.train_sentencepiece(iter(_corpus()), 40, b)
  assert a.read_bytes() == b.read_bytes()


def test_rejects_bad_training_arguments(tmp_path):
  path = tmp_path / "x.model"
  with pytest.raises(ValueError, match="vocab_size must be >= 4"):
    tokenizer_lib.train_sentencepiece(_corpus(), 3, path)
  with pytest.raises(ValueError, match="empty corpus"):
    tokenizer_lib.train_sentencepiece([], 64, path)
  with pytest.raises(ValueError, match="empty corpus"):
    tokenizer_lib.train_sentencepiece(["", "  "], 64, path)
  with pytest.raises(ValueError, match="too small for the corpus"):
    tokenizer_lib.train_sentencepiece(_corpus(), 5, path)
  assert os.listdir(tmp_path) == []


def test_load_missing_file(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tokenizer_lib.Tokenizer.load(missing)
  with pytest.raises(FileNotFoundError, match="not a file"):
    tokenizer_lib.Tokenizer.load(tmp_path)


@pytest.mark.parametrize("content", [b"not a sentencepiece model", b""])
def test_load_garbage_file(tmp_path, content):
  path = tmp_path / "garbage.model"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="garbage.model.*not a valid"):
    tokenizer_lib.Tokenizer.load(path)


def test_load_rejects_other_special_ids(tmp_path):
  # SentencePiece's defaults: unk 0, bos 1, eos 2, no pad.
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus()), model_writer=writer, vocab_size=40,
      minloglevel=2)
  path = tmp_path / "default_ids.model"
  path.write_bytes(writer.getvalue())
  with pytest.raises(ValueError,
                     match=r"default_ids\.model.*-1/2/0.*0/1/2"):
    tokenizer_lib.Tokenizer.load(path)
