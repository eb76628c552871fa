"""Runs each example of examples/ and checks what it claims.

The training examples: the fused kernel's log π(y|x) equals an explicit
float64 log-softmax gather over the completion's targets; V(x) sees the
prompt only; training starts at π = π_ref (loss ½·mean r², log-ratio 0) and
the loss falls. The judge example: verdicts follow the rewards, the swap
cancels a position bias, and the CLI takes the judge in both documented
forms. The Hugging Face round trip: trained from a tiny folder, its export
scores the rows in transformers as dro_fast.score does on the run. Each
example runs as `python examples/NAME.py` from any directory.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from examples import custom_judge
from examples import flax_nnx_decoder_only
from examples import hf_dro_v_round_trip
from examples import plain_jax_decoder_only

REPO = pathlib.Path(__file__).resolve().parents[1]
# Each example, and what its output ends with when it runs as a script.
EXAMPLES = {
    "custom_judge": "judge: reward:",
    "plain_jax_decoder_only": "step 19 ",
    "flax_nnx_decoder_only": "step 19 ",
}
# Examples that need inputs, each run as a script by its own test.
EXAMPLES_WITH_INPUTS = {"hf_dro_v_round_trip"}
# Distinct small sizes (B, P, C, D, V = 5, 3, 4, 8, 11) so a swapped axis or
# an off-by-one in the shift fails.
SHAPES = dict(vocab=11, prompt_len=3, completion_len=4, width=8, heads=2,
              layers=1, examples=5)
TRAIN_STEPS = 10


def _reference_logprobs(hidden, weight, targets, mask) -> np.ndarray:
  """Σ_t mask · log_softmax(hidden @ weight)[targets], in float64 numpy."""
  logits = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64),
                     np.asarray(weight, np.float64))
  top = logits.max(-1, keepdims=True)
  log_z = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
  picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)
  return ((picked[..., 0] - log_z) * np.asarray(mask)).sum(-1)


def _check_training(history: dict[str, list[float]]) -> None:
  losses = history["loss"]
  assert len(losses) == TRAIN_STEPS
  assert all(math.isfinite(x) for x in losses), losses
  # Step 0 is before any update: π = π_ref and V = 0, so δ = r and the loss
  # is ½·mean r² = ½ (rewards normalised to variance 1).
  np.testing.assert_allclose(history["log_ratio_mean"][0], 0.0, atol=1e-6)
  np.testing.assert_allclose(losses[0], 0.5, atol=1e-3)
  assert losses[-1] < 0.4 * losses[0], losses
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def _check_value_sees_the_prompt_only(run, tokens: jax.Array, prompt_len: int,
                                      vocab: int) -> None:
  """Other completions of the same prompts: same V(x), other log π(y|x).

  Args:
    run: [B, P + C] tokens -> ([B] log-probs, [B] values).
    tokens: the sequences.
    prompt_len: P.
    vocab: the vocabulary size; a changed token stays in [1, vocab).
  """
  logprobs, values = run(tokens)
  completions = tokens[:, prompt_len:]
  other = tokens.at[:, prompt_len:].set(completions % (vocab - 1) + 1)
  other_logprobs, other_values = run(other)
  np.testing.assert_allclose(other_values, values, rtol=1e-6)
  assert not np.allclose(other_logprobs, logprobs)


class _DecoderOnlyExample:
  """What both decoder-only examples must do; `ex` is the example module."""
  ex = None

  @pytest.mark.slow
  def test_training_from_the_reference_lowers_the_loss(self):
    _check_training(self.ex.main(self.ex.Config(steps=TRAIN_STEPS)))


class TestPlainJax(_DecoderOnlyExample):
  ex = plain_jax_decoder_only

  def test_kernel_logprobs_and_value_position(self):
    cfg = self.ex.Config(**SHAPES)
    rng = np.random.default_rng(3)
    tokens, _ = self.ex.make_data(rng, cfg)
    params = self.ex.init_params(rng, cfg)
    params["value"]["w"] = jnp.ones(cfg.width)     # a value that is not 0
    run = jax.jit(self.ex.policy_and_value, static_argnums=2)
    logprobs, _ = run(params, tokens, cfg.prompt_len)

    inputs, targets, mask = self.ex.decoder_inputs(tokens, cfg.prompt_len)
    np.testing.assert_array_equal(mask.sum(-1), cfg.completion_len)
    np.testing.assert_array_equal(targets[:, cfg.prompt_len - 1:],
                                  tokens[:, cfg.prompt_len:])
    hidden = jax.jit(self.ex.forward)(params, inputs)
    expected = _reference_logprobs(hidden, params["unembed"], targets, mask)
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)
    _check_value_sees_the_prompt_only(
        lambda t: run(params, t, cfg.prompt_len), tokens, cfg.prompt_len,
        cfg.vocab)


class TestFlaxNnx(_DecoderOnlyExample):
  ex = flax_nnx_decoder_only

  def test_kernel_logprobs_and_value_position(self):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    cfg = self.ex.Config(**SHAPES)
    tokens, _ = self.ex.make_data(np.random.default_rng(3), cfg)
    model = self.ex.Decoder(cfg, rngs=nnx.Rngs(4))
    model.value_head.kernel[...] = jnp.ones((cfg.width, 1))
    run = nnx.jit(lambda m, t: (*m(t), m.hidden(t[:, :-1])))
    logprobs, _, hidden = run(model, tokens)

    _, targets, mask = self.ex.decoder_inputs(tokens, cfg.prompt_len)
    np.testing.assert_array_equal(mask.sum(-1), cfg.completion_len)
    expected = _reference_logprobs(hidden, model.unembed.kernel[...],
                                   targets, mask)
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)
    _check_value_sees_the_prompt_only(
        lambda t: run(model, t)[:2], tokens, cfg.prompt_len, cfg.vocab)


class TestCustomJudge:

  def test_verdicts_follow_the_rewards(self, capsys):
    rows = custom_judge.main()
    assert f"judge: {custom_judge.JUDGE_SPEC}" in capsys.readouterr().out
    assert len(rows) == len(custom_judge.PAIRS)
    for row in rows:
      by_reward = (0.5 if row["reward_1"] == row["reward_2"] else
                   float(row["reward_1"] > row["reward_2"]))
      assert row["verdict"] == row["swapped"] == by_reward, row
      # The swap turns the biased judge's position preference into a tie
      # and keeps its clear verdicts.
      assert row["biased_swapped"] in (by_reward, 0.5), row
    assert [row["verdict"] for row in rows] == [1.0, 0.5, 1.0, 1.0]
    assert [row["biased"] for row in rows] == [1.0, 1.0, 1.0, 1.0]
    assert [row["biased_swapped"] for row in rows] == [1.0, 0.5, 1.0, 0.5]

  def test_make_judge_spec_names_the_example(self):
    from dro_fast.evaluation import judges  # pylint: disable=g-import-not-at-top
    judge = judges.make_judge(custom_judge.JUDGE_SPEC)
    assert judge.name == custom_judge.JUDGE_SPEC
    prompt, good, bad = custom_judge.PAIRS[0]
    assert judge.judge(prompt, good, bad) == 1.0
    assert judge.judge(prompt, bad, good) == 0.0

  @pytest.mark.slow
  def test_evaluation_cli_takes_the_documented_specs(self, tmp_path):
    # The CLI builds the judge before it reads the (absent) run, so a run
    # that fails on the run, not on --judge, has imported the example.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for spec in (custom_judge.JUDGE_SPEC,
                 "reward:examples/custom_judge.py:reward",
                 "reward:examples.custom_judge:reward"):
      result = subprocess.run(
          [sys.executable, "-m", "dro_fast.evaluation",
           f"--policy_a={tmp_path / 'no_run'}", f"--judge={spec}",
           f"--output_dir={tmp_path / 'eval'}"],
          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
          check=False)
      assert result.returncode == 2, result.stderr
      assert "no run_config.json" in result.stderr, result.stderr
      assert "--judge" not in result.stderr, result.stderr


def test_every_example_is_run():
  scripts = {p.stem for p in (REPO / "examples").glob("*.py")}
  assert scripts - {"__init__"} == set(EXAMPLES) | EXAMPLES_WITH_INPUTS


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name == "custom_judge" else
                 pytest.mark.slow) for name in EXAMPLES])
def test_runs_as_a_script_from_any_directory(name, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, str(REPO / "examples" /
                                               f"{name}.py")],
                          cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  last_line = result.stdout.strip().splitlines()[-1]
  assert last_line.startswith(EXAMPLES[name]), result.stdout[-2000:]


class TestHfRoundTrip:
  """examples/hf_dro_v_round_trip.py on a tiny Gemma 3 folder."""

  @staticmethod
  def _rows(n: int = 8) -> list[dict]:
    rows = []
    for i in range(n):
      prompt = ([{"role": "system", "content": "Be brief."}] if i % 3 == 0
                else []) + [{"role": "user",
                             "content": f"What about the sky {i}?"}]
      answer = "It is blue and warm." if i % 2 else "Count one two three."
      rows.append({"prompt": prompt, "label": bool(i % 2),
                   "completion": [{"role": "assistant", "content": answer}]})
    return rows

  @pytest.mark.slow
  def test_export_scores_as_dro_fast_in_transformers(self, tmp_path):
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    from tests import hf_folders  # pylint: disable=g-import-not-at-top
    folder = hf_folders.build_model_folder(tmp_path / "gemma3", "gemma3")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in self._rows()))
    # This tree's dro_fast, not an installed one, from another directory.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "hf_dro_v_round_trip.py"),
         f"--model={folder}", f"--data={data}", "--steps=2", "--rows=3",
         f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}"],
        cwd=scratch, env=env, capture_output=True, text=True, timeout=600,
        check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("max |difference| "), result.stdout[-2000:]
    scored = [re.fullmatch(r"row \d: log π\(y\|x\) transformers (\S+)  "
                           r"dro_fast (\S+)  difference \S+", line)
              for line in lines if line.startswith("row ")]
    assert len(scored) == 3 and all(scored), lines
    by_transformers, by_dro_fast = np.array(
        [[float(m[1]), float(m[2])] for m in scored]).T
    np.testing.assert_allclose(by_transformers, by_dro_fast, rtol=0,
                               atol=1e-4)
    assert np.all(by_dro_fast < 0)
    assert any(line.startswith("trained 2 DRO-V steps") for line in lines)
    # The export holds the trained policy, not the folder's weights.
    weights = lambda path: safetensors.numpy.load_file(
        pathlib.Path(path) / "model.safetensors")
    trained, initial = weights(tmp_path / "hf"), weights(folder)
    name = "model.layers.0.mlp.down_proj.weight"
    assert trained[name].shape == initial[name].shape
    assert np.abs(trained[name] - initial[name]).max() > 1e-5

  def test_refuses_a_folder_that_is_not_a_decoder(self, tmp_path):
    cfg = hf_dro_v_round_trip.Config(model=str(tmp_path),
                                     data=str(tmp_path / "rows.jsonl"))
    with pytest.raises(ValueError, match="no decoder-only Hugging Face"):
      hf_dro_v_round_trip.run_config(cfg, str(tmp_path / "run"))

  def test_trl_ids_split_the_template_at_the_generation_prompt(
      self, tmp_path):
    from tests import hf_folders  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    folder = hf_folders.build_tokenizer(tmp_path, "qwen")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = [{"role": "user", "content": "hello"}]
    completion = [{"role": "assistant", "content": "again"}]
    prompt_ids, completion_ids = hf_dro_v_round_trip.trl_ids(
        tokenizer, prompt, completion)
    assert tokenizer.decode(prompt_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(completion_ids) == "again<|im_end|>\n"
    prompt_ids, completion_ids = hf_dro_v_round_trip.trl_ids(
        tokenizer, "hello", " again")
    assert tokenizer.decode(prompt_ids) == "hello"
    assert tokenizer.decode(completion_ids) == " again<|im_end|>"
