"""dro_fast.cpu_gemm: which operand dtype the CPU GEMMs take bfloat16 in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_fast import cpu_gemm
from dro_fast import models
from dro_fast.training import optim
from dro_fast.kernels.linear_logprobs import chunked_xla

_ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 "
         "avx512f avx512bw avx512_bf16 avx512_vnni\n")
_AVX2 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 "
         "avx avx2 fma\n")


@pytest.mark.parametrize("cpuinfo, machine, want", [
    (_ZEN4, "x86_64", True),
    (_AVX2, "x86_64", False),
    (_AVX2.replace("fma", "fma amx_bf16"), "x86_64", True),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", "aarch64", True),
    ("processor\t: 0\nFeatures\t: fp asimd\n", "aarch64", False),
    ("processor\t: 0\n", "x86_64", None),          # no flags line: unknown
])
def test_bf16_native_from_cpuinfo(cpuinfo, machine, want):
  assert cpu_gemm.bf16_native_from_cpuinfo(cpuinfo, machine) is want


def test_override_and_bad_value(monkeypatch):
  x = jnp.ones((2, 3), jnp.bfloat16)
  y = jnp.ones((3,), jnp.float32)
  monkeypatch.setenv(cpu_gemm.ENV, "upcast")
  assert cpu_gemm.bf16_mode() == "upcast"
  assert [a.dtype for a in cpu_gemm.operands(x, y)] == [jnp.float32] * 2
  monkeypatch.setenv(cpu_gemm.ENV, "Native ")
  assert cpu_gemm.bf16_mode() == "native"
  assert cpu_gemm.operands(x, y)[0].dtype == jnp.bfloat16
  monkeypatch.setenv(cpu_gemm.ENV, "fast")
  with pytest.raises(ValueError, match="DRO_FAST_CPU_BF16_GEMM='fast'"):
    cpu_gemm.operands(x, y)


def test_chunked_linear_logprobs_agree_across_modes(monkeypatch):
  # Both modes give the same bfloat16 log-probs and gradients up to float32
  # summation order: the products of bfloat16 values are exact in float32.
  rng = np.random.default_rng(3)
  hidden = jnp.asarray(rng.normal(size=(6, 16)), jnp.bfloat16)
  weight = jnp.asarray(rng.normal(size=(16, 40)) / 4, jnp.bfloat16)
  targets = jnp.asarray(rng.integers(0, 40, 6), jnp.int32)
  g = jnp.asarray(rng.normal(size=6), jnp.float32)
  out = {}
  for mode in ("native", "upcast"):
    monkeypatch.setenv(cpu_gemm.ENV, mode)
    logp, lse = chunked_xla.linear_token_logprobs(hidden, weight, targets)
    grads = chunked_xla.linear_token_logprobs_bwd(hidden, weight, targets,
                                                  lse, g)
    out[mode] = [np.asarray(a, np.float64) for a in (logp, *grads)]
  for a, b in zip(out["native"], out["upcast"]):
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)


def test_accelerator_paths_switch_off_every_cpu_only_form(monkeypatch):
  assert cpu_gemm.cpu_paths()                 # these tests run on the CPU
  monkeypatch.setenv(cpu_gemm.ENV, "upcast")
  config = models.preset("tiny", dropout_rate=0.0)
  tokens = jnp.ones((2, 6), jnp.int32)
  model = models.t5(config)
  params = model.init(jax.random.key(0), tokens, tokens)
  optimizer = optim.adafactor(1e-3, min_dim_size_to_factor=4)
  weights = {"w": jnp.ones((8, 8), jnp.float32)}
  hidden = jnp.ones((4, 8), jnp.bfloat16)
  weight = jnp.ones((8, 16), jnp.bfloat16)
  targets = jnp.zeros((4,), jnp.int32)

  def forms():
    """What each CPU-only form traces to, as text to search."""
    model_jaxpr = str(jax.make_jaxpr(
        lambda p: model.apply(p, None, tokens, tokens).sum())(params))
    optimizer_jaxpr = str(jax.make_jaxpr(
        lambda g: optimizer.update(g, optimizer.init(weights), weights))(
            weights))
    kernel_jaxpr = str(jax.make_jaxpr(
        lambda h, w: chunked_xla.linear_token_logprobs_bwd(
            h, w, targets, jnp.zeros((4,), jnp.float32),
            jnp.ones((4,), jnp.float32)))(hidden, weight))
    return {
        "model's VJPs": "name=cpu_" in model_jaxpr,
        "optimizer's dots": "dot_general" in optimizer_jaxpr,
        "kernel's row-major transpose": "optimization_barrier" in kernel_jaxpr,
        "bfloat16 upcast": cpu_gemm.operands(hidden)[0].dtype == jnp.float32,
    }

  assert all(forms().values()), forms()
  with cpu_gemm.accelerator_paths():
    assert not cpu_gemm.cpu_paths()
    assert not any(forms().values()), forms()
    with cpu_gemm.accelerator_paths():
      pass
    assert not cpu_gemm.cpu_paths()           # nesting keeps it
  assert cpu_gemm.cpu_paths()
