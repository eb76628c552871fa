"""dro_fast.export: a run's policy as a transformers folder.

Checked against transformers itself: T5ForConditionalGeneration (T5) or
AutoModelForCausalLM (decoder-only families, trained from a tiny Hugging
Face folder) and AutoTokenizer load the exported folder, and give the
log-probabilities and ids that dro_fast's model and tokenizer give. Bad
input is one line, exit status 2, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import dro_fast
from dro_fast import export
from dro_fast import models
from dro_fast import tokenizer as tokenizer_lib
from dro_fast.data.config import DataConfig
from dro_fast.models import hf_files
from dro_fast.models import hf_t5
from dro_fast.models import pretrained
from dro_fast.training import checkpointing
from dro_fast.training import runs
from dro_fast.training.run_config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
PIECES = 48     # the SentencePiece model's, fewer than the embedding's rows
TEXTS = ([f"the quick brown fox jumps over the lazy dog {i} times"
          for i in range(100)] + ["hello world, foo bar baz"] * 20)
ROWS = [("the quick fox", "jumps over"), ("hello world", "foo bar baz qux"),
        ("lazy dog 12", "the"), ("zz", "brown fox jumps over the lazy dog")]


def _config(variant="v1_1", scan_layers=False):
  return models.preset("tiny", vocab_size=VOCAB, variant=variant,
                       scan_layers=scan_layers)


def _params(config, seed=0):
  """Random parameters whose outputs are far from uniform: numpy draws in the
  model's shapes (no compilation), norm scales around 1, the
  relative-position tables and embedding wide, the kernels 1/sqrt(fan-in)."""
  rng = np.random.default_rng(seed)
  tokens = jnp.ones((1, 2), jnp.int32)
  shapes = jax.eval_shape(models.t5(config).init, jax.random.key(0), tokens,
                          tokens)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    std = 1.0 if leaf.ndim < 2 or "embedding" in name else (
        leaf.shape[-2] ** -0.5)
    return rng.normal(0.0, std, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def make_workdir(path, config, steps=(3, 7)):
  """A run directory as runs.py reads it: run_config.json, spiece.model and
  checkpoints holding the policy (the train state is a stand-in: export
  never reads it). Returns {step: policy params}."""
  os.makedirs(path, exist_ok=True)
  run = RunConfig(str(path), data=DataConfig(), model=config)
  with open(os.path.join(path, "run_config.json"), "w") as f:
    f.write(run.to_json())
  tokenizer_lib.train_sentencepiece(TEXTS, PIECES,
                                    os.path.join(path, "spiece.model"))
  checkpointer = checkpointing.Checkpointer(os.path.join(path, "checkpoints"),
                                            runs.ITEMS)
  policies = {}
  for step in steps:
    policies[step] = _params(config, seed=step)
    checkpointer.save(step, {runs.POLICY: policies[step],
                             runs.TRAIN_STATE: {"step": np.int32(step)}}, {})
  checkpointer.close()
  return policies


def _rows(tokenizer):
  inputs, _ = tokenizer.encode_batch([p for p, _ in ROWS], 8)
  targets, mask = tokenizer.encode_batch([c for _, c in ROWS], 10)
  return inputs, targets, mask


def _dro_fast_logprobs(config, params, inputs, targets, mask):
  logits = jax.jit(models.t5(config).apply.logits)(
      params, None, jnp.asarray(inputs), jnp.asarray(targets))
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], -1)
  return np.asarray(jnp.sum(picked[..., 0] * mask, axis=-1))


def _hf_logprobs(model, inputs, targets, mask):
  inputs, targets = torch.tensor(inputs).long(), torch.tensor(targets).long()
  with torch.no_grad():
    # labels: transformers shifts them right behind decoder_start_token_id.
    logits = model(input_ids=inputs, attention_mask=inputs != 0,
                   labels=targets).logits.double()
  picked = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
  return (picked * torch.tensor(mask)).sum(-1).numpy()


@pytest.mark.parametrize("variant, scan_layers", [
    ("v1_1", False), ("v1_0", True)])
def test_transformers_loads_the_export_with_the_same_logprobs(
    tmp_path, variant, scan_layers):
  config = _config(variant, scan_layers)
  policies = make_workdir(tmp_path / "run", config)
  out = tmp_path / "hf"
  result = export.export(f"{tmp_path / 'run'}:3", str(out))
  assert result["source"].endswith(":3")
  assert {"config.json", "generation_config.json", "model.safetensors",
          "spiece.model", "tokenizer_config.json"} <= set(os.listdir(out))
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]

  model = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  assert model.dtype == torch.float32
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  tokenizer = tokenizer_lib.Tokenizer.load(tmp_path / "run" / "spiece.model")
  for prompt, completion in ROWS:
    assert hf_tokenizer(prompt)["input_ids"] == tokenizer.encode(prompt)
    assert hf_tokenizer(completion)["input_ids"] == tokenizer.encode(
        completion)
  assert hf_tokenizer.decode(tokenizer.encode("the lazy dog"),
                             skip_special_tokens=True) == "the lazy dog"
  rows = _rows(tokenizer)
  expected = _dro_fast_logprobs(config, policies[3], *rows)
  np.testing.assert_allclose(_hf_logprobs(model, *rows), expected,
                             rtol=0, atol=1e-5)
  # Not the newest checkpoint's policy: that one scores otherwise.
  assert np.abs(_dro_fast_logprobs(config, policies[7], *rows)
                - expected).max() > 1e-2
  # And dro_fast reads its own export back exactly.
  back_config, back = pretrained.load_hf(out)
  assert back_config.variant == variant
  jax.tree.map(np.testing.assert_array_equal, back,
               hf_t5.unstack_layers(policies[3], config))


def test_sharded_export_reads_back(tmp_path):
  config = _config()
  policies = make_workdir(tmp_path / "run", config, steps=(5,))
  out = tmp_path / "hf"
  export.export(str(tmp_path / "run"), str(out), max_shard_bytes=30_000,
                dtype="bfloat16")
  index = json.loads((out / hf_files.INDEX_FILE).read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2
  assert shards == [hf_files.shard_name(k + 1, len(shards))
                    for k in range(len(shards))]
  assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == (
      shards)
  assert not (out / hf_files.SINGLE_FILE).exists()
  state = hf_t5.hf_state_dict(config, policies[5], "bfloat16")
  assert set(index["weight_map"]) == set(state)
  assert index["metadata"]["total_size"] == sum(a.nbytes
                                                for a in state.values())
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

  model = transformers.T5ForConditionalGeneration.from_pretrained(out)
  assert model.dtype == torch.bfloat16
  loaded = model.state_dict()
  for name, array in state.items():
    np.testing.assert_array_equal(
        loaded[name].float().numpy(), array.astype(np.float32), err_msg=name)


def test_t5_tokenizer_keeps_t5s_sentinels_where_the_vocabulary_has_room(
    tmp_path):
  tokenizer = tokenizer_lib.train_sentencepiece(TEXTS, PIECES, None)
  assert tokenizer.vocab_size == PIECES
  for vocab_size, extra_ids in ((PIECES + 100 + 28, 100), (VOCAB, 0)):
    files = hf_t5.tokenizer_files(tokenizer, vocab_size)
    assert files["tokenizer_config.json"]["extra_ids"] == extra_ids
    folder = tmp_path / str(vocab_size)
    folder.mkdir()
    hf_t5.write_files(files, str(folder))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(hf_tokenizer) == PIECES + extra_ids
    if extra_ids:
      # T5's layout: <extra_id_0> is the last id.
      assert hf_tokenizer.convert_tokens_to_ids("<extra_id_0>") == (
          PIECES + 99)
    assert hf_tokenizer("the lazy dog")["input_ids"] == tokenizer.encode(
        "the lazy dog")


def test_staged_directory_leaves_nothing_when_writing_fails(tmp_path):
  out = tmp_path / "hf"
  with pytest.raises(RuntimeError, match="disk"):
    with hf_files.staged_directory(out) as staging:
      (tmp_path / "probe").write_text(staging)
      hf_files.write_safetensors_shards({"a": np.ones(3, np.float32)},
                                        staging)
      raise RuntimeError("disk gone")
  assert sorted(os.listdir(tmp_path)) == ["probe"]
  # --overwrite replaces a folder's whole contents.
  out.mkdir()
  (out / "old.txt").write_text("old")
  with pytest.raises(hf_files.ExportError, match="not empty.*`overwrite`"):
    with hf_files.staged_directory(out):
      pass
  with hf_files.staged_directory(out, overwrite=True) as staging:
    hf_files.write_safetensors_shards({"a": np.ones(3, np.float32)}, staging)
  assert os.listdir(out) == [hf_files.SINGLE_FILE]
  assert sorted(os.listdir(tmp_path)) == ["hf", "probe"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("export") / "run"
  make_workdir(path, _config(), steps=(2, 4))
  return path


@pytest.mark.parametrize("source, out, message", [
    ("{tmp}/nowhere", "{tmp}/hf", "no run_config.json"),
    ("{run}:5", "{tmp}/hf", "no checkpoint for step 5; it has steps [2, 4]"),
    ("{run}", "{tmp}/full", "exists and is not empty; name a new folder, or "
     "set `overwrite`"),
    ("{run}", "{run}", "holds the run"),
    ("{empty_run}", "{tmp}/hf", "has no checkpoints"),
])
def test_bad_input_is_refused_before_anything_is_written(
    tmp_path, run_dir, source, out, message):
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("mine")
  (tmp_path / "empty_run").mkdir()
  (tmp_path / "empty_run" / "run_config.json").write_text(
      (run_dir / "run_config.json").read_text())
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  names = {"tmp": tmp_path, "run": run_dir, "empty_run": tmp_path / "empty_run"}
  with pytest.raises((export.ExportError, runs.RunError)) as raised:
    export.export(source.format(**names), out.format(**names))
  assert message in str(raised.value)
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before
  assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "dro_fast.export", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)


def test_cli_exports_and_refuses_in_one_line(run_dir, tmp_path):
  result = _cli(f"{run_dir}:2", str(tmp_path / "hf"), "--max_shard_bytes=30000")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"exported {run_dir}:2 to {tmp_path / 'hf'}" in result.stdout
  assert (tmp_path / "hf" / hf_files.INDEX_FILE).is_file()
  result = _cli(f"{run_dir}:9", str(tmp_path / "hf2"))
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1] == (f"error: {run_dir} has no checkpoint for step 9; it "
                       "has steps [2, 4].")
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "hf2").exists()
  result = _cli(str(run_dir), str(tmp_path / "hf"))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().endswith("or set --overwrite to replace it.")
  result = _cli(str(run_dir), str(tmp_path / "hf2"), "--dtype=int8")
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith("error: flag --dtype=int8: value should be "
                                  "one of <float32|bfloat16|float16>.")
  assert not (tmp_path / "hf2").exists()


def test_init_exports_the_runs_initial_policy(run_dir, tmp_path):
  result = export.export(f"{run_dir}:init", str(tmp_path / "hf"))
  assert result["source"] == f"{run_dir}:init"
  _, params = pretrained.load_hf(tmp_path / "hf")
  jax.tree.map(np.testing.assert_array_equal, params,
               runs.load_initial_policy(str(run_dir)))


# ---------------------------------------------------------------------------
# Decoder-only policies: trained from a tiny Hugging Face folder of each
# family (tests/hf_folders.py) by the trainer's CLI, exported, and read back
# by transformers alone.

_DECODER_ROWS = [
    ([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What about the sky?"}],
     [{"role": "assistant", "content": "It is blue and warm today."}]),
    ([{"role": "user", "content": "Count, please."}],
     [{"role": "assistant", "content": "one two three four five"}]),
    ("What is the capital of France?", " Paris is the capital."),
]


def _unpaired_rows(n=8):
  rows = []
  for i in range(n):
    prompt, completion = _DECODER_ROWS[i % 2]
    rows.append({"prompt": prompt, "completion": completion,
                 "label": bool(i % 2)})
  return rows


def _trl_ids(tokenizer, prompt, completion):
  """(prompt ids, completion ids) by TRL's rule (REFERENCE.md §9), with
  transformers' tokenizer: a chat row split at the generation prompt's
  text, each part without special tokens; a plain prompt with them, its
  completion without, EOS appended."""
  if isinstance(prompt, str):
    return (tokenizer(prompt)["input_ids"],
            tokenizer(completion + tokenizer.eos_token,
                      add_special_tokens=False)["input_ids"])
  prompt_text = tokenizer.apply_chat_template(
      prompt, add_generation_prompt=True, tokenize=False)
  full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
  assert full.startswith(prompt_text)
  return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
          tokenizer(full[len(prompt_text):],
                    add_special_tokens=False)["input_ids"])


def _causal_lm_logprob(model, prompt_ids, completion_ids):
  """Σ log π(completion | prompt) of a transformers causal LM."""
  ids = torch.tensor([prompt_ids + completion_ids])
  with torch.no_grad():
    logits = model(input_ids=ids).logits[0]
  start = len(prompt_ids) - 1     # position t predicts token t + 1
  logp = torch.log_softmax(logits[start:start + len(completion_ids)], -1)
  return float(logp.gather(-1, torch.tensor(completion_ids)[:, None]).sum())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_decoder_export_scores_and_tokenises_as_the_run(tmp_path, family):
  from dro_fast import scoring  # pylint: disable=g-import-not-at-top
  from tests import hf_folders  # pylint: disable=g-import-not-at-top
  folder = hf_folders.build_model_folder(tmp_path / family, family)
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in _unpaired_rows()))
  workdir = tmp_path / "run"
  lengths = {"max_input_length": 64, "max_target_length": 32}
  trained = subprocess.run(
      [sys.executable, "-m", "dro_fast.train", f"--init_checkpoint={folder}",
       f"--train_data={data}", "--data_format=unpaired",
       f"--workdir={workdir}", "--batch_size=4", "--train_steps=2",
       "--checkpoint_every=2", "--log_every=1", "--warmup_steps=1",
       "--policy_lr=1e-3", "--value_lr=1e-3",
       *[f"--{k}={v}" for k, v in lengths.items()]],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert trained.returncode == 0, trained.stderr[-3000:]

  out = tmp_path / "hf"
  result = export.export(str(workdir), str(out))
  assert result["source"] == f"{workdir}:2"
  assert {"config.json", "generation_config.json", "model.safetensors",
          "tokenizer.json", "tokenizer_config.json"} <= set(result["files"])
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["model_type"] == json.loads(
      (tmp_path / family / "config.json").read_text())["model_type"]

  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  assert model.dtype == torch.float32
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  run_tokenizer = runs.tokenizer(runs.read_run_config(str(workdir)),
                                 str(workdir))
  prompts = [p for p, _ in _DECODER_ROWS]
  completions = [c for _, c in _DECODER_ROWS]
  expected = []
  for prompt, completion in _DECODER_ROWS:
    prompt_ids, completion_ids = _trl_ids(hf_tokenizer, prompt, completion)
    example = scoring.as_example(prompt)
    assert run_tokenizer.prompt_ids(example) == prompt_ids
    assert run_tokenizer.completion_ids(
        example, scoring.as_example(completion)) == completion_ids
    # dro_fast's run truncates to its lengths; these rows fit.
    assert len(prompt_ids) <= lengths["max_input_length"]
    assert len(completion_ids) <= lengths["max_target_length"]
    expected.append(_causal_lm_logprob(model, prompt_ids, completion_ids))

  scored = dro_fast.score(str(workdir), prompts, completions)
  # 1e-5, and 1e-6 of the sum: a float32 sum near 100 steps by 7.6e-6.
  np.testing.assert_allclose(scored, expected, rtol=1e-6, atol=1e-5)
  # The trained policy, not the folder's: that one scores otherwise.
  initial = dro_fast.score(f"hf:{tmp_path / family}", prompts, completions)
  assert np.abs(initial - scored).max() > 1e-3


# Fields of a transformers config that the export may write otherwise,
# because they change no computation of the model: the class list and
# dtype (informational); max_window_layers (Qwen's sliding window, off
# here); Gemma 3's sliding_window_pattern (layer_types, written, decides).
_UNCOMPUTED_FIELDS = {"architectures", "dtype", "max_window_layers",
                      "sliding_window_pattern", "_sliding_window_pattern"}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_decoder_config_json_survives_run_config_json(family):
  """config.json -> DecoderConfig -> run_config.json -> the export's
  config.json: transformers reads it (its strict field types) as the
  original config."""
  from dro_fast.models import hf_decoder  # pylint: disable=g-import-not-at-top
  from tests import hf_folders  # pylint: disable=g-import-not-at-top
  original = hf_folders.hf_model_config(family, 304)
  config = hf_decoder.config_from_hf(original.to_dict(), "config.json")
  read_back = RunConfig.from_json(
      RunConfig("run", model=config).to_json()).model
  exported = transformers.AutoConfig.for_model(
      **hf_decoder.hf_config(read_back))
  assert type(exported) is type(original)
  want, got = original.to_dict(), exported.to_dict()
  differ = {k: (want.get(k), got.get(k)) for k in set(want) | set(got)
            if want.get(k) != got.get(k)}
  assert set(differ) <= _UNCOMPUTED_FIELDS, differ
