"""Side-by-side evaluation of trained policies: the CLI and the judges.

  python -m dro_fast.evaluation --policy_a=runs/demo --folds=5
"""
