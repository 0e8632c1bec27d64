// Schemas, input checks and kernel registration of the densenet_fast ops. No math here: each op
// checks its inputs, allocates its outputs and calls the launcher of its csrc/<op>.{cpp,cu}.
//
// Loading this library (import densenet_fast._C) runs the TORCH_LIBRARY blocks below, which
// register the ops as torch.ops.densenet_fast.*. The Python side adds their fake (meta) kernels
// and autograd formulas (densenet_fast/ops/<op>.py).
#include <Python.h>

#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "channel_stats.h"

// One macro per property; each names the tensor in its message ("x must have 4 dims, got 3").
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as ValueError / TypeError.
#define CHECK_DIM(x, d) TORCH_CHECK_VALUE((x).dim() == (d), #x " must have " #d " dims, got ", (x).dim())
#define CHECK_FLOATING(x) \
  TORCH_CHECK_TYPE(at::isFloatingType((x).scalar_type()), #x " must be a floating-point tensor, got ", (x).scalar_type())
#define CHECK_VALUES_PER_CHANNEL(x)                                               \
  TORCH_CHECK_VALUE((x).size(0) * (x).size(2) * (x).size(3) > 0,                  \
                    #x " must have at least one element per channel, got shape ", \
                    (x).sizes())
#define CHECK_DEVICE(x, is_device, name) TORCH_CHECK((x).is_device(), #x " must be a " name " tensor, got ", (x).device())

namespace densenet_fast {
namespace {

void check_channel_stats_input(const at::Tensor& x) {
  CHECK_DIM(x, 4);
  CHECK_FLOATING(x);
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

}  // namespace
}  // namespace densenet_fast

TORCH_LIBRARY(densenet_fast, m) {
  // The fake (meta) kernels live in Python; torch.compile points at this module if they are missing.
  m.set_python_module("densenet_fast.ops.channel_stats");
  m.def("channel_stats(Tensor x) -> (Tensor mean, Tensor var)");
}

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("channel_stats", &densenet_fast::channel_stats_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("channel_stats", &densenet_fast::channel_stats_cuda);
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
