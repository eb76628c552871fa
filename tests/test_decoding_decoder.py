"""Decoder-only sampling (decoding.sample / generate) against full forwards.

The loop is tested over a stand-in model written here: pure JAX functions
with the prefill / decode_step signatures of models.decoder, whose cache is
a running state (the last token and the sum of the embeddings seen), and
whose full forward recomputes the same logits from the whole sequence. The
reference decodes step by step: argmax (or the filtered support) of the
full forward over prompt + tokens so far. Then generate with a tiny
models.decoder: its greedy tokens are the argmax of its teacher-forced
logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import decoding
from dro_fast import models

V = 11
D = 4


class Step(NamedTuple):
  logits: jax.Array
  cache: tuple


def stand_in(seed=2, scale=2.0):
  """(params, prefill, decode_step, full): a bigram + bag-of-tokens LM.

  logits(next | x_1..x_n) = table[x_n] + (Σ_i emb[x_i]) @ out. The cache is
  (last token, Σ emb).
  """
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = {"table": scale * jax.random.normal(k1, (V, V)),
            "emb": jax.random.normal(k2, (V, D)),
            "out": jax.random.normal(k3, (D, V))}

  def logits_of(last, total):
    return params["table"][last] + total @ params["out"]

  def prefill(inputs, max_new_tokens):
    del max_new_tokens
    valid = inputs >= 0
    length = valid.sum(axis=1)
    last = jnp.take_along_axis(inputs, (length - 1)[:, None], axis=1)[:, 0]
    total = jnp.einsum("bs,bsd->bd", valid.astype(jnp.float32),
                       params["emb"][jnp.maximum(inputs, 0)])
    return Step(logits_of(last, total), (last, total))

  def decode_step(token, cache):
    _, total = cache
    total = total + params["emb"][token]
    return Step(logits_of(token, total), (token, total))

  def full(sequence):
    """Logits of the token after a 1-D sequence, from scratch."""
    sequence = jnp.asarray(sequence)
    return logits_of(sequence[-1], params["emb"][sequence].sum(axis=0))

  return params, prefill, decode_step, full


PROMPTS = [[3, 1, 4], [1, 5], [9, 2, 6, 5]]


def padded(prompts, width=5):
  out = np.full((len(prompts), width), -1, np.int32)
  for row, prompt in enumerate(prompts):
    out[row, :len(prompt)] = prompt
  return jnp.asarray(out)


def run(prefill, decode_step, max_new_tokens, rng=None, **kwargs):
  """(tokens, steps) of decoding.sample on PROMPTS, jitted."""
  fn = jax.jit(lambda inputs, rng: decoding.sample(
      prefill, decode_step, inputs, max_new_tokens=max_new_tokens, rng=rng,
      **kwargs))
  tokens, steps = fn(padded(PROMPTS),
                     jax.random.PRNGKey(0) if rng is None else rng)
  return np.asarray(tokens), int(steps)


def reference_greedy(full, prompt, max_new_tokens, stop_ids=()):
  out = []
  for _ in range(max_new_tokens):
    token = int(jnp.argmax(full(prompt + out)))
    out.append(token)
    if token in stop_ids:
      break
  return out + [-1] * (max_new_tokens - len(out))


def test_greedy_equals_argmax_of_the_full_forward_step_by_step():
  _, prefill, decode_step, full = stand_in()
  tokens, steps = run(prefill, decode_step, 6)
  assert steps == 6
  for row, prompt in enumerate(PROMPTS):
    assert tokens[row].tolist() == reference_greedy(full, prompt, 6)


def test_rows_stop_at_any_stop_id_and_the_loop_ends_early():
  _, prefill, decode_step, full = stand_in()
  free = [reference_greedy(full, p, 8) for p in PROMPTS]
  assert free == [[2, 6, 7, 10, 5, 5, 5, 5], [2, 5, 7, 3, 3, 6, 7, 10],
                  [7, 7, 8, 7, 1, 9, 9, 9]]
  # Row 0 stops at its 2nd token, row 1 at its 4th, row 2 runs on.
  tokens, steps = run(prefill, decode_step, 8, stop_ids=(6, 3))
  assert tokens.tolist() == [[2, 6] + [-1] * 6, [2, 5, 7, 3] + [-1] * 4,
                             free[2]]
  assert steps == 8
  # Every row stopped: the loop ends at the last row's stop.
  tokens, steps = run(prefill, decode_step, 8,
                      stop_ids=tuple(sorted(set(sum(free, [])))))
  assert steps == 1 and (tokens[:, 1:] == -1).all()
  assert tokens[:, 0].tolist() == [f[0] for f in free]


def test_stopped_rows_cost_no_more_steps():
  """decode_step runs until the last row stops, not to max_new_tokens."""
  _, prefill, decode_step, full = stand_in()
  stop_ids = (10, 3, 1)
  expected = [reference_greedy(full, p, 8, stop_ids) for p in PROMPTS]
  assert [8 - row.count(-1) for row in expected] == [4, 4, 5]
  tokens, steps = run(prefill, decode_step, 8, stop_ids=stop_ids)
  assert tokens.tolist() == expected
  assert steps == 5


@pytest.mark.parametrize("sampling", [
    decoding.SamplingConfig(temperature=0.7, top_k=1),
    decoding.SamplingConfig(temperature=1.3, top_p=1e-6),
])
def test_top_one_sampling_is_greedy(sampling):
  _, prefill, decode_step, full = stand_in()
  tokens, _ = run(prefill, decode_step, 5, sampling=sampling)
  assert tokens.tolist() == [reference_greedy(full, p, 5) for p in PROMPTS]


def test_top_k_and_top_p_draw_only_from_the_kept_set():
  """Each sampled token lies in the top-k / top-p set of its prefix."""
  _, prefill, decode_step, full = stand_in(scale=1.0)
  for sampling in (decoding.SamplingConfig(temperature=1.0, top_k=3),
                   decoding.SamplingConfig(temperature=1.0, top_p=0.6)):
    seen = set()
    for seed in range(4):
      tokens, _ = run(prefill, decode_step, 6, sampling=sampling,
                      rng=jax.random.PRNGKey(seed))
      for row, prompt in enumerate(PROMPTS):
        prefix = list(prompt)
        for token in tokens[row]:
          probs = np.asarray(jax.nn.softmax(full(prefix)), np.float64)
          order = np.argsort(-probs)
          if sampling.top_k:
            kept = set(order[:sampling.top_k].tolist())
          else:
            before = np.cumsum(probs[order]) - probs[order]
            kept = set(order[before < sampling.top_p].tolist())
          assert int(token) in kept, (sampling, prefix, token)
          seen.add(int(token))
          prefix.append(int(token))
    assert len(seen) > 3, "sampling drew (almost) one token only"


def test_sampling_draws_from_the_softmax():
  """Temperature sampling of the first token follows softmax(logits / t)."""
  _, prefill, decode_step, full = stand_in(scale=1.0)
  sampling = decoding.SamplingConfig(temperature=2.0)
  fn = jax.jit(jax.vmap(lambda rng: decoding.sample(
      prefill, decode_step, padded(PROMPTS[:1]), max_new_tokens=1,
      sampling=sampling, rng=rng)[0][0, 0]))
  draws = np.asarray(fn(jax.random.split(jax.random.PRNGKey(1), 4000)))
  expected = np.asarray(jax.nn.softmax(full(PROMPTS[0]) / 2.0))
  counts = np.bincount(draws, minlength=V) / len(draws)
  np.testing.assert_allclose(counts, expected, atol=0.03)


def test_sampling_is_deterministic_per_key():
  _, prefill, decode_step, _ = stand_in(scale=1.0)
  sampling = decoding.SamplingConfig(temperature=1.0)
  a, _ = run(prefill, decode_step, 6, sampling=sampling,
             rng=jax.random.PRNGKey(3))
  b, _ = run(prefill, decode_step, 6, sampling=sampling,
             rng=jax.random.PRNGKey(3))
  c, _ = run(prefill, decode_step, 6, sampling=sampling,
             rng=jax.random.PRNGKey(4))
  assert (a == b).all() and (a != c).any()


TINY = models.DecoderConfig(
    family="qwen3", vocab_size=V, hidden_size=16, num_layers=2, num_heads=2,
    num_kv_heads=1, head_dim=8, intermediate_size=24, qk_norm=True,
    rope_theta=10000.0)


@pytest.fixture(scope="module")
def tiny_params():
  inputs = padded(PROMPTS)
  params = models.decoder(TINY).init(jax.random.PRNGKey(0), inputs,
                                     jnp.zeros((3, 2), jnp.int32))
  # Larger weights than the init's, so that the greedy paths differ by row.
  return jax.tree.map(lambda p: p * 4.0 if p.ndim == 2 else p, params)


def test_generate_with_a_decoder_equals_argmax_of_its_full_forward(
    tiny_params):
  """generate's cached greedy tokens: each the argmax of the teacher-forced
  logits of models.decoder over prompt + the tokens before it."""
  inputs = padded(PROMPTS)
  tokens = np.asarray(decoding.generate(tiny_params, inputs, config=TINY,
                                        max_length=6))
  assert (tokens >= 0).all() and len({tuple(r) for r in tokens}) > 1
  logits = models.decoder(TINY).apply.logits(tiny_params, None, inputs,
                                             jnp.asarray(tokens))
  np.testing.assert_array_equal(np.argmax(np.asarray(logits), -1), tokens)
  # Stopping at a token that row 0 emits third pads the rest of that row.
  stop = int(tokens[0, 2])
  stopped = np.asarray(decoding.generate(
      tiny_params, inputs, config=TINY, max_length=6, stop_ids=[stop]))
  for row, free in zip(stopped, tokens):
    end = next((i for i, t in enumerate(free) if t == stop), 5) + 1
    assert row.tolist() == free[:end].tolist() + [-1] * (6 - end)


def test_t5_takes_no_stop_ids():
  config = models.T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8,
                           num_heads=2, num_encoder_layers=1,
                           num_decoder_layers=1)
  with pytest.raises(ValueError, match="stop_ids is for decoder-only"):
    decoding.generate({}, jnp.zeros((1, 2), jnp.int32), config=config,
                      max_length=2, stop_ids=[1])
