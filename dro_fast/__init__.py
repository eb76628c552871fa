"""dro_fast: DRO / DRO-V alignment from single-trajectory feedback, in JAX.

Layers, each importing only the ones before it:
data -> models -> kernels (dro_fast.kernels) -> losses -> training -> CLI.
"""

__version__ = "0.1.0"
