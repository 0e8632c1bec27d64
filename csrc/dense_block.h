// dense_block: the whole memory-efficient dense block of the "cuda" backend, forward and
// backward, run from C++ (../shared/design/dense_block.md).
//
// The block's per-layer work is a few dozen small launches (the BN-ReLU passes, the 1x1 GEMMs
// over input-channel chunks, the 3x3 conv, the statistics, the per-channel vectors). Issued one
// by one from Python, the host cost of each (Python, the dispatcher, the launch) exceeds the GPU
// time of most of them: a DenseNet-BC-100 step measured 90 ms eager against 22 ms when the same
// launches were replayed from a CUDA graph (benchmarks/NOTES-gpu.md). Here the layer loop, the
// chunk loop and every per-channel vector run in C++: one op call per block and direction.
//
// The math is exactly that of densenet_fast/ops/cuda_block.py's per-layer path (which still runs
// what this does not cover: dropout, synchronized BN, float64, tracing), on the same kernels.
// One function serves every device: it takes the device's launchers.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

namespace densenet_fast {

// The launchers of one device (csrc/channel_stats.h, csrc/bn_relu.h); they check nothing.
struct BlockLaunchers {
  void (*channel_stats)(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var);
  void (*bn_relu_out)(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& out);
  void (*bn_relu_backward_reduce)(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& sum_dy,
                                  const at::Tensor& sum_dy_xmu);
  void (*bn_backward_apply)(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& grad_x, bool accumulate);
  void (*channel_affine)(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, const at::Tensor& invstd, const at::Tensor& scale,
                         const at::Tensor& shift);
  void (*channel_bn_backward)(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                              int64_t count, bool batch, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& d_gamma);
};

// Per layer, what the forward keeps for the backward: (invstd1, scale1, shift1) over the layer's
// C_l input channels and (invstd2, scale2, shift2) over its B bottleneck channels, float32.
constexpr int64_t kSavedPerLayer = 6;
constexpr int64_t kParamsPerLayer = 6;  // norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight

// Forward of a block of L = params.size() / 6 layers whose input is already in fbuf[:, :c0].
//   fbuf   (N, c0 + L*k, H, W), float32/float16/bfloat16, NCHW or channels_last: channels
//          [c0, c0 + L*k) are written, layer by layer
//   mean, var  (c0 + L*k,) float32: the statistics cache, filled for every channel when
//          compute_stats (else unused)
//   stats1, stats2  2L entries each, (mean, biased var) of layer l's norm1 at [2l, 2l+1]; None
//          means batch statistics (norm1: the cache's first C_l entries; norm2: those of the
//          bottleneck, computed here)
//   steps  L entries: input channels per chunk of layer l's 1x1 conv
// Returns (saved: 6 per layer, bt_stats: (mean, var) of each layer whose stats2 were None, in
// layer order, bottlenecks: each layer's Bt when save_bottleneck, else empty).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> dense_block_forward(
    const BlockLaunchers& launch, const at::Tensor& fbuf, const at::Tensor& mean, const at::Tensor& var, int64_t c0,
    at::TensorList params, at::ArrayRef<double> eps1, at::ArrayRef<double> eps2,
    const c10::List<std::optional<at::Tensor>>& stats1, const c10::List<std::optional<at::Tensor>>& stats2,
    at::IntArrayRef steps, bool compute_stats, bool save_bottleneck);

// Backward: gbuf (fbuf's shape; float32, or fbuf's dtype for float32 data) holds dLoss/dF and
// ends holding dLoss/dF[:, :c0] in its first c0 channels (each layer adds its input gradient into
// its prefix). mean1[l] (C_l,) and mean2[l] (B,) are the means the forward normalised with;
// batch1[l] / batch2[l] are 1 where they were batch statistics (training-mode BN backward) and 0
// for fixed ones. bottlenecks: the forward's, or empty (then recomputed). count: N*H*W.
// Returns the 6L parameter gradients in params' order and dtypes.
std::vector<at::Tensor> dense_block_backward(const BlockLaunchers& launch, const at::Tensor& fbuf,
                                             const at::Tensor& gbuf, int64_t c0, at::TensorList params,
                                             at::TensorList saved, at::TensorList mean1, at::TensorList mean2,
                                             at::IntArrayRef batch1, at::IntArrayRef batch2,
                                             at::TensorList bottlenecks, at::IntArrayRef steps, int64_t count);

}  // namespace densenet_fast
