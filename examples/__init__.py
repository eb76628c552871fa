"""Runnable examples of dro_fast's kernels, losses and judges.

Each runs as `python examples/NAME.py` from any directory, and
tests/test_examples.py runs each so.
"""
