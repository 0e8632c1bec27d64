// bn_relu on the GPU: the forward, backward-reduce and backward-apply passes of bn_relu.h.
//
// One kernel template per loop order, shared by the three passes (the pass is a template
// parameter; only the reduce pass has an epilogue):
//   channels-inner (x is channels_last or a slice of it): threadIdx.x walks groups of channels,
//     threadIdx.y and blockIdx.y walk the pixels (n, h, w), so a warp reads neighbouring channels.
//     The block is (tx, 256 / tx) with tx the smallest power of two >= the channel groups (at
//     most 32), so a layer's 12 new channels do not leave 20 of 32 lanes idle.
//   planar (x is NCHW or a slice of it): blockIdx.x is the channel, the threads of a 1-D block
//     and blockIdx.y walk the flattened (n, h, w) index.
// Each comes in a vector flavour (16-byte accesses of x: 8 fp16/bf16 or 4 fp32 values, and the
// same number of values of the other operands, split into <= 16-byte accesses) and a scalar one:
//   kNhwcVec  every operand has channel stride 1, its pixels at a constant stride (a dense
//             channels_last buffer or a channel slice of one), base pointer and pixel stride
//             aligned to the access size; a thread handles G consecutive channels of a pixel (the
//             last group of an odd channel count is done value by value).
//   kNhwc     any strides, channels-inner order, one value per access (1 channel per thread).
//   kNchwVec  every operand has (h, w) flat (stride_w 1, stride_h W), H*W a multiple of G, base
//             pointer, batch and channel strides aligned; a thread handles G consecutive pixels
//             of one plane.
//   kGeneric  any strides, planar order, one value per access: the fallback for everything else.
// The launcher checks the alignment at run time and picks the first layout that applies.
//
// Reduce pass: fp32 accumulation in a fixed tree, no atomics, so the sums are deterministic.
// Every thread sums its share of a channel serially (a few dozen values in the tests and for a
// layer's new channels; up to a few hundred for a wide NCHW prefix, e.g. 256 channels at 56x56 and
// batch 64, where 3 splits already fill the GPU), the block combines its threads in a fixed-order
// tree (shared memory / warp shuffles), and each block writes one partial pair per (split, channel). With several splits per channel a finalize kernel, one warp per
// channel, adds the splits (lane-strided sums, then a shuffle tree).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "bn_relu.h"

namespace densenet_fast {
namespace {

constexpr int kThreads = 256;       // threads per block, both loop orders
constexpr int kWarp = 32;
constexpr int kVectorBytes = 16;    // the widest global load/store of one thread
constexpr int kMinItemsPerThread = 4;  // below this a split is not worth its launch share
constexpr int kBlocksPerSM = 4;
constexpr int kFinalizeThreads = 128;  // 4 warps = 4 channels per finalize block
constexpr unsigned kFullMask = 0xffffffffu;

enum class Layout { kNhwcVec, kNhwc, kNchwVec, kGeneric };

constexpr bool is_vector(Layout layout) { return layout == Layout::kNhwcVec || layout == Layout::kNchwVec; }
constexpr bool is_channels_inner(Layout layout) { return layout == Layout::kNhwcVec || layout == Layout::kNhwc; }

// Values of each operand that one thread reads or writes per access: a 16-byte vector of x.
template <typename scalar_x, Layout kLayout>
constexpr int values_per_access() {
  return is_vector(kLayout) ? kVectorBytes / static_cast<int>(sizeof(scalar_x)) : 1;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// G consecutive values of T from an address aligned to min(16, G * sizeof(T)) bytes, in
// accesses of at most 16 bytes (an fp32 operand next to fp16 x takes two per group).
template <int G, typename T>
__device__ __forceinline__ void load_values(const T* ptr, float (&dst)[G]) {
  constexpr int kChunk = G * sizeof(T) > kVectorBytes ? kVectorBytes / static_cast<int>(sizeof(T)) : G;
#pragma unroll
  for (int j = 0; j < G; j += kChunk) {
    const Pack<T, kChunk> pack = *reinterpret_cast<const Pack<T, kChunk>*>(ptr + j);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) dst[j + k] = static_cast<float>(pack.v[k]);
  }
}

template <int G, typename T>
__device__ __forceinline__ void store_values(T* ptr, const float (&src)[G]) {
  constexpr int kChunk = G * sizeof(T) > kVectorBytes ? kVectorBytes / static_cast<int>(sizeof(T)) : G;
#pragma unroll
  for (int j = 0; j < G; j += kChunk) {
    Pack<T, kChunk> pack;
#pragma unroll
    for (int k = 0; k < kChunk; ++k) pack.v[k] = static_cast<T>(src[j + k]);
    *reinterpret_cast<Pack<T, kChunk>*>(ptr + j) = pack;
  }
}

// The per-channel constants a pass reads (zero where the pass does not read them).
struct ChannelConsts {
  float scale, shift, mean, a, b;
};

template <FusedBnOp kOp>
__device__ __forceinline__ ChannelConsts load_consts(const FusedBnParams& p, int64_t c) {
  ChannelConsts k{p.scale[c], p.shift[c], 0.f, 0.f, 0.f};
  if constexpr (kOp != FusedBnOp::kForward) k.mean = p.mean[c];
  if constexpr (kOp == FusedBnOp::kBackwardApply) {
    k.a = p.a[c];
    k.b = p.b[c];
  }
  return k;
}

// One value of a pass. x, grad_z: inputs; out: the old grad_x (apply with accumulate) and the
// result (forward, apply); s_dy, s_xmu: the reduce pass's running sums.
template <FusedBnOp kOp>
__device__ __forceinline__ void compute_value(const ChannelConsts& k, float x, float grad_z, float& out, float& s_dy,
                                              float& s_xmu, bool accumulate) {
  const float y = bn_affine(x, k.scale, k.shift);
  if constexpr (kOp == FusedBnOp::kForward) {
    out = relu_value(y);
  } else {
    const float dy = relu_grad(grad_z, y);
    if constexpr (kOp == FusedBnOp::kBackwardReduce) {
      s_dy += dy;
      s_xmu += dy * (x - k.mean);
    } else {
      const float dx = bn_backward_dx(dy, x, k.scale, k.mean, k.a, k.b);
      out = accumulate ? out + dx : dx;
    }
  }
}

// The operand pointers of a pass, typed.
template <typename scalar_x, typename scalar_z, typename scalar_o>
struct Operands {
  const scalar_x* x;
  const scalar_z* grad_z;
  scalar_o* out;
};

// Loads the G values at the given offsets, computes, stores. `count` < G only for the last
// channel group of the vector channels-inner layout (channel stride 1 there), done value by value.
template <FusedBnOp kOp, int G, typename scalar_x, typename scalar_z, typename scalar_o, typename ConstsAt>
__device__ __forceinline__ void process_group(const Operands<scalar_x, scalar_z, scalar_o>& t, int64_t ox, int64_t oz,
                                              int64_t oo, int count, bool accumulate, ConstsAt consts_at,
                                              float (&s_dy)[G], float (&s_xmu)[G]) {
  constexpr bool kReadsGradZ = kOp != FusedBnOp::kForward;
  constexpr bool kWrites = kOp != FusedBnOp::kBackwardReduce;
  const bool reads_out = kOp == FusedBnOp::kBackwardApply && accumulate;
  float xv[G], zv[G], ov[G];
#pragma unroll
  for (int j = 0; j < G; ++j) zv[j] = ov[j] = 0.f;
  if (count == G) {
    load_values<G>(t.x + ox, xv);
    if constexpr (kReadsGradZ) load_values<G>(t.grad_z + oz, zv);
    if (reads_out) load_values<G>(t.out + oo, ov);
#pragma unroll
    for (int j = 0; j < G; ++j) compute_value<kOp>(consts_at(j), xv[j], zv[j], ov[j], s_dy[j], s_xmu[j], accumulate);
    if constexpr (kWrites) store_values<G>(t.out + oo, ov);
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j) {
      if (j < count) {
        const float x = static_cast<float>(t.x[ox + j]);
        const float z = kReadsGradZ ? static_cast<float>(t.grad_z[oz + j]) : 0.f;
        float o = reads_out ? static_cast<float>(t.out[oo + j]) : 0.f;
        compute_value<kOp>(consts_at(j), x, z, o, s_dy[j], s_xmu[j], accumulate);
        if constexpr (kWrites) t.out[oo + j] = static_cast<scalar_o>(o);
      }
    }
  }
}

__device__ __forceinline__ int64_t pixel_stride(const FusedBnParams& p, const Strides4& s) {
  return p.width > 1 ? s.w : p.height > 1 ? s.h : s.n;
}

template <FusedBnOp kOp, typename scalar_x, typename scalar_z, typename scalar_o, Layout kLayout>
__global__ void __launch_bounds__(kThreads)
    bn_relu_nhwc_kernel(const FusedBnParams p, float* partial_dy, float* partial_dy_xmu) {
  constexpr int G = values_per_access<scalar_x, kLayout>();
  constexpr bool kVec = kLayout == Layout::kNhwcVec;
  const Operands<scalar_x, scalar_z, scalar_o> t{static_cast<const scalar_x*>(p.x),
                                                 static_cast<const scalar_z*>(p.grad_z),
                                                 static_cast<scalar_o*>(p.out)};
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * G;
  const int64_t left = p.channels - c0;  // channels from c0 on
  const int count = left <= 0 ? 0 : left < G ? static_cast<int>(left) : G;
  ChannelConsts consts[G];
#pragma unroll
  for (int j = 0; j < G; ++j) consts[j] = j < count ? load_consts<kOp>(p, c0 + j) : ChannelConsts{};
  float s_dy[G], s_xmu[G];
#pragma unroll
  for (int j = 0; j < G; ++j) s_dy[j] = s_xmu[j] = 0.f;

  // 32-bit pixel index: the launcher checks N*H*W < 2^31.
  const uint32_t hw = static_cast<uint32_t>(p.height * p.width);
  const uint32_t m = static_cast<uint32_t>(p.batch) * hw;
  const uint32_t width = static_cast<uint32_t>(p.width);
  if (count > 0) {
    const int64_t px = pixel_stride(p, p.x_stride), pz = pixel_stride(p, p.grad_z_stride),
                  po = pixel_stride(p, p.out_stride);
    for (uint32_t i = blockIdx.y * blockDim.y + threadIdx.y; i < m; i += gridDim.y * blockDim.y) {
      int64_t ox, oz, oo;
      if constexpr (kVec) {  // channel stride 1, pixel i at i * pixel stride
        ox = i * px + c0;
        oz = i * pz + c0;
        oo = i * po + c0;
      } else {
        const uint32_t n = i / hw;
        const uint32_t r = i - n * hw;
        const uint32_t h = r / width;
        const uint32_t w = r - h * width;
        const Strides4 &sx = p.x_stride, &sz = p.grad_z_stride, &so = p.out_stride;
        ox = n * sx.n + h * sx.h + w * sx.w + c0 * sx.c;
        oz = n * sz.n + h * sz.h + w * sz.w + c0 * sz.c;
        oo = n * so.n + h * so.h + w * so.w + c0 * so.c;
      }
      process_group<kOp, G>(t, ox, oz, oo, count, p.accumulate, [&](int j) { return consts[j]; }, s_dy, s_xmu);
    }
  }

  if constexpr (kOp == FusedBnOp::kBackwardReduce) {
    // Fixed-order tree over the block's rows (blockDim.y is a power of two).
    __shared__ float shared_dy[kThreads * G];
    __shared__ float shared_xmu[kThreads * G];
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int j = 0; j < G; ++j) {
      shared_dy[tid * G + j] = s_dy[j];
      shared_xmu[tid * G + j] = s_xmu[j];
    }
    __syncthreads();
    for (int rows = blockDim.y / 2; rows > 0; rows >>= 1) {
      if (threadIdx.y < rows) {
        const int other = tid + rows * blockDim.x;
#pragma unroll
        for (int j = 0; j < G; ++j) {
          shared_dy[tid * G + j] += shared_dy[other * G + j];
          shared_xmu[tid * G + j] += shared_xmu[other * G + j];
        }
      }
      __syncthreads();
    }
    if (threadIdx.y == 0) {
      for (int j = 0; j < count; ++j) {
        partial_dy[blockIdx.y * p.channels + c0 + j] = shared_dy[tid * G + j];
        partial_dy_xmu[blockIdx.y * p.channels + c0 + j] = shared_xmu[tid * G + j];
      }
    }
  }
}

// Sum over a 1-D block of kThreads threads in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ float2 block_sum(float2 v) {
  constexpr int kWarps = kThreads / kWarp;
  __shared__ float2 shared[kWarps];
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v.x += __shfl_down_sync(kFullMask, v.x, offset);
    v.y += __shfl_down_sync(kFullMask, v.y, offset);
  }
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : make_float2(0.f, 0.f);
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      v.x += __shfl_down_sync(kFullMask, v.x, offset);
      v.y += __shfl_down_sync(kFullMask, v.y, offset);
    }
  }
  return v;
}

template <FusedBnOp kOp, typename scalar_x, typename scalar_z, typename scalar_o, Layout kLayout>
__global__ void __launch_bounds__(kThreads)
    bn_relu_planar_kernel(const FusedBnParams p, float* partial_dy, float* partial_dy_xmu) {
  constexpr int G = values_per_access<scalar_x, kLayout>();
  constexpr bool kVec = kLayout == Layout::kNchwVec;
  const Operands<scalar_x, scalar_z, scalar_o> t{static_cast<const scalar_x*>(p.x),
                                                 static_cast<const scalar_z*>(p.grad_z),
                                                 static_cast<scalar_o*>(p.out)};
  const int64_t c = blockIdx.x;
  const ChannelConsts consts = load_consts<kOp>(p, c);
  float s_dy[G], s_xmu[G];
#pragma unroll
  for (int j = 0; j < G; ++j) s_dy[j] = s_xmu[j] = 0.f;

  const uint32_t hw = static_cast<uint32_t>(p.height * p.width);
  const uint32_t groups_per_plane = hw / G;  // kVec: the launcher checks H*W % G == 0
  const uint32_t groups = static_cast<uint32_t>(p.batch) * groups_per_plane;
  const uint32_t width = static_cast<uint32_t>(p.width);
  const Strides4 &sx = p.x_stride, &sz = p.grad_z_stride, &so = p.out_stride;
  for (uint32_t i = blockIdx.y * kThreads + threadIdx.x; i < groups; i += gridDim.y * kThreads) {
    const uint32_t n = i / groups_per_plane;
    const uint32_t r = (i - n * groups_per_plane) * G;  // flat (h, w) index of the group's first value
    int64_t ox = n * sx.n + c * sx.c, oz = n * sz.n + c * sz.c, oo = n * so.n + c * so.c;
    if constexpr (kVec) {  // (h, w) flat in every operand
      ox += r;
      oz += r;
      oo += r;
    } else {
      const uint32_t h = r / width;
      const uint32_t w = r - h * width;
      ox += h * sx.h + w * sx.w;
      oz += h * sz.h + w * sz.w;
      oo += h * so.h + w * so.w;
    }
    process_group<kOp, G>(t, ox, oz, oo, G, p.accumulate, [&](int) { return consts; }, s_dy, s_xmu);
  }

  if constexpr (kOp == FusedBnOp::kBackwardReduce) {
    float2 v = make_float2(0.f, 0.f);
#pragma unroll
    for (int j = 0; j < G; ++j) {
      v.x += s_dy[j];
      v.y += s_xmu[j];
    }
    v = block_sum(v);
    if (threadIdx.x == 0) {
      partial_dy[blockIdx.y * p.channels + c] = v.x;
      partial_dy_xmu[blockIdx.y * p.channels + c] = v.y;
    }
  }
}

// One warp per channel adds the channel's `splits` partial sums: lane-strided, then a shuffle tree.
__global__ void __launch_bounds__(kFinalizeThreads)
    bn_relu_reduce_finalize_kernel(const float* partial_dy, const float* partial_dy_xmu, int64_t channels,
                                   int splits, float* sum_dy, float* sum_dy_xmu) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kFinalizeThreads / kWarp) + threadIdx.x / kWarp;
  if (c >= channels) return;  // the whole warp leaves together
  float dy = 0.f, xmu = 0.f;
  for (int j = lane; j < splits; j += kWarp) {
    dy += partial_dy[j * channels + c];
    xmu += partial_dy_xmu[j * channels + c];
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    dy += __shfl_down_sync(kFullMask, dy, offset);
    xmu += __shfl_down_sync(kFullMask, xmu, offset);
  }
  if (lane == 0) {
    sum_dy[c] = dy;
    sum_dy_xmu[c] = xmu;
  }
}

// ---- host side ------------------------------------------------------------------------------

// One 4-D operand as the layout choice sees it.
struct Operand {
  const void* ptr;
  Strides4 s;
  int64_t itemsize;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes of one access of g values of this operand (load_values splits wider groups into 16-byte accesses).
int64_t access_bytes(int64_t g, const Operand& t) { return std::min<int64_t>(kVectorBytes, g * t.itemsize); }

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// A stride (in elements) that moves an aligned address to another aligned address, or one that is
// never taken because its dimension has size 1.
bool stride_aligned(int64_t size, int64_t stride, const Operand& t, int64_t bytes) {
  return size == 1 || (stride * t.itemsize) % bytes == 0;
}

// kNhwcVec for this operand: channel stride 1 and pixel i = (n*H + h)*W + w at i * pixel stride.
bool nhwc_vector_ok(const FusedBnParams& p, const Operand& t, int64_t g) {
  const Strides4& s = t.s;
  const int64_t pixel = p.width > 1 ? s.w : p.height > 1 ? s.h : s.n;
  const bool flat = (p.height == 1 || s.h == p.width * pixel) && (p.batch == 1 || s.n == p.height * p.width * pixel);
  const int64_t bytes = access_bytes(g, t);
  return (p.channels == 1 || s.c == 1) && flat && aligned(t.ptr, bytes) &&
         stride_aligned(p.batch * p.height * p.width, pixel, t, bytes);
}

// kNchwVec for this operand: (h, w) flat, H*W a multiple of g, plane starts aligned.
bool nchw_vector_ok(const FusedBnParams& p, const Operand& t, int64_t g) {
  const Strides4& s = t.s;
  const bool hw_flat = (p.width == 1 || s.w == 1) && (p.height == 1 || s.h == p.width);
  const int64_t bytes = access_bytes(g, t);
  return hw_flat && (p.height * p.width) % g == 0 && aligned(t.ptr, bytes) &&
         stride_aligned(p.batch, s.n, t, bytes) && stride_aligned(p.channels, s.c, t, bytes);
}

Layout choose_layout(const FusedBnParams& p, const std::vector<Operand>& operands, int64_t g) {
  if (x_channels_innermost(p)) {
    const bool vec = std::all_of(operands.begin(), operands.end(),
                                 [&](const Operand& t) { return nhwc_vector_ok(p, t, g); });
    return vec ? Layout::kNhwcVec : Layout::kNhwc;
  }
  const bool vec = std::all_of(operands.begin(), operands.end(),
                               [&](const Operand& t) { return nchw_vector_ok(p, t, g); });
  return vec ? Layout::kNchwVec : Layout::kGeneric;
}

int next_pow2(int64_t v) {
  int r = 1;
  while (r < v && r < kWarp) r <<= 1;
  return r;
}

// Splits of the pixel loop: enough blocks to fill the GPU, never fewer than kMinItemsPerThread
// accesses per thread, at most gridDim.y's limit.
int num_splits(int64_t blocks_x, int64_t items, int64_t threads_per_split) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = ceil_div(int64_t(kBlocksPerSM) * sms, blocks_x);
  const int64_t useful = ceil_div(items, threads_per_split * kMinItemsPerThread);
  return static_cast<int>(std::clamp<int64_t>(std::min(wanted, useful), 1, 65535));
}

struct LaunchShape {
  dim3 grid, block;
};

template <typename scalar_x, Layout kLayout>
LaunchShape launch_shape(const FusedBnParams& p) {
  constexpr int G = values_per_access<scalar_x, kLayout>();
  const int64_t m = p.batch * p.height * p.width;
  if constexpr (is_channels_inner(kLayout)) {
    const int64_t groups = ceil_div(p.channels, G);
    const int tx = next_pow2(groups);
    const int ty = kThreads / tx;
    const int64_t blocks_x = ceil_div(groups, tx);
    return {dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(num_splits(blocks_x, m, ty))), dim3(tx, ty)};
  } else {
    return {dim3(static_cast<unsigned>(p.channels), static_cast<unsigned>(num_splits(p.channels, m / G, kThreads))),
            dim3(kThreads)};
  }
}

template <FusedBnOp kOp, typename scalar_x, typename scalar_z, typename scalar_o, Layout kLayout>
void launch_layout(const FusedBnParams& p, const at::Tensor& x) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const LaunchShape shape = launch_shape<scalar_x, kLayout>(p);
  // if constexpr, not ?:, so that only the kernel of this layout's loop order is instantiated.
  const auto kernel = [] {
    if constexpr (is_channels_inner(kLayout)) {
      return &bn_relu_nhwc_kernel<kOp, scalar_x, scalar_z, scalar_o, kLayout>;
    } else {
      return &bn_relu_planar_kernel<kOp, scalar_x, scalar_z, scalar_o, kLayout>;
    }
  }();
  if constexpr (kOp != FusedBnOp::kBackwardReduce) {
    kernel<<<shape.grid, shape.block, 0, stream>>>(p, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int splits = static_cast<int>(shape.grid.y);
    if (splits == 1) {  // one block per channel group: it writes the sums itself
      kernel<<<shape.grid, shape.block, 0, stream>>>(p, p.sum_dy, p.sum_dy_xmu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor workspace = at::empty({2, splits, p.channels}, x.options().dtype(at::kFloat));
    float* partial_dy = workspace.mutable_data_ptr<float>();
    float* partial_dy_xmu = partial_dy + splits * p.channels;
    kernel<<<shape.grid, shape.block, 0, stream>>>(p, partial_dy, partial_dy_xmu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.channels, kFinalizeThreads / kWarp));
    bn_relu_reduce_finalize_kernel<<<blocks, kFinalizeThreads, 0, stream>>>(partial_dy, partial_dy_xmu, p.channels,
                                                                           splits, p.sum_dy, p.sum_dy_xmu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The common part of the three launchers: guard, size checks, layout choice, kernel launch.
// z_dtype / o_dtype: the dtypes of grad_z and out/grad_x, ignored by a pass without that operand.
template <FusedBnOp kOp>
void launch(const FusedBnParams& p, const at::Tensor& x, at::ScalarType z_dtype, at::ScalarType o_dtype,
            std::vector<Operand> operands, const char* name) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t m = p.batch * p.height * p.width;
  if (p.channels == 0 || m == 0) return;  // reduce: ops.cpp allocated zero sums for m == 0
  TORCH_CHECK(m <= std::numeric_limits<int32_t>::max(),
              "x must have fewer than 2^31 values per channel (N*H*W), got ", m);
  // Only the dtype combinations a pass can see are instantiated: grad_z is float32 or x's dtype
  // (the forward pass has none), out/grad_x any of the three (the reduce pass has none).
  dispatch_value_dtype(x.scalar_type(), name, [&](auto x_tag) {
    using scalar_x = typename decltype(x_tag)::type;
    const int64_t g = kVectorBytes / static_cast<int64_t>(sizeof(scalar_x));
    const Layout layout = choose_layout(p, operands, g);
    const auto run = [&](auto z_tag, auto o_tag) {
      using scalar_z = typename decltype(z_tag)::type;
      using scalar_o = typename decltype(o_tag)::type;
      switch (layout) {
        case Layout::kNhwcVec:
          return launch_layout<kOp, scalar_x, scalar_z, scalar_o, Layout::kNhwcVec>(p, x);
        case Layout::kNhwc:
          return launch_layout<kOp, scalar_x, scalar_z, scalar_o, Layout::kNhwc>(p, x);
        case Layout::kNchwVec:
          return launch_layout<kOp, scalar_x, scalar_z, scalar_o, Layout::kNchwVec>(p, x);
        case Layout::kGeneric:
          return launch_layout<kOp, scalar_x, scalar_z, scalar_o, Layout::kGeneric>(p, x);
      }
    };
    const auto with_out = [&](auto z_tag) {
      if constexpr (kOp == FusedBnOp::kBackwardReduce) {
        run(z_tag, TypeTag<float>{});
      } else {
        dispatch_value_dtype(o_dtype, name, [&](auto o_tag) { run(z_tag, o_tag); });
      }
    };
    if constexpr (kOp == FusedBnOp::kForward) {
      with_out(TypeTag<scalar_x>{});
    } else {
      dispatch_grad_z_dtype<scalar_x>(z_dtype, with_out);
    }
  });
}

constexpr int kChannelThreads = 128;

__global__ void channel_affine_kernel(const float* __restrict__ mean, const float* __restrict__ var,
                                      const float* __restrict__ weight, const float* __restrict__ bias, float eps,
                                      int64_t channels, float* invstd, float* scale, float* shift) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < channels) channel_affine(mean[c], var[c], weight[c], bias[c], eps, invstd + c, scale + c, shift + c);
}

__global__ void channel_bn_backward_kernel(const float* __restrict__ sum_dy, const float* __restrict__ sum_dy_xmu,
                                           const float* __restrict__ invstd, float count, bool batch,
                                           int64_t channels, float* a, float* b, float* d_gamma) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < channels) channel_bn_backward(sum_dy[c], sum_dy_xmu[c], invstd[c], count, batch, a + c, b + c, d_gamma + c);
}

Operand operand(const at::Tensor& t) { return {t.const_data_ptr(), strides_of(t), static_cast<int64_t>(t.element_size())}; }

}  // namespace

void channel_affine_cuda_launch(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const at::Tensor& invstd, const at::Tensor& scale,
                                const at::Tensor& shift) {
  const int64_t channels = mean.numel();
  if (channels == 0) return;
  const c10::cuda::CUDAGuard device_guard(mean.device());
  const unsigned blocks = static_cast<unsigned>(ceil_div(channels, kChannelThreads));
  channel_affine_kernel<<<blocks, kChannelThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      mean.const_data_ptr<float>(), var.const_data_ptr<float>(), weight.const_data_ptr<float>(),
      bias.const_data_ptr<float>(), static_cast<float>(eps), channels, invstd.mutable_data_ptr<float>(),
      scale.mutable_data_ptr<float>(), shift.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void channel_bn_backward_cuda_launch(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                                     int64_t count, bool batch, const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& d_gamma) {
  const int64_t channels = sum_dy.numel();
  if (channels == 0) return;
  const c10::cuda::CUDAGuard device_guard(sum_dy.device());
  const unsigned blocks = static_cast<unsigned>(ceil_div(channels, kChannelThreads));
  channel_bn_backward_kernel<<<blocks, kChannelThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      sum_dy.const_data_ptr<float>(), sum_dy_xmu.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
      static_cast<float>(count), batch, channels, a.mutable_data_ptr<float>(), b.mutable_data_ptr<float>(),
      d_gamma.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void bn_relu_out_cuda_launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor& out) {
  const FusedBnParams p = make_forward_params(x, scale, shift, out);
  // No grad_z: launch<kForward> ignores its dtype.
  launch<FusedBnOp::kForward>(p, x, x.scalar_type(), out.scalar_type(), {operand(x), operand(out)},
                              "bn_relu_out_cuda");
}

void bn_relu_backward_reduce_cuda_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                         const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& sum_dy,
                                         const at::Tensor& sum_dy_xmu) {
  const FusedBnParams p = make_reduce_params(grad_z, x, scale, shift, mean, sum_dy, sum_dy_xmu);
  // No out: launch<kBackwardReduce> ignores its dtype.
  launch<FusedBnOp::kBackwardReduce>(p, x, grad_z.scalar_type(), at::kFloat, {operand(x), operand(grad_z)},
                                     "bn_relu_backward_reduce_cuda");
}

void bn_backward_apply_cuda_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a,
                                   const at::Tensor& b, const at::Tensor& grad_x, bool accumulate) {
  const FusedBnParams p = make_apply_params(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate);
  launch<FusedBnOp::kBackwardApply>(p, x, grad_z.scalar_type(), grad_x.scalar_type(),
                                    {operand(x), operand(grad_z), operand(grad_x)}, "bn_backward_apply_cuda");
}

}  // namespace densenet_fast
