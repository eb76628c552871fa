"""Preparing a run's training data: read, tokenise, check, normalise.

`load_dataset` reads the data (or writes the demo's synthetic task into the
workdir), chooses the tokenizer, applies the length policy, fits or reuses
the reward statistics and tokenises. What it would save in the workdir (a
tokenizer trained here, the reward statistics) comes back unsaved and is
written by `save_inputs` once every input has been checked, so that a run
stopped by a bad input leaves nothing a later run would silently reuse.
What a later run (a resumption) does reuse is checked first: the tokenizer
against the SHA-256 saved beside it (spiece.model.sha256), the reward
statistics against the rewards they were fitted on, and the tokenised rows,
the tokenizer and the settings that shape them against the fingerprints the
first run recorded (data_fingerprint.json): a workdir never resumes on data
other than its own.

Problems with the inputs raise DataError with a message that names the
file, row or flag and what to do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from absl import logging
import numpy as np

from dro_fast import fileio
from dro_fast.data import pipeline
from dro_fast.data import formats
from dro_fast.data import synthetic
from dro_fast.data.config import DataConfig
from dro_fast.data.records import DataError
from dro_fast.data.rewards import RewardStats
from dro_fast.tokenizer import as_text
from dro_fast.tokenizer import DecoderOnlyTokenizer
from dro_fast.tokenizer import Tokenizer
from dro_fast.tokenizer import train_sentencepiece

# The tokenizer a run trains is saved in its workdir under this name.
TOKENIZER = "spiece.model"

# What the first run on a workdir records of its data (see fingerprints).
FINGERPRINT = "data_fingerprint.json"

# DataConfig fields that do not shape the tokenised rows by themselves: where
# the data and the tokenizer are read from (their contents are fingerprinted),
# the size of a tokenizer trained here (idem) and the length buckets (they
# cut padding from batches, not tokens from rows).
_UNSHAPING_FIELDS = ("train_data", "tokenizer", "tokenizer_vocab_size",
                     "length_buckets")

# Algorithms trained on (prompt, chosen, rejected) pairs.
PAIRWISE_ALGORITHMS = ("dpo", "ipo", "slic")


@dataclasses.dataclass
class Dataset:
  """The tokenised training data.

  Attributes:
    arrays: the model's input arrays (see data.tokenize_triplets / pairs).
    tokenizer: the tokenizer (T5's Tokenizer, or an HFTokenizer for a
      Hugging Face folder); `path` None while one trained here is unsaved.
    tokenizer_fingerprint: a digest of the SentencePiece model, or of the
      folder's tokenizer files.
    reward_stats: reward statistics not yet saved in the workdir, or None.
    fingerprints: what shaped `arrays` (see `fingerprints`); recorded in the
      workdir by save_inputs when it holds no record yet.
  """
  arrays: dict[str, np.ndarray]
  tokenizer: Any
  tokenizer_fingerprint: str
  reward_stats: RewardStats | None = None
  fingerprints: dict | None = None

  @property
  def key(self) -> str:
    """One digest of `fingerprints`, to key caches of this data."""
    return hashlib.sha256(json.dumps(self.fingerprints, sort_keys=True)
                          .encode()).hexdigest()


def demo_data(workdir: str, config: DataConfig, pairwise: bool,
              seed: int) -> str:
  """The synthetic task's file in `workdir`, written if absent."""
  path = os.path.join(workdir, "demo_pairs.jsonl" if pairwise
                      else "demo_train.jsonl")
  if not os.path.isfile(path):
    rows = (synthetic.make_pairs(config.demo_examples, seed) if pairwise
            else synthetic.make_triplets(config.demo_examples, seed))
    synthetic.write_jsonl(path, rows)
  return path


def choose_tokenizer(workdir: str, config: DataConfig,
                     texts: list[str]) -> tuple[Any, str]:
  """config.tokenizer, the workdir's, or one trained on `texts` (unsaved).

  A `tokenizer` that is a folder is a Hugging Face model's (HFTokenizer:
  tokenizer.json / tokenizer.model, its chat template); a file is a
  SentencePiece model for T5, whose conversational prompts are joined with
  config.message_separator. The workdir's spiece.model is used only when its
  SHA-256 still equals the one recorded in spiece.model.sha256 when it was
  saved.

  Returns:
    (tokenizer, fingerprint of its SentencePiece model or tokenizer files).

  Raises:
    DataError: an unreadable --tokenizer, or a workdir tokenizer that is
      invalid, altered or has no (valid) recorded SHA-256.
  """
  if config.tokenizer and os.path.isdir(config.tokenizer):
    from dro_fast import hf_tokenizer  # pylint: disable=g-import-not-at-top
    if not config.decoder_only:
      raise DataError(
          f"`tokenizer`={config.tokenizer} is a folder, a Hugging Face "
          "decoder-only model's tokenizer, but the model is a T5: pass its "
          "spiece.model file as `tokenizer`.")
    try:
      tok = hf_tokenizer.HFTokenizer.load(config.tokenizer)
    except (OSError, ValueError) as e:
      raise DataError(f"`tokenizer`: {e}") from None
    return tok, tok.fingerprint()
  if config.tokenizer:
    try:
      tok = Tokenizer.load(config.tokenizer)
    except (OSError, ValueError) as e:
      raise DataError(f"`tokenizer`: {e}") from None
  else:
    path = os.path.join(workdir, TOKENIZER)
    if os.path.isfile(path):
      check_tokenizer_digest(workdir)
      try:
        tok = Tokenizer.load(path)
      except ValueError as e:
        raise DataError(f"{e} It was trained by an earlier run in `workdir`="
                        f"{workdir}: delete it to train a new one, or pass "
                        "`tokenizer`.") from None
    else:
      try:
        tok = train_sentencepiece(texts, config.tokenizer_vocab_size, None)
      except ValueError as e:
        raise DataError(
            "cannot train a tokenizer with `tokenizer_vocab_size`="
            f"{config.tokenizer_vocab_size}: {e} Pass `tokenizer`="
            "<spiece.model> instead.") from None
  tok.message_separator = config.message_separator
  fingerprint = pipeline.fingerprint(
      {"model": np.frombuffer(tok.serialized_model(), np.uint8)})
  return (DecoderOnlyTokenizer(tok) if config.decoder_only else tok,
          fingerprint)


def check_tokenizer_digest(workdir: str) -> None:
  """Checks the workdir's spiece.model against spiece.model.sha256.

  Raises:
    DataError: the digest file is missing or not one `sha256sum` line, or
      the model's SHA-256 differs from it (the file was altered or
      truncated since the run that trained it saved it).
  """
  path = os.path.join(workdir, TOKENIZER)
  digest_path = path + ".sha256"
  record = f"`sha256sum {TOKENIZER} > {TOKENIZER}.sha256` in {workdir}"
  try:
    with open(digest_path, encoding="ascii") as f:
      line = f.read()
  except FileNotFoundError:
    raise DataError(
        f"{path} has no recorded SHA-256 ({digest_path} is missing: an older "
        "version saved it, or it was copied in), so it cannot be checked. If "
        "it is the tokenizer this workdir was trained with, record it with "
        f"{record}; otherwise pass `tokenizer` or use a new `workdir`."
    ) from None
  except (OSError, ValueError):      # unreadable, or not ASCII
    line = ""
  recorded = line.split()[0] if line.split() else ""
  if len(recorded) != 64 or set(recorded) - set("0123456789abcdef"):
    raise DataError(
        f"{digest_path} is not a SHA-256 line (`<64 hex digits>  {TOKENIZER}`,"
        f" as sha256sum writes): restore it, or, if {path} is the tokenizer "
        f"this workdir was trained with, rewrite it with {record}.")
  with open(path, "rb") as f:
    actual = hashlib.sha256(f.read()).hexdigest()
  if actual != recorded:
    raise DataError(
        f"{path} was altered or truncated since the run that trained it "
        f"saved it: its SHA-256 is {actual[:16]}..., {digest_path} records "
        f"{recorded[:16]}.... Restore the original file (the checkpoints "
        "and caches in this workdir were made with it), or use a new "
        "`workdir`.")


def check_lengths(rows: list, tokenizer: pipeline.Tokenizer,
                  config: DataConfig) -> list:
  """Applies config.long_rows to the rows with texts over the limits."""
  long = pipeline.long_texts(rows, tokenizer, config.max_input_length,
                             config.max_target_length)
  if not long:
    return rows
  index, field, length, limit = long[0]
  flag = "`max_input_length`" if field == "prompt" else "`max_target_length`"
  eos = " (EOS included)" if isinstance(tokenizer, Tokenizer) else ""
  first = (f"{rows[index].source}: the {field} has {length} tokens{eos}, "
           f"more than {flag}={limit}")
  bad = {i for i, *_ in long}
  if config.long_rows == "error":
    raise DataError(
        f"{first} ({len(bad)} of {len(rows)} rows are too long; "
        "`long_rows`=error). Raise the length flags, shorten or remove those "
        "rows, or pass `long_rows`=truncate (cut the texts, EOS kept last) "
        "or `long_rows`=skip (drop the rows).")
  if config.long_rows == "truncate":
    logging.warning("truncating %d of %d rows longer than `max_input_length` "
                    "or `max_target_length` (first: %s); `long_rows`=skip "
                    "drops them, `long_rows`=error stops.", len(bad),
                    len(rows), first)
    return rows
  kept = [row for i, row in enumerate(rows) if i not in bad]
  if not kept:
    raise DataError(f"`long_rows`=skip dropped all {len(rows)} rows (first: "
                    f"{first}). Raise `max_input_length` and "
                    "`max_target_length`, or pass `long_rows`=truncate.")
  logging.warning("skipping %d of %d rows longer than `max_input_length` or "
                  "`max_target_length` (`long_rows`=skip; first: %s).",
                  len(bad), len(rows), first)
  return kept


def reward_stats(workdir: str, rewards: list[float],
                 path: str) -> tuple[RewardStats, RewardStats | None]:
  """(statistics to normalise with, the same if fitted here and unsaved).

  The workdir's reward_stats.json is reused only when it is intact and was
  fitted on exactly these rewards: its recorded fingerprint matches them and
  its mean, std and count are theirs. Otherwise the run stops: a file fitted
  on other data means the workdir belongs to another run; an unreadable,
  edited or unfingerprinted (older) file is not trusted, and deleting it
  fits the statistics again.

  Raises:
    DataError: the file is unreadable, invalid, unfingerprinted, edited or
      fitted on other rewards; the message names it and what to do.
  """
  stats_path = os.path.join(workdir, "reward_stats.json")
  fitted = RewardStats.fit(rewards, path)
  if not os.path.isfile(stats_path):
    return fitted, fitted
  delete = (f"It was written by an earlier run in `workdir`={workdir}: "
            f"delete it to fit the statistics again on {path}, or use a new "
            "`workdir`.")
  stats = RewardStats.load(stats_path, remedy=delete)
  match = stats.fitted_on(rewards)
  if match is None:
    raise DataError(f"{stats_path} records no fingerprint of the rewards it "
                    f"was fitted on (an older version wrote it), so it "
                    f"cannot be checked against {path}. {delete}")
  if match is False:
    raise DataError(
        f"{stats_path} holds the reward statistics of other data "
        f"({stats.count} rewards; {path} now gives {len(rewards)}), so this "
        "workdir was trained on different rewards. Rerun with the "
        "`train_data` and reward flags of the run that wrote it, or use a "
        "new `workdir`.")
  if stats.count != fitted.count or not np.allclose(
      [stats.mean, stats.std], [fitted.mean, fitted.std], rtol=1e-9,
      atol=0.0):
    raise DataError(
        f"{stats_path} was edited: it records the fingerprint of the rewards "
        f"of {path} but mean {stats.mean}, std {stats.std}, count "
        f"{stats.count}, where they give {fitted.mean}, {fitted.std}, "
        f"{fitted.count}. {delete}")
  return stats, None


def fingerprints(arrays: dict[str, np.ndarray], tokenizer_fingerprint: str,
                 config: DataConfig, algo: str) -> dict:
  """What shapes a run's training: its data, tokenizer and data settings.

  Returns:
    {"data": a digest of the tokenised rows in order (prompts, completions,
    normalised rewards, KTO's mismatched pairs: pipeline.fingerprint),
    "rows": their number, "tokenizer": a digest of the SentencePiece
    model, "settings": the DataConfig fields that shape the rows (lengths,
    format, fields, truncation) and the algorithm's data layout}.
  """
  settings = {field.name: getattr(config, field.name)
              for field in dataclasses.fields(config)
              if field.name not in _UNSHAPING_FIELDS}
  if not config.decoder_only:       # as recorded before the field existed
    del settings["decoder_only"]
  settings["layout"] = ("pairwise" if algo in PAIRWISE_ALGORITHMS else
                        "kto" if algo == "kto" else "single")
  return {"data": pipeline.fingerprint(arrays),
          "rows": int(len(arrays["inputs"])),
          "tokenizer": tokenizer_fingerprint, "settings": settings}


def check_fingerprints(workdir: str, found: dict) -> None:
  """Checks `found` against the workdir's recorded fingerprints, if any.

  Raises:
    DataError: the record is unreadable, or the data, the tokenizer or the
      settings differ from it; the message names what changed and the two
      ways forward.
  """
  path = os.path.join(workdir, FINGERPRINT)
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
    changed = [part for part in ("settings", "tokenizer", "data")
               if recorded[part] != found[part]]
  except FileNotFoundError:
    return
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(
        f"{path} cannot be read ({e}): it records the data this workdir "
        "was trained on. Restore it from a copy, or train in a new workdir."
    ) from None
  if not changed:
    return
  details = []
  if "settings" in changed:
    names = sorted(name for name in recorded["settings"].keys()
                   | found["settings"].keys()
                   if recorded["settings"].get(name)
                   != found["settings"].get(name))
    details.append("settings " + ", ".join(
        f"{name} {recorded['settings'].get(name)!r} -> "
        f"{found['settings'].get(name)!r}" for name in names))
  if "tokenizer" in changed:
    details.append("the tokenizer (another SentencePiece model or "
                   "tokenizer files)")
  if changed == ["data"]:
    details.append(f"the tokenised rows ({recorded.get('rows')} rows "
                   f"recorded, {found['rows']} now; a prompt, completion, "
                   "reward or their order differs)")
  raise DataError(
      f"{workdir} was trained on other data: {'; '.join(details)} "
      f"(recorded in {path}). Resuming would mix two datasets in one run. "
      "Restore the original data and settings and rerun, or train in a new "
      "workdir.")


def load_dataset(workdir: str, config: DataConfig, algo: str,
                 seed: int) -> Dataset:
  """Reads, checks, normalises and tokenises the training data.

  Args:
    workdir: the run's folder (demo data, tokenizer, reward statistics).
    config: the data configuration.
    algo: the algorithm (training.config.ALGORITHMS): pairwise ones read pairs, KTO
      also gets each prompt's mismatched completion.
    seed: the run's seed (demo data, KTO's mismatched pairing).

  Returns:
    The Dataset; a tokenizer trained here and the reward statistics are
    unsaved (see save_inputs).

  Raises:
    DataError: a bad input, or data other than the workdir was trained on;
      the message says where and what to do.
  """
  dataset = _tokenised(workdir, config, algo, seed)
  dataset.fingerprints = fingerprints(
      dataset.arrays, dataset.tokenizer_fingerprint, config, algo)
  check_fingerprints(workdir, dataset.fingerprints)
  return dataset


def _tokenised(workdir: str, config: DataConfig, algo: str,
               seed: int) -> Dataset:
  """load_dataset's data, before its fingerprints."""
  pairwise = algo in PAIRWISE_ALGORITHMS
  if config.train_data and pairwise != (config.data_format == "pairwise"):
    needs = ("`data_format`=pairwise" if pairwise else "single-trajectory "
             "data (`data_format`=triplets, unpaired or ultrafeedback)")
    raise DataError(f"`algo`={algo} needs {needs}, got `data_format`="
                    f"{config.data_format}.")
  path = config.train_data or demo_data(workdir, config, pairwise, seed)
  data_format = config.data_format if config.train_data else (
      "pairwise" if pairwise else "triplets")
  rows = formats.read_dataset(path, data_format,
                              **config.reader_kwargs(data_format))
  # The texts a tokenizer trained here learns from: T5's text of each.
  separator = config.message_separator
  if pairwise:
    texts = [t for r in rows for t in (
        as_text(r.prompt, separator),
        as_text(r.chosen, separator, completion=True),
        as_text(r.rejected, separator, completion=True))]
  else:
    texts = [t for r in rows for t in (
        as_text(r.prompt, separator),
        as_text(r.completion, separator, completion=True))]
  tok, tok_fingerprint = choose_tokenizer(workdir, config, texts)
  rows = check_lengths(rows, tok, config)
  if pairwise:
    arrays = pipeline.tokenize_pairs(rows, tok, config.max_input_length,
                                     config.max_target_length)
    return Dataset(arrays, tok, tok_fingerprint)
  stats, unsaved = reward_stats(workdir, [r.reward for r in rows], path)
  arrays = pipeline.tokenize_triplets(rows, tok, config.max_input_length,
                                      config.max_target_length, stats)
  if algo == "kto":
    # Each prompt's mismatched completion for the KL reference point: a
    # fixed derangement of the data (HALOs rotates within each batch).
    order = np.random.default_rng([seed, 1]).permutation(
        len(arrays["targets"]))
    partner = np.empty_like(order)
    partner[order] = np.roll(order, -1)
    arrays["mismatched_targets"] = arrays["targets"][partner]
    arrays["mismatched_mask"] = arrays["target_mask"][partner]
  return Dataset(arrays, tok, tok_fingerprint, unsaved)


def save_inputs(workdir: str, dataset: Dataset) -> None:
  """Saves in `workdir` what the run made of its inputs and it lacks.

  That is a tokenizer trained here, the reward statistics and the data's
  fingerprints.

  The tokenizer goes to spiece.model with its SHA-256 in
  spiece.model.sha256, the fingerprints to data_fingerprint.json.

  Call it once every input has been checked (and in one process of a
  multi-process run).
  """
  if (isinstance(dataset.tokenizer, (Tokenizer, DecoderOnlyTokenizer))
      and dataset.tokenizer.path is None):
    # The digest first: a run stopped between the two writes leaves a digest
    # without a model, and the next run trains and saves both again.
    model = dataset.tokenizer.serialized_model()
    fileio.atomic_write_bytes(
        os.path.join(workdir, TOKENIZER + ".sha256"),
        f"{hashlib.sha256(model).hexdigest()}  {TOKENIZER}\n".encode())
    dataset.tokenizer.save(os.path.join(workdir, TOKENIZER))
  if dataset.reward_stats is not None:
    dataset.reward_stats.save(os.path.join(workdir, "reward_stats.json"))
    dataset.reward_stats = None
  record = os.path.join(workdir, FINGERPRINT)
  if dataset.fingerprints is not None and not os.path.isfile(record):
    fileio.atomic_write_json(record, dataset.fingerprints)
