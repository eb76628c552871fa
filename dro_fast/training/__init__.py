"""Training: optimisers, train state and steps, sharding, reference
log-probs, checkpointing, metrics and host memory (the layer after losses)."""
