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
PY=python3
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/device_check.log"; }

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee -a "$OUT/device_check.log"

# The project, without its dependencies (the image has jax, absl, numpy).
log "install dro_fast (no deps, no network)"
$PY -m pip install -q --no-deps --no-build-isolation --no-index \
  --target /tmp/dro_site . 2>&1 | tail -3
export PYTHONPATH=/tmp/dro_site:$(pwd)

log "numerics against float64 (both ops, float32 + bfloat16, V=32128)"
timeout 150 $PY benchmarks/gpu_numerics.py --json_out="$OUT/numerics.jsonl" \
  2>&1 | grep -v "Unable to initialize backend" | tee "$OUT/numerics.txt"

log "kernel tests on the GPU (sequence op: native pallas_gpu and xla)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -x \
  tests/kernels/test_sequence_logprobs.py -k "pallas_gpu or xla" 2>&1 \
  | tail -5 | tee "$OUT/pytest_gpu.txt"

log "kernel benchmark"
timeout 270 $PY benchmarks/kernels.py --flagfile=configs/kernels_gpu.flags \
  --json_out="$OUT/kernels.jsonl" 2>&1 | grep -v "Unable to initialize" \
  | tee "$OUT/kernels.txt"
log "done"
