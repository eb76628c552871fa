"""Training: optimisers, train state and steps, sharding, reference
log-probs, checkpointing and metrics (the layer after losses)."""
