r"""Train-step throughput of DRO-V (and baselines) against the paper.

  python benchmarks/step_time.py --size=large --batch_size=32 \
      --input_length=512 --target_length=128 [--json_out=PATH]

Builds the real trainer step (dro_fast.training.steps: policy forward and
backward through the fused linear log-prob kernel, the value network, two
Adafactor updates; reference log-probs come from the cache, so they cost
nothing per step), times it on random tokens and prints compile time,
steps/s, examples/s, tokens/s, XLA's planned memory, the process's peak RSS,
MFU and the ratio to the paper's per-chip throughput.

--size, --batch_size, --target_length, --implementation, --remat and
--attention take comma-separated lists. Every (size, batch, target length)
point is timed in turn, and at each point every variant (one per
implementation, remat policy and attention, plus the PyTorch step with
--compare_torch) is compiled first and then
timed interleaved: --repeats rounds of --steps steps each, alternating the
order; the figures are medians over the rounds ("vs torch": the ratio of
the medians; "paired": the median of each round's ratio, both sides having
run back to back under the same load). With more than one point a
scaling table follows (time per example and per token). --memory_only
compiles and prints XLA's memory plan without running.

  # JAX against the PyTorch baseline (benchmarks/torch_step.py) on a CPU:
  python benchmarks/step_time.py --compare_torch --dtype=float32 \
      --remat=none --size=small --batch_size=8 --input_length=128 \
      --target_length=64
  # fused (chunked_xla) against materialised (xla) logits:
  python benchmarks/step_time.py --implementation=chunked_xla,xla ...
  # scaling:
  python benchmarks/step_time.py --size=tiny,small --batch_size=2,4,8 \
      --target_length=16,32,64 ...

FLOPs counted (matmuls and attention; embedding lookups, norms and
elementwise work are not):
  forward of one network on one example = 2 · N_matmul · tokens + attention,
    where the encoder's N_matmul (its layers' projections) sees S tokens;
    the decoder's (its layers' projections plus the output projection D·V)
    sees T tokens, except cross-attention's key and value projections
    (2 · D·H·K per layer), which see the S encoder outputs; and attention
    adds 4 · S² · H·K per encoder layer, 4 · T² · H·K (self) + 4 · T · S ·
    H·K (cross) per decoder layer. (Until 2026-11-28 the cross-attention
    keys and values were counted over T tokens: 2.6% too few FLOPs at
    S=128, T=64 and 4.6% too few at S=512, T=128 for T5-L.)
  a trained network costs 3x its forward (6 · N · tokens), a forward-only
    one 1x (2 · N · tokens).
  dro_v: policy trained + separate value encoder trained (shared: the
    policy's encoder, no extra work); kto: policy trained on 2B sequences
    (examples and their mismatched completions); sft: policy trained.
MFU = counted FLOPs per second / the device's peak dense bf16 FLOP/s
(H100/H200 SXM: 989e12, A100: 312e12, TPU v5e: 197e12, or --peak_flops).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

# Run as a script, Python puts benchmarks/ first on sys.path, where
# kernels.py would shadow the top-level `kernels` that transformers probes for
# (--compare_torch); the benchmarks import as `benchmarks.*` from the
# repository root instead, appended so that an installed dro_fast comes first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.append(os.path.dirname(_HERE))
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import cpu_gemm  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import kernels  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models import value  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models.config import ATTENTION_IMPLEMENTATIONS  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models.config import REMAT_POLICIES  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models.t5 import cudnn_memory_stand_in  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import runtime as host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import steps  # pylint: disable=g-import-not-at-top,wrong-import-position

SIZES = ("tiny", "small", "base", "large", "xl", "xxl")

_ALGO = flags.DEFINE_enum("algo", "dro_v", ["dro_v", "kto", "sft"],
                          "Algorithm whose step is timed.")
_SIZE = flags.DEFINE_list("size", ["tiny"],
                          f"T5 v1.1 / FLAN-T5 size(s), of {SIZES}.")
_BATCH = flags.DEFINE_list("batch_size", ["32"], "Examples per step.")
_INPUT_LENGTH = flags.DEFINE_integer("input_length", 512, "Prompt tokens S.")
_TARGET_LENGTH = flags.DEFINE_list("target_length", ["128"],
                                   "Completion tokens T.")
_IMPLEMENTATION = flags.DEFINE_list(
    "implementation", ["default"],
    "Kernel implementation(s) (default: by backend; xla materialises the "
    "logits, the others do not).")
_COMPARE_TORCH = flags.DEFINE_bool(
    "compare_torch", False, "Also time the PyTorch / transformers DRO-V step "
    "(benchmarks/torch_step.py), interleaved with the JAX step(s), in "
    "float32 or, with --dtype=bfloat16, under torch.autocast to bfloat16. "
    "Needs --algo=dro_v and --value_net=separate.")
_MEMORY_ONLY = flags.DEFINE_bool(
    "memory_only", False, "Compile from shapes alone and report XLA's memory "
    "plan without allocating or running anything (shapes too slow to run "
    "here, models larger than this host's memory).")
_ACCELERATOR_PATHS = flags.DEFINE_bool(
    "accelerator_paths", False, "With --memory_only on a CPU: trace the "
    "program a GPU or TPU would run (dro_fast.cpu_gemm.accelerator_paths: "
    "no CPU-only VJPs, optimizer GEMVs or bfloat16 upcasts), so that "
    "XLA:CPU plans its memory rather than the CPU program's. The kernel "
    "registry still picks by the real backend: the default implementation "
    "stays chunked_xla, not pallas_gpu, and XLA:CPU's fusion and buffer "
    "reuse differ from XLA:GPU's, so the plan approximates the GPU's.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed round.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (after 2 "
                                "warm-up steps per variant).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "Compute dtype (parameters and optimizer states "
                           "stay float32).")
_REMAT = flags.DEFINE_list("remat", ["dots"], "Rematerialisation "
                           f"policy or policies, of {REMAT_POLICIES}.")
_ATTENTION = flags.DEFINE_list(
    "attention", ["xla"], "Attention implementation(s), of "
    f"{ATTENTION_IMPLEMENTATIONS}: xla materialises the [B, H, q, k] "
    "logits, cudnn is cuDNN's fused attention (CUDA GPU, bfloat16). "
    "Without a GPU, --memory_only --accelerator_paths plans cudnn's memory "
    "with a stand-in that keeps what cuDNN keeps for its backward "
    "(dro_fast.models.t5.cudnn_memory_stand_in; it overstates cuDNN: its "
    "[B, H, q, k] float32 temporaries, one layer at a time, are a "
    "workspace cuDNN does not have).")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Scan over layers.")
_VALUE_NET = flags.DEFINE_enum("value_net", "separate", ["separate", "shared"],
                               "DRO-V value network.")
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", None,
                                 "Peak FLOP/s of one device (default: from "
                                 "the device kind).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append JSON lines here.")
_TORCH_HOST_MEMORY = flags.DEFINE_list(
    "torch_host_memory", ["same"],
    "With --compare_torch, the PyTorch step(s) to time: same (in this "
    "process, under --host_memory), or keep / system (each in a child "
    "process of its own under that setting, timed through a pipe, "
    "interleaved with the rest as usual). `system` is PyTorch as a user "
    "runs it by default. Speed-ups are against the first.")
_HOST_MEMORY = flags.DEFINE_enum(
    "host_memory", "auto", ["auto", "keep", "system"],
    "keep: glibc keeps freed host memory for reuse "
    "(dro_fast.runtime; process-wide, so a --compare_torch "
    "step in this process runs under it too); system: glibc's defaults, "
    "which unmap XLA:CPU's temporary buffer after every step; auto: keep "
    "where JAX runs on the CPU alone, else system, as `python -m "
    "dro_fast.train` does.")

# Paper, §4: T5-L 0.5 steps/s at batch 32 on 16 TPU v5e; T5-XL 0.1 steps/s
# on 32 chips. Examples per second per chip:
PAPER_EXAMPLES_PER_CHIP = {"large": 0.5 * 32 / 16, "xl": 0.1 * 32 / 32}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12}
TORCH = "torch"


def config_for(size: str, remat: str,
               attention: str | None = None) -> models.T5Config:
  """The benchmarked preset; attention defaults to the first --attention."""
  name = "tiny" if size == "tiny" else f"flan-t5-{size}"
  return models.preset(name, dtype=_DTYPE.value, remat=remat,
                       attention=attention or _ATTENTION.value[0],
                       scan_layers=_SCAN.value, dropout_rate=0.0)


def forward_flops(config: models.T5Config, batch: int, s: int, t: int,
                  part: str) -> float:
  """Forward FLOPs of the encoder ("encoder") or the decoder ("decoder")."""
  d, hk, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  mlp = (3 if config.gated else 2) * d * ff
  if part == "encoder":
    n = config.num_encoder_layers * (4 * d * hk + mlp)
    attention = config.num_encoder_layers * 4 * s * s * hk
    return batch * (2 * n * s + attention)
  # Self-attention q, k, v, o and cross-attention q, o see the T targets;
  # cross-attention k, v see the S encoder outputs.
  n = config.num_decoder_layers * (6 * d * hk + mlp) + d * config.vocab_size
  cross_kv = config.num_decoder_layers * 2 * d * hk
  attention = config.num_decoder_layers * (4 * t * t * hk + 4 * t * s * hk)
  return batch * (2 * n * t + 2 * cross_kv * s + attention)


def step_flops(config, algo, value_net, batch, s, t) -> float:
  policy = (forward_flops(config, batch, s, t, "encoder")
            + forward_flops(config, batch, s, t, "decoder"))
  if algo == "kto":
    return 3 * 2 * policy
  flops = 3 * policy
  if algo == "dro_v" and value_net == "separate":
    flops += 3 * forward_flops(config, batch, s, t, "encoder")
  return flops


def peak_flops() -> float | None:
  if _PEAK_FLOPS.value:
    return _PEAK_FLOPS.value
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def random_batch(config, batch, s, t, rng):
  tokens = lambda n: rng.integers(2, config.vocab_size, (batch, n)).astype(
      np.int32)
  return {
      "inputs": tokens(s), "targets": tokens(t),
      "target_mask": np.ones((batch, t), bool),
      "mismatched_targets": tokens(t),
      "mismatched_mask": np.ones((batch, t), bool),
      "rewards": rng.normal(size=batch).astype(np.float32),
      "ref_logprobs": (rng.normal(size=batch) - 5 * t).astype(np.float32),
      "mismatched_ref_logprobs": (rng.normal(size=batch) - 5 * t).astype(
          np.float32),
  }


def host_usage() -> tuple[int, float]:
  """This process's minor page faults and system CPU seconds so far."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_minflt, usage.ru_stime


def peak_rss_bytes() -> int:
  """The process's peak resident set so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class JaxStep:
  """The compiled dro_fast update and its state; a call runs one step.

  Attributes:
    compile_s: seconds to lower and compile the update.
    memory: XLA's planned peak and temporary bytes (timing.compiled_peak_bytes).
  """

  def __init__(self, config: models.T5Config, implementation: str | None,
               batches: list[dict[str, np.ndarray]], abstract: bool = False):
    """Builds and compiles the step.

    Args:
      config: the model.
      implementation: the kernel implementation (None: by backend).
      batches: the batches a call cycles through.
      abstract: compile from shapes alone, allocating no parameters,
        optimizer states or batches (XLA's memory plan of a model larger
        than this host's memory); such a step cannot be called.
    """
    algorithm = steps.AlgorithmConfig(algo=_ALGO.value,
                                      value_net=_VALUE_NET.value,
                                      implementation=implementation)
    trainer = steps.make_trainer(algorithm, config,
                                 optim.make_optimizer(1e-4),
                                 optim.make_optimizer(1e-4))

    def init_state(key):
      tokens = jnp.ones((1, 2), jnp.int32)
      policy_key, value_key, state_key = jax.random.split(key, 3)
      policy_params = models.t5(config).init(policy_key, tokens, tokens)
      value_params = {}
      if algorithm.has_value:
        net = value.value_network(config, algorithm.value_net)
        if algorithm.value_net == "separate":
          value_params = value.init_from_policy(
              net.init(value_key, tokens), policy_params)
        else:
          value_params = net.init(value_key,
                                  jnp.zeros((1, 2, config.d_model)), tokens)
      return trainer.init(policy_params, value_params, state_key)

    key = jax.random.key(0)
    if abstract:
      self._state = jax.eval_shape(init_state, key)
      self._batches = [jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), b)
                       for b in batches]
    else:
      self._state = jax.jit(init_state)(key)
      self._batches = [jax.device_put(b) for b in batches]
    self.abstract = abstract
    start = time.perf_counter()
    self._update = jax.jit(trainer.update, donate_argnums=0).lower(
        self._state, self._batches[0]).compile()
    self.compile_s = time.perf_counter() - start
    self.memory = timing.compiled_peak_bytes(self._update)
    self._calls = 0
    self._metrics = None

  def __call__(self) -> None:
    if self.abstract:
      raise RuntimeError("an abstract JaxStep (shapes only) cannot run.")
    self._state, self._metrics = self._update(
        self._state, self._batches[self._calls % len(self._batches)])
    self._calls += 1
    jax.block_until_ready((self._state, self._metrics))

  @property
  def loss(self) -> float:
    return float(self._metrics["loss"])

  def compiled_text(self) -> str:
    """The compiled update's HLO module, as text."""
    return self._update.as_text()


class TorchStep:
  """benchmarks/torch_step.DroVStep on the same batches; a call is one step."""

  def __init__(self, config: models.T5Config,
               batches: list[dict[str, np.ndarray]]):
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_step  # pylint: disable=g-import-not-at-top
    # As many threads as XLA's CPU client uses: the schedulable cores.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    # Our compute dtype bfloat16 <-> PyTorch's autocast to bfloat16.
    self.autocast = (torch.bfloat16 if config.compute_dtype == jnp.bfloat16
                     else None)
    self._step = torch_step.DroVStep(config, autocast=self.autocast)
    self.compile_s = time.perf_counter() - start        # construction only
    self.memory = {"peak_bytes": -1, "temp_bytes": -1}
    self._batches = [torch_step.to_torch(b) for b in batches]
    self._calls = 0
    self._loss = None

  def __call__(self) -> None:
    self._loss = self._step(self._batches[self._calls % len(self._batches)])
    self._calls += 1

  @property
  def loss(self) -> float:
    return float(self._loss)


def _torch_worker(conn, host_memory_mode: str, config: models.T5Config,
                  batches: list[dict[str, np.ndarray]]) -> None:
  """Child process of TorchProcessStep: serves steps until sent None."""
  if host_memory_mode == "keep":
    host_memory.keep_freed_host_memory()    # before torch allocates
  step = TorchStep(config, batches)
  conn.send(step.compile_s)
  while (n := conn.recv()) is not None:
    for _ in range(n):
      step()
    conn.send((step.loss, host_usage()))


class TorchProcessStep:
  """TorchStep in a child process with its own host-memory setting.

  The malloc settings (dro_fast.runtime) are process-wide, so
  PyTorch under glibc's defaults cannot share a process with JAX under
  `keep`. A call sends one step to the child and waits for it; the pipe's
  round trip (a few bytes) is part of the time.
  """

  def __init__(self, config: models.T5Config,
               batches: list[dict[str, np.ndarray]], host_memory_mode: str):
    import multiprocessing  # pylint: disable=g-import-not-at-top
    context = multiprocessing.get_context("spawn")   # no forked JAX state
    self._conn, child = context.Pipe()
    self._process = context.Process(
        target=_torch_worker, daemon=True,
        args=(child, host_memory_mode, config, batches))
    self._process.start()
    self.compile_s = self._conn.recv()
    self.memory = {"peak_bytes": -1, "temp_bytes": -1}
    self._loss = None
    self._usage = (0, 0.0)

  def __call__(self) -> None:
    self._conn.send(1)
    self._loss, self._usage = self._conn.recv()

  def usage(self) -> tuple[int, float]:
    """The child's page faults and system seconds, as of its last step."""
    return self._usage

  @property
  def loss(self) -> float:
    return float(self._loss)

  def close(self) -> None:
    self._conn.send(None)
    self._process.join(timeout=60)


def interleaved_step_seconds(
    variants: dict[str, Callable[[], None]], steps_per_round: int,
    rounds: int, warmup: int = 2,
    usage: dict[str, list[tuple[float, float]]] | None = None,
) -> dict[str, list[float]]:
  """Seconds per step of each variant in each round, variants alternating.

  Each variant runs `warmup` untimed steps; then every round times
  `steps_per_round` steps of each variant in turn, reversing the order on
  odd rounds so that neither side always follows the other. With `usage`,
  also records each round's minor page faults and system CPU seconds per
  step there (from the variant's `usage()` where it runs elsewhere, else
  this process's).
  """
  for step in variants.values():
    for _ in range(warmup):
      step()
  seconds = {name: [] for name in variants}
  for round_ in range(rounds):
    order = list(variants.items())
    for name, step in order[::-1] if round_ % 2 else order:
      count = getattr(step, "usage", host_usage)
      faults, system_s = count()
      start = time.perf_counter()
      for _ in range(steps_per_round):
        step()
      seconds[name].append((time.perf_counter() - start) / steps_per_round)
      if usage is not None:
        now_faults, now_system_s = count()
        usage.setdefault(name, []).append(
            ((now_faults - faults) / steps_per_round,
             (now_system_s - system_s) / steps_per_round))
  return seconds


def check_flags(implementations: list[str]) -> None:
  """Raises app.UsageError for flag values this script cannot run."""
  unknown = [s for s in _SIZE.value if s not in SIZES]
  if unknown:
    raise app.UsageError(f"--size: unknown {unknown}; choose from {SIZES}.")
  unknown = [r for r in _REMAT.value if r not in REMAT_POLICIES]
  if unknown:
    raise app.UsageError(f"--remat: unknown {unknown}; choose from "
                         f"{REMAT_POLICIES}.")
  unknown = [a for a in _ATTENTION.value if a not in ATTENTION_IMPLEMENTATIONS]
  if unknown or not _ATTENTION.value:
    raise app.UsageError(f"--attention: unknown {unknown}; choose from "
                         f"{ATTENTION_IMPLEMENTATIONS}.")
  if "cudnn" in _ATTENTION.value and (
      not (models.cuda_backend() or _cudnn_stand_in())
      or _DTYPE.value != "bfloat16"):
    raise app.UsageError(
        "--attention=cudnn runs cuDNN's fused attention: it needs a CUDA GPU "
        f"(JAX's backend here is {jax.default_backend()!r}; without one, "
        "--memory_only --accelerator_paths plans its memory) and "
        "--dtype=bfloat16.")
  for name, values in (("batch_size", _BATCH.value),
                       ("target_length", _TARGET_LENGTH.value)):
    if not all(v.isdigit() and int(v) > 0 for v in values):
      raise app.UsageError(f"--{name} takes positive integers, got {values}.")
  odd = [f"--input_length={_INPUT_LENGTH.value}"] * (_INPUT_LENGTH.value % 2)
  odd += [f"--target_length={t}" for t in _TARGET_LENGTH.value if int(t) % 2]
  if "cudnn" in _ATTENTION.value and odd:
    raise app.UsageError(
        f"--attention=cudnn: cuDNN's attention with T5's bias refuses odd "
        f"lengths in its backward pass; got {', '.join(odd)}.")
  for name in implementations:
    if name != "default" and name not in kernels.IMPLEMENTATIONS:
      raise app.UsageError(f"--implementation: unknown {name!r}; choose from "
                           f"{sorted(kernels.IMPLEMENTATIONS)} or default.")
  if _ACCELERATOR_PATHS.value and not _MEMORY_ONLY.value:
    raise app.UsageError("--accelerator_paths plans the memory of an "
                         "accelerator's program: pass --memory_only too.")
  if _COMPARE_TORCH.value and _MEMORY_ONLY.value:
    raise app.UsageError("--memory_only plans XLA's memory; PyTorch has no "
                         "plan: drop --compare_torch.")
  modes = _TORCH_HOST_MEMORY.value
  if (not modes or len(set(modes)) != len(modes)
      or not set(modes) <= {"same", "keep", "system"}):
    raise app.UsageError(f"--torch_host_memory: got {modes}; give each of "
                         "same, keep, system at most once.")
  if _COMPARE_TORCH.value and (_ALGO.value != "dro_v"
                               or _VALUE_NET.value != "separate"):
    raise app.UsageError(
        "--compare_torch times the PyTorch DRO-V step with a separate value "
        "network: pass --algo=dro_v --value_net=separate.")


def _cudnn_stand_in() -> bool:
  """Whether attention "cudnn" is planned with the memory stand-in: a
  memory plan of the accelerator's program, on a backend without cuDNN."""
  return (_MEMORY_ONLY.value and _ACCELERATOR_PATHS.value
          and not models.cuda_backend())


def build_jax_step(config: models.T5Config, implementation: str | None,
                   batches: list[dict[str, np.ndarray]]) -> JaxStep | str:
  """A compiled JaxStep that has run one step, or why it cannot run.

  A variant that does not fit in the device's memory (XLA's
  RESOURCE_EXHAUSTED, at compile time or at its first step) is a finding,
  not a crash: the message is returned so that the other variants are still
  measured. So is a variant with config.attention "cudnn" failing with
  a RuntimeError (XLA's runtime errors included), ValueError or
  NotImplementedError: cuDNN refusing its fused attention depends on the
  machine's cuDNN version, GPU and the shapes. Any other error propagates.
  """
  paths = (cpu_gemm.accelerator_paths() if _ACCELERATOR_PATHS.value
           else contextlib.nullcontext())
  stand_in = (cudnn_memory_stand_in()
              if config.attention == "cudnn" and _cudnn_stand_in()
              else contextlib.nullcontext())
  try:
    with paths, stand_in:
      step = JaxStep(config, implementation, batches,
                     abstract=_MEMORY_ONLY.value)
    if not _MEMORY_ONLY.value:
      step()               # allocation fails here, not in a timed round
    return step
  except (RuntimeError, ValueError, NotImplementedError) as error:
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    if (isinstance(error, jax.errors.JaxRuntimeError)
        and "RESOURCE_EXHAUSTED" in str(error)):
      return f"out of memory: {first_line}"
    # (Not under the stand-in: no cuDNN is involved, so it is our bug.)
    if config.attention == "cudnn" and not _cudnn_stand_in():
      return (f"attention=cudnn variant failed: {type(error).__name__}: "
              f"{first_line}")
    raise


def measure_point(size: str, b: int, t: int, implementations: list[str],
                  host_memory_how: str) -> list[dict[str, Any]]:
  """Builds every variant at one (size, batch, target length) and times
  them interleaved (unless --memory_only); one record per variant.

  The JAX variants are every (implementation, remat policy, attention); a
  variant is named by its implementation, followed by "/" and the policy
  when several policies are compared, and by "/" and the attention when
  several attentions are.
  """
  s = _INPUT_LENGTH.value
  config = config_for(size, "none")       # shapes (remat changes no shape)
  attentions = _ATTENTION.value
  rng = np.random.default_rng(0)
  batches = [random_batch(config, b, s, t, rng) for _ in range(2)]
  variants, settings, failed = {}, {}, {}
  for name, remat, attention in itertools.product(
      implementations, _REMAT.value, attentions):
    variant = "/".join([name] + [remat] * (len(_REMAT.value) > 1)
                       + [attention] * (len(attentions) > 1))
    settings[variant] = (name, remat, attention)
    step = build_jax_step(config_for(size, remat, attention),
                          None if name == "default" else name, batches)
    if isinstance(step, str):
      failed[variant] = step
    else:
      variants[variant] = step
  torch_modes = {}                      # PyTorch variant -> its malloc mode
  if _COMPARE_TORCH.value:
    for mode in _TORCH_HOST_MEMORY.value:
      name = TORCH if mode == "same" else f"{TORCH}[{mode}]"
      torch_modes[name] = mode
      settings[name] = (TORCH, "none", "eager")
      variants[name] = (TorchStep(config, batches) if mode == "same" else
                        TorchProcessStep(config, batches, mode))
  usage = {name: [] for name in variants}
  try:
    seconds = ({name: [] for name in variants} if _MEMORY_ONLY.value else
               interleaved_step_seconds(variants, _STEPS.value,
                                        _REPEATS.value, usage=usage))
  finally:
    for step in variants.values():
      if isinstance(step, TorchProcessStep):
        step.close()

  flops = step_flops(config, _ALGO.value, _VALUE_NET.value, b, s, t)
  peak = peak_flops()
  paper = PAPER_EXAMPLES_PER_CHIP.get(size)

  def speedup(reference: str, name: str) -> tuple[float, float]:
    """Median-to-median ratio, and the median of the per-round ratios
    (both sides ran back to back under the same load)."""
    return (statistics.median(seconds[reference])
            / statistics.median(seconds[name]),
            statistics.median(ref_round / own_round for ref_round, own_round
                              in zip(seconds[reference], seconds[name])))

  def variant_fields(name: str) -> dict[str, Any]:
    """What names a variant's record, measured or not."""
    return {
        "algo": _ALGO.value, "size": size, "batch_size": b,
        "input_length": s, "target_length": t,
        "framework": TORCH if name in torch_modes else "jax",
        "variant": name, "implementation": settings[name][0],
        "remat": settings[name][1], "attention": settings[name][2],
        **({"attention_stand_in": True}
           if settings[name][2] == "cudnn" and _cudnn_stand_in() else {}),
        "dtype": _DTYPE.value,
        "scan_layers": _SCAN.value, "value_net": _VALUE_NET.value,
        "device": timing.device_description(),
        # Under --accelerator_paths no GEMM goes through cpu_gemm's
        # upcast, so its mode would describe nothing.
        **({"cpu_bf16_gemm": (None if _ACCELERATOR_PATHS.value
                              else cpu_gemm.bf16_mode()),
            "accelerator_paths": _ACCELERATOR_PATHS.value}
           if jax.default_backend() == "cpu" else {})}

  records = [{**variant_fields(name), "error": error}
             for name, error in failed.items()]
  for name, step in variants.items():
    is_torch = name in torch_modes
    mode = torch_modes.get(name, "same")
    record = {
        **variant_fields(name),
        "threads": len(os.sched_getaffinity(0)),
        "compile_s": step.compile_s, "steps_per_round": _STEPS.value,
        "round_step_s": seconds[name],
        # The device allocator's peak (GPU/TPU; -1 on a CPU): process-wide,
        # so with several variants it is the largest so far.
        "peak_bytes": (-1 if is_torch else int(
            (jax.devices()[0].memory_stats() or {}).get(
                "peak_bytes_in_use", -1))),
        "planned_peak_bytes": step.memory["peak_bytes"],
        "planned_temp_bytes": step.memory["temp_bytes"],
        "peak_rss_bytes": peak_rss_bytes(),
        "flops_per_step": flops,
        "host_memory": host_memory_how if mode == "same" else mode,
    }
    if seconds[name]:
      median_s = statistics.median(seconds[name])
      steps_per_s = 1.0 / median_s
      vs = {ref: speedup(ref, name) for ref in torch_modes}
      first = next(iter(torch_modes), None)
      record.update({
          "median_step_s": median_s, "steps_per_s": steps_per_s,
          "examples_per_s": steps_per_s * b,
          "tokens_per_s": steps_per_s * b * (s + t),
          "s_per_example": median_s / b,
          "s_per_token": median_s / (b * (s + t)),
          # Against the first PyTorch variant; every one in speedups_vs.
          "speedup_vs_torch": vs[first][0] if vs else None,
          "paired_speedup_vs_torch": vs[first][1] if vs else None,
          "speedups_vs": {ref: {"median": m, "paired": p}
                          for ref, (m, p) in vs.items()},
          # Medians over rounds, in the process that ran the step.
          "minor_faults_per_step": statistics.median(
              f for f, _ in usage[name]),
          "system_s_per_step": statistics.median(
              sys_s for _, sys_s in usage[name]),
          "mfu": flops * steps_per_s / peak if peak else None,
          "loss": step.loss,
          "ratio_to_paper_per_chip": (steps_per_s * b / paper if paper
                                      else None),
      })
    records.append(record)
  return records


def print_point(point: list[dict[str, Any]]) -> None:
  """One line per variant; timing columns only where it was timed; then the
  variants that could not run, and why."""
  records = [r for r in point if "error" not in r]
  for r in point:
    if "error" in r:
      print(f"\n{r['device']}  {r['algo']}  size={r['size']}  "
            f"B={r['batch_size']}  S={r['input_length']}  "
            f"T={r['target_length']}  {r['dtype']}  {r['variant']}: "
            f"{r['error']}", flush=True)
  if not records:
    return
  r = records[0]
  timed = "median_step_s" in r
  print(f"\n{r['device']}  {r['algo']}  size={r['size']}  B={r['batch_size']}"
        f"  S={r['input_length']}  T={r['target_length']}  {r['dtype']}  "
        f"scan={r['scan_layers']}  threads={r['threads']}"
        + (f"  {len(r['round_step_s'])} rounds x {r['steps_per_round']} "
           f"steps" if timed else "  (memory plan only)"))
  print(f"{'variant':>16s} {'XLA peak MiB':>12s} {'XLA temp MiB':>12s} "
        f"{'compile s':>9s}" + (f" {'s/step':>9s} {'ex/s':>9s} {'tok/s':>9s}"
                                f" {'vs torch':>8s} {'paired':>7s} {'MFU':>7s}"
                                f"  rounds (s/step)" if timed else ""))
  mib = lambda n: f"{n / 2**20:12.1f}" if n >= 0 else f"{'n/a':>12s}"
  for r in records:
    line = (f"{r['variant']:>16s} {mib(r['planned_peak_bytes'])} "
            f"{mib(r['planned_temp_bytes'])} {r['compile_s']:9.1f}")
    if timed:
      vs = (f"{r['speedup_vs_torch']:7.3f}x "
            f"{r['paired_speedup_vs_torch']:6.3f}x" if r["speedup_vs_torch"]
            else f"{'':16s}")
      mfu = f"{r['mfu']:7.2%}" if r["mfu"] is not None else f"{'n/a':>7s}"
      rounds = " ".join(f"{x:.3f}" for x in r["round_step_s"])
      line += (f" {r['median_step_s']:9.4f} {r['examples_per_s']:9.3f} "
               f"{r['tokens_per_s']:9.0f} {vs} {mfu}  {rounds}")
    print(line)
  if timed:
    print("host: " + ", ".join(
        f"{r['variant']} {r['host_memory']} {r['minor_faults_per_step']:.0f} "
        f"page faults {r['system_s_per_step']:.2f} system s"
        for r in records) + " (per step, medians)")
  for r in records:
    if (timed and r["framework"] == "jax"
        and len(r.get("speedups_vs") or {}) > 1):
      print(f"{r['variant']:>16s} speed-up against each PyTorch step "
            "(median, paired): " + ", ".join(
                f"{ref} {v['median']:.3f}x {v['paired']:.3f}x"
                for ref, v in r["speedups_vs"].items()))
  print(f"peak RSS of this process so far: "
        f"{records[-1]['peak_rss_bytes'] / 2**20:.0f} MiB"
        + ("; loss " + ", ".join(f"{r['variant']} {r['loss']:.6g}"
                                 for r in records) if timed else ""),
        flush=True)


def print_scaling(records: list[dict[str, Any]]) -> None:
  """Time per step, per example and per token, and its growth ('x' columns,
  relative to the first point of the same size and variant) against the
  growth of the tokens B·(S+T) and of the counted FLOPs."""
  print("\nScaling (median s/step; per example; per token of B·(S+T))")
  print(f"{'size':>6s} {'variant':>16s} {'B':>3s} {'T':>4s} {'s/step':>9s} "
        f"{'ms/example':>10s} {'us/token':>9s} {'time x':>7s} "
        f"{'tokens x':>8s} {'FLOPs x':>7s}")
  key = lambda r: (r["size"], r["variant"])
  for (size, name), group in itertools.groupby(sorted(records, key=key),
                                               key=key):
    group = sorted(group, key=lambda r: (r["batch_size"], r["target_length"]))
    first = group[0]
    tokens = lambda r: r["batch_size"] * (r["input_length"]
                                          + r["target_length"])
    for r in group:
      print(f"{size:>6s} {name:>16s} {r['batch_size']:3d} "
            f"{r['target_length']:4d} {r['median_step_s']:9.4f} "
            f"{r['s_per_example'] * 1e3:10.2f} {r['s_per_token'] * 1e6:9.2f} "
            f"{r['median_step_s'] / first['median_step_s']:7.2f} "
            f"{tokens(r) / tokens(first):8.2f} "
            f"{r['flops_per_step'] / first['flops_per_step']:7.2f}")


def apply_host_memory() -> str:
  """Applies --host_memory (before the first JAX computation)."""
  keep = _HOST_MEMORY.value == "keep" or (_HOST_MEMORY.value == "auto"
                                          and host_memory.cpu_only_jax())
  return host_memory.keep_freed_host_memory() if keep else "system"


def main(argv):
  del argv
  how = apply_host_memory()
  implementations = _IMPLEMENTATION.value
  check_flags(implementations)
  print(f"jax {jax.__version__}  {timing.device_description()}  "
        f"threads {len(os.sched_getaffinity(0))}  host memory: {how}"
        + (f"  bfloat16 GEMMs: {cpu_gemm.bf16_mode()} (dro_fast.cpu_gemm)"
           if jax.default_backend() == "cpu" and not _ACCELERATOR_PATHS.value
           else "")
        + ("  planning the accelerator's program (--accelerator_paths)"
           if _ACCELERATOR_PATHS.value else "")
        + ("; cudnn attention planned with its memory stand-in"
           if "cudnn" in _ATTENTION.value and _cudnn_stand_in() else ""))
  out = open(_JSON_OUT.value, "a") if _JSON_OUT.value else None
  records = []
  for size, b, t in itertools.product(_SIZE.value, _BATCH.value,
                                      _TARGET_LENGTH.value):
    point = measure_point(size, int(b), int(t), implementations, how)
    print_point(point)
    records += point
    if out:
      out.writelines(json.dumps(r) + "\n" for r in point)
      out.flush()
  per_point = len(implementations) * len(_REMAT.value) * len(
      _ATTENTION.value) + (
      len(_TORCH_HOST_MEMORY.value) if _COMPARE_TORCH.value else 0)
  failed = [r for r in records if "error" in r]
  if not _MEMORY_ONLY.value and len(records) > per_point:
    print_scaling([r for r in records if "error" not in r])
  if out:
    out.close()
  if failed:
    # The rest were measured and written; the exit status still says that
    # not every variant ran.
    sys.exit(f"{len(failed)} variant(s) could not run: " + "; ".join(
        f"{r['size']} B={r['batch_size']} T={r['target_length']} "
        f"{r['variant']}: {r['error'][:120]}" for r in failed))


if __name__ == "__main__":
  app.run(main)
