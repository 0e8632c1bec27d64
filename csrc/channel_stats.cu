// channel_stats on the GPU.
//
// Two passes, no atomics (so the result is deterministic):
// 1. A stats kernel: every thread runs Welford over a strided share of one channel's N*H*W
//    values; the block merges its threads with Chan's formula (warp shuffles, then shared
//    memory) and writes one partial (count, mean, M2) per (split, channel) to a workspace.
//    There are two such kernels, one per layout family, so that a warp always reads neighbouring
//    addresses:
//      planar (NCHW slices):      blockIdx.x = channel, threads walk the flattened N*H*W index.
//      channels-inner (NHWC):     threadIdx.x = one of 32 consecutive channels, threadIdx.y and
//                                 blockIdx.y walk the pixels.
//    blockIdx.y splits a channel's values over several blocks when there are too few channels
//    to fill the GPU (a dense layer's 12 or 32 new channels).
// 2. A finalize kernel: one thread per channel merges its splits and writes mean and M2 / count.
// All partial means are of x - pivot, pivot = the channel's first value (channel_stats.h); the
// finalize kernel adds it back.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "channel_stats.h"
#include "static_switch.h"

namespace densenet_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kPlanarThreads = 256;  // planar kernel: a 1-D block per (channel, split)
constexpr int kRows = 8;             // channels-inner kernel: a (32 channels) x (kRows pixels) block
constexpr int kMinValuesPerThread = 8;  // below this a split is not worth its launch share
constexpr int kBlocksPerSM = 4;
constexpr int kFinalizeThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> s) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    Welford<acc_t> other;
    other.mean = __shfl_down_sync(kFullMask, s.mean, offset);
    other.m2 = __shfl_down_sync(kFullMask, s.m2, offset);
    other.count = __shfl_down_sync(kFullMask, static_cast<long long>(s.count), offset);
    s = welford_merge(s, other);
  }
  return s;
}

// Merge the states of a 1-D block; the result is valid in thread 0.
template <int kThreads, typename acc_t>
__device__ __forceinline__ Welford<acc_t> block_merge(Welford<acc_t> s) {
  constexpr int kWarps = kThreads / kWarp;
  __shared__ Welford<acc_t> shared[kWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  s = warp_merge(s);
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? shared[lane] : Welford<acc_t>{acc_t(0), acc_t(0), 0};
    s = warp_merge(s);
  }
  return s;
}

// kHwFlat: stride_w == 1 and stride_h == W, so the (h, w) offset is the flat index itself.
template <typename scalar_t, bool kHwFlat>
__global__ void __launch_bounds__(kPlanarThreads)
    channel_stats_planar_kernel(const ChannelStatsParams p, Welford<at::opmath_type<scalar_t>>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  // 32-bit index math: the launcher checks N*H*W < 2^31.
  const uint32_t hw = static_cast<uint32_t>(p.height * p.width);
  const uint32_t m = static_cast<uint32_t>(p.batch) * hw;
  const uint32_t width = static_cast<uint32_t>(p.width);
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + c * p.stride_c;
  const acc_t pivot = static_cast<acc_t>(x[0]);

  Welford<acc_t> s{acc_t(0), acc_t(0), 0};
  for (uint32_t i = blockIdx.y * kPlanarThreads + threadIdx.x; i < m; i += gridDim.y * kPlanarThreads) {
    const uint32_t n = i / hw;
    const uint32_t r = i - n * hw;
    int64_t offset = n * p.stride_n;
    if constexpr (kHwFlat) {
      offset += r;
    } else {
      const uint32_t h = r / width;
      offset += h * p.stride_h + (r - h * width) * p.stride_w;
    }
    welford_push(s, static_cast<acc_t>(x[offset]) - pivot);
  }
  s = block_merge<kPlanarThreads>(s);
  if (threadIdx.x == 0) partial[blockIdx.y * p.channels + c] = s;
}

// kPixelsFlat: pixel i = (n*H + h)*W + w sits at i * stride_w (a whole channels_last buffer,
// or a channel slice of one).
template <typename scalar_t, bool kPixelsFlat>
__global__ void __launch_bounds__(kWarp * kRows)
    channel_stats_nhwc_kernel(const ChannelStatsParams p, Welford<at::opmath_type<scalar_t>>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const uint32_t hw = static_cast<uint32_t>(p.height * p.width);
  const uint32_t m = static_cast<uint32_t>(p.batch) * hw;
  const uint32_t width = static_cast<uint32_t>(p.width);

  Welford<acc_t> s{acc_t(0), acc_t(0), 0};
  if (c < p.channels) {
    const scalar_t* x = static_cast<const scalar_t*>(p.x) + c * p.stride_c;
    const acc_t pivot = static_cast<acc_t>(x[0]);
    for (uint32_t i = blockIdx.y * kRows + threadIdx.y; i < m; i += gridDim.y * kRows) {
      int64_t offset;
      if constexpr (kPixelsFlat) {
        offset = static_cast<int64_t>(i) * p.stride_w;
      } else {
        const uint32_t n = i / hw;
        const uint32_t r = i - n * hw;
        const uint32_t h = r / width;
        offset = n * p.stride_n + h * p.stride_h + (r - h * width) * p.stride_w;
      }
      welford_push(s, static_cast<acc_t>(x[offset]) - pivot);
    }
  }
  __shared__ Welford<acc_t> shared[kRows][kWarp];
  shared[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < p.channels) {
#pragma unroll
    for (int row = 1; row < kRows; ++row) s = welford_merge(s, shared[row][threadIdx.x]);
    partial[blockIdx.y * p.channels + c] = s;
  }
}

template <typename scalar_t>
__global__ void channel_stats_finalize_kernel(const ChannelStatsParams p, const Welford<at::opmath_type<scalar_t>>* partial,
                                              int splits) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.channels) return;
  Welford<acc_t> s = partial[c];
  for (int j = 1; j < splits; ++j) s = welford_merge(s, partial[j * p.channels + c]);
  const acc_t pivot = static_cast<acc_t>(static_cast<const scalar_t*>(p.x)[c * p.stride_c]);
  static_cast<acc_t*>(p.mean)[c] = pivot + s.mean;
  static_cast<acc_t*>(p.var)[c] = s.m2 / static_cast<acc_t>(s.count);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Splits per channel group: enough blocks to fill the GPU, never fewer than
// kMinValuesPerThread values per thread, at most gridDim.y's limit.
int num_splits(int64_t channel_groups, int64_t values, int64_t threads_per_split) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = ceil_div(int64_t(kBlocksPerSM) * sms, channel_groups);
  const int64_t useful = ceil_div(values, threads_per_split * kMinValuesPerThread);
  return static_cast<int>(std::clamp<int64_t>(std::min(wanted, useful), 1, 65535));
}

}  // namespace

void channel_stats_cuda_launch(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const ChannelStatsParams p = make_channel_stats_params(x, mean, var);
  if (p.channels == 0) return;
  const int64_t m = p.batch * p.height * p.width;
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(),
              "x must have fewer than 2^31 values per channel (N*H*W), got ", m);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool nhwc = channels_innermost(p);
  const int64_t channel_groups = nhwc ? ceil_div(p.channels, kWarp) : p.channels;
  const int splits = num_splits(channel_groups, m, nhwc ? kRows : kPlanarThreads);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor workspace = at::empty({splits * p.channels * int64_t(sizeof(Welford<acc_t>))},
                                           x.options().dtype(at::kByte));
    auto* partial = reinterpret_cast<Welford<acc_t>*>(workspace.mutable_data_ptr());
    const dim3 grid(static_cast<unsigned>(channel_groups), static_cast<unsigned>(splits));
    if (nhwc) {
      const bool pixels_flat = (p.height == 1 || p.stride_h == p.width * p.stride_w) &&
                               (p.batch == 1 || p.stride_n == p.height * p.width * p.stride_w);
      BOOL_SWITCH(pixels_flat, kPixelsFlat, [&] {
        channel_stats_nhwc_kernel<scalar_t, kPixelsFlat><<<grid, dim3(kWarp, kRows), 0, stream>>>(p, partial);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const bool hw_flat = (p.width == 1 || p.stride_w == 1) && (p.height == 1 || p.stride_h == p.width);
      BOOL_SWITCH(hw_flat, kHwFlat, [&] {
        channel_stats_planar_kernel<scalar_t, kHwFlat><<<grid, kPlanarThreads, 0, stream>>>(p, partial);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    channel_stats_finalize_kernel<scalar_t>
        <<<static_cast<unsigned>(ceil_div(p.channels, kFinalizeThreads)), kFinalizeThreads, 0, stream>>>(
            p, partial, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace densenet_fast
