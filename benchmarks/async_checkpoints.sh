#!/usr/bin/env bash
# Synchronous against asynchronous checkpoint saves on this machine: the
# trainer's examples/s with a save every 2 steps (tiny T5, batch 8), the two
# modes alternating for ROUNDS rounds (default 4). Each line: mode, round,
# median examples/s over the logged windows after the first (compile).
# Claim: benchmarks/RESULTS.md#asynchronous-checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ROUNDS=${ROUNDS:-4}
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
"$PY" -c "
from dro_fast.data import synthetic
synthetic.write_jsonl('$D/train.jsonl', synthetic.make_triplets(256, seed=0))"
export JAX_COMPILATION_CACHE_DIR=$D/cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
for round in $(seq "$ROUNDS"); do
  for mode in noasync_checkpoints async_checkpoints; do
    rm -rf "$D/run"
    "$PY" -m dro_fast.train --workdir="$D/run" --train_data="$D/train.jsonl" \
      --batch_size=8 --max_input_length=16 --max_target_length=12 \
      --tokenizer_vocab_size=48 --train_steps=50 --log_every=10 \
      --checkpoint_every=2 --keep_checkpoints=3 "--$mode" > "$D/log" 2>&1
    "$PY" -c "
import json, statistics
rows = [json.loads(l) for l in open('$D/run/metrics.jsonl')][1:]
print('$mode', $round, round(statistics.median(
    r['examples_per_s'] for r in rows), 2))"
  done
done
