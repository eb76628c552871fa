"""Log-probabilities from hidden states and the output projection.

No [N, V] logits are materialised.
"""
