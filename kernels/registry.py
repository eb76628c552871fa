"""The registry of implementations, one entry per backend.

Each entry supplies, for both ops, a row-wise forward returning
(logprobs [N], lse [N]) and a backward that rebuilds the gradient from the
saved lse. "xla" is differentiated by JAX's autodiff instead (the baseline a
user would write); every other entry goes through the ops' jax.custom_vjp.
The table is fixed at import (a read-only mapping); the Pallas backends are
in it where their modules import.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable, Mapping

from dro_fast.kernels import platform as platform_lib
from dro_fast.kernels.linear_logprobs import chunked_xla as linear_chunked_xla
from dro_fast.kernels.linear_logprobs import reference as linear_reference
from dro_fast.kernels.sequence_logprobs import chunked_xla
from dro_fast.kernels.sequence_logprobs import reference


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One backend of the two ops.

  Attributes:
    name: registry key.
    token_logprobs: (logits [N,V], targets [N], block_sizes, interpret) ->
      (logprobs [N] f32, lse [N] f32).
    token_logprobs_bwd: (logits, targets, lse, g [N], block_sizes, interpret)
      -> dlogits [N,V].
    linear_token_logprobs: (hidden [N,D], weight [D,V], targets, block_sizes,
      interpret) -> (logprobs [N], lse [N]).
    linear_token_logprobs_bwd: (hidden, weight, targets, lse, g, block_sizes,
      interpret) -> (dhidden [N,D], dweight [D,V]). A target of −1 has no
      one-hot term (g · (−softmax)): the vocabulary-parallel op passes it
      for rows whose target is in another shard, with the global lse.
    autodiff: differentiate the forward with JAX instead of the backward.
    native_backend: the platform it compiles for (platform.PLATFORMS);
      elsewhere the Pallas entries run in interpret mode.
  """

  name: str
  token_logprobs: Callable
  token_logprobs_bwd: Callable
  linear_token_logprobs: Callable
  linear_token_logprobs_bwd: Callable
  autodiff: bool = False
  native_backend: str | None = None


def _implementations() -> Mapping[str, Implementation]:
  """The table, built once: the XLA entries always, Pallas where it imports."""
  table = {
      "xla": Implementation(
          "xla", reference.token_logprobs, reference.token_logprobs_bwd,
          linear_reference.linear_token_logprobs,
          linear_reference.linear_token_logprobs_bwd, autodiff=True),
      "chunked_xla": Implementation(
          "chunked_xla", chunked_xla.token_logprobs,
          chunked_xla.token_logprobs_bwd,
          linear_chunked_xla.linear_token_logprobs,
          linear_chunked_xla.linear_token_logprobs_bwd),
  }
  try:
    from dro_fast.kernels.linear_logprobs import pallas_tpu as linear_pallas_tpu  # pylint: disable=g-import-not-at-top
    from dro_fast.kernels.sequence_logprobs import pallas_tpu  # pylint: disable=g-import-not-at-top
    table["pallas_tpu"] = Implementation(
        "pallas_tpu", pallas_tpu.token_logprobs, pallas_tpu.token_logprobs_bwd,
        linear_pallas_tpu.linear_token_logprobs,
        linear_pallas_tpu.linear_token_logprobs_bwd, native_backend="tpu")
  except ImportError:  # pragma: no cover - depends on the jaxlib build
    pass
  try:
    from dro_fast.kernels.linear_logprobs import pallas_gpu as linear_pallas_gpu  # pylint: disable=g-import-not-at-top
    from dro_fast.kernels.sequence_logprobs import pallas_gpu  # pylint: disable=g-import-not-at-top
    table["pallas_gpu"] = Implementation(
        "pallas_gpu", pallas_gpu.token_logprobs, pallas_gpu.token_logprobs_bwd,
        linear_pallas_gpu.linear_token_logprobs,
        linear_pallas_gpu.linear_token_logprobs_bwd, native_backend="gpu")
  except ImportError:  # pragma: no cover
    pass
  return types.MappingProxyType(table)


IMPLEMENTATIONS: Mapping[str, Implementation] = _implementations()

_BY_BACKEND = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cpu": "chunked_xla"}


def implementation_for(platform: str) -> str:
  """The implementation for a program compiled for `platform`.

  The platform's ("cpu", "gpu", "tpu") Pallas kernels where they import,
  else "chunked_xla". Callers that compile for a platform other than the
  host's (a TPU program built on a CPU host) pick by it, not by the backend.
  """
  name = _BY_BACKEND.get(platform, "chunked_xla")
  return name if name in IMPLEMENTATIONS else "chunked_xla"


def default_implementation() -> str:
  """The implementation `implementation=None` picks: for the target platform."""
  return implementation_for(platform_lib.target_platform())


def get(name: str | None) -> Implementation:
  """Looks an implementation up by name (None: by backend)."""
  name = default_implementation() if name is None else name
  try:
    return IMPLEMENTATIONS[name]
  except KeyError:
    raise ValueError(
        f"Unknown implementation {name!r}; choose one of "
        f"{sorted(IMPLEMENTATIONS)} or None to pick by backend.") from None
