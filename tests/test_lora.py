"""LoRA: adapters on a frozen base, for T5 and decoder-only models.

An adapted model equals its base at initialisation (lora_b is zero), and
with trained adapters equals the merged weights W + (alpha / r)·A·B; the
trainer differentiates and updates the adapters only and checkpoints them
alone; the export's PEFT folder loads onto the base with transformers and
peft and gives our log-probabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dro_fast import export
from dro_fast import models
from dro_fast.data.config import DataConfig
from dro_fast.models import hf_decoder
from dro_fast.models import lora
from dro_fast.models import partitioning
from dro_fast.training import checkpointing
from dro_fast.training import init
from dro_fast.training import runs
from dro_fast.training import steps
from dro_fast.training.config import AlgorithmConfig
from dro_fast.training.run_config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = models.LoraConfig(rank=4, alpha=6.0, base_dtype="float32")


def _t5(**changes):
  return models.preset("tiny", vocab_size=64, dropout_rate=0.0, **changes)


def _decoder(**changes):
  return models.decoder_preset("tiny_decoder", vocab_size=64, **changes)


CONFIGS = {"t5": _t5, "t5_v1_0_scan": lambda **c: _t5(variant="v1_0",
                                                       scan_layers=True, **c),
           "decoder": _decoder,
           "decoder_scan": lambda **c: _decoder(scan_layers=True, **c)}


def _batch(config):
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 64, (2, 6)).astype(np.int32)
  targets = rng.integers(2, 64, (2, 5)).astype(np.int32)
  if isinstance(config, models.DecoderConfig):
    inputs[1, 4:] = models.PAD
    targets[0, 3:] = models.PAD
  return jnp.asarray(inputs), jnp.asarray(targets)


def _logits(config, params):
  inputs, targets = _batch(config)
  return np.asarray(jax.jit(steps.policy_network(config).apply.logits)(
      params, None, inputs, targets))


def _trained(params, seed=1):
  """params with every adapter drawn away from zero (as if trained)."""
  rng = np.random.default_rng(seed)
  return {module: {name: (jnp.asarray(rng.normal(0, 0.3, value.shape),
                                      jnp.float32)
                          if name in lora.ADAPTERS else value)
                   for name, value in leaves.items()}
          for module, leaves in params.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapted_model_equals_its_base_at_init_and_its_merged_weights(name):
  base_config = CONFIGS[name]()
  config = CONFIGS[name](lora=LORA)
  rng = jax.random.PRNGKey(0)
  base, _ = init.init_params(base_config, None, rng)
  adapted, _ = init.init_params(config, None, rng, policy_params=base)
  adapters, kept = lora.split(adapted)
  assert adapters and all(
      np.all(np.asarray(leaves["lora_b"]) == 0) for leaves in adapters.values())
  jax.tree.map(np.testing.assert_array_equal, kept, base)
  # Exactly the base model at step 0.
  np.testing.assert_array_equal(_logits(config, adapted),
                                _logits(base_config, base))
  # Trained adapters: x·W + s·(x·A)·B against the merged W + s·A·B.
  trained = _trained(adapted)
  want = _logits(base_config, lora.merge(trained, LORA))
  got = _logits(config, trained)
  assert np.max(np.abs(want - _logits(base_config, base))) > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(
      np.abs(want)))


def test_merge_is_the_scaled_low_rank_product():
  rng = np.random.default_rng(0)
  kernel, a, b = (rng.normal(size=s) for s in ((3, 5, 7), (3, 5, 2),
                                               (3, 2, 7)))
  merged = lora.merge({"m": {"kernel": jnp.asarray(kernel, jnp.float32),
                             "lora_a": jnp.asarray(a, jnp.float32),
                             "lora_b": jnp.asarray(b, jnp.float32)}},
                      LORA)
  want = kernel + LORA.alpha / LORA.rank * np.einsum("lir,lro->lio", a, b)
  np.testing.assert_allclose(merged["m"]["kernel"], want, rtol=1e-5)
  assert set(merged["m"]) == {"kernel"}


def test_targets_that_name_no_layer_list_the_valid_names():
  with pytest.raises(ValueError, match=r"'wi' names no layer of T5 v1_1.*"
                     r"wi_0, wi_1, wo"):
    _t5(lora=models.LoraConfig(targets=("attention", "wi")))
  with pytest.raises(ValueError, match=r"'q' names no layer of a qwen3 "
                     r"model; valid targets: attention, mlp, q_proj"):
    _decoder(lora=models.LoraConfig(targets=("q",)))
  assert _t5(lora=models.LoraConfig(targets=("mlp",))).lora_modules == {
      "wi_0", "wi_1", "wo"}
  assert _t5(variant="v1_0", lora=models.LoraConfig(
      targets=("mlp", "query"))).lora_modules == {"wi", "wo", "query"}
  assert _decoder(lora=models.LoraConfig(
      targets=("q_proj", "v_proj"))).lora_modules == {"q_proj", "v_proj"}


def test_the_trainer_bad_targets_flag_is_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, "-m", "dro_fast.train", "--lora_rank=4",
       "--lora_targets=attention,qkv", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2
  assert "Traceback" not in done.stderr
  assert ("--lora_targets: LoRA target 'qkv' names no layer of T5 v1_1; "
          "valid targets: attention, mlp, query") in done.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, line", [
    ("--lora_alpha=0", "flag --lora_alpha=0.0: must be > 0"),
    ("--lora_rank=-2", "flag --lora_rank=-2: -2 is not a non-negative"),
])
def test_the_trainer_bad_rank_or_alpha_flag_is_one_line(tmp_path, flag,
                                                        line):
  done = subprocess.run(
      [sys.executable, "-m", "dro_fast.train", "--lora_rank=4", flag,
       f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert line in done.stderr
  assert not (tmp_path / "run").exists()


def test_lora_config_refuses_bad_fields():
  for fields, message in (({"rank": 0}, "rank must be positive"),
                          ({"alpha": -1.0}, "alpha must be > 0"),
                          ({"targets": ()}, "targets is empty"),
                          ({"base_dtype": "float16"}, "base_dtype must be")):
    with pytest.raises(ValueError, match=message):
      models.LoraConfig(**fields)


def test_adapters_take_their_kernels_axes():
  for path, want in (
      ("model/layers/self_attn/q_proj/lora_a",
       ("layers", "embed", "lora_rank")),
      ("model/layers/self_attn/q_proj/lora_b",
       ("layers", "lora_rank", "heads")),
      ("model/layers_1/mlp/down_proj/lora_a", ("mlp", "lora_rank")),
      ("decoder/layers_0/encoder_decoder_attention/out/lora_b",
       ("lora_rank", "embed"))):
    assert partitioning.logical_axes(path) == want
    assert partitioning.mesh_axes(want)[-2:] in (
        ("fsdp", None), (None, "model"), ("model", None), (None, "fsdp"))


def test_run_config_json_keeps_lora():
  run = RunConfig("/tmp/w", model=_decoder(lora=LORA))
  again = RunConfig.from_json(run.to_json())
  assert again == run and again.model.lora == LORA
  assert RunConfig.from_json(RunConfig("/tmp/w").to_json()).model.lora is None


def test_the_trainer_updates_only_the_adapters():
  config = _decoder(lora=models.LoraConfig(rank=2, alpha=4.0))
  algorithm = AlgorithmConfig(algo="dro_v", value_net="shared",
                              implementation="xla")
  policy, value = init.init_params(config, algorithm, jax.random.PRNGKey(0))
  # The base is frozen in bfloat16 (LoraConfig's default).
  assert {x.dtype for x in jax.tree.leaves(lora.split(policy)[1])} == {
      jnp.dtype(jnp.bfloat16)}
  optimizer = optax.adam(1e-2)
  trainer = steps.build_trainer(algorithm, config, optimizer, optax.adam(1e-2))
  state = trainer.init(policy, value, jax.random.PRNGKey(1))
  adapters, base = lora.split(policy)
  assert jax.tree.structure(state.policy_params) == jax.tree.structure(
      adapters)
  assert jax.tree.structure(state.policy_opt_state) == jax.tree.structure(
      optimizer.init(adapters))
  inputs, targets = _batch(config)
  batch = {"inputs": inputs, "targets": targets,
           "target_mask": targets >= 0,
           "rewards": jnp.array([1.0, 0.0]),
           "ref_logprobs": jnp.array([-30.0, -20.0])}
  new, metrics = jax.jit(trainer.update)(state, batch)
  assert float(metrics["skipped_update"]) == 0.0
  assert float(metrics["policy_grad_norm"]) > 0
  jax.tree.map(np.testing.assert_array_equal, new.frozen_params, base)
  moved = [float(jnp.max(jnp.abs(leaves["lora_b"])))
           for leaves in new.policy_params.values()]
  assert min(moved) > 0
  # The whole policy the loss saw: base and adapters.
  assert set(new.policy) == set(policy)


# ---------------------------------------------------------------------------
# Checkpoints and export.


def _lora_workdir(path, config, *, init_checkpoint=None, step=3):
  """A LoRA run as runs.py reads it: run_config.json (and spiece.model for
  T5) and one checkpoint whose policy item holds trained adapters."""
  os.makedirs(path, exist_ok=True)
  data = DataConfig(tokenizer=init_checkpoint,
                    decoder_only=isinstance(config, models.DecoderConfig))
  run = RunConfig(str(path), data=data, model=config,
                  init_checkpoint=init_checkpoint)
  (path / "run_config.json").write_text(run.to_json())
  if init_checkpoint is None:
    from tests.test_export import PIECES, TEXTS  # pylint: disable=g-import-not-at-top
    from dro_fast import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    tokenizer_lib.train_sentencepiece(TEXTS, PIECES,
                                      str(path / "spiece.model"))
  adapters, _ = lora.split(_trained(runs.load_initial_policy(str(path)),
                                    seed=step))
  checkpointer = checkpointing.Checkpointer(str(path / "checkpoints"),
                                            runs.ITEMS)
  checkpointer.save(step, {runs.POLICY: adapters,
                           runs.TRAIN_STATE: {"step": np.int32(step)}}, {})
  checkpointer.close()


def _t5_logprobs(model, inputs, targets):
  import torch  # pylint: disable=g-import-not-at-top
  inputs = torch.tensor(np.asarray(inputs)).long()
  targets = torch.tensor(np.asarray(targets)).long()
  with torch.no_grad():
    logits = model(input_ids=inputs, attention_mask=inputs != 0,
                   labels=targets).logits.double()
  picked = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
  return (picked * (targets != 0)).sum(-1).numpy()


def _decoder_logprobs(model, inputs, targets):
  """log π of right-padded (PAD) completions after right-padded prompts."""
  import torch  # pylint: disable=g-import-not-at-top
  out = []
  for prompt, completion in zip(np.asarray(inputs), np.asarray(targets)):
    prompt, completion = prompt[prompt >= 0], completion[completion >= 0]
    ids = torch.tensor(np.concatenate([prompt, completion]))[None].long()
    with torch.no_grad():
      logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    n = len(prompt)
    out.append(sum(float(logp[n - 1 + i, t]) for i, t in
                   enumerate(completion)))
  return np.array(out)


def _ours(config, params, inputs, targets):
  logits = _logits(config, params).astype(np.float64)
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)),
                                -1, keepdims=True)) - logits.max(
                                    -1, keepdims=True)
  targets = np.asarray(targets)
  valid = targets >= 0 if isinstance(config, models.DecoderConfig) else (
      targets != 0)
  picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None],
                              -1)[..., 0]
  return np.sum(np.where(valid, picked, 0.0), -1)


@pytest.mark.parametrize("family", ["t5", "llama_scan"])
def test_peft_folder_loads_on_the_base_with_our_logprobs(family, tmp_path):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if family == "t5":
    config = _t5(lora=models.LoraConfig(rank=3, alpha=5.0,
                                        targets=("attention", "wo"),
                                        base_dtype="float32"))
    init_checkpoint, load = None, transformers.T5ForConditionalGeneration
    score = _t5_logprobs
    inputs, targets = _batch(config)
    targets = targets.at[1, 3:].set(0)
  else:
    from tests.hf_folders import build_model_folder  # pylint: disable=g-import-not-at-top
    init_checkpoint = build_model_folder(tmp_path / "llama", "llama")
    base_config, _ = hf_decoder.load_hf_decoder(init_checkpoint)
    # The frozen base in bfloat16: the export of WORKDIR:init is that base.
    config = base_config.replace(scan_layers=True, lora=models.LoraConfig(
        rank=4, alpha=8.0, targets=("q_proj", "v_proj", "mlp")))
    load, score = transformers.AutoModelForCausalLM, _decoder_logprobs
    inputs, targets = _batch(config)
  workdir = tmp_path / "run"
  _lora_workdir(workdir, config, init_checkpoint=init_checkpoint)
  export.export(f"{workdir}:init", str(tmp_path / "base"))
  export.export(str(workdir), str(tmp_path / "adapters"), peft=True)
  export.export(str(workdir), str(tmp_path / "merged"))
  assert sorted(os.listdir(tmp_path / "adapters")) == [
      "adapter_config.json", "adapter_model.safetensors"]
  params, _ = runs.load_policy(str(workdir))
  ours = _ours(config, params, inputs, targets)
  base_model = load.from_pretrained(tmp_path / "base",
                                    dtype=torch.float32).eval()
  at_base = score(base_model, inputs, targets)
  adapted = peft.PeftModel.from_pretrained(base_model,
                                           tmp_path / "adapters").eval()
  merged = load.from_pretrained(tmp_path / "merged",
                                dtype=torch.float32).eval()
  tolerance = 1e-4 * np.max(np.abs(ours))
  assert np.max(np.abs(at_base - ours)) > 100 * tolerance   # adapters matter
  np.testing.assert_allclose(score(adapted, inputs, targets), ours,
                             atol=tolerance)
  np.testing.assert_allclose(score(merged, inputs, targets), ours,
                             atol=tolerance)
  written = json.loads((tmp_path / "adapters" /
                        "adapter_config.json").read_text())
  assert written["r"] == config.lora.rank
  assert written["lora_alpha"] == config.lora.alpha


def test_peft_export_of_a_full_fine_tune_is_refused(tmp_path):
  from tests.test_export import make_workdir  # pylint: disable=g-import-not-at-top
  make_workdir(tmp_path / "run", _t5(), steps=(2,))
  with pytest.raises(export.ExportError, match="no adapters to export"):
    export.export(str(tmp_path / "run"), str(tmp_path / "out"), peft=True)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["t5", "decoder"])
def test_the_flop_model_counts_each_adapter_it_builds(name):
  """2 · (|A| + |B|) FLOPs per token through each adapter, counted from the
  parameters themselves: T5's encoder and cross-attention key / value
  adapters see S tokens, the rest of its decoder T; a decoder-only model's
  every adapter S + T."""
  from dro_fast.training import flops  # pylint: disable=g-import-not-at-top
  config = CONFIGS[name](lora=models.LoraConfig(rank=3))
  shapes = jax.eval_shape(lambda: init.init_params(
      config, None, jax.random.PRNGKey(0))[0])
  batch, s, t = 2, 7, 5
  want = 0
  for module, leaves in lora.split(shapes)[0].items():
    per_token = 2 * (leaves["lora_a"].size + leaves["lora_b"].size)
    if isinstance(config, models.DecoderConfig):
      tokens = s + t
    elif module.startswith("encoder/") or (
        "encoder_decoder_attention/" in module
        and module.endswith(("/key", "/value"))):
      tokens = s
    else:
      tokens = t
    want += batch * tokens * per_token
  assert flops.lora_forward_flops(config, batch, s, t) == want
  full = flops.step_flops(CONFIGS[name](), "sft", "shared", batch, s, t)
  adapted = flops.step_flops(config, "sft", "shared", batch, s, t)
  assert adapted == pytest.approx(full * 2 / 3 + 3 * want)
