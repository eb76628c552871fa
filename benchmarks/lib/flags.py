"""Flags shared by the benchmark scripts, defined once.

A script imports this module, adds its own flags, and may change a shared
flag's default with `set_defaults` before `app.run`. The step flags (size,
batch, lengths, dtype, layers, platform) describe one train step as
`benchmarks.lib.step` builds it; list flags take comma-separated values.
"""

from __future__ import annotations

from absl import app
from absl import flags

from dro_fast import kernels
from dro_fast import runtime

SIZES = ("tiny", "small", "base", "large", "xl", "xxl")
PLATFORMS = ("auto", "cpu", "gpu", "tpu")

SIZE = flags.DEFINE_list("size", ["tiny"],
                         f"T5 v1.1 / FLAN-T5 size(s), of {SIZES}.")
BATCH = flags.DEFINE_list("batch_size", ["32"], "Examples per step.")
INPUT_LENGTH = flags.DEFINE_integer("input_length", 512, "Prompt tokens S.")
TARGET_LENGTH = flags.DEFINE_list("target_length", ["128"],
                                  "Completion tokens T.")
DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                          "Compute dtype (parameters and optimizer states "
                          "stay float32).")
SCAN = flags.DEFINE_bool("scan_layers", True, "Scan over layers (on a CPU "
                         "unrolled layers are faster: "
                         "benchmarks/RESULTS.md#train-step-on-the-cpu-"
                         "against-pytorch).")
PLATFORM = flags.DEFINE_enum(
    "platform", "auto", list(PLATFORMS),
    "The platform whose program is built (dro_fast.backend.resolve; auto: "
    "the one JAX compiles for). With --memory_only on a CPU, gpu plans the "
    "program a GPU runs (XLA:CPU's fusion and buffer reuse still differ "
    "from XLA:GPU's).")
IMPLEMENTATION = flags.DEFINE_list(
    "implementation", ["default"], "Log-prob kernel implementation(s) "
    "(default: by backend; xla materialises the logits, the others do not).")
STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed round.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (after 2 "
                               "warm-up calls per variant).")
HOST_MEMORY = flags.DEFINE_enum(
    "host_memory", "auto", ["auto", "keep", "system"],
    "keep: glibc keeps freed host memory for reuse (dro_fast.runtime; "
    "process-wide); system: glibc's defaults; auto: keep where JAX runs on "
    "the CPU alone, as `python -m dro_fast.train` does "
    "(benchmarks/RESULTS.md#host-memory).")
JSON_OUT = flags.DEFINE_string("json_out", None, "Append JSON lines here.")
LORA_RANK = flags.DEFINE_integer(
    "lora_rank", 0, "LoRA adapters of this rank on the frozen policy, as "
    "the trainer's --lora_rank (alpha 2 x rank); 0: full fine-tuning.",
    lower_bound=0)
LORA_TARGETS = flags.DEFINE_list(
    "lora_targets", ["attention", "mlp"], "The trainer's --lora_targets.")
LORA_BASE_DTYPE = flags.DEFINE_enum(
    "lora_base_dtype", "bfloat16", ["bfloat16", "float32"],
    "The trainer's --lora_base_dtype. XLA:CPU converts a bfloat16 base to "
    "float32 whole (hoisted out of the layer loop), so its CPU plans hold a "
    "float32 copy that a GPU or TPU program does not.")


def with_lora(config):
  """`config` with --lora_rank's adapters (unchanged at rank 0).

  Alpha is 2 x rank; targets and base dtype are --lora_targets' and
  --lora_base_dtype's.
  """
  if not LORA_RANK.value:
    return config
  from dro_fast import models  # pylint: disable=g-import-not-at-top
  try:
    return config.replace(lora=models.LoraConfig(
        rank=LORA_RANK.value, alpha=2.0 * LORA_RANK.value,
        targets=tuple(LORA_TARGETS.value),
        base_dtype=LORA_BASE_DTYPE.value))
  except ValueError as e:
    raise app.UsageError(f"--lora_targets: {e}") from None


def program_platform() -> str:
  """--platform, with auto as the platform JAX compiles for."""
  if PLATFORM.value == "auto":
    return kernels.target_platform()
  return PLATFORM.value


def set_defaults(**defaults) -> None:
  """Changes shared flags' defaults (a script's own, before app.run)."""
  for name, value in defaults.items():
    flags.FLAGS.set_default(name, value)


def positive_ints(name: str, values: list[str]) -> list[int]:
  """The values of list flag --name as positive integers, or a usage error."""
  if not values or not all(v.isdigit() and int(v) > 0 for v in values):
    raise app.UsageError(f"--{name} takes positive integers, got {values}.")
  return [int(v) for v in values]


def known_values(name: str, values: list[str], known) -> list[str]:
  """Returns --name's values if each is one of `known`, else a usage error."""
  unknown = [v for v in values if v not in known]
  if unknown or not values:
    raise app.UsageError(f"--{name}: unknown {unknown}; choose from "
                         f"{list(known)}.")
  return values


def check_sizes() -> None:
  known_values("size", SIZE.value, SIZES)


def apply_host_memory() -> str:
  """Applies --host_memory before the first JAX computation; returns it.

  The setting in force is named as dro_fast.runtime names it, or "system".
  Also keeps an installed libtpu without a TPU from probing
  (runtime.hide_absent_tpu).
  """
  runtime.hide_absent_tpu()
  keep = HOST_MEMORY.value == "keep" or (HOST_MEMORY.value == "auto"
                                         and runtime.cpu_only_jax())
  return runtime.keep_freed_host_memory() if keep else "system"
