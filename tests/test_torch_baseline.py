"""The PyTorch DRO-V baseline (benchmarks/torch_step.py) computes our step.

Its loss and gradients equal ours: the same weights in both, one step on the
same batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import torch_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models import hf_decoder  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.models import value  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from dro_fast.training import steps  # pylint: disable=g-import-not-at-top,wrong-import-position

# Distinct small dimensions; sequences past the exact relative-position
# buckets (8 in the encoder) and padded prompts / masked completions.
CONFIG = models.T5Config(vocab_size=97, d_model=48, d_kv=16, d_ff=80,
                         num_heads=4, num_encoder_layers=2,
                         num_decoder_layers=3, dropout_rate=0.0,
                         scan_layers=True)     # compiles faster than unrolled
B, S, T = 3, 13, 7
TAU = 0.5          # not 1, so that the 1/τ gradient rescale is exercised


def _batch():
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, CONFIG.vocab_size, (B, S)).astype(np.int32)
  inputs[1, 9:] = CONFIG.pad_id
  mask = np.ones((B, T), bool)
  mask[2, 4:] = False
  return {
      "inputs": inputs,
      "targets": rng.integers(2, CONFIG.vocab_size, (B, T)).astype(np.int32),
      "target_mask": mask,
      "rewards": rng.normal(size=B).astype(np.float32),
      "ref_logprobs": rng.normal(-30.0, 3.0, size=B).astype(np.float32),
  }


def _jax_params(step: torch_step.DroVStep):
  """The torch policy's and value network's weights in our layout."""
  state = {k: v.detach().numpy() for k, v in step.policy.state_dict().items()}
  flat = {ours: state[name].T if transpose else state[name]
          for name, (ours, transpose) in pretrained.hf_name_map(
              CONFIG).items()}
  policy_params = pretrained.check_and_build(flat, CONFIG, "torch policy")
  # The value encoder starts as a copy of the policy's, in both frameworks
  # (only the parameter names are needed from the value network's init).
  tokens = np.ones((1, 2), np.int32)
  value_params = value.init_from_policy(
      jax.eval_shape(value.value_network(CONFIG).init, jax.random.key(0),
                     tokens, None), policy_params)
  value_params["value_head"] = {
      "w": step.value.head.weight.detach().numpy().T,              # [D, 1]
      "b": step.value.head.bias.detach().numpy()}                  # [1]
  return policy_params, value_params


def _grad_norm(module) -> float:
  return float(torch.sqrt(sum(p.grad.square().sum()
                              for p in module.parameters()
                              if p.grad is not None)))


def _assert_jax_step_matches(config, step, policy_params, value_params, batch,
                             loss):
  """Our update's loss and gradient norms equal the torch step's."""
  trainer = steps.build_trainer(
      steps.AlgorithmConfig(tau=TAU, implementation="xla"), config,
      optax.sgd(0.0), optax.sgd(0.0))
  state = trainer.init(policy_params, value_params, jax.random.PRNGKey(0))
  _, metrics = jax.jit(trainer.update)(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["policy_grad_norm"]),
                             _grad_norm(step.policy), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["value_grad_norm"]),
                             _grad_norm(step.value), rtol=1e-4)


def test_torch_step_matches_the_jax_step():
  step = torch_step.DroVStep(CONFIG, tau=TAU)
  batch = _batch()
  loss = float(step.backward(torch_step.to_torch(batch)))

  policy_params, value_params = _jax_params(step)
  # Only the loss and the gradients are compared (the two Adafactors differ
  # in details such as which matrices they factor); a no-op optimizer keeps
  # the compile short.
  _assert_jax_step_matches(CONFIG, step, policy_params, value_params, batch,
                           loss)


def test_rescale_divides_only_the_policy_gradient_by_tau():
  logprobs = torch.tensor([-3.0, -5.0], requires_grad=True)
  values = torch.tensor([0.5, -0.5], requires_grad=True)
  ref, rewards = torch.tensor([-4.0, -4.0]), torch.tensor([1.0, 0.0])
  for rescale, scale in ((False, 1.0), (True, 1.0 / TAU)):
    logprobs.grad = values.grad = None
    loss = torch_step.dro_v_loss(logprobs, ref, values, rewards, tau=TAU,
                                 rescale_policy_grad=rescale)
    loss.backward()
    delta = (rewards - values - TAU * (logprobs - ref)).detach().numpy()
    np.testing.assert_allclose(float(loss.detach()), 0.5 * np.mean(delta**2),
                               rtol=1e-6)
    np.testing.assert_allclose(values.grad.numpy(), -delta / 2, rtol=1e-6)
    np.testing.assert_allclose(logprobs.grad.numpy(),
                               -TAU * delta / 2 * scale, rtol=1e-6)


def test_autocast_step_computes_the_float32_loss_in_bfloat16():
  # The bfloat16 baseline (step_time --compare_torch --dtype=bfloat16): its
  # matmuls run in bfloat16, its loss and gradients stay near float32's, and
  # its parameters and gradients stay float32.
  batch = torch_step.to_torch(_batch())
  exact = torch_step.DroVStep(CONFIG, tau=TAU)
  mixed = torch_step.DroVStep(CONFIG, tau=TAU, autocast=torch.bfloat16)
  want, got = float(exact.backward(batch)), float(mixed.backward(batch))
  assert got != want                      # bfloat16 did round something
  np.testing.assert_allclose(got, want, rtol=5e-2)
  np.testing.assert_allclose(_grad_norm(mixed.policy),
                             _grad_norm(exact.policy), rtol=5e-2)
  assert all(p.grad.dtype == torch.float32 for p in mixed.policy.parameters())


def test_learning_rate_warms_up_like_optax_linear_schedule():
  # make_optimizer's schedule: update k runs at lr · min(1, k / warmup), k
  # from 0, so the first update moves nothing.
  lr, warmup = 1e-3, 4
  step = torch_step.DroVStep(CONFIG, tau=TAU, learning_rate=lr,
                             warmup_steps=warmup)
  schedule = optim.learning_rate_schedule(lr, warmup)
  batch = torch_step.to_torch(_batch())
  weight = step.policy.lm_head.weight
  for k in range(6):
    for optimizer in (step.policy_optimizer, step.value_optimizer):
      np.testing.assert_allclose(optimizer.param_groups[0]["lr"],
                                 float(schedule(k)), rtol=1e-6)
    before = weight.detach().clone()
    step(batch)
    assert torch.equal(before, weight.detach()) == (k == 0)


def test_baseline_policy_starts_near_uniform_like_ours():
  # Both freshly drawn policies are close to uniform: log π per target token
  # a little below −log V (logits of std ~1 cost about σ²/2 more), so the
  # two timed steps start at the same loss scale. With lm_head a copy of
  # the std-1 embedding, the baseline's logits were ~√D times larger.
  batch = _batch()
  torch_batch = torch_step.to_torch(batch)
  step = torch_step.DroVStep(CONFIG, tau=TAU)
  with torch.no_grad():
    theirs = torch_step.sequence_logprobs(
        step.policy, torch_batch["inputs"], torch_batch["targets"],
        torch_batch["target_mask"]).numpy()
  tokens = jnp.ones((1, 2), jnp.int32)
  params = models.t5(CONFIG).init(jax.random.key(0), tokens, tokens)
  ours = np.asarray(steps.reference_logprob_fn(CONFIG, "xla")(
      params, batch["inputs"], batch["targets"], batch["target_mask"]))
  tokens = batch["target_mask"].sum()
  uniform = -np.log(CONFIG.vocab_size)
  for logprobs in (ours, theirs):
    per_token = logprobs.sum() / tokens  # -5.30 and -5.38 (uniform: -4.57)
    assert 1.5 * uniform < per_token < uniform + 0.25, per_token


# The decoder-only baseline (Qwen 3-shaped: q/k norms, grouped-query
# attention, an untied lm_head), with distinct small dimensions.
DECODER = models.decoder_preset("tiny_decoder", vocab_size=97, hidden_size=48,
                                num_heads=4, num_kv_heads=2, head_dim=12,
                                intermediate_size=80, scan_layers=True)


def _decoder_batch():
  # Prompts of different lengths and a masked completion: the layout of
  # dro_fast.models.decoder (right-padded with -1).
  batch = _batch()
  batch["inputs"][1, 9:] = -1
  batch["inputs"][0, 4:] = -1
  batch["targets"][2, 4:] = -1
  return batch


def test_decoder_torch_step_matches_the_jax_step(tmp_path):
  step = torch_step.DecoderDroVStep(DECODER, tau=TAU)
  batch = _decoder_batch()
  loss = float(step.backward(torch_step.to_torch(batch)))

  # The same weights in ours: the torch policy through transformers'
  # save_pretrained and our loader; the value trunk is a copy of the
  # policy's in both frameworks.
  step.policy.save_pretrained(tmp_path)
  _, policy_params = hf_decoder.load_hf_decoder(tmp_path, DECODER)
  tokens = np.ones((1, 2), np.int32)
  value_params = value.init_from_policy(
      jax.eval_shape(value.value_network(DECODER).init, jax.random.key(0),
                     tokens, None), policy_params)
  value_params["value_head"] = {
      "w": step.value.head.weight.detach().numpy().T,              # [D, 1]
      "b": step.value.head.bias.detach().numpy()}                  # [1]
  _assert_jax_step_matches(DECODER, step, policy_params, value_params, batch,
                           loss)


def test_decoder_rows_join_prompt_and_completion():
  inputs = torch.tensor([[5, 6, -1], [7, 8, 9]])
  targets = torch.tensor([[1, 2], [3, -1]])
  ids, mask, index = torch_step.join_prompt_completion(inputs, targets)
  assert ids.tolist() == [[5, 6, 1, 2, 0], [7, 8, 9, 3, 0]]
  assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
  assert index.tolist() == [[1, 2], [2, 3]]
