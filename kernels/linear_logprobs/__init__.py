"""Per-token log-probabilities from hidden states and the output projection,
without materialising the [N, V] logits."""
