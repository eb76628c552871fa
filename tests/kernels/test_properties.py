"""Hypothesis property tests over shapes and masks (deterministic profile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.lib import numpy_reference as ref
from dro_fast import kernels
from tests.kernels import cases


@st.composite
def problems(draw):
  batch = draw(st.integers(1, 3))
  time = draw(st.integers(1, 6))
  vocab = draw(st.integers(2, 260))
  mask = np.array(draw(st.lists(st.booleans(), min_size=batch * time,
                                max_size=batch * time))).reshape(batch, time)
  seed = draw(st.integers(0, 2**16))
  implementation = draw(st.sampled_from(["chunked_xla", "pallas_gpu"]))
  return batch, time, vocab, mask, seed, implementation


@given(problems())
def test_sequence_logprobs_matches_reference(problem):
  batch, time, vocab, mask, seed, implementation = problem
  logits, targets, _, g = cases.random_inputs(seed, batch, time, vocab,
                                              jnp.float32)
  mask = jnp.asarray(mask)
  fn = lambda x: kernels.sequence_logprobs(x, targets, mask,
                                           implementation=implementation,
                                           block_sizes=cases.SMALL_BLOCKS)
  value, vjp = jax.vjp(fn, logits)
  cases.close(value, ref.sequence_logprobs(logits, targets, mask),
              rtol=2e-5, atol=2e-4)
  cases.close(vjp(g)[0], ref.sequence_logprobs_vjp(logits, targets, mask, g),
              rtol=1e-4, atol=2e-5)
  # Masked positions never contribute, whatever their logits hold.
  poisoned = jnp.where(mask[..., None], logits, 1e4)
  cases.close(fn(poisoned), np.asarray(value), rtol=1e-6, atol=1e-5)
