#!/usr/bin/env bash
# The one prepared GPU run (DEVELOPERS.md): installs nothing from the network,
# checks the kernels' numerics on the GPU against float64, then benchmarks
# them. Every figure lands under $OUT as it is measured, so a time-out still
# returns what was done. Budget: under 8 minutes.
#
#   bash benchmarks/device_check.sh            # on the device machine
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(pwd)/.out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
BENCH_FLAGS="${BENCH_FLAGS:---flagfile=configs/kernels_gpu.flags}"
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/device_check.log"; }

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee -a "$OUT/device_check.log"

# The installed layout without pip (the image has jax, absl, numpy, pytest):
# kernels/ becomes dro_fast/kernels, as pyproject's package-dir maps it.
log "lay out dro_fast as installed (no deps, no network)"
SITE=/tmp/dro_site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r dro_fast benchmarks tests configs pyproject.toml "$SITE"/
cp -r kernels "$SITE"/dro_fast/kernels
cd "$SITE"

log "numerics against float64 (both ops, float32 + bfloat16, V=32128)"
timeout 150 $PY benchmarks/gpu_numerics.py --json_out="$OUT/numerics.jsonl" \
  2>&1 | grep -v "Unable to initialize backend" | tee "$OUT/numerics.txt"

log "kernel tests on the GPU (sequence op: native pallas_gpu and xla)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -x \
  tests/kernels/test_sequence_logprobs.py -k "pallas_gpu or xla" 2>&1 \
  | tail -5 | tee "$OUT/pytest_gpu.txt"

log "kernel benchmark"
timeout 270 $PY benchmarks/kernels.py $BENCH_FLAGS \
  --json_out="$OUT/kernels.jsonl" 2>&1 | grep -v "Unable to initialize" \
  | tee "$OUT/kernels.txt"
log "done"
