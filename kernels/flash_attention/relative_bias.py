"""T5's relative-position bias: the bucket rule and the factored bias.

Shapes: H heads, q queries, k keys.

The one home of this maths: the flash kernels build the bias from it tile by
tile, and the model (dro_fast.models.layers) materialises it from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucketing of key_position − query_position (Mesh TF / T5X / HF).

  Half the buckets (per direction) hold exact small distances; the rest grow
  logarithmically up to max_distance, beyond which all share the last.
  """
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket += (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = jnp.maximum(-relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  log_ratio = (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, large)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["table"],
                   meta_fields=["bidirectional", "max_distance"])
@dataclasses.dataclass(frozen=True)
class RelativeBias:
  """T5's relative-position bias as its table and bucket rule.

  For query and key positions that are the sequence indices (0, 1, ...):

    bias[h, i, j] = table[h, relative_position_bucket(j - i)].

  flash_attention builds the bias from this tile by tile; `dense`
  materialises the [1, H, q, k] array.

  Attributes:
    table: rel_embedding [H, buckets] float32.
    bidirectional: bucket rule of relative_position_bucket (encoder: True;
      decoder self-attention: False).
    max_distance: distance of the last bucket.
  """
  table: jax.Array
  bidirectional: bool
  max_distance: int

  @property
  def num_buckets(self) -> int:
    return self.table.shape[1]

  def buckets(self, relative_position: jax.Array) -> jax.Array:
    """relative_position_bucket of key index − query index, this rule."""
    return relative_position_bucket(relative_position, self.bidirectional,
                                    self.num_buckets, self.max_distance)

  def dense(self, q_len: int, k_len: int) -> jax.Array:
    """Bias [1, H, q, k] float32."""
    return self.lookup(jnp.arange(k_len)[None, :] - jnp.arange(q_len)[:, None])

  def lookup(self, relative_position: jax.Array) -> jax.Array:
    """table[:, bucket] [1, H, *relative_position.shape] float32."""
    return jnp.take(self.table, self.buckets(relative_position), axis=1)[None]
