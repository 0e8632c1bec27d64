// channel_stats: per-channel count / mean / M2 of a 4-D tensor, shared by the CPU and CUDA kernels.
//
// The input is usually a channel slice of a dense block's buffer F (N, C_total, H, W): it is not
// contiguous, its first channel sits at an arbitrary offset, and its layout is NCHW or
// channels_last. The kernels therefore read through explicit strides and never call .contiguous().
//
// Numerics (the dense-block design note, "Statistics cache"): each worker runs Welford's
// update over its share of the values, and the partial (count, mean, M2) triples are combined
// with Chan, Golub & LeVeque's parallel formula
//     n = n_a + n_b,  d = mean_b - mean_a,
//     mean = mean_a + d * n_b / n,   M2 = M2_a + M2_b + d^2 * n_a * n_b / n.
// Neither step forms E[x^2] - E[x]^2, so a mean 1000x the spread does not cancel the variance.
// One more guard against a large mean: the kernels run Welford on x - pivot, the pivot being the
// channel's first value, and add the pivot back at the end. Every update of a running mean
// rounds to the ulp of that mean; for raw data with mean 1000 in fp32 that is 6e-5 per update,
// and a few hundred sequential updates or merges put the mean off by ~1e-3 of the spread. The
// shifted data have a mean of the order of the spread, so the same roundings become negligible.
// fp16/bf16/fp32 data accumulate in fp32, fp64 data in fp64 (at::opmath_type).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace densenet_fast {

// Strides are in elements of x, as at::Tensor::stride() reports them.
struct ChannelStatsParams {
  const void* x;  // first element of the slice, dtype of x
  void* mean;     // (C,) statistics dtype: float32, or float64 for float64 input
  void* var;      // (C,) biased variance M2 / count, same dtype as mean
  int64_t batch, channels, height, width;
  int64_t stride_n, stride_c, stride_h, stride_w;
};

inline ChannelStatsParams make_channel_stats_params(const at::Tensor& x, const at::Tensor& mean,
                                                    const at::Tensor& var) {
  ChannelStatsParams p;
  p.x = x.const_data_ptr();
  p.mean = mean.mutable_data_ptr();
  p.var = var.mutable_data_ptr();
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.height = x.size(2);
  p.width = x.size(3);
  p.stride_n = x.stride(0);
  p.stride_c = x.stride(1);
  p.stride_h = x.stride(2);
  p.stride_w = x.stride(3);
  return p;
}

// True when the channels are the fastest-moving dimension (channels_last and its slices). Size-1
// dims are ignored because their strides are arbitrary: (N, C, 1, 1) contiguous is channels-inner.
// Both kernels are correct for any strides; this only picks the one that reads memory in order.
inline bool channels_innermost(const ChannelStatsParams& p) {
  const int64_t pixel_stride = p.width > 1 ? p.stride_w : p.height > 1 ? p.stride_h : p.stride_n;
  return p.stride_c < pixel_stride;
}

// Running (count, mean, M2) of one channel's values. M2 = sum of squared deviations from mean.
template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;
  int64_t count;
};

template <typename acc_t>
C10_HOST_DEVICE inline void welford_push(Welford<acc_t>& s, acc_t value) {
  s.count += 1;
  const acc_t delta = value - s.mean;
  s.mean += delta / static_cast<acc_t>(s.count);
  s.m2 += delta * (value - s.mean);
}

// Chan et al.'s merge of two disjoint partial states.
template <typename acc_t>
C10_HOST_DEVICE inline Welford<acc_t> welford_merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const int64_t count = a.count + b.count;
  const acc_t delta = b.mean - a.mean;
  const acc_t b_share = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  Welford<acc_t> out;
  out.count = count;
  out.mean = a.mean + delta * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * b_share;
  return out;
}

// Launchers. x: (N, C, H, W) any strides with N*H*W > 0; mean, var: (C,) contiguous, statistics
// dtype, on x's device. Inputs are checked in ops.cpp; the launchers only compute.
void channel_stats_cpu_launch(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var);
#ifdef WITH_CUDA
void channel_stats_cuda_launch(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var);
#endif

}  // namespace densenet_fast
