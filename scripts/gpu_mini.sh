#!/usr/bin/env bash
# The shortest useful GPU check (a lease with little time left): build, the model-level GPU tests,
# and DenseNet-BC-100 with the fused backends, autotuning off (first configuration of each kernel).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-mini}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DENSENET_FAST_TRITON_AUTOTUNE=0
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 DENSENET_FAST_FORCE_CUDA_BUILD=1
t0=$(date +%s); stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -5 "$OUT/build.log"; stamp "BUILD FAILED"; }
stamp built
timeout ${TEST_S:-70} python3 -m pytest -q -x -p no:cacheprovider --tb=short tests/test_gpu.py >"$OUT/tests.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/tests.log"
stamp tested
timeout ${BENCH_S:-80} python3 -m densenet_fast bench --device cuda --plain --model densenet_bc_100_12 --batch 64 \
  --providers ${PROVIDERS:-naive,triton,cuda,naive+graph,triton+graph} --repeats 10 --out "$OUT/bench.csv" 2>&1 | tail -12
stamp done
