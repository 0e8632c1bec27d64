// bn_relu: the elementwise and reduction passes of the fused batch norm of the "cuda" backend,
// shared by the CPU kernels (bn_relu_cpu.cpp) and the CUDA kernels (bn_relu.cu).
//
// Every norm of the dense block normalises with statistics it did not compute itself (the
// block's per-channel cache, or the running buffers in eval mode), so batch norm reduces to a
// per-channel affine map y = x * scale + shift with scale = gamma * invstd and
// shift = beta - mean * scale (the dense-block design note, "Forward", step 3). The three passes:
//   forward           out = relu(y)
//   backward reduce   dy = grad_z * [y > 0];  sum_dy = sum(dy),  sum_dy_xmu = sum(dy * (x - mean))
//   backward apply    dx = scale * (dy - a - (x - mean) * b);  grad_x = dx  or  grad_x += dx
// with sums over N, H, W. Training-mode BN backward (Ioffe & Szegedy 2015) is the apply pass with
// a = sum_dy / M and b = invstd^2 * sum_dy_xmu / M, since with xhat = (x - mean) * invstd,
//   dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M),
//   dbeta = sum_dy,  dgamma = invstd * sum_dy_xmu;
// eval mode is a = b = 0. The ReLU mask is recomputed from x in both backward passes, so the
// BN-ReLU output never has to be kept.
//
// All math is fp32 whatever the storage dtype (float32, float16 or bfloat16) of each 4-D operand;
// the operands are (N, C, H, W) with arbitrary strides (channel slices of a block buffer, NCHW or
// channels_last, at any channel offset), and each may have its own dtype and layout.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace densenet_fast {

enum class FusedBnOp { kForward, kBackwardReduce, kBackwardApply };

// Strides of one 4-D operand, in elements of its own dtype, as at::Tensor::stride() reports them.
struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct FusedBnParams {
  int64_t batch, channels, height, width;  // of x; every 4-D operand has this shape
  const void* x;
  Strides4 x_stride;
  const void* grad_z;  // backward passes only, else nullptr
  Strides4 grad_z_stride;
  void* out;  // forward: out; backward apply: grad_x; reduce: nullptr
  Strides4 out_stride;
  // (C,) float32 contiguous; the pointers a pass does not read are nullptr.
  const float* scale;
  const float* shift;
  const float* mean;
  const float* a;
  const float* b;
  float* sum_dy;      // reduce: (C,) outputs
  float* sum_dy_xmu;
  bool accumulate;    // apply: grad_x += dx instead of grad_x = dx
};

inline FusedBnParams make_fused_bn_params(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift) {
  FusedBnParams p{};
  p.batch = x.size(0);
  p.channels = x.size(1);
  p.height = x.size(2);
  p.width = x.size(3);
  p.x = x.const_data_ptr();
  p.x_stride = strides_of(x);
  p.scale = scale.const_data_ptr<float>();
  p.shift = shift.const_data_ptr<float>();
  return p;
}

// True when x's channels are its fastest-moving dimension (channels_last and its slices); size-1
// dims are ignored because their strides are arbitrary. Only picks the loop order that reads x
// in memory order; every kernel is correct for any strides of every operand.
inline bool x_channels_innermost(const FusedBnParams& p) {
  const Strides4& s = p.x_stride;
  const int64_t pixel_stride = p.width > 1 ? s.w : p.height > 1 ? s.h : s.n;
  return s.c < pixel_stride;
}

// The per-element math, the same on both devices (fp32).
C10_HOST_DEVICE inline float bn_affine(float x, float scale, float shift) { return x * scale + shift; }

// relu(y); NaN propagates as in torch.relu.
C10_HOST_DEVICE inline float relu_value(float y) { return y < 0.f ? 0.f : y; }

// The gradient that passes the ReLU: grad_z where y > 0 (torch's threshold_backward convention).
C10_HOST_DEVICE inline float relu_grad(float grad_z, float y) { return y > 0.f ? grad_z : 0.f; }

C10_HOST_DEVICE inline float bn_backward_dx(float dy, float x, float scale, float mean, float a, float b) {
  return scale * (dy - a - (x - mean) * b);
}

// ---- per-channel vectors: the arithmetic between the passes, one launch each ------------------
// All (C,) float32 contiguous, the same formulas on both devices (std::fma / fmaf: one rounding).
//   channel_affine        invstd = 1 / sqrt(var + eps), scale = weight * invstd,
//                         shift = bias - mean * scale                        (the forward's vectors)
//   channel_bn_backward   batch statistics: a = sum_dy / M, b = invstd^2 * sum_dy_xmu / M;
//                         fixed ones: a = b = 0; d_gamma = sum_dy_xmu * invstd  (the apply pass's
//                         coefficients and the weight gradient; d_beta is sum_dy itself)
C10_HOST_DEVICE inline void channel_affine(float mean, float var, float weight, float bias, float eps, float* invstd,
                                           float* scale, float* shift) {
  const float is = 1.f / sqrtf(var + eps);
  const float s = weight * is;
  *invstd = is;
  *scale = s;
  *shift = fmaf(-mean, s, bias);
}

C10_HOST_DEVICE inline void channel_bn_backward(float sum_dy, float sum_dy_xmu, float invstd, float count, bool batch,
                                                float* a, float* b, float* d_gamma) {
  *a = batch ? sum_dy / count : 0.f;
  *b = batch ? invstd * invstd * sum_dy_xmu / count : 0.f;
  *d_gamma = sum_dy_xmu * invstd;
}

// Turns the dtype of an operand into a type for a generic lambda: f(TypeTag<float>{}) etc.
template <typename T>
struct TypeTag {
  using type = T;
};

// float32, float16 or bfloat16 (ops.cpp has already rejected anything else).
template <typename F>
void dispatch_value_dtype(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(TypeTag<float>{});
    case at::kHalf:
      return f(TypeTag<c10::Half>{});
    case at::kBFloat16:
      return f(TypeTag<c10::BFloat16>{});
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

// grad_z is float32 or x's dtype: two instantiations per x dtype instead of three.
template <typename scalar_x, typename F>
void dispatch_grad_z_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) return f(TypeTag<float>{});
  return f(TypeTag<scalar_x>{});
}

// Launchers. Shapes, dtypes and devices are checked in ops.cpp; the launchers only compute.
// x, grad_z, out, grad_x: (N, C, H, W) any strides; per-channel vectors (C,) float32 contiguous;
// sum_dy, sum_dy_xmu: (C,) float32 contiguous outputs.
void bn_relu_out_cpu_launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& out);
void bn_relu_backward_reduce_cpu_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                        const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& sum_dy,
                                        const at::Tensor& sum_dy_xmu);
void bn_backward_apply_cpu_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& grad_x, bool accumulate);
// Per-channel launchers: every operand (C,) float32 contiguous on one device; count = M > 0.
void channel_affine_cpu_launch(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                               const at::Tensor& bias, double eps, const at::Tensor& invstd, const at::Tensor& scale,
                               const at::Tensor& shift);
void channel_bn_backward_cpu_launch(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                                    int64_t count, bool batch, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& d_gamma);
#ifdef WITH_CUDA
void channel_affine_cuda_launch(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                                const at::Tensor& bias, double eps, const at::Tensor& invstd, const at::Tensor& scale,
                                const at::Tensor& shift);
void channel_bn_backward_cuda_launch(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                                     int64_t count, bool batch, const at::Tensor& a, const at::Tensor& b,
                                     const at::Tensor& d_gamma);
void bn_relu_out_cuda_launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                             const at::Tensor& out);
void bn_relu_backward_reduce_cuda_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                         const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& sum_dy,
                                         const at::Tensor& sum_dy_xmu);
void bn_backward_apply_cuda_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a,
                                   const at::Tensor& b, const at::Tensor& grad_x, bool accumulate);
#endif

// Fills the operand fields of p for each pass (shared by the CPU and CUDA launchers).
inline FusedBnParams make_forward_params(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                                         const at::Tensor& out) {
  FusedBnParams p = make_fused_bn_params(x, scale, shift);
  p.out = out.mutable_data_ptr();
  p.out_stride = strides_of(out);
  return p;
}

inline FusedBnParams make_reduce_params(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                        const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& sum_dy,
                                        const at::Tensor& sum_dy_xmu) {
  FusedBnParams p = make_fused_bn_params(x, scale, shift);
  p.grad_z = grad_z.const_data_ptr();
  p.grad_z_stride = strides_of(grad_z);
  p.mean = mean.const_data_ptr<float>();
  p.sum_dy = sum_dy.mutable_data_ptr<float>();
  p.sum_dy_xmu = sum_dy_xmu.mutable_data_ptr<float>();
  return p;
}

inline FusedBnParams make_apply_params(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                       const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a,
                                       const at::Tensor& b, const at::Tensor& grad_x, bool accumulate) {
  FusedBnParams p = make_fused_bn_params(x, scale, shift);
  p.grad_z = grad_z.const_data_ptr();
  p.grad_z_stride = strides_of(grad_z);
  p.out = grad_x.mutable_data_ptr();
  p.out_stride = strides_of(grad_x);
  p.mean = mean.const_data_ptr<float>();
  p.a = a.const_data_ptr<float>();
  p.b = b.const_data_ptr<float>();
  p.accumulate = accumulate;
  return p;
}

}  // namespace densenet_fast
