// Schemas, input checks and kernel registration of the densenet_fast ops. No math here: each op
// checks its inputs, allocates its outputs and calls the launcher of its csrc/<op>.{cpp,cu}.
//
// Loading this library (import densenet_fast._C) runs the TORCH_LIBRARY blocks below, which
// register the ops as torch.ops.densenet_fast.*. The Python side adds their fake (meta) kernels
// and autograd formulas (densenet_fast/ops/<op>.py).
#include <Python.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bn_relu.h"
#include "channel_stats.h"
#include "dense_block.h"

// One macro per property; each names the tensor in its message ("x must have 4 dims, got 3").
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#define CHECK_DIM(x, d) TORCH_CHECK_VALUE((x).dim() == (d), #x " must have " #d " dims, got ", (x).dim())
#define CHECK_FLOATING(x) \
  TORCH_CHECK_TYPE(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", (x).scalar_type())
// at::isFloatingType also admits the float8 types, which no kernel reads: name the ones they do.
#define CHECK_STATS_DTYPE(x)                                                                              \
  TORCH_CHECK_TYPE(is_stats_input_dtype((x).scalar_type()),                                               \
                   #x " must be float32, float64, float16 or bfloat16, got ", (x).scalar_type())
#define CHECK_VALUES_PER_CHANNEL(x)                                               \
  TORCH_CHECK_VALUE((x).size(0) * (x).size(2) * (x).size(3) > 0,                  \
                    #x " must have at least one element per channel, got shape ", \
                    (x).sizes())
#define CHECK_VALUE_DTYPE(x)                                                                  \
  TORCH_CHECK_TYPE(is_value_dtype((x).scalar_type()), #x " must be float32, float16 or bfloat16, got ", \
                   (x).scalar_type())
#define CHECK_SAME_DEVICE(t, x) \
  TORCH_CHECK((t).device() == (x).device(), #t " must be on the device of " #x " (", (x).device(), "), got ", (t).device())
#define CHECK_SAME_SHAPE(t, x) \
  TORCH_CHECK_VALUE((t).sizes() == (x).sizes(), #t " must have the shape of " #x " ", (x).sizes(), ", got ", (t).sizes())
// A vector of per-channel values is float32 and contiguous; name: a string naming it.
#define CHECK_FLOAT32_CONTIGUOUS(v, name)                                                                 \
  do {                                                                                                     \
    TORCH_CHECK_TYPE((v).scalar_type() == at::kFloat, name, " must be float32, got ", (v).scalar_type());  \
    TORCH_CHECK_VALUE((v).is_contiguous(), name, " must be contiguous, got strides ", (v).strides());      \
  } while (0)
// A per-channel vector of the fused batch norm: (C,) float32 contiguous.
#define CHECK_PER_CHANNEL(v, x)                                                                            \
  do {                                                                                                     \
    TORCH_CHECK_VALUE((v).dim() == 1 && (v).size(0) == (x).size(1), #v " must have shape (C,) = (",       \
                      (x).size(1), ",) for " #x " of shape ", (x).sizes(), ", got ", (v).sizes());         \
    CHECK_FLOAT32_CONTIGUOUS(v, #v);                                                                       \
  } while (0)
// A tensor an op writes: no two of its elements may share memory (an expanded tensor), and it may
// not partially overlap an input (full overlap, i.e. in place, is fine: each element is read
// before it is written, by the same thread). Overlaps of strided slices are too hard to decide
// here (ATen's MemOverlapStatus::TooHard) and are the caller's responsibility.
#define CHECK_WRITABLE(t)                                                          \
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes,            \
                    #t " must not have overlapping elements (an expanded tensor?), got strides ", (t).strides())
#define CHECK_NO_PARTIAL_OVERLAP(t, u) \
  TORCH_CHECK_VALUE(at::get_overlap_status(t, u) != at::MemOverlapStatus::Partial, #t " must not partially overlap " #u)

namespace densenet_fast {
namespace {

// The first operand (whose device picked the kernel) must be on the kernel's device type.
void check_device_type(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device), " tensor, got ",
              t.device());
}

// The dtypes of the channel_stats kernels (AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16)).
bool is_stats_input_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_channel_stats_input(const at::Tensor& x) {
  CHECK_DIM(x, 4);
  CHECK_FLOATING(x);
  CHECK_STATS_DTYPE(x);
  CHECK_VALUES_PER_CHANNEL(x);
}

using ChannelStatsLauncher = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&);

// x: (N, C, H, W), any strides (a channel slice of a block buffer, NCHW or channels_last).
// Returns (mean, var), each (C,): the batch mean and the biased variance over N, H, W, in
// float32 for fp16/bf16/fp32 data and float64 for fp64 data.
std::tuple<at::Tensor, at::Tensor> channel_stats_with(const at::Tensor& x, ChannelStatsLauncher launch) {
  check_channel_stats_input(x);
  const auto options = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor mean = at::empty({x.size(1)}, options);
  at::Tensor var = at::empty({x.size(1)}, options);
  launch(x, mean, var);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x) {
  check_device_type(x, "x", c10::kCPU);
  return channel_stats_with(x, channel_stats_cpu_launch);
}

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x) {
  check_device_type(x, "x", c10::kCUDA);
  return channel_stats_with(x, channel_stats_cuda_launch);
}
#endif

// ---- fused batch norm passes (bn_relu.h) ------------------------------------------------------
// x, grad_z, out, grad_x: (N, C, H, W), any strides, each float32, float16 or bfloat16 (grad_z:
// float32 or x's dtype); scale, shift, mean, a, b: (C,) float32 contiguous; all on x's device.

bool is_value_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

void check_x_scale_shift(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  CHECK_DIM(x, 4);
  CHECK_VALUE_DTYPE(x);
  CHECK_PER_CHANNEL(scale, x);
  CHECK_PER_CHANNEL(shift, x);
}

void check_grad_z(const at::Tensor& grad_z, const at::Tensor& x) {
  CHECK_SAME_SHAPE(grad_z, x);
  TORCH_CHECK_TYPE(grad_z.scalar_type() == at::kFloat || grad_z.scalar_type() == x.scalar_type(),
                   "grad_z must be float32 or the dtype of x (", x.scalar_type(), "), got ", grad_z.scalar_type());
}

// Each op's checks start with the devices: a tensor on another device makes the dispatcher pick
// that device's kernel, and "scale must be on the device of x" says more than "x must be a CUDA
// tensor".
void check_bn_relu_out(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  CHECK_SAME_DEVICE(scale, x);
  CHECK_SAME_DEVICE(shift, x);
  CHECK_SAME_DEVICE(out, x);
  check_x_scale_shift(x, scale, shift);
  CHECK_SAME_SHAPE(out, x);
  CHECK_VALUE_DTYPE(out);
  CHECK_WRITABLE(out);
  CHECK_NO_PARTIAL_OVERLAP(out, x);
}

void check_bn_relu_backward_reduce(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& shift, const at::Tensor& mean) {
  CHECK_SAME_DEVICE(grad_z, x);
  CHECK_SAME_DEVICE(scale, x);
  CHECK_SAME_DEVICE(shift, x);
  CHECK_SAME_DEVICE(mean, x);
  check_x_scale_shift(x, scale, shift);
  CHECK_PER_CHANNEL(mean, x);
  check_grad_z(grad_z, x);
}

void check_bn_backward_apply(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                             const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a,
                             const at::Tensor& b, const at::Tensor& grad_x) {
  CHECK_SAME_DEVICE(grad_z, x);
  CHECK_SAME_DEVICE(scale, x);
  CHECK_SAME_DEVICE(shift, x);
  CHECK_SAME_DEVICE(mean, x);
  CHECK_SAME_DEVICE(a, x);
  CHECK_SAME_DEVICE(b, x);
  CHECK_SAME_DEVICE(grad_x, x);
  check_x_scale_shift(x, scale, shift);
  CHECK_PER_CHANNEL(mean, x);
  CHECK_PER_CHANNEL(a, x);
  CHECK_PER_CHANNEL(b, x);
  check_grad_z(grad_z, x);
  CHECK_SAME_SHAPE(grad_x, x);
  CHECK_VALUE_DTYPE(grad_x);
  CHECK_WRITABLE(grad_x);
  CHECK_NO_PARTIAL_OVERLAP(grad_x, x);
  CHECK_NO_PARTIAL_OVERLAP(grad_x, grad_z);
}

// (sum_dy, sum_dy_xmu), (C,) float32: zeros when there is no value to sum (N*H*W == 0).
std::tuple<at::Tensor, at::Tensor> allocate_sums(const at::Tensor& x) {
  const auto options = x.options().dtype(at::kFloat);
  if (x.size(0) * x.size(2) * x.size(3) == 0) return {at::zeros({x.size(1)}, options), at::zeros({x.size(1)}, options)};
  return {at::empty({x.size(1)}, options), at::empty({x.size(1)}, options)};
}

void bn_relu_out_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu_out(x, scale, shift, out);
  check_device_type(x, "x", c10::kCPU);
  bn_relu_out_cpu_launch(x, scale, shift, out);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(const at::Tensor& grad_z, const at::Tensor& x,
                                                               const at::Tensor& scale, const at::Tensor& shift,
                                                               const at::Tensor& mean) {
  check_bn_relu_backward_reduce(grad_z, x, scale, shift, mean);
  check_device_type(x, "x", c10::kCPU);
  auto [sum_dy, sum_dy_xmu] = allocate_sums(x);
  bn_relu_backward_reduce_cpu_launch(grad_z, x, scale, shift, mean, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

void bn_backward_apply_cpu(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& grad_x, bool accumulate) {
  check_bn_backward_apply(grad_z, x, scale, shift, mean, a, b, grad_x);
  check_device_type(x, "x", c10::kCPU);
  bn_backward_apply_cpu_launch(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate);
}

// ---- per-channel vectors (bn_relu.h: channel_affine, channel_bn_backward) --------------------
// Every operand (C,) float32 contiguous on the first one's device.

#define CHECK_CHANNEL_VECTOR(v, ref)                                                                       \
  do {                                                                                                     \
    CHECK_SAME_DEVICE(v, ref);                                                                             \
    TORCH_CHECK_VALUE((v).dim() == 1 && (v).size(0) == (ref).size(0), #v " must have shape (C,) = (",     \
                      (ref).size(0), ",) like " #ref ", got ", (v).sizes());                               \
    CHECK_FLOAT32_CONTIGUOUS(v, #v);                                                                       \
  } while (0)

void check_channel_affine(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                          const at::Tensor& bias) {
  CHECK_DIM(mean, 1);
  CHECK_CHANNEL_VECTOR(mean, mean);
  CHECK_CHANNEL_VECTOR(var, mean);
  CHECK_CHANNEL_VECTOR(weight, mean);
  CHECK_CHANNEL_VECTOR(bias, mean);
}

void check_channel_bn_backward(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                               int64_t count) {
  CHECK_DIM(sum_dy, 1);
  CHECK_CHANNEL_VECTOR(sum_dy, sum_dy);
  CHECK_CHANNEL_VECTOR(sum_dy_xmu, sum_dy);
  CHECK_CHANNEL_VECTOR(invstd, sum_dy);
  TORCH_CHECK_VALUE(count > 0, "count must be positive (values per channel), got ", count);
}

// The launchers of each device (dense_block.h): the whole-block ops and the channel ops pick
// theirs through the templates below.
const densenet_fast::BlockLaunchers kCpuLaunchers{channel_stats_cpu_launch, bn_relu_out_cpu_launch,
                                                  bn_relu_backward_reduce_cpu_launch, bn_backward_apply_cpu_launch,
                                                  channel_affine_cpu_launch, channel_bn_backward_cpu_launch};
#ifdef WITH_CUDA
const densenet_fast::BlockLaunchers kCudaLaunchers{channel_stats_cuda_launch, bn_relu_out_cuda_launch,
                                                   bn_relu_backward_reduce_cuda_launch, bn_backward_apply_cuda_launch,
                                                   channel_affine_cuda_launch, channel_bn_backward_cuda_launch};
#endif

// Returns (invstd, scale, shift).
template <const densenet_fast::BlockLaunchers& kLaunchers, c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_affine_on(const at::Tensor& mean, const at::Tensor& var,
                                                                 const at::Tensor& weight, const at::Tensor& bias,
                                                                 double eps) {
  check_device_type(mean, "mean", kDevice);
  check_channel_affine(mean, var, weight, bias);
  at::Tensor invstd = at::empty_like(mean), scale = at::empty_like(mean), shift = at::empty_like(mean);
  kLaunchers.channel_affine(mean, var, weight, bias, eps, invstd, scale, shift);
  return {invstd, scale, shift};
}

// Returns (a, b, d_gamma).
template <const densenet_fast::BlockLaunchers& kLaunchers, c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_bn_backward_on(const at::Tensor& sum_dy,
                                                                      const at::Tensor& sum_dy_xmu,
                                                                      const at::Tensor& invstd, int64_t count,
                                                                      bool batch) {
  check_device_type(sum_dy, "sum_dy", kDevice);
  check_channel_bn_backward(sum_dy, sum_dy_xmu, invstd, count);
  at::Tensor a = at::empty_like(sum_dy), b = at::empty_like(sum_dy), d_gamma = at::empty_like(sum_dy);
  kLaunchers.channel_bn_backward(sum_dy, sum_dy_xmu, invstd, count, batch, a, b, d_gamma);
  return {a, b, d_gamma};
}

#ifdef WITH_CUDA
void bn_relu_out_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu_out(x, scale, shift, out);
  check_device_type(x, "x", c10::kCUDA);
  bn_relu_out_cuda_launch(x, scale, shift, out);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cuda(const at::Tensor& grad_z, const at::Tensor& x,
                                                                const at::Tensor& scale, const at::Tensor& shift,
                                                                const at::Tensor& mean) {
  check_bn_relu_backward_reduce(grad_z, x, scale, shift, mean);
  check_device_type(x, "x", c10::kCUDA);
  auto [sum_dy, sum_dy_xmu] = allocate_sums(x);
  bn_relu_backward_reduce_cuda_launch(grad_z, x, scale, shift, mean, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

void bn_backward_apply_cuda(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& grad_x, bool accumulate) {
  check_bn_backward_apply(grad_z, x, scale, shift, mean, a, b, grad_x);
  check_device_type(x, "x", c10::kCUDA);
  bn_backward_apply_cuda_launch(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate);
}
#endif

// ---- the whole dense block (dense_block.h) ----------------------------------------------------
// The layer loop trusts its inputs, so every tensor it reads is checked here: params[6l + i] is
// parameter i of layer l, C_l = c0 + l*k, B = conv1.weight's output channels.

#define CHECK_SHAPE(t, name, ...)                                                                          \
  TORCH_CHECK_VALUE((t).sizes() == at::IntArrayRef({__VA_ARGS__}), name, " must have shape ",              \
                    at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())
#define CHECK_FLOAT_VECTOR(t, name, c)                                                                     \
  do {                                                                                                     \
    CHECK_SHAPE(t, name, c);                                                                               \
    CHECK_FLOAT32_CONTIGUOUS(t, name);                                                                     \
  } while (0)

// Two tensors an op writes (or one it writes and one it reads throughout) must not share memory.
#define CHECK_DISJOINT(t, u)                                                                            \
  do {                                                                                                  \
    const at::MemOverlapStatus status = at::get_overlap_status(t, u);                                  \
    TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, \
                      #t " and " #u " must not share memory");                                         \
  } while (0)

std::string layer_tensor(const char* what, int64_t l) { return std::string(what) + " of layer " + std::to_string(l); }

// Returns the number of layers; fbuf, params (and their shapes), steps.
int64_t check_block(const at::Tensor& fbuf, int64_t c0, at::TensorList params, at::IntArrayRef steps) {
  CHECK_DIM(fbuf, 4);
  CHECK_VALUE_DTYPE(fbuf);
  CHECK_VALUES_PER_CHANNEL(fbuf);
  TORCH_CHECK_VALUE(fbuf.is_contiguous() || fbuf.is_contiguous(at::MemoryFormat::ChannelsLast),
                    "fbuf must be contiguous (NCHW) or channels_last, got strides ", fbuf.strides());
  CHECK_WRITABLE(fbuf);
  TORCH_CHECK_VALUE(!params.empty() && params.size() % densenet_fast::kParamsPerLayer == 0,
                    "params must hold 6 tensors per layer (norm1.weight, norm1.bias, conv1.weight, norm2.weight, "
                    "norm2.bias, conv2.weight), got ", params.size());
  const int64_t layers = static_cast<int64_t>(params.size()) / densenet_fast::kParamsPerLayer;
  TORCH_CHECK_VALUE(steps.size() == static_cast<size_t>(layers), "steps must have one entry per layer (", layers,
                    "), got ", steps.size());
  const at::Tensor& w2_0 = params[5];
  TORCH_CHECK_VALUE(w2_0.dim() == 4 && w2_0.size(0) > 0, "conv2.weight of layer 0 must be (k, B, 3, 3), got shape ",
                    w2_0.sizes());
  const int64_t k = w2_0.size(0);
  TORCH_CHECK_VALUE(c0 > 0 && fbuf.size(1) == c0 + layers * k, "fbuf must have c0 + L*k = ", c0, " + ", layers, "*",
                    k, " channels, got ", fbuf.size(1));
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t cl = c0 + l * k;
    const at::TensorList p = params.slice(densenet_fast::kParamsPerLayer * l, densenet_fast::kParamsPerLayer);
    TORCH_CHECK_VALUE(p[2].dim() == 4 && p[2].size(0) > 0, layer_tensor("conv1.weight", l),
                      " must be (B, C_l, 1, 1), got shape ", p[2].sizes());
    const int64_t b = p[2].size(0);
    CHECK_SHAPE(p[0], layer_tensor("norm1.weight", l), cl);
    CHECK_SHAPE(p[1], layer_tensor("norm1.bias", l), cl);
    CHECK_SHAPE(p[2], layer_tensor("conv1.weight", l), b, cl, 1, 1);
    CHECK_SHAPE(p[3], layer_tensor("norm2.weight", l), b);
    CHECK_SHAPE(p[4], layer_tensor("norm2.bias", l), b);
    CHECK_SHAPE(p[5], layer_tensor("conv2.weight", l), k, b, 3, 3);
    for (int i = 0; i < densenet_fast::kParamsPerLayer; ++i) {
      TORCH_CHECK(p[i].device() == fbuf.device(), "params[", densenet_fast::kParamsPerLayer * l + i,
                  "] must be on the device of fbuf (", fbuf.device(), "), got ", p[i].device());
      TORCH_CHECK_TYPE(is_stats_input_dtype(p[i].scalar_type()), "params[", densenet_fast::kParamsPerLayer * l + i,
                       "] must be float32, float64, float16 or bfloat16, got ", p[i].scalar_type());
    }
    TORCH_CHECK_TYPE(p[2].scalar_type() == fbuf.scalar_type() && p[5].scalar_type() == fbuf.scalar_type(),
                     "the conv weights of layer ", l, " must have fbuf's dtype ", fbuf.scalar_type(), ", got ",
                     p[2].scalar_type(), " and ", p[5].scalar_type());
    TORCH_CHECK_VALUE(steps[l] > 0, "steps[", l, "] must be positive, got ", steps[l]);
  }
  return layers;
}

// stats: 2L entries; entry 2l (mean) and 2l+1 (var) both None or both (channels(l),) tensors.
template <typename Channels>
void check_fixed_stats(const c10::List<std::optional<at::Tensor>>& stats, const char* name, int64_t layers,
                       const at::Tensor& fbuf, Channels channels) {
  TORCH_CHECK_VALUE(stats.size() == static_cast<size_t>(2 * layers), name, " must have 2 entries per layer (",
                    2 * layers, "), got ", stats.size());
  for (int64_t l = 0; l < layers; ++l) {
    const std::optional<at::Tensor> m = stats[2 * l], v = stats[2 * l + 1];
    TORCH_CHECK_VALUE(m.has_value() == v.has_value(), name, "[", 2 * l, "] and ", name, "[", 2 * l + 1,
                      "] must both be None or both tensors");
    if (!m.has_value()) continue;
    for (const at::Tensor& t : {*m, *v}) {
      TORCH_CHECK(t.device() == fbuf.device(), name, " of layer ", l, " must be on the device of fbuf (", fbuf.device(),
                  "), got ", t.device());
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels(l), name, " of layer ", l, " must have shape (",
                        channels(l), ",), got ", t.sizes());
      CHECK_FLOATING(t);
    }
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> dense_block_forward_with(
    const densenet_fast::BlockLaunchers& launch, const at::Tensor& fbuf, const at::Tensor& mean, const at::Tensor& var,
    int64_t c0, at::TensorList params, at::ArrayRef<double> eps1, at::ArrayRef<double> eps2,
    const c10::List<std::optional<at::Tensor>>& stats1, const c10::List<std::optional<at::Tensor>>& stats2,
    at::IntArrayRef steps, bool compute_stats, bool save_bottleneck) {
  const int64_t layers = check_block(fbuf, c0, params, steps);
  const int64_t k = params[5].size(0);
  TORCH_CHECK_VALUE(eps1.size() == static_cast<size_t>(layers) && eps2.size() == static_cast<size_t>(layers),
                    "eps1 and eps2 must have one entry per layer (", layers, "), got ", eps1.size(), " and ",
                    eps2.size());
  check_fixed_stats(stats1, "stats1", layers, fbuf, [&](int64_t l) { return c0 + l * k; });
  check_fixed_stats(stats2, "stats2", layers, fbuf,
                    [&](int64_t l) { return params[densenet_fast::kParamsPerLayer * l + 2].size(0); });
  bool needs_cache = compute_stats;
  for (int64_t l = 0; l < layers; ++l) needs_cache = needs_cache || !stats1[2 * l].has_value();
  if (needs_cache) {
    CHECK_SAME_DEVICE(mean, fbuf);
    CHECK_SAME_DEVICE(var, fbuf);
    CHECK_FLOAT_VECTOR(mean, "mean", fbuf.size(1));
    CHECK_FLOAT_VECTOR(var, "var", fbuf.size(1));
    TORCH_CHECK_VALUE(compute_stats, "compute_stats must be true when a layer's stats1 are None (batch statistics)");
    CHECK_DISJOINT(mean, var);
    CHECK_DISJOINT(mean, fbuf);
    CHECK_DISJOINT(var, fbuf);
  }
  return densenet_fast::dense_block_forward(launch, fbuf, mean, var, c0, params, eps1, eps2, stats1, stats2, steps,
                                            compute_stats, save_bottleneck);
}

std::vector<at::Tensor> dense_block_backward_with(const densenet_fast::BlockLaunchers& launch, const at::Tensor& fbuf,
                                                  const at::Tensor& gbuf, int64_t c0, at::TensorList params,
                                                  at::TensorList saved, at::TensorList mean1, at::TensorList mean2,
                                                  at::IntArrayRef batch1, at::IntArrayRef batch2,
                                                  at::TensorList bottlenecks, at::IntArrayRef steps, int64_t count) {
  const int64_t layers = check_block(fbuf, c0, params, steps);
  const int64_t k = params[5].size(0);
  CHECK_SAME_DEVICE(gbuf, fbuf);
  CHECK_SAME_SHAPE(gbuf, fbuf);
  TORCH_CHECK_TYPE(gbuf.scalar_type() == at::kFloat || gbuf.scalar_type() == fbuf.scalar_type(),
                   "gbuf must be float32 or the dtype of fbuf (", fbuf.scalar_type(), "), got ", gbuf.scalar_type());
  CHECK_WRITABLE(gbuf);
  CHECK_DISJOINT(gbuf, fbuf);
  const auto per_layer = [&](size_t got, int64_t per, const char* name) {
    TORCH_CHECK_VALUE(got == static_cast<size_t>(per * layers), name, " must have ", per, " entries per layer (",
                      per * layers, "), got ", got);
  };
  per_layer(saved.size(), densenet_fast::kSavedPerLayer, "saved");
  per_layer(mean1.size(), 1, "mean1");
  per_layer(mean2.size(), 1, "mean2");
  per_layer(batch1.size(), 1, "batch1");
  per_layer(batch2.size(), 1, "batch2");
  TORCH_CHECK_VALUE(bottlenecks.empty() || bottlenecks.size() == static_cast<size_t>(layers),
                    "bottlenecks must be empty or hold one tensor per layer (", layers, "), got ", bottlenecks.size());
  TORCH_CHECK_VALUE(count == fbuf.size(0) * fbuf.size(2) * fbuf.size(3), "count must be N*H*W = ",
                    fbuf.size(0) * fbuf.size(2) * fbuf.size(3), ", got ", count);
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t cl = c0 + l * k, b = params[densenet_fast::kParamsPerLayer * l + 2].size(0);
    for (int64_t i = 0; i < densenet_fast::kSavedPerLayer; ++i) {
      const at::Tensor& t = saved[densenet_fast::kSavedPerLayer * l + i];
      CHECK_SAME_DEVICE(t, fbuf);
      CHECK_FLOAT_VECTOR(t, "saved[" + std::to_string(densenet_fast::kSavedPerLayer * l + i) + "]", i < 3 ? cl : b);
    }
    CHECK_SAME_DEVICE(mean1[l], fbuf);
    CHECK_SAME_DEVICE(mean2[l], fbuf);
    CHECK_FLOAT_VECTOR(mean1[l], layer_tensor("mean1", l), cl);
    CHECK_FLOAT_VECTOR(mean2[l], layer_tensor("mean2", l), b);
    if (!bottlenecks.empty()) {
      const at::Tensor& bt = bottlenecks[l];
      CHECK_SAME_DEVICE(bt, fbuf);
      CHECK_SHAPE(bt, layer_tensor("the bottleneck", l), fbuf.size(0), b, fbuf.size(2), fbuf.size(3));
      TORCH_CHECK_TYPE(bt.scalar_type() == fbuf.scalar_type(), "the bottleneck of layer ", l,
                       " must have fbuf's dtype ", fbuf.scalar_type(), ", got ", bt.scalar_type());
    }
  }
  return densenet_fast::dense_block_backward(launch, fbuf, gbuf, c0, params, saved, mean1, mean2, batch1, batch2,
                                             bottlenecks, steps, count);
}

// The op on one device: its launchers, and fbuf (whose device picked the kernel) checked first.
template <const densenet_fast::BlockLaunchers& kLaunchers, c10::DeviceType kDevice>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> dense_block_forward_on(
    const at::Tensor& fbuf, const at::Tensor& mean, const at::Tensor& var, int64_t c0, at::TensorList params,
    at::ArrayRef<double> eps1, at::ArrayRef<double> eps2, const c10::List<std::optional<at::Tensor>>& stats1,
    const c10::List<std::optional<at::Tensor>>& stats2, at::IntArrayRef steps, bool compute_stats,
    bool save_bottleneck) {
  check_device_type(fbuf, "fbuf", kDevice);
  return dense_block_forward_with(kLaunchers, fbuf, mean, var, c0, params, eps1, eps2, stats1, stats2, steps,
                                  compute_stats, save_bottleneck);
}

template <const densenet_fast::BlockLaunchers& kLaunchers, c10::DeviceType kDevice>
std::vector<at::Tensor> dense_block_backward_on(const at::Tensor& fbuf, const at::Tensor& gbuf, int64_t c0,
                                                at::TensorList params, at::TensorList saved, at::TensorList mean1,
                                                at::TensorList mean2, at::IntArrayRef batch1, at::IntArrayRef batch2,
                                                at::TensorList bottlenecks, at::IntArrayRef steps, int64_t count) {
  check_device_type(fbuf, "fbuf", kDevice);
  return dense_block_backward_with(kLaunchers, fbuf, gbuf, c0, params, saved, mean1, mean2, batch1, batch2,
                                   bottlenecks, steps, count);
}


}  // namespace
}  // namespace densenet_fast

TORCH_LIBRARY(densenet_fast, m) {
  // The fake (meta) kernels live in Python; torch.compile points at this module if they are missing.
  m.set_python_module("densenet_fast.ops.channel_stats");
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");

  // The passes of the fused batch norm (csrc/bn_relu.h); fakes in densenet_fast/ops/fused_bn.py.
  m.set_python_module("densenet_fast.ops.fused_bn");
  m.def("bn_relu_out(Tensor x, Tensor scale, Tensor shift, Tensor(a!) out) -> ()");
  m.def(
      "bn_relu_backward_reduce(Tensor grad_z, Tensor x, Tensor scale, Tensor shift, Tensor mean)"
      " -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "bn_backward_apply(Tensor grad_z, Tensor x, Tensor scale, Tensor shift, Tensor mean, Tensor a, Tensor b,"
      " Tensor(a!) grad_x, bool accumulate) -> ()");

  // Per-channel vectors between the passes (csrc/bn_relu.h); fakes in densenet_fast/ops/fused_bn.py.
  m.def("channel_affine(Tensor mean, Tensor var, Tensor weight, Tensor bias, float eps)"
        " -> (Tensor invstd, Tensor scale, Tensor shift)");
  m.def("channel_bn_backward(Tensor sum_dy, Tensor sum_dy_xmu, Tensor invstd, int count, bool batch)"
        " -> (Tensor a, Tensor b, Tensor d_gamma)");

  // The whole dense block (csrc/dense_block.h); fakes in densenet_fast/ops/cuda_block.py.
  m.set_python_module("densenet_fast.ops.cuda_block");
  m.def(
      "dense_block_forward(Tensor(a!) fbuf, Tensor(b!) mean, Tensor(c!) var, int c0, Tensor[] params, float[] eps1,"
      " float[] eps2, Tensor?[] stats1, Tensor?[] stats2, int[] steps, bool compute_stats, bool save_bottleneck)"
      " -> (Tensor[] saved, Tensor[] bt_stats, Tensor[] bottlenecks)");
  m.def(
      "dense_block_backward(Tensor fbuf, Tensor(a!) gbuf, int c0, Tensor[] params, Tensor[] saved, Tensor[] mean1,"
      " Tensor[] mean2, int[] batch1, int[] batch2, Tensor[] bottlenecks, int[] steps, int count) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("channel_stats", &densenet_fast::channel_stats_cpu);
  m.impl("bn_relu_out", &densenet_fast::bn_relu_out_cpu);
  m.impl("bn_relu_backward_reduce", &densenet_fast::bn_relu_backward_reduce_cpu);
  m.impl("bn_backward_apply", &densenet_fast::bn_backward_apply_cpu);
  m.impl("channel_affine", &densenet_fast::channel_affine_on<densenet_fast::kCpuLaunchers, c10::kCPU>);
  m.impl("channel_bn_backward", &densenet_fast::channel_bn_backward_on<densenet_fast::kCpuLaunchers, c10::kCPU>);
  m.impl("dense_block_forward", &densenet_fast::dense_block_forward_on<densenet_fast::kCpuLaunchers, c10::kCPU>);
  m.impl("dense_block_backward", &densenet_fast::dense_block_backward_on<densenet_fast::kCpuLaunchers, c10::kCPU>);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("channel_stats", &densenet_fast::channel_stats_cuda);
  m.impl("bn_relu_out", &densenet_fast::bn_relu_out_cuda);
  m.impl("bn_relu_backward_reduce", &densenet_fast::bn_relu_backward_reduce_cuda);
  m.impl("bn_backward_apply", &densenet_fast::bn_backward_apply_cuda);
  m.impl("channel_affine", &densenet_fast::channel_affine_on<densenet_fast::kCudaLaunchers, c10::kCUDA>);
  m.impl("channel_bn_backward", &densenet_fast::channel_bn_backward_on<densenet_fast::kCudaLaunchers, c10::kCUDA>);
  m.impl("dense_block_forward", &densenet_fast::dense_block_forward_on<densenet_fast::kCudaLaunchers, c10::kCUDA>);
  m.impl("dense_block_backward", &densenet_fast::dense_block_backward_on<densenet_fast::kCudaLaunchers, c10::kCUDA>);
}
#endif

// A Python module with no functions: importing it only loads this library, whose static
// initialisers above register the ops. Written against the limited C API (no pybind11), so the
// same .abi3.so works for every Python >= 3.10 and the build skips pybind11's heavy headers.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "densenet_fast compiled ops; they are registered under torch.ops.densenet_fast",  // m_doc
      -1,    // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
