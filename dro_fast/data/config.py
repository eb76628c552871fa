"""DataConfig: what a run trains on and how it is tokenised (frozen).

Field names are the trainer's flag names (python -m dro_fast.train), and
validation errors name a field as that flag (`--max_input_length`), the way
users meet them.
"""

from __future__ import annotations

import dataclasses
import math

# The layouts of training data (data.formats reads each).
DATA_FORMATS = ("triplets", "unpaired", "ultrafeedback", "pairwise")
ULTRAFEEDBACK_ASPECTS = ("instruction_following", "honesty", "truthfulness",
                         "helpfulness")
# UltraFeedback's rewards (data.ultrafeedback computes each).
ULTRAFEEDBACK_REWARDS = (("mean_rating", "overall_score", "binary")
                         + ULTRAFEEDBACK_ASPECTS)
LONG_ROWS = ("truncate", "skip", "error")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The training data, its reader and its tokenisation.

  Attributes:
    train_data: JSON Lines or Parquet data: a file, a folder of shards, a
      glob or a comma-separated list, read in sorted order
      (data.files.data_files); None: the demo's synthetic task
      (dro_fast.data.synthetic), written to the workdir.
    data_format: one of data.DATA_FORMATS: "triplets", "unpaired",
      "ultrafeedback" or "pairwise" (the layout of train_data; the demo
      picks by algorithm).
    prompt_field: prompt field (triplets, unpaired, pairwise).
    completion_field: completion field (triplets, unpaired).
    reward_field: reward field (triplets).
    label_field: boolean thumbs-up/down field (unpaired).
    message_separator: T5 only (a decoder renders its chat template): joins
      the "<role>: <content>" lines of a conversational prompt (triplets,
      unpaired, pairwise).
    chosen_field: preferred completion field (pairwise).
    rejected_field: dispreferred completion field (pairwise).
    ultrafeedback_reward: one of data.ULTRAFEEDBACK_REWARDS.
    binary_threshold: mean rating at or above which a completion is a
      thumbs-up, for ultrafeedback_reward "binary" only.
    skip_bad_rows: drop malformed rows (counted per reason) instead of
      stopping at the first.
    max_input_length: prompt tokens kept, EOS included; >= 2.
    max_target_length: completion tokens kept, EOS included; >= 2.
    long_rows: rows over a limit: "truncate" (EOS kept last), "skip" or
      "error".
    tokenizer: a SentencePiece model; None: the workdir's, or one trained
      on the data and saved there.
    tokenizer_vocab_size: vocabulary of a tokenizer trained here; >= 4.
    demo_examples: examples of the synthetic task; >= 1.
    length_buckets: 0: every batch is padded to the maximum lengths; b > 0:
      each batch's prompt and completion axes are cut to the smallest of
      b, 2b, 4b, ... (capped at the maximum) holding its longest row
      (pipeline.bucket_length), so short batches cost less while few
      distinct shapes are compiled; >= 0.
    decoder_only: the rows are for a decoder-only model, which reads prompt
      and completion as one sequence: prompts without EOS, the last tokens
      kept; completions with EOS; padding -1 (dro_fast.hf_tokenizer's
      layout). Set by the trainer from the model; a Hugging Face tokenizer
      folder is always read so.
  """

  train_data: str | None = None
  data_format: str = "triplets"
  prompt_field: str = "prompt"
  completion_field: str = "completion"
  reward_field: str = "reward"
  label_field: str = "label"
  message_separator: str = "\n"
  chosen_field: str = "chosen"
  rejected_field: str = "rejected"
  ultrafeedback_reward: str = "mean_rating"
  binary_threshold: float | None = None
  skip_bad_rows: bool = False
  max_input_length: int = 64
  max_target_length: int = 32
  long_rows: str = "truncate"
  tokenizer: str | None = None
  tokenizer_vocab_size: int = 256
  demo_examples: int = 2048
  length_buckets: int = 0
  decoder_only: bool = False

  def __post_init__(self):
    for name, choices in (("data_format", DATA_FORMATS),
                          ("ultrafeedback_reward", ULTRAFEEDBACK_REWARDS),
                          ("long_rows", LONG_ROWS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"`{name}`={getattr(self, name)} is not one of "
                         f"{', '.join(choices)}.")
    for name, least in (("max_input_length", 2), ("max_target_length", 2),
                        ("demo_examples", 1), ("length_buckets", 0)):
      if getattr(self, name) < least:
        raise ValueError(f"`{name}` must be >= {least}, got "
                         f"{getattr(self, name)}.")
    if not self.tokenizer and self.tokenizer_vocab_size < 4:
      raise ValueError("`tokenizer_vocab_size` must be >= 4 (pad, eos, unk "
                       f"and one character), got {self.tokenizer_vocab_size}.")
    binary = self.ultrafeedback_reward == "binary"
    if self.binary_threshold is not None and not binary:
      raise ValueError(
          "`binary_threshold` applies only to `ultrafeedback_reward`=binary, "
          f"not `ultrafeedback_reward`={self.ultrafeedback_reward}: drop "
          "`binary_threshold` or set `ultrafeedback_reward`=binary.")
    if binary and self.data_format == "ultrafeedback":
      if self.binary_threshold is None:
        raise ValueError(
            "`ultrafeedback_reward`=binary needs `binary_threshold`=<mean "
            "rating>: completions whose mean aspect rating is at or above it "
            "get reward 1, the others 0 (ratings run from 1 to 5).")
      if not math.isfinite(self.binary_threshold):
        raise ValueError("`binary_threshold` must be a finite number, got "
                         f"{self.binary_threshold}.")

  @property
  def synthetic_task(self) -> bool:
    """Whether the run trains on the demo's synthetic task."""
    return not self.train_data

  def reader_kwargs(self, data_format: str) -> dict:
    """Keyword arguments of data.read_dataset for `data_format`."""
    kwargs = {"skip_bad_rows": self.skip_bad_rows}
    if data_format == "ultrafeedback":
      kwargs.update(reward=self.ultrafeedback_reward,
                    threshold=self.binary_threshold)
      return kwargs
    kwargs.update(prompt_field=self.prompt_field)
    if data_format == "triplets":
      kwargs.update(completion_field=self.completion_field,
                    reward_field=self.reward_field)
    elif data_format == "unpaired":
      kwargs.update(completion_field=self.completion_field,
                    label_field=self.label_field)
    else:
      kwargs.update(chosen_field=self.chosen_field,
                    rejected_field=self.rejected_field)
    return kwargs

  def replace(self, **changes) -> DataConfig:
    return dataclasses.replace(self, **changes)
