"""From records to batches: tokenisation, shuffled batching and cache keys.

Shapes: N examples, S prompt (encoder) length, T completion (decoder)
length. Every id array is int32, right-padded with the pad id 0 and ending
each sequence with EOS (kept last when the text is truncated); masks are
bool, True on tokens.

BatchIterator shuffles each epoch with its own seeded permutation and can
save and restore its position, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import concurrent.futures
import hashlib
import json
import os
from typing import Any

import numpy as np

from dro_fast.data.records import Pair
from dro_fast.data.records import Triplet
from dro_fast.data.rewards import RewardStats
from dro_fast.tokenizer import Tokenizer

_STATE_KEYS = ("epoch", "position", "seed", "num_examples")


def _check_lengths(max_input_length: int, max_target_length: int) -> None:
  for name, value in (("max_input_length", max_input_length),
                      ("max_target_length", max_target_length)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1 (it includes the EOS token), "
                       f"got {value}.")


def tokenize_triplets(triplets: Sequence[Triplet], tokenizer: Tokenizer,
                      max_input_length: int, max_target_length: int,
                      reward_stats: RewardStats | None = None
                      ) -> dict[str, np.ndarray]:
  """Tokenises triplets into the arrays the DRO trainer takes.

  Args:
    triplets: N triplets.
    tokenizer: the model's tokenizer.
    max_input_length: S; longer prompts are truncated, EOS kept last.
    max_target_length: T; longer completions are truncated, EOS kept last.
    reward_stats: if given, rewards are normalised with it; otherwise they
      are returned raw.

  Returns:
    {"inputs": int32 [N, S], "targets": int32 [N, T], "target_mask": bool
    [N, T], "rewards": float32 [N]}.

  Raises:
    ValueError: a maximum length is below 1.
  """
  _check_lengths(max_input_length, max_target_length)
  inputs, _ = tokenizer.encode_batch([t.prompt for t in triplets],
                                     max_input_length)  # [N, S]
  targets, target_mask = tokenizer.encode_batch(
      [t.completion for t in triplets], max_target_length)  # [N, T]
  rewards = np.array([t.reward for t in triplets], dtype=np.float64)  # [N]
  if reward_stats is not None:
    rewards = reward_stats.normalise(rewards)
  return {
      "inputs": inputs,
      "targets": targets,
      "target_mask": target_mask,
      "rewards": rewards.astype(np.float32),
  }


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer,
                   max_input_length: int, max_target_length: int
                   ) -> dict[str, np.ndarray]:
  """Tokenises preference pairs for the pairwise baselines.

  Args:
    pairs: N pairs.
    tokenizer: the model's tokenizer.
    max_input_length: S; longer prompts are truncated, EOS kept last.
    max_target_length: T; longer completions are truncated, EOS kept last.

  Returns:
    {"inputs": int32 [N, S], "chosen": int32 [N, T], "chosen_mask": bool
    [N, T], "rejected": int32 [N, T], "rejected_mask": bool [N, T]}.

  Raises:
    ValueError: a maximum length is below 1.
  """
  _check_lengths(max_input_length, max_target_length)
  inputs, _ = tokenizer.encode_batch([p.prompt for p in pairs],
                                     max_input_length)  # [N, S]
  chosen, chosen_mask = tokenizer.encode_batch(
      [p.chosen for p in pairs], max_target_length)  # [N, T]
  rejected, rejected_mask = tokenizer.encode_batch(
      [p.rejected for p in pairs], max_target_length)  # [N, T]
  return {
      "inputs": inputs,
      "chosen": chosen,
      "chosen_mask": chosen_mask,
      "rejected": rejected,
      "rejected_mask": rejected_mask,
  }


def long_texts(records: Sequence[Triplet] | Sequence[Pair],
               tokenizer: Tokenizer, max_input_length: int,
               max_target_length: int) -> list[tuple[int, str, int, int]]:
  """The texts that tokenize_triplets / tokenize_pairs would truncate.

  Args:
    records: triplets or pairs.
    tokenizer: the model's tokenizer.
    max_input_length: S, the prompt tokens kept (EOS included).
    max_target_length: T, the completion tokens kept (EOS included).

  Returns:
    (record index, field, tokens with EOS, limit) for every prompt longer
    than S and every completion (triplets) or chosen / rejected completion
    (pairs) longer than T, in record order.
  """
  found = []
  for index, record in enumerate(records):
    if isinstance(record, Pair):
      targets = (("chosen", record.chosen), ("rejected", record.rejected))
    else:
      targets = (("completion", record.completion),)
    for field, text, limit in (("prompt", record.prompt, max_input_length),
                               *((f, t, max_target_length)
                                 for f, t in targets)):
      length = len(tokenizer.encode(text))
      if length > limit:
        found.append((index, field, length, limit))
  return found


class BatchIterator:
  """Endless shuffled batches of a dict of arrays, resumable.

  Epoch e visits the examples in the order
  `np.random.default_rng([seed, e]).permutation(N)`, `batch_size` at a time;
  the last partial batch of each epoch is dropped. Every array of a batch
  is indexed by the same example indices.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int,
               seed: int):
    """Checks the arrays and starts at epoch 0.

    Args:
      arrays: arrays sharing their leading dimension N, e.g. the output of
        tokenize_triplets.
      batch_size: examples per batch, 1 to N.
      seed: a non-negative integer seeding every epoch's permutation.

    Raises:
      ValueError: `arrays` is empty or its leading dimensions differ,
        `batch_size` is not in [1, N], or `seed` is negative.
    """
    if not arrays:
      raise ValueError("BatchIterator needs at least one array; got an "
                       "empty dict.")
    sizes = {key: np.shape(value)[0] if np.ndim(value) else None
             for key, value in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(
          "BatchIterator's arrays must share their leading (example) "
          f"dimension; got leading sizes {sizes}. Build them from the same "
          "records.")
    self._arrays = {key: np.asarray(value) for key, value in arrays.items()}
    self._num_examples = next(iter(sizes.values()))
    if not 1 <= batch_size <= self._num_examples:
      raise ValueError(
          f"batch_size must be in [1, {self._num_examples}] (the number of "
          f"examples), got {batch_size}. Use a smaller batch or more data.")
    if seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    self._batch_size = int(batch_size)
    self._seed = int(seed)  # A Python int, so that get_state is JSON.
    self._epoch = 0
    self._position = 0  # Examples of the current epoch already yielded.
    self._order_epoch = -1
    self._order = np.empty(0, dtype=np.int64)

  @property
  def num_examples(self) -> int:
    """N, the number of examples."""
    return self._num_examples

  @property
  def batches_per_epoch(self) -> int:
    """Full batches per epoch: N // batch_size."""
    return self._num_examples // self._batch_size

  def _epoch_order(self) -> np.ndarray:
    """The current epoch's permutation of the example indices."""
    if self._order_epoch != self._epoch:
      rng = np.random.default_rng([self._seed, self._epoch])
      self._order = rng.permutation(self._num_examples)
      self._order_epoch = self._epoch
    return self._order

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._position + self._batch_size > self._num_examples:
      self._epoch += 1
      self._position = 0
    indices = self._epoch_order()[
        self._position:self._position + self._batch_size]
    self._position += self._batch_size
    return {key: value[indices] for key, value in self._arrays.items()}

  def get_state(self) -> dict[str, int]:
    """The position to resume from, JSON-serialisable.

    Returns:
      {"epoch", "position" (examples of the epoch already yielded), "seed",
      "num_examples"}.
    """
    return {"epoch": self._epoch, "position": self._position,
            "seed": self._seed, "num_examples": self._num_examples}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes from a `get_state` result.

    Afterwards the iterator yields exactly the batches the iterator that
    produced `state` would have yielded next (given the same batch size).

    Args:
      state: a `get_state` result, e.g. read back from JSON.

    Raises:
      ValueError: `state` is malformed, or its seed or number of examples
        differ from this iterator's (the data or seed changed).
    """
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
      raise ValueError(f"BatchIterator state {dict(state)} lacks "
                       f"{', '.join(missing)}; pass a get_state() result.")
    for key in _STATE_KEYS:
      if isinstance(state[key], bool) or not isinstance(state[key], int):
        raise ValueError(f"BatchIterator state {key!r} must be an integer, "
                         f"got {state[key]!r}; pass a get_state() result.")
    if (state["seed"], state["num_examples"]) != (self._seed,
                                                  self._num_examples):
      raise ValueError(
          "The data changed since this BatchIterator state was saved: the "
          f"state has seed {state['seed']} and {state['num_examples']} "
          f"examples, this iterator has seed {self._seed} and "
          f"{self._num_examples} examples. Resume with the same data and "
          "seed, or start a fresh iterator.")
    if state["epoch"] < 0 or not 0 <= state["position"] <= self._num_examples:
      raise ValueError(
          f"BatchIterator state has epoch {state['epoch']} and position "
          f"{state['position']}; they must be >= 0 and in "
          f"[0, {self._num_examples}]. Pass a get_state() result.")
    self._epoch = state["epoch"]
    self._position = state["position"]


# Bytes per piece hashed on its own thread: hashlib releases the GIL, so
# the pieces of a large dataset are hashed on every core at once.
_PIECE_BYTES = 1 << 26


def _piece_digests(data: memoryview) -> list[bytes]:
  """SHA-256 digests of consecutive _PIECE_BYTES pieces of `data`."""
  pieces = [data[i:i + _PIECE_BYTES]
            for i in range(0, len(data), _PIECE_BYTES)] or [data]
  if len(pieces) == 1:
    return [hashlib.sha256(pieces[0]).digest()]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    return list(pool.map(lambda piece: hashlib.sha256(piece).digest(),
                         pieces))


def fingerprint(arrays: Mapping[str, np.ndarray]) -> str:
  """A SHA-256 hex digest of the arrays, to key caches and check resumes.

  Covers the sorted keys and each array's dtype, shape and bytes (C order),
  so equal contents give equal digests whatever the dict order or memory
  layout. The bytes are hashed in pieces, in parallel, and the pieces'
  digests hashed in order (a hash tree of depth one).

  Args:
    arrays: arrays keyed by name.

  Returns:
    64 hex characters.

  Raises:
    ValueError: a key is not a string, or an array has object dtype (its
      bytes are pointers, not contents).
  """
  if not all(isinstance(key, str) for key in arrays):
    raise ValueError("fingerprint needs string keys; got "
                     f"{sorted(map(repr, arrays))}.")
  digest = hashlib.sha256()
  for key in sorted(arrays):
    array = np.ascontiguousarray(arrays[key])
    if array.dtype.hasobject:
      raise ValueError(f"fingerprint cannot hash array {key!r} of object "
                       "dtype: its bytes are pointers. Convert it to a "
                       "numeric or fixed-width string dtype.")
    header = json.dumps([key, array.dtype.str, list(array.shape)])
    digest.update(header.encode("utf-8") + b"\0")
    for piece in _piece_digests(memoryview(array.reshape(-1).view(np.uint8))):
      digest.update(piece)
  return digest.hexdigest()
