"""The evaluation with decoder-only policies: Hugging Face folders (hf:DIR).

Both policies are a tiny Qwen3 folder (tests.test_scoring); their greedy
responses in pairs.jsonl must equal transformers' own greedy generation
from the chat-templated prompt (one user message, generation prompt),
stopped at <|im_end|>, decoded without special tokens.
"""

from __future__ import annotations

import json

import pytest

from dro_fast.evaluation import evaluate as evaluation
from dro_fast.evaluation import judges
from tests import test_scoring

# Greedy, 6 tokens at most: "what colour is the sky" runs to the limit;
# "the sea" stops at its 5th token, "no cat" at its 3rd, "a mat" at once;
# "mat blue" emits <|im_start|> (dropped by decoding) and stops at its 4th.
PROMPTS = ["what colour is the sky", "the sea", "mat blue", "no cat",
           "a mat"]


def transformers_greedy(folder, prompt, max_new_tokens):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                add_generation_prompt=True, tokenize=True,
                                return_dict=False)
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
  return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_two_hugging_face_policies_answer_as_transformers(tmp_path):
  folder = test_scoring.save_tiny_qwen3(tmp_path / "qwen3")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                             for p in PROMPTS))
  judge_file = tmp_path / "judge.py"
  judge_file.write_text("def score(prompt, response):\n"
                        "  return float(len(response))\n")
  judge = judges.make_judge(f"reward:{judge_file}:score")
  cfg = evaluation.EvalConfig(prompts=str(prompts), folds=1,
                              prompts_per_fold=len(PROMPTS), batch_size=2,
                              max_input_length=16, max_target_length=6)
  result = evaluation.compare(f"hf:{folder}", str(folder),
                              str(tmp_path / "out"), judge, cfg,
                              platform="cpu")
  assert result["folds"] == [0.5]    # The same policy on both sides.
  rows = [json.loads(line)
          for line in (tmp_path / "out" / "pairs.jsonl").open()]
  expected = {p: transformers_greedy(folder, p, 6) for p in PROMPTS}
  assert {r["prompt"]: r["response_a"] for r in rows} == expected
  assert all(r["response_a"] == r["response_b"] for r in rows)
  assert expected["a mat"] == "" and expected["no cat"] == "user no"
  assert expected["mat blue"] == "a what"


def test_hugging_face_policies_need_lengths(tmp_path):
  folder = test_scoring.save_tiny_qwen3(tmp_path / "qwen3")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
  cfg = evaluation.EvalConfig(prompts=str(prompts), folds=1,
                              prompts_per_fold=1)
  with pytest.raises(evaluation.EvalError,
                     match="give `max_input_length` and `max_target_length`"):
    evaluation.compare(f"hf:{folder}", f"hf:{folder}", str(tmp_path / "o"),
                       None, cfg, platform="cpu")
