"""The train step the step benchmarks time: dro_fast's, and PyTorch's.

A step object is built (and compiled) once; calling it runs one step on the
next of its batches and returns when the step is done, as
`timing.interleaved_seconds` expects. `compile_s`, `memory` (XLA's plan,
`timing.compiled_peak_bytes`) and `loss` describe it for the records.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np

from dro_fast.training import flops
from benchmarks.lib import timing
from dro_fast import backend
from dro_fast import kernels
from dro_fast import models
from dro_fast import runtime
from dro_fast.training import init
from dro_fast.training import loop
from dro_fast.training import sharding
from dro_fast.training import steps
from dro_fast.training.run_config import RunConfig

NO_PLAN = {"peak_bytes": -1, "temp_bytes": -1}


def config_for(size: str, dtype: str, *, platform: str | None = None,
               **fields) -> models.T5Config | models.DecoderConfig:
  """The benchmarked preset of `size`, without dropout, for `platform`.

  `size` is a T5 size (benchmarks.lib.flags.SIZES: the FLAN-T5 preset,
  "tiny" the test model) or a decoder-only preset's name
  (models.DECODER_PRESETS, e.g. "llama-3.1-8b"; these have no dropout).
  It computes in what `runtime.compute_dtype` gives for `dtype` on
  `platform` (None: kernels.target_platform()), as the CLIs do; JaxStep
  resolves its backend fields.
  """
  platform = platform or kernels.target_platform()
  dtype = runtime.compute_dtype(dtype, platform)
  if size in models.DECODER_PRESETS:
    return models.decoder_preset(size, dtype=dtype, **fields)
  name = "tiny" if size == "tiny" else f"flan-t5-{size}"
  return models.preset(name, dtype=dtype, dropout_rate=0.0, **fields)


def random_batch(config: models.T5Config | models.DecoderConfig, batch: int,
                 s: int, t: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A train batch of random tokens, every target position valid.

  The same keys serve both families: for a decoder-only model the prompts
  fill all s positions and the completions all t (the layout's -1 padding
  is absent, which changes no shape: the compiled program is the same).
  """
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


class JaxStep:
  """The compiled dro_fast update and its state.

  The update is the trainer's own (training.loop.trainer_for_run over a
  RunConfig of the paper's optimizer settings, resolved as the trainer's
  CLI resolves it: dro_fast.backend.resolve), jitted as train() jits it:
  donating the state, the state sharded by sharding.tree_shardings and the
  batch by sharding.batch_sharding over `mesh`.

  Attributes:
    config: the model as resolved.
    compiled: the compiled update.
    compile_s: seconds to lower and compile the update.
    memory: XLA's memory plan per device (`timing.compiled_peak_bytes`).
    xla_flops: XLA's count of the compiled update's FLOPs (`flops.xla_flops`).
  """

  def __init__(self, config: models.T5Config,
               algorithm: steps.AlgorithmConfig,
               batches: list[dict[str, np.ndarray]], abstract: bool = False,
               reduce_with_dots: bool | None = None, mesh=None,
               platform: str | None = None,
               value_config: models.DecoderConfig | None = None):
    """Builds and compiles the step.

    Args:
      config: the model; its backend fields are resolved here.
      algorithm: what is trained (and the kernel implementation; None:
        resolved for the mesh's platform).
      batches: the batches a call cycles through.
      abstract: compile from shapes alone, allocating no parameters, states
        or batches (the memory plan of a model larger than this host's
        memory); such a step cannot be called.
      reduce_with_dots: Adafactor's statistics as GEMVs (a CPU form);
        None: as dro_fast.backend.resolve decides.
      mesh: the device mesh (sharding.make_mesh); None: one device. An
        abstract step over a TPU topology's devices compiles for that
        slice (benchmarks/tpu_compile.py).
      platform: the platform whose program is built (backend.resolve's
        `platform`); None: the mesh's, which always picks the kernels
        (a CPU's memory plan of a GPU's step: platform "gpu").
      value_config: a separate value network's own DecoderConfig
        (RunConfig.value_model: a 1B value network of an 8B policy); None:
        the policy's shape.
    """
    if mesh is None:
      mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    target = kernels.target_platform(mesh.devices)
    run = backend.resolve(
        RunConfig(workdir="", model=config, algorithm=algorithm,
                  value_model=value_config,
                  batch_size=len(batches[0]["inputs"])),
        platform or target, target=target)
    if reduce_with_dots is not None:
      run = run.replace(**{
          name: dataclasses.replace(getattr(run, name),
                                    reduce_with_dots=reduce_with_dots)
          for name in ("policy_optimizer", "value_optimizer")})
    config, algorithm = run.model, run.algorithm
    self.config = config
    trainer = loop.trainer_for_run(run, config, mesh)

    def init_state(key):             # as the trainer splits a run's key
      policy_params, value_params = init.init_params(
          config, algorithm, key, value_config=run.value_model)
      return trainer.init(policy_params, value_params, init.split(key).train)

    key = jax.random.key(0)
    shapes = jax.eval_shape(init_state, key)
    state_shardings = sharding.tree_shardings(shapes, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    if abstract:
      self._state = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
          shapes, state_shardings)
      self._batches = [{k: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                sharding=batch_sharding)
                        for k, x in b.items()} for b in batches]
    else:
      self._state = jax.jit(init_state, out_shardings=state_shardings)(key)
      self._batches = [jax.device_put(b, batch_sharding) for b in batches]
    self.abstract = abstract
    start = time.perf_counter()
    self.compiled = jax.jit(trainer.update, donate_argnums=0).lower(
        self._state, self._batches[0]).compile()
    self.compile_s = time.perf_counter() - start
    self._update = self.compiled
    self.memory = timing.compiled_peak_bytes(self.compiled)
    self.xla_flops = flops.xla_flops(self.compiled)
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


class TorchStep:
  """benchmarks/torch_step's DRO-V step on the same batches.

  DroVStep for a T5Config, DecoderDroVStep for a DecoderConfig
  (torch_step.step_for). In float32, or under torch.autocast to bfloat16
  when the config computes in bfloat16.
  """

  def __init__(self, config: models.T5Config | models.DecoderConfig,
               batches: list[dict[str, np.ndarray]]):
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_step  # pylint: disable=g-import-not-at-top
    # As many threads as XLA's CPU client uses: the schedulable cores.
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    autocast = torch.bfloat16 if config.dtype == "bfloat16" else None
    self._step = torch_step.step_for(config, autocast=autocast)
    self.compile_s = time.perf_counter() - start        # construction only
    self.memory = NO_PLAN
    self._batches = [torch_step.to_torch(b) for b in batches]
    self._calls = 0
    self._loss = None

  def __call__(self) -> None:
    self._loss = self._step(self._batches[self._calls % len(self._batches)])
    self._calls += 1

  @property
  def loss(self) -> float:
    return float(self._loss)


def _torch_worker(conn, host_memory_mode: str,
                  config: models.T5Config | models.DecoderConfig,
                  batches: list[dict[str, np.ndarray]]) -> None:
  """Child process of TorchProcessStep: serves steps until sent None."""
  if host_memory_mode == "keep":
    runtime.keep_freed_host_memory()           # before torch allocates
  step = TorchStep(config, batches)
  conn.send(step.compile_s)
  while (n := conn.recv()) is not None:
    for _ in range(n):
      step()
    conn.send((step.loss, timing.host_usage()))


class TorchProcessStep:
  """TorchStep in a child process with its own host-memory setting.

  The malloc settings are process-wide, so PyTorch under glibc's defaults
  cannot share a process with JAX under `keep`. A call sends one step to
  the child and waits for it; the pipe's round trip (a few bytes) is part
  of the time.
  """

  def __init__(self, config: models.T5Config | models.DecoderConfig,
               batches: list[dict[str, np.ndarray]], host_memory_mode: str):
    import multiprocessing  # pylint: disable=g-import-not-at-top
    context = multiprocessing.get_context("spawn")   # no forked JAX state
    self._conn, child = context.Pipe()
    self._process = context.Process(
        target=_torch_worker, daemon=True,
        args=(child, host_memory_mode, config, batches))
    self._process.start()
    self.compile_s = self._conn.recv()
    self.memory = NO_PLAN
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
