#!/usr/bin/env bash
# The one prepared GPU run (docs/DEVELOPMENT.md#the-gpu-check): lays
# dro_fast out as installed under SITE, installs nothing from the network,
# runs the CHECKS below. Every figure lands under $OUT as it is measured, so
# a time-out still returns what was done; BUDGET_S (default 450, under a
# device call's 10 minutes) bounds the run, a check that no longer fits is
# skipped and logged. $OUT gets at most 8 files: device_check.log,
# profile.jsonl, profile.xplane.pb[.gz], step_time.jsonl, numerics.jsonl,
# optimizer_time.jsonl, kernels.jsonl.
#
#   bash benchmarks/device_check.sh --wheels          # here, once: .whl/
#   bash benchmarks/device_check.sh                   # there: every check
#   CHECKS="numerics steps" bash benchmarks/device_check.sh
#   STEP_RUNS="large:dots,full xl:full:cudnn" bash benchmarks/device_check.sh
#   DRY_RUN=1 bash benchmarks/device_check.sh         # on a CPU (the test)
#
# CHECKS (default: all, in this order):
#   profile    benchmarks.profile_step, PROFILE_FLAGS: the variant we
#              would ship (T5-L DRO-V, cuDNN attention, remat "dots", B=32,
#              512/128, bfloat16): device ms per step by category and op,
#              the raw trace (gzipped, or left out, past 15 MiB).
#   steps      benchmarks.step_time with STEP_FLAGS, one process per
#              STEP_RUNS item SIZE:REMAT[,REMAT...][:ATTENTION[,...]]
#              (attention "xla" unless given), its variants timed side by
#              side (T5-XL: one per item, two states do not fit). A variant
#              that does not fit or that cuDNN refuses is recorded with its
#              error. The defaults, RESULTS.md#train-step-on-the-h100's
#              open targets: T5-L "dots", xla against cudnn; T5-XL cudnn,
#              then xla (a figure even if cuDNN refuses); T5-L remat none.
#   numerics   benchmarks.gpu_numerics: the kernels against float64.
#   tests      the GPU kernel tests (the sequence op: pallas_gpu and xla).
#   optimizer  benchmarks.optimizer_time: our Adafactor against optax's.
#   kernels    benchmarks.kernel_time with BENCH_FLAGS.
# The budget is likely spent by the steps: ask for the rest on a 2nd call.
#
# The cap: the profile and the steps may take CAP_MIB (default 77,481 MiB,
# the 0.95 of an 80 GB H100's 81,559 MiB that JAX takes there) as a
# fraction of the card's memory.total (nvidia-smi; CAP_FALLBACK, 0.539, the
# H200's, without one), so that an H200 answers what fits on an H100; XLA's
# compiler gets the limit too. CAP_MIB=0: the other checks' 0.95. Their
# records carry memory_fraction, memory_cap_mib and device_memory_mib.
#
# --wheels: the device image lacks dm-haiku, jmp and tensorboardX of
# pyproject's dependencies. Run where there is a network, this downloads
# them at requirements/constraints.txt's pins into .whl/ (git ignores it);
# name .whl in the device call's carry: they install with pip --no-index.
#
# Every script runs as a module (python -m benchmarks.NAME) from SITE.
# DRY_RUN=1 (tests/test_device_check.py, on a CPU): every script gets its
# command line but only parses it and runs its check_flags() (PARSE_ONLY;
# step_time with --memory_only --platform=gpu, its stand-in for cuDNN),
# appending a dry-run record to its --json_out; the profile traces a small
# function (--dry_run); pytest only collects; nothing is installed.
set -uo pipefail
PY="${PY:-python3}"
[[ "$PY" == */* ]] && PY=$(realpath -s "$PY")   # the checks run from $SITE
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY_RUN="${DRY_RUN:-0}"

if [[ "${1:-}" == "--wheels" ]]; then
  pins=()
  for name in dm-haiku jmp tensorboardX; do
    pin=$(grep -i "^$name==" requirements/constraints.txt) \
      || { echo "no pin for $name in requirements/constraints.txt"; exit 2; }
    pins+=("$pin")
  done
  cmd=($PY -m pip download --no-deps --only-binary=:all: --python-version 3.12
       -d .whl "${pins[@]}")
  echo "${cmd[*]}"
  [[ "$DRY_RUN" == 1 ]] || { rm -rf .whl && "${cmd[@]}" && ls .whl; }
  exit
fi

OUT="${OUT:-$REPO/.out}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
export PYTHONUNBUFFERED=1
# JAX preallocates 75% of the GPU by default; the checks take 0.95. Older
# jaxlibs read only the deprecated name, and the new one may not be set too.
FRACTION="${XLA_CLIENT_MEM_FRACTION:-${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}}"
unset XLA_CLIENT_MEM_FRACTION
export XLA_PYTHON_CLIENT_MEM_FRACTION="$FRACTION"
CHECKS="${CHECKS:-profile steps numerics tests optimizer kernels}"
BENCH_FLAGS="${BENCH_FLAGS:---flagfile=benchmarks/configs/kernels_gpu.flags}"
STEP_RUNS="${STEP_RUNS:-large:dots:xla,cudnn xl:dots_except_mlp_hidden:cudnn xl:dots_except_mlp_hidden:xla large:none:cudnn}"
STEP_FLAGS="${STEP_FLAGS:---batch_size=32 --input_length=512 --target_length=128 --steps=4 --repeats=3}"
PROFILE_FLAGS="${PROFILE_FLAGS:---size=large --remat=dots --attention=cudnn --batch_size=32 --input_length=512 --target_length=128 --dtype=bfloat16 --warmup=2 --steps=2}"
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))

# PARSE_ONLY: `$PY -c "$PARSE_ONLY" MODULE ARGS...` runs MODULE with its
# app.run(main) replaced: the flags parsed, the script's check_flags() if it
# has one, a dry-run record appended to --json_out; main never runs.
PARSE_ONLY='import json, runpy, sys
from absl import app, flags
module, args = sys.argv[1], sys.argv[2:]
def parse_only(main):
  flags.FLAGS([module, *args])
  main.__globals__.get("check_flags", lambda: None)()
  if flags.FLAGS.json_out:
    with open(flags.FLAGS.json_out, "a") as f:
      f.write(json.dumps({"dry_run": True, "script": module, "args": args})
              + "\n")
  print("flags parse:", module, *args)
app.run = parse_only
runpy.run_module(module, run_name="__main__", alter_sys=True)'
SCRIPT=($PY -m) DRY_STEP="" DRY_PROFILE="" DRY_TESTS=""
if [[ "$DRY_RUN" == 1 ]]; then
  SCRIPT=($PY -c "$PARSE_ONLY") DRY_STEP="--memory_only --platform=gpu"
  DRY_PROFILE="--dry_run --platform=gpu" DRY_TESTS="--collect-only"
fi

log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
wants() { [[ " $CHECKS " == *" $1 "* ]]; }
# run_for WANT NAME COMMAND...: COMMAND under WANT seconds or what is left
# of the budget less 10 s; skipped, and logged, when under 30 s are left.
run_for() {
  local want=$1 name=$2 left=$((DEADLINE - SECONDS - 10)); shift 2
  if (( left < 30 )); then log "skipped $name: budget spent"; return 0; fi
  timeout $((want < left ? want : left)) "$@"
}
# Output to the log, less the CUDA-less backends' probing noise.
to_log() { grep -v "Unable to initialize backend" | tee -a "$LOG"; }
# cap FILE: the cap's fields added to FILE's records that lack them (the
# last command's: each earlier one's got them).
cap() { [[ -f $1 ]] && sed -i "/\"memory_fraction\"/!s/}\$/, $CAP_FIELDS}/" "$1"; }

log "machine$([[ "$DRY_RUN" == 1 ]] && echo ' (dry run)')"
{ command -v nvidia-smi >/dev/null \
    && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | to_log

# The cap (header): CAP_MIB of this card, as a fraction.
CAP_MIB="${CAP_MIB:-77481}"
TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 | tr -d ' ')
[[ "$TOTAL_MIB" =~ ^[0-9]+$ ]] || TOTAL_MIB=null
if (( CAP_MIB == 0 )); then
  STEP_FRACTION=$FRACTION CAP_MIB=null
elif [[ "$TOTAL_MIB" != null ]]; then
  milli=$(((CAP_MIB * 1000 + TOTAL_MIB / 2) / TOTAL_MIB))
  STEP_FRACTION=$(printf "0.%03d" $((milli < 950 ? milli : 950)))
else
  STEP_FRACTION="${CAP_FALLBACK:-0.539}"
fi
CAP_FIELDS="\"memory_fraction\": $STEP_FRACTION, \"memory_cap_mib\": $CAP_MIB, \"device_memory_mib\": $TOTAL_MIB"
log "step memory: fraction $STEP_FRACTION (CAP_MIB $CAP_MIB of the card's" \
  "$TOTAL_MIB MiB$([[ $TOTAL_MIB == null ]] && echo ': CAP_FALLBACK');" \
  "the other checks $FRACTION)"

# The installed layout without pip: kernels/ becomes dro_fast/kernels, as
# pyproject's package-dir maps it; the .whl wheels install into SITE/wheels.
log "lay out dro_fast as installed (no deps, no network)"
SITE="$(realpath -m "${SITE:-${TMPDIR:-/tmp}/dro_site}")"
case "$REPO/" in "$SITE"/*)
  log "refusing SITE=$SITE: it holds the checkout"; exit 2 ;; esac
case "$SITE/" in "$REPO"/*)
  log "refusing SITE=$SITE: it is inside the checkout"; exit 2 ;; esac
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r dro_fast benchmarks tests configs pyproject.toml "$SITE"/
cp -r kernels "$SITE"/dro_fast/kernels
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  if [[ "$DRY_RUN" == 1 ]]; then
    log "dry run: not installing $(ls "$REPO"/.whl | tr '\n' ' ')"
  else
    log "install $(ls "$REPO"/.whl | tr '\n' ' ')(--no-index)"
    if $PY -m pip install -q --no-index --find-links "$REPO/.whl" --no-deps \
      --no-compile --no-cache-dir --upgrade --target "$SITE/wheels" \
      "$REPO"/.whl/*.whl >>"$LOG" 2>&1; then export PYTHONPATH="$SITE/wheels"
    else log "pip install from .whl failed (above)"; fi
  fi
fi
cd "$SITE"
$PY -c "import importlib.util as u, sys; sys.exit(not u.find_spec('haiku'))" \
  || log "dm-haiku is missing: the steps and the profile fail; make .whl" \
  "with 'bash benchmarks/device_check.sh --wheels' and carry it"

if wants profile; then
  log "profile: $PROFILE_FLAGS (memory fraction $STEP_FRACTION)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=$STEP_FRACTION run_for 150 profile \
    $PY -m benchmarks.profile_step $PROFILE_FLAGS $DRY_PROFILE \
    --trace_out="$OUT/profile.xplane.pb" --json_out="$OUT/profile.jsonl" \
    2>&1 | to_log
  cap "$OUT/profile.jsonl"
fi

if wants steps; then
  for RUN in $STEP_RUNS; do
    IFS=: read -r SIZE REMAT ATTENTION <<< "$RUN"
    ATTENTION="${ATTENTION:-xla}"
    log "step_time $SIZE remat=$REMAT attention=$ATTENTION (DRO-V:" \
      "$STEP_FLAGS; memory fraction $STEP_FRACTION)"
    XLA_PYTHON_CLIENT_MEM_FRACTION=$STEP_FRACTION run_for \
      "${STEP_TIMEOUT:-170}" "step_time $RUN" "${SCRIPT[@]}" \
      benchmarks.step_time --size="$SIZE" --remat="$REMAT" \
      --attention="$ATTENTION" $STEP_FLAGS $DRY_STEP \
      --json_out="$OUT/step_time.jsonl" 2>&1 | to_log
    cap "$OUT/step_time.jsonl"
  done
fi

if wants numerics; then
  log "numerics against float64 (both ops, float32 + bfloat16, V=32128)"
  run_for 120 numerics "${SCRIPT[@]}" benchmarks.gpu_numerics \
    --json_out="$OUT/numerics.jsonl" 2>&1 | to_log
fi

if wants tests; then
  log "kernel tests on the GPU (sequence op: native pallas_gpu and xla)"
  run_for 90 tests $PY -m pytest -q -p no:cacheprovider -x $DRY_TESTS \
    tests/kernels/test_sequence_logprobs.py -k "pallas_gpu or xla" 2>&1 \
    | tail -30 | to_log
fi

if wants optimizer; then
  log "optimizer_time (T5-L policy + value encoder, optax against fused)"
  run_for 90 optimizer_time "${SCRIPT[@]}" benchmarks.optimizer_time \
    --size=large --repeats=5 --json_out="$OUT/optimizer_time.jsonl" 2>&1 \
    | to_log
fi

if wants kernels; then
  log "kernel benchmark"
  run_for 240 kernels "${SCRIPT[@]}" benchmarks.kernel_time $BENCH_FLAGS \
    --json_out="$OUT/kernels.jsonl" 2>&1 | to_log
fi
log "done"
