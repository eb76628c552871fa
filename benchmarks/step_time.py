r"""Train-step throughput of DRO-V (and baselines) against the paper.

  python -m benchmarks.step_time --size=large --batch_size=32 \
      --input_length=512 --target_length=128 [--json_out=PATH]
  make bench-step-cpu        # JAX against PyTorch (torch_step.py) on a CPU
  python -m benchmarks.step_time --decoder=tiny_decoder \
      --decoder_fields=num_layers=4,hidden_size=512 --compare_torch ...
  python -m benchmarks.step_time --size=large,xl --remat=dots,full \
      --attention=xla,cudnn --memory_only --platform=gpu   # GPU plans, no GPU

Builds the trainer's step (benchmarks/lib/step.py), times it on random
tokens and prints compile time, steps/s, examples/s, XLA's planned memory,
MFU and the ratio to the paper's per-chip throughput (lib/flops.py). List
flags give points (size x batch x target length) and, at each point,
variants (implementation x remat x attention, plus PyTorch with
--compare_torch), compiled first and then timed interleaved
(lib/timing.py). A variant that runs out of memory is recorded with its
error, the others are still timed, and the script exits 1 naming it.
The model is --size's T5 (FLAN-T5 / T5 v1.1 presets), or, with --decoder, a
decoder-only LLM: a models.DECODER_PRESETS name (then --size is not read),
its DecoderConfig fields changed by --decoder_fields FIELD=VALUE items
(e.g. num_layers=4,hidden_size=512,vocab_size=4096; the backend fields
dtype, remat, scan_layers, attention and matmul come from their flags and
dro_fast.backend.resolve). Its batches are bench_step.random_batch's in
the decoder-only layout; its PyTorch step (--compare_torch) is
torch_step.DecoderDroVStep on transformers' model of that config. Records
name the preset in "size" and the changes in "decoder_fields".
Without a GPU, --memory_only plans --attention=cudnn with
benchmarks/cudnn_stand_in.py ("attention_stand_in": true in the record).
Claims: benchmarks/RESULTS.md#train-step-on-the-h100,
#train-step-on-the-cpu-against-pytorch, #memory-plans-at-t5-l-and-t5-xl.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import cudnn_stand_in
from benchmarks.lib import flags as shared
from benchmarks.lib import records
from benchmarks.lib import step as bench_step
from benchmarks.lib import timing
from dro_fast import kernels
from dro_fast import models
from dro_fast import runtime
from dro_fast.models.config import REMAT_POLICIES
from dro_fast.training import flops
from dro_fast.training import steps

_ALGO = flags.DEFINE_enum("algo", "dro_v", ["dro_v", "kto", "sft"],
                          "Algorithm whose step is timed.")
_REMAT = flags.DEFINE_list("remat", ["dots"], "Rematerialisation "
                           f"policy or policies, of {REMAT_POLICIES}.")
_ATTENTION = flags.DEFINE_list(
    "attention", ["xla"], "Attention implementation(s): xla (materialised "
    "[B, H, q, k] logits) or cudnn (cuDNN's fused attention; CUDA GPU, "
    "bfloat16, even lengths).")
_COMPARE_TORCH = flags.DEFINE_bool(
    "compare_torch", False, "Also time the PyTorch DRO-V step "
    "(benchmarks/torch_step.py), interleaved, in float32 or under "
    "torch.autocast to bfloat16.")
_TORCH_HOST_MEMORY = flags.DEFINE_list(
    "torch_host_memory", ["same"],
    "With --compare_torch, the PyTorch step(s): same (in this process, "
    "under --host_memory), keep / system (each in a child process under "
    "that setting). Speed-ups are against each; the first is the headline.")
_DECODER = flags.DEFINE_string(
    "decoder", None, "Time this decoder-only LLM instead of --size's T5s: a "
    f"models.DECODER_PRESETS name, of {sorted(models.DECODER_PRESETS)}.")
_DECODER_FIELDS = flags.DEFINE_list(
    "decoder_fields", [], "With --decoder: DecoderConfig fields changed from "
    "the preset, as FIELD=VALUE items (e.g. num_layers=4,hidden_size=512).")
_VALUE_NET = flags.DEFINE_enum(
    "value_net", "separate", ["separate", "shared"], "DRO-V's value "
    "network: its own (the policy's shape, or --value_decoder's) or a head "
    "on the policy's trunk.")
_VALUE_DECODER = flags.DEFINE_string(
    "value_decoder", None, "With --decoder and --value_net=separate: the "
    "value network's own preset (RunConfig.value_model, e.g. llama-3.2-1b "
    "valuing llama-3.1-8b); unset: the policy's shape.")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Only XLA's memory "
                                 "plan, compiled from shapes alone.")
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", None, "Device peak FLOP/s.")
TORCH = "torch"
# DecoderConfig fields that other flags (or backend.resolve) decide.
_FLAG_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention",
                "attention_interpret", "matmul")


def _stand_in() -> bool:
  """Whether --attention=cudnn is planned with the cuDNN memory stand-in."""
  return _MEMORY_ONLY.value and kernels.target_platform() != "gpu"


def _parse_field(text: str, current: Any) -> Any:
  """A --decoder_fields value, typed as the preset's value of the field."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise ValueError("expected true or false")
    return text.lower() == "true"
  if isinstance(current, (int, float, str)):
    return type(current)(text)
  if current is None:
    if text.lower() == "none":
      return None
    for kind in (int, float):
      try:
        return kind(text)
      except ValueError:
        pass
    return text
  raise ValueError(f"a {type(current).__name__} field cannot be set here")


def decoder_changes() -> dict[str, Any]:
  """--decoder_fields as DecoderConfig.replace's keyword arguments."""
  base = models.DECODER_PRESETS[_DECODER.value]
  known = [f.name for f in dataclasses.fields(models.DecoderConfig)
           if f.name not in _FLAG_FIELDS]
  changes = {}
  for item in _DECODER_FIELDS.value:
    name, sep, text = item.partition("=")
    if name in _FLAG_FIELDS:
      raise app.UsageError(f"--decoder_fields: {name} is set by its own flag "
                           "(--dtype, --remat, --scan_layers, --attention) "
                           "or by dro_fast.backend.resolve.")
    if not sep or name not in known:
      raise app.UsageError(f"--decoder_fields: {item!r} is not FIELD=VALUE "
                           f"of a DecoderConfig field; fields: {known}.")
    try:
      changes[name] = _parse_field(text, getattr(base, name))
    except ValueError as error:
      raise app.UsageError(f"--decoder_fields: {item!r}: {error}.") from None
  return changes


def model_names() -> list[str]:
  """The models timed: --decoder's preset, or --size's T5 sizes."""
  return [_DECODER.value] if _DECODER.value else list(shared.SIZE.value)


def decoder_config_for(remat: str, attention: str, platform: str | None = None
                       ) -> models.DecoderConfig:
  """--decoder's config with --decoder_fields, computing as the CLIs do."""
  platform = platform or shared.program_platform()
  return shared.with_lora(models.decoder_preset(
      _DECODER.value, **decoder_changes(),
      dtype=runtime.compute_dtype(shared.DTYPE.value, platform), remat=remat,
      scan_layers=shared.SCAN.value, attention=attention))


def value_config_for(config) -> models.DecoderConfig | None:
  """--value_decoder's config beside `config` (None: the policy's shape)."""
  if not _VALUE_DECODER.value:
    return None
  return models.decoder_preset(
      _VALUE_DECODER.value, dtype=config.dtype, remat=config.remat,
      scan_layers=config.scan_layers, attention=config.attention)


def config_for(size: str, remat: str, attention: str):
  """The model of `size` (or --decoder's) under remat and attention."""
  if _DECODER.value:
    return decoder_config_for(remat, attention)
  stand_in = attention == "cudnn" and _stand_in()
  return shared.with_lora(bench_step.config_for(
      size, shared.DTYPE.value, remat=remat, scan_layers=shared.SCAN.value,
      attention=cudnn_stand_in.IMPLEMENTATION if stand_in else attention,
      platform=shared.program_platform()))


def check_flags() -> None:
  """Raises app.UsageError for flag values this script cannot run."""
  if _DECODER.value:
    if _DECODER.value not in models.DECODER_PRESETS:
      raise app.UsageError(f"--decoder: unknown {_DECODER.value!r}; choose "
                           f"from {sorted(models.DECODER_PRESETS)}.")
    try:
      decoder_config_for("none", "xla")
    except ValueError as error:
      raise app.UsageError(f"--decoder_fields: {error}") from error
    if "cudnn" in _ATTENTION.value and _stand_in():
      raise app.UsageError("--decoder: --attention=cudnn is planned only on "
                           "a GPU (the memory stand-in is T5's).")
  elif _DECODER_FIELDS.value:
    raise app.UsageError("--decoder_fields needs --decoder.")
  else:
    shared.check_sizes()
  shared.known_values("remat", _REMAT.value, REMAT_POLICIES)
  shared.known_values("attention", _ATTENTION.value, ("xla", "cudnn"))
  shared.known_values("implementation", shared.IMPLEMENTATION.value,
                      ["default", *kernels.IMPLEMENTATIONS])
  lengths = shared.positive_ints("target_length", shared.TARGET_LENGTH.value)
  shared.positive_ints("batch_size", shared.BATCH.value)
  if "cudnn" in _ATTENTION.value:
    if kernels.target_platform() != "gpu" and not _MEMORY_ONLY.value:
      raise app.UsageError(
          "--attention=cudnn runs cuDNN's fused attention: it needs a CUDA "
          f"GPU (JAX's platform here is {kernels.target_platform()!r}); "
          "without one, --memory_only --platform=gpu plans its memory.")
    odd = [n for n in [shared.INPUT_LENGTH.value, *lengths] if n % 2]
    if odd:
      raise app.UsageError(f"--attention=cudnn: cuDNN's attention with T5's "
                           f"bias refuses odd lengths; got {odd}.")
    if _stand_in() and shared.PLATFORM.value != "gpu":
      raise app.UsageError("--attention=cudnn plans the GPU's program: pass "
                           "--platform=gpu with --memory_only.")
    try:                      # the config holds cuDNN's other constraints
      if _DECODER.value:
        decoder_config_for("none", "xla", "gpu").replace(attention="cudnn")
      else:
        bench_step.config_for(shared.SIZE.value[0], shared.DTYPE.value,
                              attention="cudnn", platform="gpu")
    except ValueError as error:
      raise app.UsageError(f"--attention=cudnn: {error}") from error
  if _COMPARE_TORCH.value and (_MEMORY_ONLY.value or _ALGO.value != "dro_v"
                              or _VALUE_NET.value != "separate"
                              or _VALUE_DECODER.value
                              or shared.LORA_RANK.value):
    raise app.UsageError("--compare_torch times the PyTorch DRO-V step: it "
                         "needs --algo=dro_v with --value_net=separate of the "
                         "policy's shape, no --lora_rank and no "
                         "--memory_only.")
  if _VALUE_DECODER.value and (not _DECODER.value
                               or _VALUE_NET.value != "separate"
                               or _VALUE_DECODER.value
                               not in models.DECODER_PRESETS):
    raise app.UsageError("--value_decoder: a decoder preset (of "
                         f"{sorted(models.DECODER_PRESETS)}) for the separate "
                         "value network of a --decoder policy.")
  modes = _TORCH_HOST_MEMORY.value
  if (not modes or len(set(modes)) != len(modes)
      or not set(modes) <= {"same", "keep", "system"}):
    raise app.UsageError(f"--torch_host_memory: got {modes}; give each of "
                         "same, keep, system at most once.")


def build_jax_step(config, implementation: str,
                   batches) -> bench_step.JaxStep | str:
  """A compiled step that has run once, or why it cannot run.

  Out of memory (XLA's RESOURCE_EXHAUSTED, at compile time or at the first
  step) is a finding, returned as the variant's error; so is cuDNN refusing
  its attention on a GPU (RuntimeError, ValueError, NotImplementedError:
  it depends on the machine's cuDNN, GPU and shapes). Anything else, the
  stand-in's errors included, propagates.
  """
  algorithm = steps.AlgorithmConfig(
      algo=_ALGO.value, value_net=_VALUE_NET.value,
      implementation=None if implementation == "default" else implementation)
  try:
    step = bench_step.JaxStep(config, algorithm, batches,
                              abstract=_MEMORY_ONLY.value,
                              platform=shared.program_platform(),
                              value_config=value_config_for(config))
    if not _MEMORY_ONLY.value:
      step()                 # allocation fails here, not in a timed round
    return step
  except (RuntimeError, ValueError, NotImplementedError) as error:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    if (isinstance(error, jax.errors.JaxRuntimeError)
        and "RESOURCE_EXHAUSTED" in str(error)):
      return f"out of memory: {first_line}"
    if config.attention == "cudnn":
      return (f"attention=cudnn variant failed: {type(error).__name__}: "
              f"{first_line}")
    raise


def measure_point(size: str, b: int, t: int, host_memory: str
                  ) -> list[dict[str, Any]]:
  """One record per variant at one (size, batch, target length).

  The variants are timed interleaved unless --memory_only. A JAX variant is
  named by its implementation, then "/remat" and "/attention" where several
  are.
  """
  s = shared.INPUT_LENGTH.value
  config = config_for(size, "none", "xla")      # remat changes no shape
  rng = np.random.default_rng(0)
  batches = [bench_step.random_batch(config, b, s, t, rng) for _ in range(2)]
  variants, settings, failed = {}, {}, {}
  for name, remat, attention in itertools.product(
      shared.IMPLEMENTATION.value, _REMAT.value, _ATTENTION.value):
    variant = "/".join([name] + [remat] * (len(_REMAT.value) > 1)
                       + [attention] * (len(_ATTENTION.value) > 1))
    settings[variant] = (name, remat, attention, "jax")
    step = build_jax_step(config_for(size, remat, attention), name, batches)
    (failed if isinstance(step, str) else variants)[variant] = step
  torch_names = []
  for mode in _TORCH_HOST_MEMORY.value if _COMPARE_TORCH.value else []:
    name = TORCH if mode == "same" else f"{TORCH}[{mode}]"
    torch_names.append(name)
    settings[name] = (TORCH, "none", "eager", mode)
    variants[name] = (bench_step.TorchStep(config, batches) if mode == "same"
                      else bench_step.TorchProcessStep(config, batches, mode))
  usage = {}
  try:
    seconds = ({} if _MEMORY_ONLY.value else timing.interleaved_seconds(
        variants, shared.STEPS.value, shared.REPEATS.value, usage=usage))
  finally:
    for step in variants.values():
      if isinstance(step, bench_step.TorchProcessStep):
        step.close()

  model_flops = flops.step_flops(config, _ALGO.value, _VALUE_NET.value, b,
                                 s, t, value_config=value_config_for(config))
  peak = flops.peak_flops(_PEAK_FLOPS.value)
  paper = flops.PAPER_EXAMPLES_PER_CHIP.get(size)

  def fields(name: str) -> dict[str, Any]:
    implementation, remat, attention, mode = settings[name]
    return {"algo": _ALGO.value, "size": size, "batch_size": b,
            "input_length": s, "target_length": t, "variant": name,
            "framework": TORCH if mode != "jax" else "jax",
            "implementation": implementation, "remat": remat,
            "attention": attention, "dtype": shared.DTYPE.value,
            "compute_dtype": config.dtype,
            "platform": shared.program_platform(),
            "scan_layers": shared.SCAN.value,
            "value_net": _VALUE_NET.value,
            "value_decoder": _VALUE_DECODER.value,
            "lora_rank": shared.LORA_RANK.value,
            "lora_base_dtype": (shared.LORA_BASE_DTYPE.value
                                if shared.LORA_RANK.value else None),
            **({"decoder_fields": decoder_changes()} if _DECODER.value
               else {}),
            "host_memory": host_memory if mode in ("jax", "same") else mode,
            **({"attention_stand_in": True}
               if attention == "cudnn" and _stand_in() else {}),
            **records.machine()}

  out = [{**fields(name), "error": error} for name, error in failed.items()]
  for name, step in variants.items():
    record = {**fields(name), "compile_s": step.compile_s,
              "planned_peak_bytes": step.memory["peak_bytes"],
              "planned_temp_bytes": step.memory["temp_bytes"],
              "flops_per_step": model_flops,
              "xla_flops_per_step": getattr(step, "xla_flops", None),
              "peak_rss_bytes": timing.peak_rss_bytes()}
    if name in seconds:
      median = statistics.median(seconds[name])
      vs = {ref: timing.speedup(seconds[ref], seconds[name])
            for ref in torch_names}
      first = vs[torch_names[0]] if vs else (None, None)
      record.update({
          "steps_per_round": shared.STEPS.value,
          "round_step_s": seconds[name], "median_step_s": median,
          "steps_per_s": 1 / median, "examples_per_s": b / median,
          "tokens_per_s": b * (s + t) / median,
          "speedup_vs_torch": first[0], "paired_speedup_vs_torch": first[1],
          "speedups_vs": {ref: {"median": m, "paired": p}
                          for ref, (m, p) in vs.items()},
          "minor_faults_per_step": statistics.median(f for f, _ in usage[name]),
          "system_s_per_step": statistics.median(x for _, x in usage[name]),
          "mfu": model_flops / median / peak if peak else None,
          "ratio_to_paper_per_chip": b / median / paper if paper else None,
          "loss": step.loss,
          # The device allocator's peak (GPU/TPU; -1 on a CPU): the largest
          # of this process so far.
          "peak_bytes": int((jax.devices()[0].memory_stats() or {}).get(
              "peak_bytes_in_use", -1)) if name not in torch_names else -1})
    out.append(record)
  return out


def print_point(point: list[dict[str, Any]]) -> None:
  """A header, one line per variant, then the variants that could not run."""
  r = point[0]
  print(f"\n{r['device']}  {r['algo']}  size={r['size']}  B={r['batch_size']}"
        f"  S={r['input_length']}  T={r['target_length']}  "
        f"{r['compute_dtype']}  platform={r['platform']}  "
        f"scan={r['scan_layers']}  threads={r['threads']}")
  print(f"{'variant':>24s} {'peak MiB':>10s} {'temp MiB':>10s} "
        f"{'compile s':>9s} {'s/step':>8s} {'ex/s':>8s} {'vs torch':>8s} "
        f"{'paired':>7s} {'MFU':>6s} {'faults':>7s}  rounds (s/step)")
  mib = lambda n: f"{n / 2**20:10.1f}" if n >= 0 else f"{'n/a':>10s}"
  maybe = lambda x, form: form.format(x) if x is not None else "-"
  for r in point:
    if "error" in r:
      print(f"{r['variant']:>24s} {r['error']}")
      continue
    line = (f"{r['variant']:>24s} {mib(r['planned_peak_bytes'])} "
            f"{mib(r['planned_temp_bytes'])} {r['compile_s']:9.1f}")
    if "median_step_s" in r:
      line += (f" {r['median_step_s']:8.4f} {r['examples_per_s']:8.3f} "
               f"{maybe(r['speedup_vs_torch'], '{:7.3f}x'):>8s} "
               f"{maybe(r['paired_speedup_vs_torch'], '{:6.3f}x'):>7s} "
               f"{maybe(r['mfu'], '{:6.2%}'):>6s} "
               f"{r['minor_faults_per_step']:7.0f}  "
               + " ".join(f"{x:.3f}" for x in r["round_step_s"]))
    print(line)
    for ref, v in list(r.get("speedups_vs", {}).items())[1:]:
      print(f"{'':>24s} vs {ref}: {v['median']:.3f}x ({v['paired']:.3f}x)")
  sys.stdout.flush()


def main(argv):
  del argv
  timing.quiet_backend_probe()
  how = shared.apply_host_memory()
  stand_in = "cudnn" in _ATTENTION.value and _stand_in()
  check_flags()
  print(f"jax {jax.__version__}  {timing.device_description()}  host memory: "
        f"{how}" + "; cudnn planned with its stand-in" * stand_in)
  failed = []
  for size, b, t in itertools.product(model_names(), shared.BATCH.value,
                                      shared.TARGET_LENGTH.value):
    point = measure_point(size, int(b), int(t), how)
    print_point(point)
    records.append(shared.JSON_OUT.value, point)
    failed += [r for r in point if "error" in r]
  if failed:             # the rest were measured and written
    sys.exit(f"{len(failed)} variant(s) could not run: " + "; ".join(
        f"{r['size']} B={r['batch_size']} T={r['target_length']} "
        f"{r['variant']}: {r['error'][:120]}" for r in failed))


if __name__ == "__main__":
  app.run(main)
