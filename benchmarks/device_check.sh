#!/usr/bin/env bash
# The one prepared GPU run (DEVELOPERS.md): installs nothing from the network,
# checks the kernels' numerics on the GPU against float64, runs the GPU kernel
# tests, benchmarks the kernels, and times the DRO-V train step. Every figure
# lands under $OUT as it is measured, so a time-out still returns what was
# done. Budget: under 8 minutes.
#
#   bash benchmarks/device_check.sh                   # every check
#   CHECKS="numerics steps" bash benchmarks/device_check.sh
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
PY="${PY:-python3}"
CHECKS="${CHECKS:-numerics tests kernels steps}"
BENCH_FLAGS="${BENCH_FLAGS:---flagfile=configs/kernels_gpu.flags}"
STEP_SIZES="${STEP_SIZES:-large xl}"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/device_check.log"; }
wants() { [[ " $CHECKS " == *" $1 "* ]]; }

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee -a "$OUT/device_check.log"

# The installed layout without pip: kernels/ becomes dro_fast/kernels, as
# pyproject's package-dir maps it.
log "lay out dro_fast as installed (no deps, no network)"
SITE=/tmp/dro_site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r dro_fast benchmarks tests configs pyproject.toml "$SITE"/
cp -r kernels "$SITE"/dro_fast/kernels
if ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target \
    /tmp/whl_site "$REPO"/.whl/*.whl && export PYTHONPATH=/tmp/whl_site
fi
cd "$SITE"

if wants numerics; then
  log "numerics against float64 (both ops, float32 + bfloat16, V=32128)"
  timeout 150 $PY benchmarks/gpu_numerics.py \
    --json_out="$OUT/numerics.jsonl" 2>&1 \
    | grep -v "Unable to initialize backend" | tee "$OUT/numerics.txt"
fi

if wants tests; then
  log "kernel tests on the GPU (sequence op: native pallas_gpu and xla)"
  timeout 120 $PY -m pytest -q -p no:cacheprovider -x \
    tests/kernels/test_sequence_logprobs.py -k "pallas_gpu or xla" 2>&1 \
    | tail -5 | tee "$OUT/pytest_gpu.txt"
fi

if wants kernels; then
  log "kernel benchmark"
  timeout 270 $PY benchmarks/kernels.py $BENCH_FLAGS \
    --json_out="$OUT/kernels.jsonl" 2>&1 | grep -v "Unable to initialize" \
    | tee "$OUT/kernels.txt"
fi

if wants steps; then
  for SIZE in $STEP_SIZES; do
    log "step_time $SIZE (DRO-V, batch 32, inputs 512 / targets 128)"
    timeout "${STEP_TIMEOUT:-150}" $PY benchmarks/step_time.py --size="$SIZE" \
      --batch_size=32 --input_length=512 --target_length=128 --steps=8 \
      --json_out="$OUT/step_time.jsonl" 2>&1 \
      | grep -v "Unable to initialize" | tee -a "$OUT/step_time.txt"
  done
fi
log "done"
