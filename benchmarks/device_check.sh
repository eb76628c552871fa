#!/usr/bin/env bash
# The one prepared GPU run (docs/DEVELOPMENT.md): installs nothing from the
# network, times the DRO-V train step, checks the kernels' numerics on the
# GPU against float64, runs the GPU kernel tests, times one Adafactor update
# (ours against optax's) and benchmarks the kernels. Every figure lands
# under $OUT as it is measured, so a time-out still returns what was done.
# Budget: BUDGET_S seconds (default 450, under the minutes a device call is
# given); a check that no longer fits in what is left is skipped and logged.
#
#   bash benchmarks/device_check.sh                   # every check, in order
#   CHECKS="numerics steps" bash benchmarks/device_check.sh
#   STEP_RUNS="large:dots,full xl:full:cudnn" bash benchmarks/device_check.sh
#
# STEP_RUNS: one step_time process per item
# SIZE:REMAT[,REMAT...][:ATTENTION[,ATTENTION...]] (attention "xla" unless
# given); the variants of one item are timed side by side in that process
# (T5-XL's states are too large for two in one process, so give XL one per
# item). A variant that does not fit is recorded as out of memory, and a
# cuDNN attention variant that cuDNN refuses is recorded with its error;
# the others are still timed (step_time exits 1 then; the script goes on).
#
# The default runs, step times first (the open targets of
# benchmarks/RESULTS.md#train-step-on-the-h100): T5-L with remat "dots",
# materialised attention ("xla") against cuDNN's fused attention; T5-XL
# with remat "dots_except_mlp_hidden", with cuDNN attention and then
# materialised, so that a cuDNN refusal still leaves a T5-XL figure; then,
# if the budget is left, T5-L without remat with cuDNN, which recomputes
# nothing and may just fit. The plans that say which of these should fit
# are in benchmarks/RESULTS.md#memory-plans-at-t5-l-and-t5-xl. With the
# default budget the later checks are likely skipped; ask for them with
# CHECKS on a second call.
#
# JAX preallocates 75% of the GPU by default; T5-XL at batch 32 needs more,
# so the fraction is raised unless set.
#
# The image has jax, absl, numpy, optax, pytest but not dm-haiku: the train
# step needs its wheels carried in .whl/ (python3 -m pip download --no-deps
# -d .whl dm-haiku==0.0.17 jmp==0.0.4; the run names .whl in carry).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT="${OUT:-$REPO/.out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
PY="${PY:-python3}"
CHECKS="${CHECKS:-steps numerics tests optimizer kernels}"  # run in this order
BENCH_FLAGS="${BENCH_FLAGS:---flagfile=configs/kernels_gpu.flags}"
STEP_RUNS="${STEP_RUNS:-large:dots:xla,cudnn xl:dots_except_mlp_hidden:cudnn xl:dots_except_mlp_hidden:xla large:none:cudnn}"
STEP_FLAGS="${STEP_FLAGS:---batch_size=32 --input_length=512 --target_length=128 --steps=4 --repeats=3}"
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/device_check.log"; }
wants() { [[ " $CHECKS " == *" $1 "* ]]; }
# limit WANT: WANT seconds, or what is left of the budget less 10 s; 0 (and
# a log line) when under 30 s are left.
limit() {
  local left=$((DEADLINE - SECONDS - 10))
  if (( left < 30 )); then echo 0; return; fi
  echo $(( $1 < left ? $1 : left ))
}
run_for() {          # run_for WANT NAME command...: under limit, or skipped
  local want=$1 name=$2; shift 2
  local t; t=$(limit "$want")
  if (( t == 0 )); then log "skipped $name: budget spent"; return 0; fi
  timeout "$t" "$@"
}

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee -a "$OUT/device_check.log"

# The installed layout without pip: kernels/ becomes dro_fast/kernels, as
# pyproject's package-dir maps it.
log "lay out dro_fast as installed (no deps, no network)"
SITE="$(realpath -m "${SITE:-/tmp/dro_site}")"
case "$REPO/" in
  "$SITE"/*) log "refusing SITE=$SITE: it holds the checkout"; exit 2 ;;
esac
case "$SITE/" in
  "$REPO"/*) log "refusing SITE=$SITE: it is inside the checkout"; exit 2 ;;
esac
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r dro_fast benchmarks tests configs pyproject.toml "$SITE"/
cp -r kernels "$SITE"/dro_fast/kernels
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target \
    /tmp/whl_site "$REPO"/.whl/*.whl && export PYTHONPATH=/tmp/whl_site
fi
cd "$SITE"

if wants steps; then
  for RUN in $STEP_RUNS; do
    IFS=: read -r SIZE REMAT ATTENTION <<< "$RUN"
    ATTENTION="${ATTENTION:-xla}"
    log "step_time $SIZE remat=$REMAT attention=$ATTENTION (DRO-V: $STEP_FLAGS)"
    run_for "${STEP_TIMEOUT:-170}" "step_time $RUN" $PY benchmarks/step_time.py \
      --size="$SIZE" --remat="$REMAT" --attention="$ATTENTION" $STEP_FLAGS \
      --json_out="$OUT/step_time.jsonl" 2>&1 \
      | grep -v "Unable to initialize" | tee -a "$OUT/step_time.txt"
  done
fi

if wants numerics; then
  log "numerics against float64 (both ops, float32 + bfloat16, V=32128)"
  run_for 120 numerics $PY benchmarks/gpu_numerics.py \
    --json_out="$OUT/numerics.jsonl" 2>&1 \
    | grep -v "Unable to initialize backend" | tee "$OUT/numerics.txt"
fi

if wants tests; then
  log "kernel tests on the GPU (sequence op: native pallas_gpu and xla)"
  run_for 90 tests $PY -m pytest -q -p no:cacheprovider -x \
    tests/kernels/test_sequence_logprobs.py -k "pallas_gpu or xla" 2>&1 \
    | tail -5 | tee "$OUT/pytest_gpu.txt"
fi

if wants optimizer; then
  log "optimizer_time (T5-L policy + value encoder, optax against fused)"
  run_for 90 optimizer_time $PY benchmarks/optimizer_time.py --size=large \
    --repeats=5 --json_out="$OUT/optimizer_time.jsonl" 2>&1 \
    | grep -v "Unable to initialize" | tee "$OUT/optimizer_time.txt"
fi

if wants kernels; then
  log "kernel benchmark"
  run_for 240 kernels $PY benchmarks/kernels.py $BENCH_FLAGS \
    --json_out="$OUT/kernels.jsonl" 2>&1 | grep -v "Unable to initialize" \
    | tee "$OUT/kernels.txt"
fi
log "done"
