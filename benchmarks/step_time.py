r"""Train-step throughput of DRO-V (and baselines) against the paper.

  python benchmarks/step_time.py --size=large --batch_size=32 \
      --input_length=512 --target_length=128 [--json_out=PATH]

Builds the real trainer step (dro_fast.training.steps: policy forward and
backward through the fused linear log-prob kernel, the value network, two
Adafactor updates; reference log-probs come from the cache, so they cost
nothing per step), times it on random tokens and prints compile time,
steps/s, examples/s, tokens/s, peak device memory, MFU and the ratio to the
paper's per-chip throughput.

FLOPs counted (matmuls and attention; embedding lookups, norms and
elementwise work are not):
  forward of one network on one example = 2 · N_matmul · tokens + attention,
    where the encoder's N_matmul (its layers' projections) sees S tokens and
    the decoder's (its layers' projections plus the output projection D·V)
    sees T tokens, and attention adds 4 · S² · H·K per encoder layer,
    4 · T² · H·K (self) + 4 · T · S · H·K (cross) per decoder layer;
  a trained network costs 3x its forward (6 · N · tokens), a forward-only
    one 1x (2 · N · tokens).
  dro_v: policy trained + separate value encoder trained (shared: the
    policy's encoder, no extra work); kto: policy trained on 2B sequences
    (examples and their mismatched completions); sft: policy trained.
MFU = counted FLOPs per second / the device's peak dense bf16 FLOP/s
(H100/H200 SXM: 989e12, A100: 312e12, TPU v5e: 197e12, or --peak_flops).
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dro_fast import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models import value  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import steps  # pylint: disable=g-import-not-at-top,wrong-import-position

_ALGO = flags.DEFINE_enum("algo", "dro_v", ["dro_v", "kto", "sft"],
                          "Algorithm whose step is timed.")
_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "small", "base", "large",
                                           "xl", "xxl"],
                          "T5 v1.1 / FLAN-T5 size.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Examples per step.")
_INPUT_LENGTH = flags.DEFINE_integer("input_length", 512, "Prompt tokens S.")
_TARGET_LENGTH = flags.DEFINE_integer("target_length", 128,
                                      "Completion tokens T.")
_IMPLEMENTATION = flags.DEFINE_string(
    "implementation", None, "Kernel implementation (None: by backend).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "Compute dtype (parameters and optimizer states "
                           "stay float32).")
_REMAT = flags.DEFINE_enum("remat", "dots", ["none", "full", "dots"],
                           "Rematerialisation policy.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "Scan over layers.")
_VALUE_NET = flags.DEFINE_enum("value_net", "separate", ["separate", "shared"],
                               "DRO-V value network.")
_PEAK_FLOPS = flags.DEFINE_float("peak_flops", None,
                                 "Peak FLOP/s of one device (default: from "
                                 "the device kind).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Append a JSON line here.")

# Paper, §4: T5-L 0.5 steps/s at batch 32 on 16 TPU v5e; T5-XL 0.1 steps/s
# on 32 chips. Examples per second per chip:
PAPER_EXAMPLES_PER_CHIP = {"large": 0.5 * 32 / 16, "xl": 0.1 * 32 / 32}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12}


def config_for(size: str) -> models.T5Config:
  name = "tiny" if size == "tiny" else f"flan-t5-{size}"
  return models.preset(name, dtype=_DTYPE.value, remat=_REMAT.value,
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
  n = config.num_decoder_layers * (8 * d * hk + mlp) + d * config.vocab_size
  attention = config.num_decoder_layers * (4 * t * t * hk + 4 * t * s * hk)
  return batch * (2 * n * t + attention)


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


def measure() -> dict:
  config = config_for(_SIZE.value)
  algorithm = steps.AlgorithmConfig(algo=_ALGO.value,
                                    value_net=_VALUE_NET.value,
                                    implementation=_IMPLEMENTATION.value)
  b, s, t = _BATCH.value, _INPUT_LENGTH.value, _TARGET_LENGTH.value
  trainer = steps.make_trainer(algorithm, config, optim.make_optimizer(1e-4),
                               optim.make_optimizer(1e-4))
  tokens = jnp.ones((1, 2), jnp.int32)
  policy_params = jax.jit(models.t5(config).init)(jax.random.key(0), tokens,
                                                  tokens)
  value_params = {}
  if algorithm.has_value:
    net = value.value_network(config, algorithm.value_net)
    if algorithm.value_net == "separate":
      value_params = value.init_from_policy(
          jax.jit(net.init)(jax.random.key(1), tokens), policy_params)
    else:
      value_params = net.init(jax.random.key(1),
                              jnp.zeros((1, 2, config.d_model)), tokens)
  state = jax.jit(trainer.init)(policy_params, value_params,
                                jax.random.PRNGKey(0))
  del policy_params, value_params
  rng = np.random.default_rng(0)
  batches = [jax.device_put(random_batch(config, b, s, t, rng))
             for _ in range(2)]

  start = time.perf_counter()
  update = jax.jit(trainer.update, donate_argnums=0).lower(
      state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  for i in range(2):                                  # warm-up
    state, metrics = update(state, batches[i % 2])
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(_STEPS.value):
    state, metrics = update(state, batches[i % 2])
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - start

  steps_per_s = _STEPS.value / elapsed
  flops = step_flops(config, _ALGO.value, _VALUE_NET.value, b, s, t)
  peak = peak_flops()
  stats = jax.devices()[0].memory_stats() or {}
  memory = update.memory_analysis()
  record = {
      "algo": _ALGO.value, "size": _SIZE.value, "batch_size": b,
      "input_length": s, "target_length": t,
      "implementation": _IMPLEMENTATION.value or "default",
      "dtype": _DTYPE.value, "remat": _REMAT.value,
      "scan_layers": _SCAN.value, "value_net": _VALUE_NET.value,
      "compile_s": compile_s, "steps_per_s": steps_per_s,
      "examples_per_s": steps_per_s * b,
      "tokens_per_s": steps_per_s * b * (s + t),
      "peak_bytes": int(stats.get("peak_bytes_in_use", -1)),
      "planned_temp_bytes": int(memory.temp_size_in_bytes) if memory else -1,
      "flops_per_step": flops,
      "mfu": flops * steps_per_s / peak if peak else None,
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
      "loss": float(metrics["loss"]),
  }
  paper = PAPER_EXAMPLES_PER_CHIP.get(_SIZE.value)
  record["ratio_to_paper_per_chip"] = (record["examples_per_s"] / paper
                                       if paper else None)
  return record


def main(argv):
  del argv
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  record = measure()
  fmt = lambda v: "n/a" if v is None else (f"{v:.4g}" if isinstance(
      v, float) else str(v))
  for key in ("device", "algo", "size", "batch_size", "input_length",
              "target_length", "implementation", "compile_s", "steps_per_s",
              "examples_per_s", "tokens_per_s", "peak_bytes", "mfu",
              "ratio_to_paper_per_chip"):
    print(f"{key:>24s}  {fmt(record[key])}")
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "a") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  app.run(main)
