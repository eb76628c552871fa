"""The backend decision of a run: one platform, every choice that follows.

A run compiles for one platform ("cpu", "gpu", "tpu"):
dro_fast.kernels.target_platform() reads it (the mesh's devices, else JAX's
default backend), and nothing else asks JAX. `resolve` turns it, once, into
plain config fields, which the library then takes as they are:

  model.matmul                   "cpu_row_major" for a CPU program (the
                                 Dense layers' row-major VJP,
                                 models/cpu.py), else "xla"
  model.attention_interpret      attention "flash" or "splash" (TPU
                                 kernels) in the TPU simulator unless the
                                 program is a TPU's
  (model is the policy's T5Config or DecoderConfig, and the separate value
  network's own RunConfig.value_model where it has one.)
  AlgorithmConfig.implementation the log-prob kernel: the platform's Pallas
                                 kernel where it imports, else "chunked_xla"
                                 (kernels.implementation_for), unless named
  AlgorithmConfig.interpret      that kernel interpreted unless the program
                                 is for its platform
  OptimizerConfig.reduce_with_dots  Adafactor's statistics as GEMVs for a
                                 CPU program (both optimizers)
  RunConfig.async_checkpoints    unless given: True unless a CPU program

The CLIs call it when they build their configs (train.py's run_config(),
the evaluator's policy loading through training.runs.model_config, the
benchmarks' lib/step.py); run_config.json records the result.
"""

from __future__ import annotations

import dataclasses

from dro_fast import kernels
from dro_fast.kernels.platform import PLATFORMS
from dro_fast.training.run_config import RunConfig


def resolve(run: RunConfig, platform: str, *,
            target: str | None = None) -> RunConfig:
  """`run` with every backend field decided for a program for `platform`.

  Args:
    run: the run; its model's `attention`, its algorithm's
      `implementation` and its `async_checkpoints` are kept where given.
    platform: the platform whose program is built (its forms: the matmul,
      the optimizer statistics, checkpoint writing).
    target: the platform XLA compiles it for, which picks the kernels and
      whether they are interpreted; None: `platform`. Differs only where a
      host plans another platform's program (a CPU's memory plan of a
      GPU's step: benchmarks/step_time.py --memory_only).

  Returns:
    The run with T5Config.matmul and attention_interpret,
    AlgorithmConfig.implementation and interpret,
    OptimizerConfig.reduce_with_dots and async_checkpoints set.

  Raises:
    ValueError: a platform that is none of PLATFORMS; attention "flash" or
      "splash" for a GPU program, or "cudnn" for a program that is not a
      GPU's (the message names `attention`).
  """
  target = platform if target is None else target
  for value in (platform, target):
    if value not in PLATFORMS:
      raise ValueError(f"platform {value!r} is none of "
                       f"{', '.join(PLATFORMS)}.")
  model = _resolve_model(run.model, platform, target)
  value_model = (None if run.value_model is None else
                 _resolve_model(run.value_model, platform, target))
  implementation = (run.algorithm.implementation
                    or kernels.implementation_for(target))
  native = (kernels.IMPLEMENTATIONS[implementation].native_backend
            if implementation in kernels.IMPLEMENTATIONS else None)
  algorithm = dataclasses.replace(
      run.algorithm, implementation=implementation,
      interpret=native is not None and native != target)
  gemvs = platform == "cpu"
  return run.replace(
      model=model, value_model=value_model, algorithm=algorithm,
      policy_optimizer=dataclasses.replace(run.policy_optimizer,
                                           reduce_with_dots=gemvs),
      value_optimizer=dataclasses.replace(run.value_optimizer,
                                          reduce_with_dots=gemvs),
      async_checkpoints=(platform != "cpu" if run.async_checkpoints is None
                         else run.async_checkpoints))


def _resolve_model(model, platform: str, target: str):
  """A T5Config or DecoderConfig with its backend fields decided."""
  if model.attention in ("flash", "splash") and platform == "gpu":
    raise ValueError(f"`attention`={model.attention} is a Pallas TPU "
                     "(Mosaic) kernel and the run compiles for a GPU: use "
                     "`attention`=cudnn or xla.")
  if model.attention == "cudnn" and platform != "gpu":
    raise ValueError(f"`attention`=cudnn runs cuDNN's fused attention, which "
                     f"needs a CUDA GPU; the run compiles for {platform!r}: "
                     f"use `attention`=xla.")
  return model.replace(
      matmul="cpu_row_major" if platform == "cpu" else "xla",
      attention_interpret=target != "tpu")
