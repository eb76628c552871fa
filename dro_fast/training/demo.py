"""The demo task's known reward: scoring greedy decoding on held-out prompts.

Runs trained on the synthetic "repeat the prompt's words" task
(dro_fast.data.synthetic) report the mean reward of the behaviour policy
(the data), the initial policy and the final policy in summary.json.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dro_fast import decoding
from dro_fast import models
from dro_fast.data import synthetic
from dro_fast.tokenizer import Tokenizer

HELD_OUT_SEED = 10**6
PROMPTS = 256


def policy_reward(model_config: models.T5Config | models.DecoderConfig,
                  params, tokenizer: Tokenizer,
                  max_input_length: int, max_target_length: int,
                  num: int = PROMPTS) -> float:
  """Mean synthetic reward of greedy completions of held-out prompts."""
  prompts = [t.prompt for t in synthetic.make_triplets(num,
                                                        seed=HELD_OUT_SEED)]
  inputs, _ = tokenizer.encode_prompts(prompts, max_input_length)
  # T5 stops at its EOS by itself; a decoder-only model is told its stop ids.
  stop = ({} if isinstance(model_config, models.T5Config)
          else {"stop_ids": (tokenizer.eos_id,)})
  tokens = decoding.generate(params, jnp.asarray(inputs), config=model_config,
                             max_length=max_target_length, **stop)
  texts = tokenizer.decode_batch(np.asarray(tokens))
  return float(np.mean([synthetic.reward(p, y)
                        for p, y in zip(prompts, texts)]))


def rewards(model_config: models.T5Config | models.DecoderConfig,
            initial_params, final_params,
            tokenizer: Tokenizer, max_input_length: int,
            max_target_length: int) -> dict[str, float]:
  """{"behaviour_policy", "initial_policy", "final_policy"} mean rewards."""
  score = lambda params: policy_reward(model_config, params, tokenizer,
                                       max_input_length, max_target_length)
  return {"behaviour_policy": float(np.mean(
              [t.reward for t in synthetic.make_triplets(
                  PROMPTS, seed=HELD_OUT_SEED)])),
          "initial_policy": score(initial_params),
          "final_policy": score(final_params)}
