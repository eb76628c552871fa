"""The CPU backend's forms of the model's operations.

A form lives here only if it speeds up the T5-small DRO-V CPU step by at
least 5%, measured paired against its removal
(benchmarks/RESULTS.md#cpu-forms): the Dense layer's matmul
with its own VJP. The layers reach it only through
dro_fast.models.layers.matmul, when T5Config.matmul is "cpu_row_major"
(dro_fast.backend.resolve's choice for a CPU program); "xla" traces plain
jnp.dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def row_major_transpose(x2d: jax.Array) -> jax.Array:
  """x2d [N, D] -> [D, N], materialised in row-major order.

  A bare transpose reaches XLA:CPU as a non-default layout of the same
  buffer, which XLA's YNNPACK matmul does not take: the dot then runs in
  Eigen (and a bfloat16 one is first upcast to float32). Flattening the
  transpose behind an optimization barrier forces one row-major copy that
  the dot takes as it is.
  """
  n, d = x2d.shape
  return jax.lax.optimization_barrier(x2d.T.reshape(-1)).reshape(d, n)


def _matmul_2d(x: jax.Array, kernel: jax.Array, out_dtype) -> jax.Array:
  """x [..., D] @ kernel [D, F] as one 2-D GEMM, accumulated in float32."""
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel,
              preferred_element_type=jnp.float32).astype(out_dtype)
  return y.reshape(*x.shape[:-1], kernel.shape[1])                # [..., F]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, kernel: jax.Array, out_dtype) -> jax.Array:
  """x [..., D] @ kernel [D, F] in x.dtype, in the forms XLA:CPU runs fast.

  Contract: the kernel is cast to x.dtype (the compute dtype) inside; every
  matmul, forward and backward, is a 2-D GEMM with both operands in that
  dtype, accumulated in float32; the result is cast to `out_dtype`. The
  gradient flowing back is cast to the compute dtype first (mixed
  precision). d(x) comes back in x.dtype, d(kernel) in the kernel's own
  dtype (float32 for a float32 parameter, never rounded to bfloat16).

  Why not jnp.dot and autodiff, on the CPU:
    - autodiff of a dot on [B, n, D] contracts [B, n] as two dimensions for
      the weight gradient xᵀ·dy, and XLA:CPU first copies dy into a
      transposed layout with a strided loop;
    - a transposed operand (xᵀ or kernelᵀ) has a column-major layout that
      YNNPACK does not take. Here d(x) contracts the kernel's last
      dimension in place and xᵀ is materialised row-major
      (row_major_transpose).
  The residuals are x and the kernel themselves, as the caller holds them
  (a reshaped or cast copy would be stacked as a second residual under
  scan_layers). Paired figure: benchmarks/RESULTS.md#cpu-forms.
  """
  return _matmul_2d(x, kernel.astype(x.dtype), out_dtype)


def _matmul_fwd(x, kernel, out_dtype):
  return _matmul_2d(x, kernel.astype(x.dtype), out_dtype), (x, kernel)


def _matmul_bwd(out_dtype, residuals, dy):
  del out_dtype
  x, kernel = residuals
  x2d = x.reshape(-1, x.shape[-1])                                # [N, D]
  dy2d = dy.reshape(-1, dy.shape[-1]).astype(x.dtype)             # [N, F]
  # dy @ kernelᵀ, contracting F in place (no transposed operand).
  dx = jax.lax.dot_general(dy2d, kernel.astype(x.dtype),
                           (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)   # [N, D]
  dkernel = jnp.dot(row_major_transpose(x2d), dy2d,
                    preferred_element_type=jnp.float32)          # [D, F]
  return (dx.reshape(x.shape).astype(x.dtype),
          dkernel.astype(kernel.dtype))


matmul.defvjp(_matmul_fwd, _matmul_bwd)
