#!/usr/bin/env bash
# One prepared GPU session (benchmarks/README.md, "On a GPU"): build the extension against the
# machine's own torch, run the GPU tests, then the benchmarks.  Logs and CSVs go to $OUT (the
# device tool's output folder) or benchmarks/results/gpu-<date>/.
#
#   bash scripts/gpu_session.sh quick   build + GPU tests + DenseNet-BC-100 fp32 (no compile)
#   bash scripts/gpu_session.sh full    tests, then bench (below) in one call: more than one device
#                                       call's 600 s; use it only where a call may run that long
#   bash scripts/gpu_session.sh tests   build + exception probe + every GPU test group +
#                                       compute-sanitizer over the csrc kernels
#   bash scripts/gpu_session.sh bench   build (incremental on a warm machine) + per-op GB/s + both
#                                       models, fp32 and bf16 channels_last, CUDA graphs,
#                                       torch.compile of naive and of ours
# With the device tool: `tests` in one call, then `bench` in a second call on the same warm machine
# (benchmarks/NOTES-gpu.md, "Running the session").
#
# Uses the machine's python3 (the project's pins do not apply there); set DENSENET_FAST_GIT_SHA
# when the copy of the tree has no .git, so that the CSV rows name their commit.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-quick}
case $MODE in
  quick) TESTS=some BENCH=some;;
  full) TESTS=all BENCH=all;;
  tests) TESTS=all BENCH=none;;
  bench) TESTS=none BENCH=all;;
  *) echo "usage: bash scripts/gpu_session.sh quick|full|tests|bench" >&2; exit 2;;
esac
OUT=${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "environment"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2; g++ --version | head -1; } 2>&1 | tee "$OUT/env.txt"

stamp "build"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16} DENSENET_FAST_FORCE_CUDA_BUILD=1
if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; stamp "BUILD FAILED"
fi
$PY -c "from densenet_fast import _ext; from densenet_fast.backends import available_backends as a; \
print('extension', _ext.HAS_C, _ext.IMPORT_ERROR, 'cuda kernels', _ext.has_cuda_kernels(), 'backends', a('cuda'))" \
  2>&1 | tee -a "$OUT/env.txt"

if [ "$TESTS" != none ]; then
stamp "exception probe"
# The first H200 run died at the first C++ exception thrown through the extension
# (test_channel_stats.py::test_bad_inputs_raise_naming_x[cpu-kernel-3d], a segfault); this names
# the first kind of exception that does not survive here (a few seconds; scripts/exception_probe.py).
timeout 60 $PY scripts/exception_probe.py >"$OUT/group.log" 2>&1
echo "exception probe: exit $?; $(grep -E "^(probe |exception probes)" "$OUT/group.log" | tail -2 | tr '\n' ' ')"
cat "$OUT/group.log" >>"$OUT/env.txt"; rm -f "$OUT/group.log"

stamp "GPU tests"
# One pytest process per group (TEST_GROUPS: bash ignores assignments to GROUPS, its list of the
# user's group ids): a crash in one must not hide the others' results. After a crash
# (a signal: exit 134/135/136/139), the group runs once more without the tests that make the
# extension throw, so that the rest of its results are still seen.
TEST_GROUPS="tests/test_gpu.py|tests/test_channel_stats.py tests/test_extension.py|tests/test_triton_kernels.py"
[ "$TESTS" = all ] && TEST_GROUPS="$TEST_GROUPS|tests/test_fused_bn.py tests/test_cuda_backend.py|tests/test_triton_conv3x3.py \
tests/test_triton_conv1x1_backward.py tests/test_triton_transition.py tests/test_triton_backend.py"
i=0
IFS='|'; for group in $TEST_GROUPS; do
  unset IFS; i=$((i + 1))
  echo "=== group $i: $group" >"$OUT/group.log"
  timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -rfE --tb=short $group >>"$OUT/group.log" 2>&1
  rc=$?; echo "group $i ($group): pytest exit $rc"; grep -E "passed|failed|error" "$OUT/group.log" | tail -1
  grep -E "^(FAILED|ERROR)|Fatal Python error" "$OUT/group.log" | head -15
  case $rc in 134|135|136|139)
    echo "=== group $i again after exit $rc, without the bad-input tests" >>"$OUT/group.log"
    timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -rfE --tb=short $group \
      -k "not bad_inputs and not another_device" >>"$OUT/group.log" 2>&1
    echo "group $i rerun without bad-input tests: pytest exit $?"; grep -E "passed|failed|error" "$OUT/group.log" | tail -1;;
  esac
  cat "$OUT/group.log" >>"$OUT/tests.log"; rm -f "$OUT/group.log"  # at most 8 files come back
  IFS='|'
done; unset IFS

if [ "$TESTS" = all ]; then
  stamp "compute-sanitizer"
  # memcheck (out-of-bounds and misaligned accesses) and racecheck (shared-memory hazards of the
  # reductions) over a few dozen tests that run every kernel of csrc/ on CUDA tensors: each
  # layout path of the three bn_relu passes (NHWC/NCHW vector with tail groups, scalar and
  # strided fallbacks; one and several blocks per channel, so both reduce stages) and both
  # channel_stats kernels. Only csrc's kernels are instrumented (--kernel-name), the caching
  # allocator is off so that every tensor is its own allocation, CUDA API errors of torch's own
  # probing are not reported, and exit 86 means the tool found errors (pytest's exit 1 means a
  # test failed). At most ~90 s in all; output appended to tests.log.
  source scripts/sanitizer_selection.sh  # SAN, MEMCHECK_K, RACECHECK_K
  if [ -z "$SAN" ]; then
    echo "compute-sanitizer: not found in $CUDA_HOME/bin, /usr/local/cuda/bin or PATH; skipped" | tee -a "$OUT/tests.log"
  fi
  for run in "memcheck ${SAN_MEMCHECK_S:-55} $MEMCHECK_K" "racecheck ${SAN_RACECHECK_S:-35} $RACECHECK_K"; do
    [ -n "$SAN" ] || break
    read -r tool limit k <<<"$run"
    echo "=== compute-sanitizer --tool $tool (limit ${limit}s): -k \"$k\"" >"$OUT/group.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$limit" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 20 \
      --report-api-errors no --kernel-name kns=bn_relu_ --kernel-name kns=channel_ \
      $PY -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_fused_bn.py tests/test_channel_stats.py -k "$k" \
      >>"$OUT/group.log" 2>&1
    rc=$?
    echo "sanitizer $tool: exit $rc$([ $rc = 124 ] && echo ' (timed out)'); \
$(grep -ohE "(ERROR|RACECHECK) SUMMARY: .*" "$OUT/group.log" | tail -1); $(grep -E "[0-9]+ (passed|failed|skipped)" "$OUT/group.log" | tail -1)"
    cat "$OUT/group.log" >>"$OUT/tests.log"; rm -f "$OUT/group.log"
  done
fi
fi  # TESTS

if [ "$BENCH" = all ]; then
  stamp "per-op bandwidth"
  timeout 120 $PY benchmarks/bench_ops.py --out "$OUT/ops.csv" 2>&1 | tail -60
fi

if [ "$BENCH" != none ]; then
stamp "model benchmarks"
# naive, checkpoint and every backend that runs here (no torch.compile: DenseNet-121 compiles slowly)
NOCOMPILE=$($PY -c "from densenet_fast.bench import harness as h; \
print(','.join(p for p in h.default_providers('cuda') if p != 'compile'))")
if [ "$BENCH" = all ]; then
  timeout 240 $PY -m densenet_fast bench --device cuda --plain --model densenet_bc_100_12 --batch 64 \
    --out "$OUT/bench.csv" 2>&1 | tail -15
  GRAPHED=$($PY -c "from densenet_fast.bench import harness as h; \
print(','.join(['naive'] + [p + '+graph' for p in h.default_providers('cuda') if p != 'compile']))")
  timeout 120 $PY -m densenet_fast bench --device cuda --plain --model densenet_bc_100_12 --batch 64 \
    --providers $GRAPHED --out "$OUT/bench.csv" 2>&1 | tail -12
  # our model under torch.compile (inductor fuses the small per-layer ops), against compile of naive above
  timeout 180 $PY -m densenet_fast bench --device cuda --plain --model densenet_bc_100_12 --batch 64 \
    --providers naive,torch+compile,triton+compile --out "$OUT/bench.csv" 2>&1 | tail -12
  timeout 150 $PY -m densenet_fast bench --device cuda --plain --model densenet121 --batch 64 \
    --providers $NOCOMPILE --out "$OUT/bench.csv" 2>&1 | tail -12
  timeout 120 $PY -m densenet_fast bench --device cuda --plain --model densenet_bc_100_12 --batch 64 \
    --dtype bfloat16 --channels-last --providers $NOCOMPILE --out "$OUT/bench.csv" 2>&1 | tail -12
else
  timeout 100 $PY -m densenet_fast bench --device cuda --plain --model densenet_bc_100_12 --batch 64 \
    --providers $NOCOMPILE --repeats 10 --out "$OUT/bench.csv" 2>&1 | tail -12
fi
fi  # BENCH
stamp "done"
