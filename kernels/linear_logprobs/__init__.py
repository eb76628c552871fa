"""Log-probabilities from hidden states and the output projection.

No [N, V] logits are materialised. ops.py: the op on a whole [D, V]
projection; vocab_parallel.py: the same with V split over a mesh axis, each
shard running an implementation's kernels on its slice.
"""
