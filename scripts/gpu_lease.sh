#!/usr/bin/env bash
# A 15-minute GPU lease in two device calls on one warm machine (benchmarks/NOTES-gpu.md,
# "Running the session"). Unlike gpu_session.sh, the correctness work runs side by side: the
# Triton tests start while the extension builds (they do not need it), then the CUDA tests and
# compute-sanitizer run together; pytest-xdist spreads each group over several processes on the
# one GPU. Timings start only once nothing else runs on the GPU.
#
#   bash scripts/gpu_lease.sh check   build, Triton tests || (probe, CUDA tests || sanitizer),
#                                     then DenseNet-BC-100 fp32 eager + CUDA graphs, DenseNet-121
#   bash scripts/gpu_lease.sh more    per-op GB/s, torch.compile providers, bf16 channels_last
#
# DEADLINE_S (default 540) bounds the whole stage: each step's timeout is cut to what is left.
# Logs go to $OUT (at most 8 files come back from the device tool): env.txt, build.log,
# tests.log, bench.csv, ops.csv. Set DENSENET_FAST_GIT_SHA when the tree has no .git.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-check}
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE_S:-540}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
# limit N: N seconds, or what is left before the deadline (less a margin to print the summary)
limit() { local left=$(( DEADLINE - 10 - ($(date +%s) - t0) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n ${WORKERS:-6}"
PYTEST="$PY -m pytest -q -p no:cacheprovider -rfE --tb=short $XDIST"
bench() {  # bench SECONDS ARGS...: one process per call, so that a CUDA error cannot poison the others
  local s; s=$(limit "$1"); shift
  timeout -k 5 "$s" $PY -m densenet_fast bench --device cuda --plain --out "$OUT/bench.csv" "$@" 2>&1 \
    | grep -vE "^\s*$" | tail -12
}

if [ "$STAGE" = check ]; then
  stamp "environment"
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    $PY -c "import xdist; print('pytest-xdist', xdist.__version__)"
    nvcc --version | tail -2; g++ --version | head -1; } 2>&1 | tee "$OUT/env.txt"

  stamp "build || Triton tests"
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  export MAX_JOBS=${MAX_JOBS:-16} DENSENET_FAST_FORCE_CUDA_BUILD=1
  ( $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; echo "build exit $?" >>"$OUT/build.log" ) &
  build_pid=$!
  ( echo "=== Triton tests"
    timeout -k 5 "$(limit 300)" $PYTEST tests/test_triton_kernels.py tests/test_triton_conv3x3.py \
      tests/test_triton_conv1x1_backward.py tests/test_triton_transition.py tests/test_triton_backend.py
    echo "Triton tests: pytest exit $?" ) >"$OUT/tri.log" 2>&1 &
  tri_pid=$!
  wait $build_pid
  stamp "$(tail -1 "$OUT/build.log")"
  grep -E "error|Error" "$OUT/build.log" | head -5
  $PY -c "from densenet_fast import _ext; print('extension', _ext.HAS_C, _ext.IMPORT_ERROR, 'channel_stats kernels', sorted(_ext.kernel_devices('channel_stats')))" 2>&1 | tee -a "$OUT/env.txt"

  stamp "exception probe"
  timeout 40 $PY scripts/exception_probe.py >>"$OUT/env.txt" 2>&1
  echo "exception probe: exit $?; $(grep -E "^(probe |exception probes)" "$OUT/env.txt" | tail -2 | tr '\n' ' ')"

  stamp "CUDA tests || compute-sanitizer"
  ( echo "=== CUDA tests"
    timeout -k 5 "$(limit 200)" $PYTEST tests/test_gpu.py tests/test_channel_stats.py tests/test_extension.py \
      tests/test_fused_bn.py tests/test_cuda_backend.py
    echo "CUDA tests: pytest exit $?" ) >"$OUT/cu.log" 2>&1 &
  cu_pid=$!
  SAN=""
  for cand in "$CUDA_HOME/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer "$(command -v compute-sanitizer)"; do
    [ -n "$cand" ] && [ -x "$cand" ] && { SAN=$cand; break; }
  done
  # the -k selections of gpu_session.sh: every kernel path of csrc/ (see NOTES-gpu.md, compute-sanitizer)
  FUSED='bn_ and (vector-tail or vector-9x32) and (float16-float32 or float32-float32) and not bfloat16'
  STATS='matches_reference and kernel and (c12-at13 or c24-64x64)'
  MEMCHECK_K="cuda and (($FUSED and not float16-float16 and not write-train and not eval) or ($STATS and not bfloat16) \
or in_place or empty_inputs)"
  RACECHECK_K="cuda and (($FUSED and backward_reduce and (same or channels_last-other)) or ($STATS and (float32 or float64)))"
  ( [ -n "$SAN" ] || echo "compute-sanitizer: not found; skipped"
    for run in "memcheck 90 $MEMCHECK_K" "racecheck 60 $RACECHECK_K"; do
      [ -n "$SAN" ] || break
      read -r tool lim k <<<"$run"
      echo "=== compute-sanitizer --tool $tool: -k \"$k\""
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$(limit "$lim")" "$SAN" --tool "$tool" --error-exitcode 86 \
        --print-limit 20 --report-api-errors no --kernel-name kns=bn_relu_ --kernel-name kns=channel_stats_ \
        $PY -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_fused_bn.py tests/test_channel_stats.py -k "$k"
      echo "sanitizer $tool: exit $?"
    done ) >"$OUT/san.log" 2>&1 &
  san_pid=$!
  wait $tri_pid $cu_pid $san_pid
  for f in tri cu san; do cat "$OUT/$f.log" >>"$OUT/tests.log"; done
  stamp "results"
  for f in tri cu; do
    grep -E "pytest exit|[0-9]+ (passed|failed)" "$OUT/$f.log" | tail -2
    grep -E "^(FAILED|ERROR)|crashed|Fatal Python" "$OUT/$f.log" | head -12
  done
  grep -E "sanitizer .*exit|(ERROR|RACECHECK) SUMMARY|[0-9]+ (passed|failed)" "$OUT/san.log"
  rm -f "$OUT"/{tri,cu,san}.log

  stamp "DenseNet-BC-100 fp32 NCHW"
  bench 100 --model densenet_bc_100_12 --batch 64 --providers naive,checkpoint,torch,naive+graph,torch+graph
  bench 60 --model densenet_bc_100_12 --batch 64 --providers cuda,cuda+graph
  bench 90 --model densenet_bc_100_12 --batch 64 --providers triton,triton+graph
  stamp "DenseNet-121 fp32 NCHW"
  bench 90 --model densenet121 --batch 64 --providers naive,checkpoint,torch,cuda
  bench 60 --model densenet121 --batch 64 --providers triton
fi

if [ "$STAGE" = more ]; then
  stamp "per-op bandwidth"
  timeout -k 5 "$(limit 90)" $PY benchmarks/bench_ops.py --out "$OUT/ops.csv" 2>&1 | tail -40
  stamp "torch.compile (DenseNet-BC-100 fp32)"
  bench 200 --model densenet_bc_100_12 --batch 64 --providers naive,compile,torch+compile,triton+compile
  stamp "bf16 channels_last"
  bench 90 --model densenet_bc_100_12 --batch 64 --dtype bfloat16 --channels-last --providers naive,torch,cuda,triton
fi
stamp "done"
