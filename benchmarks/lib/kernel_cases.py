"""Named shapes, inputs and jitted steps shared by the kernel benchmarks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dro_fast import kernels


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  op: str            # "sequence" (logits given) or "linear" (hidden @ weight)
  batch: int
  time: int
  vocab: int
  hidden: int = 0


SHAPES = {s.name: s for s in [
    Shape("seq_b2_t64_v32128", "sequence", 2, 64, 32128),
    Shape("lin_b2_t64_d256_v32128", "linear", 2, 64, 32128, 256),
    Shape("seq_b8_t128_v32128", "sequence", 8, 128, 32128),
    Shape("seq_b8_t512_v32128", "sequence", 8, 512, 32128),
    Shape("seq_b32_t128_v32128", "sequence", 32, 128, 32128),
    Shape("seq_b32_t512_v32128", "sequence", 32, 512, 32128),
    Shape("lin_b8_t128_d1024_v32128", "linear", 8, 128, 32128, 1024),
    Shape("lin_b32_t512_d1024_v32128", "linear", 32, 512, 32128, 1024),
]}
GROUPS = {
    "small": ["seq_b2_t64_v32128", "lin_b2_t64_d256_v32128"],
    "paper": [n for n in SHAPES if "_b2_" not in n],
}
GROUPS["all"] = list(SHAPES)


def native_implementations() -> list[str]:
  platform = kernels.target_platform()
  return [name for name, impl in kernels.IMPLEMENTATIONS.items()
          if impl.native_backend in (None, platform)]


def make_inputs(shape: Shape, dtype, seed: int = 0):
  rng = np.random.default_rng(seed)
  b, t, v = shape.batch, shape.time, shape.vocab
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray(rng.random((b, t)) < 0.9)
  key = jax.random.key(seed)
  if shape.op == "sequence":
    logits = (3 * jax.random.normal(key, (b, t, v), jnp.float32)).astype(dtype)
    return (logits,), targets, mask
  k1, k2 = jax.random.split(key)
  hidden = jax.random.normal(k1, (b, t, shape.hidden), jnp.float32)
  weight = jax.random.normal(k2, (shape.hidden, v), jnp.float32)
  weight = weight / np.sqrt(shape.hidden)
  return (hidden.astype(dtype), weight.astype(dtype)), targets, mask


def make_step(shape: Shape, implementation: str, mode: str,
              block_sizes=None):
  """A jitted forward or forward+backward of the op on (diff_args, t, m)."""
  if shape.op == "sequence":
    op = lambda x, t, m: kernels.sequence_logprobs(
        x, t, m, implementation=implementation, block_sizes=block_sizes)
  else:
    op = lambda h, w, t, m: kernels.linear_sequence_logprobs(
        h, w, t, m, implementation=implementation, block_sizes=block_sizes)
  n_diff = 1 if shape.op == "sequence" else 2
  cotangent = lambda b: jnp.linspace(0.5, 1.5, b, dtype=jnp.float32)

  if mode == "forward":
    return jax.jit(op)

  def step(*args):
    diff, rest = args[:n_diff], args[n_diff:]
    value, vjp = jax.vjp(lambda *d: op(*d, *rest), *diff)
    return value, vjp(cotangent(value.shape[0]))
  return jax.jit(step)


