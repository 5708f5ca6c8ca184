#!/usr/bin/env bash
# Every measurement the CPU machine cannot make, in one run on a GPU host (run from the
# repository root with a CUDA jax installed): probe cost and FLOP rate, the ensemble over the
# loop, weights as data, a slice of the test suite on the GPU, the training checks
# (training_runs/gpu_check.sh) and paper-size experiments with the time left.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [SECONDS]
#
# Each step has its own time limit and writes OUT_DIR/<step>.txt; a step that fails or runs
# out of time does not stop the next. SECONDS (default 540) bounds the whole run.
set -uo pipefail
out=${1:-runs/gpu_checks}
budget=${2:-540}
mkdir -p "$out"
start=$(date +%s)
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
left() { echo $((budget - ($(date +%s) - start))); }
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local l; l=$(left)
  [ "$l" -lt 20 ] && { echo "== $name: skipped (no time left)" | tee -a "$out/summary.txt"; return; }
  [ "$limit" -gt "$l" ] && limit=$l
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.txt"
}

step env 60 bash -c 'nvidia-smi -L; python -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"'
# first what is still unmeasured: the ensemble over the loop with the batched QR, the QR
# routes themselves, and a new weight state since hoist_fast (the open targets)
step ensemble_w64 60 python benchmarks/ensemble_cost.py --inits 64 --width 64 --depth 32 \
    --probes 16 --repeats 3 --init-chunks 8
# Q formed by orgqr (one solver call per matrix on GPUs) vs the batched householder_qr
step qr_cost 60 python benchmarks/qr_cost.py --inits 64 --layers 33 --widths 64 256
step weights_as_data 90 python benchmarks/weights_as_data_cost.py --depth 16 --width 1024 \
    --probes 64 --states 10
# the probes' and estimators' tests, on the GPU: every failure named (-rf), not only the first
step tests_gpu 120 python -m pytest -q -rf --maxfail=20 -p no:cacheprovider -n 4 -m "not slow" \
    tests/test_stochtrace.py tests/test_moments.py tests/test_spectral.py tests/test_lanczos.py \
    tests/test_block_moments.py tests/test_weights_as_data.py tests/test_qr.py
# measured before (benchmarks/RESULTS.md, "GPU"): rerun as the time goes
step probe_cost 60 python benchmarks/probe_cost.py --sizes 1024 4096 --probes 64 --depth 4
step ensemble_w1024 90 python benchmarks/ensemble_cost.py --inits 64 --width 1024 --depth 32 \
    --probes 16 --repeats 3 --init-chunks 8
step probe_flops 60 python benchmarks/probe_flops.py --width 4096 --depth 8 --batch 256 \
    --probes 32 --matmul 8192
# training: ResNet-50 SMN vs BN, the SMN/BN speed figure, the serial CNN on digits
step training 240 bash training_runs/gpu_check.sh "$out/training"
# paper-size experiments, as far as the time goes
step paper_G14 120 python -m experiments G14 --size paper --no-progress --out "$out/paper"
step paper_M3 60 python -m experiments M3 --size paper --no-progress --out "$out/paper"
echo "total $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
