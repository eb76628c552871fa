"""Per-token log-probabilities of given targets, from logits [N, V]."""
