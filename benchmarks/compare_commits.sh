#!/usr/bin/env bash
# One benchmarks/step_time.py point at two commits, timed alternately (one
# process per commit per round, so both see the same machine load), with the
# paired ratio of their per-round medians. Each commit is checked out into a
# temporary worktree and installed there (pip --target, no dependencies: the
# .venv's packages serve both), so its own step_time.py times its own code.
#
#   bash benchmarks/compare_commits.sh OLD_REV NEW_REV ROUNDS -- STEP_TIME_FLAGS
#
# e.g. the CPU step of benchmarks/RESULTS.md#cpu-forms:
#   bash benchmarks/compare_commits.sh 08fa84d HEAD 4 -- --size=small \
#     --batch_size=8 --input_length=128 --target_length=64 --dtype=float32 \
#     --remat=none --noscan_layers --implementation=chunked_xla --steps=1 \
#     --repeats=3
# Prints one line per round and the median paired ratio (new / old s/step);
# the records land in $OUT_DIR (default: a temporary folder) as
# old.jsonl / new.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 4 && $4 == "--" ]] || {
  echo "usage: $0 OLD_REV NEW_REV ROUNDS -- STEP_TIME_FLAGS" >&2; exit 2; }
old_rev=$1 new_rev=$2 rounds=$3
shift 4
python=$PWD/.venv/bin/python
work=$(mktemp -d)
out=${OUT_DIR:-$work/out}
mkdir -p "$out"
trap 'git worktree remove --force "$work/old" 2>/dev/null;
      git worktree remove --force "$work/new" 2>/dev/null; rm -rf "$work/site_"*' EXIT
for side in old new; do
  rev=${side}_rev
  git worktree add --detach --quiet "$work/$side" "${!rev}"
  "$python" -m pip install --quiet --no-deps --no-build-isolation \
    --target "$work/site_$side" "$work/$side" >/dev/null
done
for ((r = 1; r <= rounds; r++)); do
  for side in old new; do
    (cd "$work/$side" && PYTHONPATH="$work/site_$side" "$python" \
      benchmarks/step_time.py "$@" --json_out="$out/$side.jsonl" \
      >"$out/$side.$r.log" 2>&1) || { echo "$side round $r failed:" >&2;
                                      tail -5 "$out/$side.$r.log" >&2; exit 1; }
  done
  echo "round $r done"
done
"$python" - "$out" <<'EOF'
import json, statistics, sys
read = lambda side: [json.loads(l)["median_step_s"]
                     for l in open(f"{sys.argv[1]}/{side}.jsonl")
                     if "median_step_s" in l]
old, new = read("old"), read("new")
for i, (o, n) in enumerate(zip(old, new), 1):
  print(f"round {i}: old {o:.3f} s/step  new {n:.3f} s/step  new/old {n / o:.3f}")
print(f"median s/step: old {statistics.median(old):.3f}  new "
      f"{statistics.median(new):.3f}; paired new/old "
      f"{statistics.median(n / o for o, n in zip(old, new)):.3f} "
      f"({len(old)} rounds)")
EOF
