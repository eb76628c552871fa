"""Times the T5-small DRO-V CPU step (B8, 128/64, float32, unrolled) with
whatever dro_fast is importable; optional switches remove one CPU form of the
pre-redesign code. Prints one JSON line."""
import json, sys, time, argparse, types
p = argparse.ArgumentParser()
p.add_argument("--variant", default="base")
p.add_argument("--steps", type=int, default=5)
p.add_argument("--size", default="small")
args = p.parse_args()
try:
  from dro_fast import runtime as hm
except ImportError:
  from dro_fast.training import host_memory as hm
if args.variant != "system_malloc":
  hm.keep_freed_host_memory()
import numpy as np, jax, jax.numpy as jnp
from dro_fast import models
from dro_fast.models import value
from dro_fast.training import optim, steps
if args.variant != "base" and args.variant != "system_malloc":
  from dro_fast.models import t5
  if args.variant == "no_dense_vjp":
    def mm(x, k, out):
      return jnp.dot(x, k.astype(x.dtype), preferred_element_type=jnp.float32).astype(out)
    t5.cpu_matmul = mm
  elif args.variant == "no_gelu_vjp":
    def gg(x, k0, k1):
      return (jax.nn.gelu(t5.cpu_matmul(x, k0, x.dtype), approximate=True)
              * t5.cpu_matmul(x, k1, x.dtype))
    t5.cpu_gated_gelu = gg
  elif args.variant == "no_attention_vjp":
    t5.cpu_attention_logits = t5.attention_logits
    t5.cpu_attention_combine = lambda w, v: jnp.einsum("bhqt,bthk->bqhk", w, v)
  elif args.variant == "no_gemv":
    optim.cpu_gemm = types.SimpleNamespace(cpu_paths=lambda: False)
  elif args.variant == "no_row_major_hidden_t":
    from dro_fast.kernels.linear_logprobs import chunked_xla
    chunked_xla._transposed = lambda h: h.T
  else:
    raise SystemExit("unknown variant " + args.variant)
name = "tiny" if args.size == "tiny" else f"flan-t5-{args.size}"
config = models.preset(name, dtype="float32", remat="none", scan_layers=False,
                       dropout_rate=0.0)
B, S, T = 8, 128, 64
algorithm = steps.AlgorithmConfig(algo="dro_v", implementation="chunked_xla")
def make_opt():
  if hasattr(optim, "statistics_as_gemvs"):   # the redesign: as the trainer
    return optim.make_optimizer(1e-4, reduce_with_dots=optim.statistics_as_gemvs("cpu"))
  return optim.make_optimizer(1e-4)
trainer = steps.make_trainer(algorithm, config, make_opt(), make_opt())
def init_state(key):
  tokens = jnp.ones((1, 2), jnp.int32)
  pk, vk, sk = jax.random.split(key, 3)
  pp = models.t5(config).init(pk, tokens, tokens)
  net = value.value_network(config, "separate")
  vp = value.init_from_policy(net.init(vk, tokens), pp)
  return trainer.init(pp, vp, sk)
rng = np.random.default_rng(0)
tok = lambda n: rng.integers(2, config.vocab_size, (B, n)).astype(np.int32)
batches = [dict(inputs=tok(S), targets=tok(T), target_mask=np.ones((B, T), bool),
                rewards=rng.normal(size=B).astype(np.float32),
                ref_logprobs=(rng.normal(size=B) - 5 * T).astype(np.float32))
           for _ in range(2)]
state = jax.jit(init_state)(jax.random.key(0))
batches = [jax.device_put(b) for b in batches]
t0 = time.perf_counter()
update = jax.jit(trainer.update, donate_argnums=0).lower(state, batches[0]).compile()
compile_s = time.perf_counter() - t0
state, m = update(state, batches[0]); jax.block_until_ready(state)
import sys as _sys
print(json.dumps(dict(ready=True, compile_s=compile_s)), flush=True)
i = 0
for line in _sys.stdin:
  t0 = time.perf_counter()
  state, m = update(state, batches[(i + 1) % 2]); jax.block_until_ready((state, m))
  i += 1
  print(json.dumps(dict(step_s=time.perf_counter() - t0, loss=float(m["loss"]))), flush=True)
raise SystemExit(0)
times = []
for i in range(args.steps):
  t0 = time.perf_counter()
  state, m = update(state, batches[(i + 1) % 2]); jax.block_until_ready((state, m))
  times.append(time.perf_counter() - t0)
print(json.dumps(dict(variant=args.variant, median=float(np.median(times)),
                      times=times, compile_s=compile_s, loss=float(m["loss"]))))
