// Schemas, input checks and kernel registration of the densenet_fast ops. No math here: each op
// checks its inputs, allocates its outputs and calls the launcher of its csrc/<op>.{cpp,cu}.
//
// Loading this library (import densenet_fast._C) runs the TORCH_LIBRARY blocks below, which
// register the ops as torch.ops.densenet_fast.*. The Python side adds their fake (meta) kernels
// and autograd formulas (densenet_fast/ops/<op>.py).
#include <Python.h>

#include <tuple>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "bn_relu.h"
#include "channel_stats.h"

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
#define CHECK_DEVICE(x, is_device, name) TORCH_CHECK((x).is_device(), #x " must be a " name " tensor, got ", (x).device())
#define CHECK_VALUE_DTYPE(x)                                                                  \
  TORCH_CHECK_TYPE(is_value_dtype((x).scalar_type()), #x " must be float32, float16 or bfloat16, got ", \
                   (x).scalar_type())
#define CHECK_SAME_DEVICE(t, x) \
  TORCH_CHECK((t).device() == (x).device(), #t " must be on the device of " #x " (", (x).device(), "), got ", (t).device())
#define CHECK_SAME_SHAPE(t, x) \
  TORCH_CHECK_VALUE((t).sizes() == (x).sizes(), #t " must have the shape of " #x " ", (x).sizes(), ", got ", (t).sizes())
// A per-channel vector of the fused batch norm: (C,) float32 contiguous.
#define CHECK_PER_CHANNEL(v, x)                                                                            \
  do {                                                                                                     \
    TORCH_CHECK_VALUE((v).dim() == 1 && (v).size(0) == (x).size(1), #v " must have shape (C,) = (",       \
                      (x).size(1), ",) for " #x " of shape ", (x).sizes(), ", got ", (v).sizes());         \
    TORCH_CHECK_TYPE((v).scalar_type() == at::kFloat, #v " must be float32, got ", (v).scalar_type());     \
    TORCH_CHECK_VALUE((v).is_contiguous(), #v " must be contiguous, got strides ", (v).strides());         \
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
  CHECK_DEVICE(x, is_cpu, "CPU");
  return channel_stats_with(x, channel_stats_cpu_launch);
}

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x) {
  CHECK_DEVICE(x, is_cuda, "CUDA");
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
  CHECK_DEVICE(x, is_cpu, "CPU");
  bn_relu_out_cpu_launch(x, scale, shift, out);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cpu(const at::Tensor& grad_z, const at::Tensor& x,
                                                               const at::Tensor& scale, const at::Tensor& shift,
                                                               const at::Tensor& mean) {
  check_bn_relu_backward_reduce(grad_z, x, scale, shift, mean);
  CHECK_DEVICE(x, is_cpu, "CPU");
  auto [sum_dy, sum_dy_xmu] = allocate_sums(x);
  bn_relu_backward_reduce_cpu_launch(grad_z, x, scale, shift, mean, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

void bn_backward_apply_cpu(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& grad_x, bool accumulate) {
  check_bn_backward_apply(grad_z, x, scale, shift, mean, a, b, grad_x);
  CHECK_DEVICE(x, is_cpu, "CPU");
  bn_backward_apply_cpu_launch(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate);
}

#ifdef WITH_CUDA
void bn_relu_out_cuda(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out) {
  check_bn_relu_out(x, scale, shift, out);
  CHECK_DEVICE(x, is_cuda, "CUDA");
  bn_relu_out_cuda_launch(x, scale, shift, out);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_reduce_cuda(const at::Tensor& grad_z, const at::Tensor& x,
                                                                const at::Tensor& scale, const at::Tensor& shift,
                                                                const at::Tensor& mean) {
  check_bn_relu_backward_reduce(grad_z, x, scale, shift, mean);
  CHECK_DEVICE(x, is_cuda, "CUDA");
  auto [sum_dy, sum_dy_xmu] = allocate_sums(x);
  bn_relu_backward_reduce_cuda_launch(grad_z, x, scale, shift, mean, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

void bn_backward_apply_cuda(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& grad_x, bool accumulate) {
  check_bn_backward_apply(grad_z, x, scale, shift, mean, a, b, grad_x);
  CHECK_DEVICE(x, is_cuda, "CUDA");
  bn_backward_apply_cuda_launch(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate);
}
#endif

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
}

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("channel_stats", &densenet_fast::channel_stats_cpu);
  m.impl("bn_relu_out", &densenet_fast::bn_relu_out_cpu);
  m.impl("bn_relu_backward_reduce", &densenet_fast::bn_relu_backward_reduce_cpu);
  m.impl("bn_backward_apply", &densenet_fast::bn_backward_apply_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("channel_stats", &densenet_fast::channel_stats_cuda);
  m.impl("bn_relu_out", &densenet_fast::bn_relu_out_cuda);
  m.impl("bn_relu_backward_reduce", &densenet_fast::bn_relu_backward_reduce_cuda);
  m.impl("bn_backward_apply", &densenet_fast::bn_backward_apply_cuda);
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
