"""Tests for dro_fast.data.pipeline: tokenisation, batching, fingerprints."""

import json
import random

import numpy as np
import pytest

from dro_fast import data
from dro_fast import tokenizer as tokenizer_lib

_WORDS = ("the cat dog sat on a mat ran fast slow big small red blue green "
          "house tree bird flew over under river stone light dark").split()


def _sentences(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
          for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("spm") / "spiece.model"
  return tokenizer_lib.train_sentencepiece(_sentences(300), 40, path)


def _triplets() -> list[data.Triplet]:
  prompts = _sentences(5, seed=1)
  completions = ["the cat", "red", "big", " ".join(_WORDS), "dark"]
  rewards = [1.0, 3.0, -2.0, 0.5, 4.0]
  return [data.Triplet(p, c, r, f"t.jsonl:{i + 1}")
          for i, (p, c, r) in enumerate(zip(prompts, completions, rewards))]


def test_tokenize_triplets(tokenizer):
  triplets = _triplets()
  arrays = data.tokenize_triplets(triplets, tokenizer, max_input_length=11,
                                  max_target_length=7)
  assert sorted(arrays) == ["inputs", "rewards", "target_mask", "targets"]
  assert arrays["inputs"].shape == (5, 11)
  assert arrays["inputs"].dtype == np.int32
  assert arrays["targets"].shape == (5, 7)
  assert arrays["targets"].dtype == np.int32
  assert arrays["target_mask"].shape == (5, 7)
  assert arrays["target_mask"].dtype == np.bool_
  assert arrays["rewards"].dtype == np.float32
  np.testing.assert_array_equal(arrays["rewards"], [1.0, 3.0, -2.0, 0.5, 4.0])
  expected_inputs, _ = tokenizer.encode_batch([t.prompt for t in triplets],
                                              11)
  np.testing.assert_array_equal(arrays["inputs"], expected_inputs)
  np.testing.assert_array_equal(arrays["target_mask"],
                                arrays["targets"] != tokenizer.pad_id)
  # The long completion is truncated, fills the row and keeps EOS last.
  assert len(tokenizer.encode(triplets[3].completion)) > 7
  assert tokenizer.encode(triplets[3].completion, add_eos=False)[:6] == (
      arrays["targets"][3, :6].tolist())
  assert arrays["target_mask"][3].all()
  assert arrays["targets"][3, -1] == tokenizer.eos_id
  # Every row ends with exactly one EOS.
  lengths = arrays["target_mask"].sum(axis=1)
  np.testing.assert_array_equal(
      arrays["targets"][np.arange(5), lengths - 1], tokenizer.eos_id)
  for row, triplet in enumerate(triplets):
    if row != 3:
      assert tokenizer.decode(arrays["targets"][row]) == triplet.completion


def test_tokenize_triplets_normalises_rewards(tokenizer):
  triplets = _triplets()
  stats = data.RewardStats.fit([t.reward for t in triplets], "t.jsonl")
  arrays = data.tokenize_triplets(triplets, tokenizer, 8, 8,
                                  reward_stats=stats)
  raw = np.array([t.reward for t in triplets])
  assert arrays["rewards"].dtype == np.float32
  np.testing.assert_allclose(arrays["rewards"],
                             (raw - raw.mean()) / raw.std(), rtol=1e-6)


def test_long_texts_lists_what_tokenization_truncates(tokenizer):
  triplets = _triplets()
  lengths = [(len(tokenizer.encode(t.prompt)),
              len(tokenizer.encode(t.completion))) for t in triplets]
  found = data.long_texts(triplets, tokenizer, max_input_length=11,
                          max_target_length=7)
  expected = []
  for i, (prompt, completion) in enumerate(lengths):
    if prompt > 11:
      expected.append((i, "prompt", prompt, 11))
    if completion > 7:
      expected.append((i, "completion", completion, 7))
  assert (3, "completion", lengths[3][1], 7) in expected
  assert found == expected
  # At the longest lengths nothing is truncated.
  assert not data.long_texts(triplets, tokenizer,
                             max(p for p, _ in lengths),
                             max(c for _, c in lengths))
  pair = data.Pair("the cat", "red", " ".join(_WORDS), "p.jsonl:1")
  assert data.long_texts([pair], tokenizer, 11, 7) == [
      (0, "rejected", len(tokenizer.encode(pair.rejected)), 7)]


def test_tokenize_pairs(tokenizer):
  pairs = [data.Pair(p, c, r, f"p.jsonl:{i}") for i, (p, c, r) in enumerate(
      zip(_sentences(3, 1), _sentences(3, 2), _sentences(3, 3)))]
  arrays = data.tokenize_pairs(pairs, tokenizer, max_input_length=6,
                               max_target_length=4)
  assert sorted(arrays) == ["chosen", "chosen_mask", "inputs", "rejected",
                            "rejected_mask"]
  assert arrays["inputs"].shape == (3, 6)
  for key in ("chosen", "rejected"):
    assert arrays[key].shape == (3, 4)
    assert arrays[key].dtype == np.int32
    assert arrays[f"{key}_mask"].dtype == np.bool_
    expected, expected_mask = tokenizer.encode_batch(
        [getattr(p, key) for p in pairs], 4)
    np.testing.assert_array_equal(arrays[key], expected)
    np.testing.assert_array_equal(arrays[f"{key}_mask"], expected_mask)
  assert not np.array_equal(arrays["chosen"], arrays["rejected"])


def test_tokenize_rejects_bad_lengths(tokenizer):
  with pytest.raises(ValueError, match=r"max_target_length must be >= 1"):
    data.tokenize_triplets(_triplets(), tokenizer, 4, 0)


# --------------------------------------------------------------------------
# BatchIterator.

_N = 10
_BATCH = 3  # 3 full batches per epoch, one example dropped.


def _arrays(n: int = _N) -> dict[str, np.ndarray]:
  index = np.arange(n)
  return {"index": index, "pairs": np.stack([index, -index], axis=1)}


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _indices(batches) -> list[list[int]]:
  return [batch["index"].tolist() for batch in batches]


def test_batches_index_every_array_alike():
  for batch in _take(data.BatchIterator(_arrays(), _BATCH, seed=0), 7):
    assert batch["index"].shape == (_BATCH,)
    assert batch["pairs"].shape == (_BATCH, 2)
    np.testing.assert_array_equal(batch["pairs"][:, 0], batch["index"])
    np.testing.assert_array_equal(batch["pairs"][:, 1], -batch["index"])


def test_same_seed_same_batches_other_seed_other_batches():
  first = _indices(_take(data.BatchIterator(_arrays(), _BATCH, seed=5), 9))
  again = _indices(_take(data.BatchIterator(_arrays(), _BATCH, seed=5), 9))
  other = _indices(_take(data.BatchIterator(_arrays(), _BATCH, seed=6), 9))
  assert first == again
  assert first != other


@pytest.mark.parametrize("n,batch_size", [(12, 4), (10, 3), (7, 7)])
def test_each_epoch_is_a_seeded_permutation(n, batch_size):
  seed = 3
  iterator = data.BatchIterator(_arrays(n), batch_size, seed)
  per_epoch = n // batch_size
  used = per_epoch * batch_size
  orders = []
  for epoch in range(4):
    order = np.concatenate(_indices(_take(iterator, per_epoch)))
    permutation = np.random.default_rng([seed, epoch]).permutation(n)
    np.testing.assert_array_equal(order, permutation[:used])
    assert len(set(order.tolist())) == used  # No example twice.
    if used == n:
      np.testing.assert_array_equal(np.sort(order), np.arange(n))
    orders.append(order.tolist())
  if n > 1:
    assert orders[0] != orders[1]


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 4, 8])
def test_resume_yields_the_same_next_batches(consumed):
  original = data.BatchIterator(_arrays(), _BATCH, seed=11)
  _take(original, consumed)
  state = json.loads(json.dumps(original.get_state()))
  expected = _take(original, 5)  # Crosses at least one epoch boundary.

  resumed = data.BatchIterator(_arrays(), _BATCH, seed=11)
  resumed.set_state(state)
  got = _take(resumed, 5)
  assert _indices(got) == _indices(expected)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a["pairs"], b["pairs"])


def test_state_contents():
  iterator = data.BatchIterator(_arrays(), _BATCH, seed=2)
  assert iterator.get_state() == {"epoch": 0, "position": 0, "seed": 2,
                                  "num_examples": _N}
  _take(iterator, 4)
  assert iterator.get_state() == {"epoch": 1, "position": 3, "seed": 2,
                                  "num_examples": _N}


def test_set_state_when_the_data_changed():
  state = data.BatchIterator(_arrays(), _BATCH, seed=1).get_state()
  with pytest.raises(ValueError, match=r"data changed.*this iterator has "
                     "seed 1 and 9 examples"):
    data.BatchIterator(_arrays(_N - 1), _BATCH, seed=1).set_state(state)
  with pytest.raises(ValueError,
                     match=r"data changed.*this iterator has seed 2"):
    data.BatchIterator(_arrays(), _BATCH, seed=2).set_state(state)
  with pytest.raises(ValueError, match=r"lacks position"):
    data.BatchIterator(_arrays(), _BATCH, seed=1).set_state(
        {"epoch": 0, "seed": 1, "num_examples": _N})
  with pytest.raises(ValueError, match=r"position 11"):
    data.BatchIterator(_arrays(), _BATCH, seed=1).set_state(
        dict(state, position=_N + 1))


def test_constructor_errors():
  with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\]"):
    data.BatchIterator(_arrays(), _N + 1, seed=0)
  with pytest.raises(ValueError, match=r"leading sizes"):
    data.BatchIterator({"a": np.zeros(3), "b": np.zeros(4)}, 1, seed=0)
  with pytest.raises(ValueError, match=r"at least one array"):
    data.BatchIterator({}, 1, seed=0)


# --------------------------------------------------------------------------
# fingerprint.


def test_fingerprint():
  arrays = {"a": np.arange(6, dtype=np.int32).reshape(2, 3),
            "b": np.array([True, False])}
  digest = data.fingerprint(arrays)
  assert len(digest) == 64
  assert data.fingerprint({"b": arrays["b"], "a": arrays["a"]}) == digest
  assert data.fingerprint(
      {"a": np.asfortranarray(arrays["a"]), "b": arrays["b"]}) == digest
  changed = {
      "value": {"a": arrays["a"] + np.eye(2, 3, dtype=np.int32),
                "b": arrays["b"]},
      "dtype": {"a": arrays["a"].astype(np.int64), "b": arrays["b"]},
      "shape": {"a": arrays["a"].reshape(3, 2), "b": arrays["b"]},
      "key": {"c": arrays["a"], "b": arrays["b"]},
      "dropped": {"a": arrays["a"]},
  }
  digests = {name: data.fingerprint(a) for name, a in changed.items()}
  assert digest not in digests.values()
  assert len(set(digests.values())) == len(digests)


def test_fingerprint_refuses_object_arrays():
  with pytest.raises(ValueError, match=r"object dtype"):
    data.fingerprint({"a": np.array(["x", None], dtype=object)})
