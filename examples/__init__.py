"""Runnable examples of dro_fast's kernels, losses and judges (each is run by
tests/test_examples.py). Run them from the repository root."""
