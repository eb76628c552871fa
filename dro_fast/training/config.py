"""AlgorithmConfig and OptimizerConfig: what a run optimises, and how.

Leaves, like the other configs (models.config, data.config, run_config):
they import no implementation, and validate names against the tuples
defined here. Errors name fields in backquotes (`tau`); the CLI rewrites
them as its flags.
"""

from __future__ import annotations

import dataclasses

from dro_fast.models.config import VALUE_NETS

ALGORITHMS = ("dro_v", "kto", "sft", "dpo", "ipo", "slic")
# Algorithms trained on (prompt, chosen, rejected) pairs.
PAIRWISE = ("dpo", "ipo", "slic")
VALUE_GRANULARITIES = ("per_example", "per_batch")
# dro_fast.kernels' implementations (kernels.IMPLEMENTATIONS holds those
# that import on this host).
KERNEL_IMPLEMENTATIONS = ("xla", "chunked_xla", "pallas_tpu", "pallas_gpu")


def _one_of(owner: object, name: str, choices: tuple[str, ...]) -> None:
  value = getattr(owner, name)
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {', '.join(choices)}, got "
                     f"{value!r}.")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """What is optimised (static, hashable).

  Attributes:
    algo: one of ALGORITHMS.
    tau: DRO's KL regularisation strength τ.
    beta: KTO's / the pairwise losses' β.
    rescale_policy_grad: DRO-V's 1/τ policy-gradient rescale (paper §3.3).
    value_net: "separate" (own encoder) or "shared" (head on the policy's).
    value_granularity: "per_example" V(x_i), or "per_batch": one value for
      the whole batch (the batch mean of V(x_i)), the paper's single-value
      ablation (Figure 5).
    kto_desirable_weight: λ_D.
    kto_undesirable_weight: λ_U.
    implementation: one of KERNEL_IMPLEMENTATIONS, the log-prob kernel;
      None: dro_fast.kernels' own default for the platform it compiles for.
      dro_fast.backend.resolve names it for a run.
    interpret: whether `implementation`'s Pallas kernel runs in its
      interpreter rather than compiled (a program for another platform than
      the kernel's); None: as dro_fast.kernels decides. Set with
      `implementation` by dro_fast.backend.resolve.
  """

  algo: str = "dro_v"
  tau: float = 1.0
  beta: float = 1.0
  rescale_policy_grad: bool = True
  value_net: str = "separate"
  value_granularity: str = "per_example"
  kto_desirable_weight: float = 1.0
  kto_undesirable_weight: float = 1.0
  implementation: str | None = None
  interpret: bool | None = None

  def __post_init__(self):
    _one_of(self, "algo", ALGORITHMS)
    _one_of(self, "value_net", VALUE_NETS)
    _one_of(self, "value_granularity", VALUE_GRANULARITIES)
    for name in ("tau", "beta"):
      if not getattr(self, name) > 0:
        raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
    if self.implementation not in (None, *KERNEL_IMPLEMENTATIONS):
      raise ValueError(
          f"`implementation` must be one of "
          f"{', '.join(KERNEL_IMPLEMENTATIONS)}, or unset to pick by "
          f"backend, got {self.implementation!r}.")

  @property
  def has_value(self) -> bool:
    return self.algo == "dro_v"

  @property
  def pairwise(self) -> bool:
    return self.algo in PAIRWISE


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """One optimizer of a run (training.optim.optimizer builds it).

  Attributes:
    learning_rate: the peak learning rate (paper: 1e-4); > 0.
    warmup_steps: linear warm-up steps (paper: 150); >= 0.
    decay_rate: Adafactor's second-moment decay exponent (paper: 0.8).
    clip_norm: clip gradients to this global norm first; None: no clipping.
    reduce_with_dots: Adafactor's statistics as GEMVs (optim.adafactor),
      the CPU backend's form: XLA:CPU's strided reductions over leading
      axes are slow (benchmarks/RESULTS.md#cpu-forms).
      dro_fast.backend.resolve sets it for a CPU program.
  """

  learning_rate: float = 1e-4
  warmup_steps: int = 150
  decay_rate: float = 0.8
  clip_norm: float | None = None
  reduce_with_dots: bool = False

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"`learning_rate` must be > 0, got "
                       f"{self.learning_rate}.")
    if self.warmup_steps < 0:
      raise ValueError(f"`warmup_steps` must be >= 0, got "
                       f"{self.warmup_steps}.")
    if self.clip_norm is not None and not self.clip_norm > 0:
      raise ValueError(f"`clip_norm` must be > 0 (or unset: no clipping), "
                       f"got {self.clip_norm}.")
