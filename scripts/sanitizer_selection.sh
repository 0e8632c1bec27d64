# Sourced by scripts/gpu_session.sh and scripts/gpu_lease.sh: where compute-sanitizer is and which
# tests it runs (benchmarks/NOTES-gpu.md, "compute-sanitizer").
#   SAN          the compute-sanitizer executable ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH), or ""
#   MEMCHECK_K   -k selection over tests/test_fused_bn.py and tests/test_channel_stats.py (~70 tests):
#                every kernel path of csrc/ on CUDA tensors -- the three bn_relu passes on the NHWC
#                and NCHW vector paths with tail groups, the scalar and strided fallbacks, one and
#                several blocks per channel (both reduce stages), both channel_stats kernels, the
#                per-channel vector kernels (channel_affine, channel_bn_backward)
#   RACECHECK_K  the same for racecheck (~20 tests): the reductions' shared-memory paths
SAN=""
for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
            "$(command -v compute-sanitizer)"; do
  [ -n "$cand" ] && [ -x "$cand" ] && { SAN=$cand; break; }
done
FUSED='bn_ and (vector-tail or vector-9x32) and (float16-float32 or float32-float32) and not bfloat16'
STATS='matches_reference and kernel and (c12-at13 or c24-64x64)'
MEMCHECK_K="cuda and (($FUSED and not float16-float16 and not write-train and not eval) or ($STATS and not bfloat16) \
or in_place or empty_inputs or test_channel_affine or test_channel_bn_backward)"
RACECHECK_K="cuda and (($FUSED and backward_reduce and (same or channels_last-other)) or ($STATS and (float32 or float64)))"
