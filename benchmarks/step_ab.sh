#!/usr/bin/env bash
# The CPU DRO-V step at two commits, side by side: each round runs
# benchmarks/step_time.py once in a checkout of BASE and once in one of HEAD
# (the order alternating), with the step of `make bench-step-cpu` (T5-small,
# batch 8, 128 / 64 tokens, float32, unrolled layers, chunked_xla). Prints
# each run's steps/s and, at the end, the medians and the paired ratio
# (median of per-round HEAD / BASE). Claim:
# benchmarks/RESULTS.md#train-step-on-the-cpu-against-pytorch.
#
#   bash benchmarks/step_ab.sh BASE [HEAD] [ROUNDS]    # HEAD: HEAD, ROUNDS: 5
#
# Both checkouts run on this repository's .venv; each is put first on
# sys.path (kernels/ as dro_fast.kernels through a link), so the installed
# package does not leak into the other.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:?give the base commit}
head=${2:-HEAD}
rounds=${3:-5}
python=${PYTHON:-$PWD/.venv/bin/python}
scratch=$(mktemp -d)
trap 'git worktree remove --force "$scratch/base" 2>/dev/null;
      git worktree remove --force "$scratch/head" 2>/dev/null;
      rm -rf "$scratch"' EXIT
for side in base head; do
  rev=$base; [ "$side" = head ] && rev=$head
  git worktree add --quiet --detach "$scratch/$side" "$rev"
  ln -s ../kernels "$scratch/$side/dro_fast/kernels"
done

flags=(--dtype=float32 --remat=none --size=small --batch_size=8
       --input_length=128 --target_length=64 --implementation=chunked_xla
       --steps=3 --repeats=3 --noscan_layers)
run() {   # one process in checkout $1; prints its steps/s
  local tree=$1 out=$scratch/$1.$2.jsonl
  if [ -f "$scratch/$tree/benchmarks/lib/__init__.py" ] && \
     grep -q "python -m benchmarks" "$scratch/$tree/benchmarks/step_time.py"; then
    (cd "$scratch/$tree" && "$python" -m benchmarks.step_time "${flags[@]}" \
       --json_out="$out" >/dev/null 2>&1)
  else    # older checkouts run the script by path
    (cd "$scratch/$tree" && "$python" benchmarks/step_time.py "${flags[@]}" \
       --json_out="$out" >/dev/null 2>&1)
  fi
  "$python" -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['steps_per_s'])" "$out"
}
results=()
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) = 1 ]; then order="base head"; else order="head base"; fi
  declare -A rate=()
  for side in $order; do rate[$side]=$(run "$side" "$round"); done
  echo "round $round: base ${rate[base]} head ${rate[head]} steps/s"
  results+=("${rate[base]} ${rate[head]}")
done
printf '%s\n' "${results[@]}" | "$python" -c "
import statistics, sys
pairs = [tuple(map(float, line.split())) for line in sys.stdin]
base, head = zip(*pairs)
print(f'median steps/s: base {statistics.median(base):.3f}, head '
      f'{statistics.median(head):.3f}; head / base {statistics.median(head) / statistics.median(base):.3f}x, '
      f'paired {statistics.median(h / b for b, h in pairs):.3f}x over {len(pairs)} rounds')"
