"""From records to batches: tokenisation, shuffled batching and cache keys.

Shapes: N examples, S prompt length, T completion length. Every id array is
int32 and right-padded with the tokenizer's `pad_id`; masks are bool, True
on tokens. The tokenizer implements the protocol `encode_prompts(prompts,
max_length)`, `encode_completions(prompts, completions, max_length)`,
`prompt_ids(prompt)` and `completion_ids(prompt, completion)`:
  * T5 (dro_fast.tokenizer.Tokenizer): pad 0, each sequence ends with EOS
    (kept last when truncated), conversations joined as text;
  * decoder-only models (dro_fast.hf_tokenizer.HFTokenizer): pad -1, the
    chat template's or TRL's ids, prompts truncated from the left and
    completions from the right (design: "Batch layout").

BatchIterator shuffles each epoch with its own seeded permutation and can
save and restore its position, so a resumed run sees exactly the batches an
uninterrupted one would.

Length buckets (BatchIterator's `length_buckets` b > 0): each batch's prompt
axis, and its completion axis (shared by every completion of the batch:
targets, KTO's mismatched targets, chosen and rejected), are cut to
bucket_length(longest row, b, maximum): the smallest of b, 2b, 4b, ...
that holds the batch's longest row, capped at the padded maximum. Only
padding is cut (the rows are right-padded), so the batch's contents are
unchanged. Doubling lengths give log2(maximum / b) + 1 shapes per axis, so
few programs are compiled, at most twice the needed length each; trimming
is a function of the batch alone, so a resumed run trims exactly as an
uninterrupted one. bucket_report measures the padding it saves on a
dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
import concurrent.futures
import hashlib
import json
import os
from typing import Any, Protocol

import numpy as np

from dro_fast.data.records import Pair
from dro_fast.data.records import Triplet
from dro_fast.data.rewards import RewardStats
from dro_fast.data.rows import DataError
from dro_fast.tokenizer import Text

_STATE_KEYS = ("epoch", "position", "seed", "num_examples")

# The batch keys on the prompt axis, and the completion ids and masks that
# share the completion axis (T5 and decoder-only layouts alike).
PROMPT_KEYS = ("inputs",)
COMPLETION_KEYS = (("targets", "target_mask"),
                   ("mismatched_targets", "mismatched_mask"),
                   ("chosen", "chosen_mask"), ("rejected", "rejected_mask"))


class Tokenizer(Protocol):
  """What the pipeline needs of a tokenizer (see the module docstring)."""

  pad_id: int

  def encode_prompts(self, prompts: Sequence[Text], max_length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    ...

  def encode_completions(self, prompts: Sequence[Text],
                         completions: Sequence[Text], max_length: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    ...

  def prompt_ids(self, prompt: Text) -> list[int]:
    ...

  def completion_ids(self, prompt: Text, completion: Text) -> list[int]:
    ...


def _check_lengths(max_input_length: int, max_target_length: int) -> None:
  for name, value in (("max_input_length", max_input_length),
                      ("max_target_length", max_target_length)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1 (it includes the EOS token), "
                       f"got {value}.")


def _check_prompts(mask: np.ndarray, records: Sequence) -> None:
  """Every prompt must hold a token: a decoder-only model predicts the
  completion's first token from the prompt's last (T5's has its EOS)."""
  empty = np.flatnonzero(~mask.any(axis=1))
  if len(empty):
    raise DataError(
        f"{records[empty[0]].source}: the prompt has no tokens "
        f"({len(empty)} of {len(records)} rows): a decoder-only model reads "
        "the completion after the prompt's last token. Give each row a "
        "prompt, or use a chat template, which writes its own tokens.")


def tokenize_triplets(triplets: Sequence[Triplet], tokenizer: Tokenizer,
                      max_input_length: int, max_target_length: int,
                      reward_stats: RewardStats | None = None
                      ) -> dict[str, np.ndarray]:
  """Tokenises triplets into the arrays the DRO trainer takes.

  Args:
    triplets: N triplets.
    tokenizer: the model's tokenizer (the protocol above).
    max_input_length: S; longer prompts are truncated (T5: EOS kept last;
      decoders: from the left).
    max_target_length: T; longer completions are truncated (T5: EOS kept
      last).
    reward_stats: if given, rewards are normalised with it; otherwise they
      are returned raw.

  Returns:
    {"inputs": int32 [N, S], "targets": int32 [N, T], "target_mask": bool
    [N, T], "rewards": float32 [N]}.

  Raises:
    ValueError: a maximum length is below 1.
  """
  _check_lengths(max_input_length, max_target_length)
  prompts = [t.prompt for t in triplets]
  inputs, prompt_mask = tokenizer.encode_prompts(prompts, max_input_length)
  _check_prompts(prompt_mask, triplets)
  targets, target_mask = tokenizer.encode_completions(
      prompts, [t.completion for t in triplets], max_target_length)  # [N, T]
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
    tokenizer: the model's tokenizer (the protocol above).
    max_input_length: S; longer prompts are truncated (T5: EOS kept last;
      decoders: from the left).
    max_target_length: T; longer completions are truncated (T5: EOS kept
      last).

  Returns:
    {"inputs": int32 [N, S], "chosen": int32 [N, T], "chosen_mask": bool
    [N, T], "rejected": int32 [N, T], "rejected_mask": bool [N, T]}.

  Raises:
    ValueError: a maximum length is below 1.
  """
  _check_lengths(max_input_length, max_target_length)
  prompts = [p.prompt for p in pairs]
  inputs, prompt_mask = tokenizer.encode_prompts(prompts, max_input_length)
  _check_prompts(prompt_mask, pairs)
  chosen, chosen_mask = tokenizer.encode_completions(
      prompts, [p.chosen for p in pairs], max_target_length)  # [N, T]
  rejected, rejected_mask = tokenizer.encode_completions(
      prompts, [p.rejected for p in pairs], max_target_length)  # [N, T]
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
    (record index, field, tokens (T5: with EOS), limit) for every prompt
    longer than S and every completion (triplets) or chosen / rejected
    completion (pairs) longer than T, in record order.
  """
  found = []
  for index, record in enumerate(records):
    if isinstance(record, Pair):
      targets = (("chosen", record.chosen), ("rejected", record.rejected))
    else:
      targets = (("completion", record.completion),)
    lengths = [("prompt", len(tokenizer.prompt_ids(record.prompt)),
                 max_input_length)]
    lengths.extend(
        (field, len(tokenizer.completion_ids(record.prompt, text)),
         max_target_length) for field, text in targets)
    for field, length, limit in lengths:
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
               seed: int, *, length_buckets: int = 0, pad_id: int = 0):
    """Checks the arrays and starts at epoch 0.

    Args:
      arrays: arrays sharing their leading dimension N, e.g. the output of
        tokenize_triplets.
      batch_size: examples per batch, 1 to N.
      seed: a non-negative integer seeding every epoch's permutation.
      length_buckets: 0: batches keep the arrays' lengths; b > 0: each
        batch is cut by trim_batch(batch, b, pad_id) (the module
        docstring). The state (get_state) does not depend on it.
      pad_id: the prompts' padding id (the tokenizer's pad_id: T5 0,
        decoders -1), for length_buckets.

    Raises:
      ValueError: `arrays` is empty or its leading dimensions differ,
        `batch_size` is not in [1, N], `seed` is negative or
        `length_buckets` is.
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
    if length_buckets < 0:
      raise ValueError("length_buckets must be >= 0 (0: no buckets), got "
                       f"{length_buckets}.")
    self._length_buckets = int(length_buckets)
    self._pad_id = int(pad_id)
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
    batch = {key: value[indices] for key, value in self._arrays.items()}
    if self._length_buckets:
      batch = trim_batch(batch, self._length_buckets, self._pad_id)
    return batch

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


def bucket_length(longest: int, bucket: int, maximum: int) -> int:
  """The smallest of bucket, 2 bucket, 4 bucket, ... >= longest, <= maximum.

  Args:
    longest: the longest row of a batch, in tokens.
    bucket: the smallest length, >= 1.
    maximum: the padded length, the cap.

  Returns:
    The length to cut the batch's axis to.
  """
  length = bucket
  while length < longest:
    length *= 2
  return min(length, maximum)


def _prompt_length(inputs: np.ndarray, pad_id: int) -> int:
  """The longest right-padded row of `inputs` [B, S], in tokens."""
  valid = inputs != pad_id  # [B, S]
  if not valid.any():
    return 0
  return int(inputs.shape[1] - np.argmax(valid[:, ::-1].any(axis=0)))


def trim_batch(batch: Mapping[str, np.ndarray], bucket: int,
               pad_id: int) -> dict[str, np.ndarray]:
  """Cuts a batch's prompt and completion axes to their length buckets.

  The prompt axis of PROMPT_KEYS is cut to bucket_length(the longest
  prompt, where a prompt's tokens are the ids before its trailing `pad_id`s);
  the completion axis of every id array and mask of COMPLETION_KEYS present
  to bucket_length(the longest completion of any of them, by its mask).
  Only padding is cut; other arrays are unchanged.

  Args:
    batch: a batch of tokenize_triplets / tokenize_pairs arrays (and KTO's
      mismatched ones).
    bucket: the smallest bucket length, >= 1.
    pad_id: the prompts' padding id.

  Returns:
    The batch with cut (views of the) arrays.
  """
  out = dict(batch)
  for key in PROMPT_KEYS:
    if key in out:
      length = bucket_length(_prompt_length(out[key], pad_id), bucket,
                             out[key].shape[1])
      out[key] = out[key][:, :length]
  present = [(ids, mask) for ids, mask in COMPLETION_KEYS if mask in out]
  if present:
    longest = 0
    for _, mask in present:
      rows = out[mask].any(axis=0)  # [T]: a position any row uses.
      if rows.any():
        longest = max(longest, int(len(rows) - np.argmax(rows[::-1])))
    maximum = out[present[0][1]].shape[1]
    length = bucket_length(longest, bucket, maximum)
    for ids, mask in present:
      out[mask] = out[mask][:, :length]
      if ids in out:
        out[ids] = out[ids][:, :length]
  return out


def bucket_report(arrays: Mapping[str, np.ndarray], batch_size: int,
                  seed: int, length_buckets: int, pad_id: int,
                  epochs: int = 1) -> dict[str, Any]:
  """What length buckets save on a dataset: id slots with and without.

  Runs BatchIterator over `epochs` epochs of `arrays` and counts the id
  slots of the prompt and completion id arrays (PROMPT_KEYS and the id
  arrays of COMPLETION_KEYS) the model would process.

  Args:
    arrays, batch_size, seed: as BatchIterator.
    length_buckets: the smallest bucket length, >= 1.
    pad_id: as BatchIterator.
    epochs: epochs to count, >= 1.

  Returns:
    {"batches", "tokens": real tokens, "padded_slots": slots without
    buckets, "bucketed_slots": slots with them, "saved": the fraction of
    padded_slots saved, "shapes": [[S, T, batches], ...] the distinct
    (prompt, completion) lengths by count, most frequent first}.
  """
  if length_buckets < 1 or epochs < 1:
    raise ValueError("bucket_report needs length_buckets >= 1 and epochs "
                     f">= 1, got {length_buckets} and {epochs}.")
  iterator = BatchIterator(arrays, batch_size, seed)
  id_keys = [k for k in PROMPT_KEYS + tuple(ids for ids, _ in COMPLETION_KEYS)
             if k in arrays]
  padded = bucketed = tokens = 0
  shapes: dict[tuple[int, int], int] = {}
  batches = iterator.batches_per_epoch * epochs
  for _ in range(batches):
    batch = next(iterator)
    trimmed = trim_batch(batch, length_buckets, pad_id)
    padded += sum(batch[k].size for k in id_keys)
    bucketed += sum(trimmed[k].size for k in id_keys)
    for key in id_keys:
      valid = (batch[key] != pad_id if key in PROMPT_KEYS
               else batch[dict(COMPLETION_KEYS)[key]])
      tokens += int(valid.sum())
    shape = tuple(int(trimmed[k].shape[1]) for k in id_keys[:2])
    shape = shape + (0,) * (2 - len(shape))
    shapes[shape] = shapes.get(shape, 0) + 1
  return {"batches": batches, "tokens": tokens, "padded_slots": padded,
          "bucketed_slots": bucketed,
          "saved": 1.0 - bucketed / padded if padded else 0.0,
          "shapes": [[s, t, n] for (s, t), n in
                     sorted(shapes.items(), key=lambda x: (-x[1], x[0]))]}


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
