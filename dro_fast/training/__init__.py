"""Training, the layer after losses.

The frozen configs, initial parameters, train state and steps, optimisers,
the SFT warm start, the reference log-prob cache, the training loop,
checkpoints, metrics, reading runs back, and best-checkpoint selection.
"""
