"""DRO-V updates on one device and on a data:2,fsdp:2,model:2 mesh; JSON.

For a tiny T5 and a tiny decoder-only LLM (the decoder also with splash
attention in the Pallas TPU interpreter, its heads split over model, and
with LoRA adapters): two updates with the trainer's
Adafactor behind a transformation that keeps each step's gradients in its
state, unsharded and on the mesh, the state placed by
sharding.tree_shardings and the batch by sharding.batch_sharding as
training/loop.py places them. Prints, per model, both runs' losses and
metrics, gradients and updated parameters (policy and value network), and
the specs of a query kernel and an MLP kernel on the mesh.

Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before JAX starts).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dro_fast import models
from dro_fast.models import decoder_config
from dro_fast.training import init
from dro_fast.training import optim
from dro_fast.training import sharding
from dro_fast.training import steps

B, S, T = 8, 6, 5
T5 = models.preset("tiny", dropout_rate=0.1)
DECODER = models.decoder_preset("tiny_decoder", vocab_size=64)
# Splash attention in the Pallas TPU interpreter, its heads split over model
# (T5's flash kernel hangs in the interpreter on several CPU devices); LoRA,
# whose adapters train and follow their kernels' axes.
DECODER_SPLASH = DECODER.replace(attention="splash", attention_interpret=True)
DECODER_LORA = DECODER.replace(lora=models.LoraConfig(
    rank=2, alpha=4.0, targets=("attention", "down_proj"),
    base_dtype="float32"))
PROBES = {
    "t5": ("encoder/layers_0/attention/query", "decoder/layers_1/mlp/wi_0"),
    "decoder": ("model/layers_0/self_attn/q_proj",
                "model/layers_1/mlp/down_proj"),
}


def batches(vocab: int, pad: int):
  rng = np.random.default_rng(0)
  for _ in range(2):
    inputs = rng.integers(2, vocab, (B, S)).astype(np.int32)
    targets = rng.integers(2, vocab, (B, T)).astype(np.int32)
    prompt = rng.integers(1, S + 1, B)
    completion = rng.integers(1, T + 1, B)
    inputs[np.arange(S)[None] >= prompt[:, None]] = pad
    mask = np.arange(T)[None] < completion[:, None]
    targets[~mask] = pad
    yield {"inputs": inputs, "targets": targets, "target_mask": mask,
           "rewards": rng.normal(size=B).astype(np.float32),
           "ref_logprobs": rng.normal(size=B).astype(np.float32) - 20}


def keep_gradients() -> optax.GradientTransformation:
  """Passes updates through; its state is the last gradients."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (updates, updates))


def run(config, mesh, pad, name):
  policy, value = init.init_params(config, steps.AlgorithmConfig(),
                                   jax.random.PRNGKey(0))
  optimizer = optax.chain(keep_gradients(), optim.make_optimizer(1e-2, 0))
  trainer = steps.build_trainer(
      steps.AlgorithmConfig(implementation="chunked_xla"), config,
      optimizer, optimizer, mesh=mesh)
  state = trainer.init(policy, value, jax.random.PRNGKey(1))
  if mesh is not None:
    shardings = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    update = jax.jit(trainer.update, in_shardings=(
        shardings, sharding.batch_sharding(mesh)), out_shardings=(
            shardings, None), donate_argnums=0)
  else:
    update = jax.jit(trainer.update, donate_argnums=0)
  out = {"metrics": [], "gradients": []}
  for batch in batches(config.vocab_size, pad):
    if mesh is not None:
      batch = sharding.global_batch(batch, sharding.batch_sharding(mesh))
    state, metrics = update(state, batch)
    out["metrics"].append({k: float(v) for k, v in metrics.items()})
    out["gradients"].append(flat(sharding.to_host(
        (state.policy_opt_state[0], state.value_opt_state[0]))))
  out["params"] = flat(sharding.to_host((state.policy_params,
                                         state.value_params)))
  if mesh is not None and name in PROBES:
    out["specs"] = [str(state.policy_params[p]["kernel"].sharding.spec)
                    for p in PROBES[name]]
  if mesh is not None and config.lora is not None:
    out["specs"] = [str(state.policy_params[
        "model/layers_0/self_attn/q_proj"][a].sharding.spec)
                    for a in ("lora_a", "lora_b")]
  return out


def flat(tree) -> list[list[float]]:
  """Each leaf's values, flattened, in the tree's leaf order."""
  return [np.ravel(x).tolist() for x in jax.tree.leaves(tree)]


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.device_count()
  mesh = sharding.make_mesh(sharding.parse_mesh("data:2,fsdp:2,model:2"))
  print(json.dumps({
      name: {"single": run(config, None, pad, name),
             "sharded": run(config, mesh, pad, name)}
      for name, config, pad in (
          ("t5", T5, T5.pad_id), ("decoder", DECODER, decoder_config.PAD),
          ("decoder_splash", DECODER_SPLASH, decoder_config.PAD),
          ("decoder_lora", DECODER_LORA, decoder_config.PAD))}))
