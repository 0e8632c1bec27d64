// bn_relu on the CPU: the forward, backward-reduce and backward-apply passes of bn_relu.h.
//
// The work is cut into image rows (n, h). Within a row the loop order follows x's layout:
// pixels outer and channels inner for channels_last slices, channels outer and pixels inner for
// NCHW slices, so that x is read in memory order; every other operand is addressed through its
// own strides, whatever they are.
//
// Reduce pass, deterministic whatever the thread count: the rows are cut into fixed blocks of
// about kValuesPerBlock values per channel, each block sums its values in fp32 into its own
// partial (blocks run in parallel), and the partials of a channel are added in a fixed pairwise
// tree. No running sum is ever longer than one block plus log2(blocks) additions.
#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>

#include "bn_relu.h"

namespace densenet_fast {
namespace {

// Values per parallel task: below this, threading costs more than it saves.
constexpr int64_t kMinValuesPerTask = 1 << 15;
// Values per channel summed serially by the reduce pass before partials are combined pairwise.
constexpr int64_t kValuesPerBlock = 256;

template <typename scalar_x, typename scalar_z, typename scalar_o>
struct Operands {
  const scalar_x* x;
  const scalar_z* grad_z;
  scalar_o* out;
};

// One pass over rows [row_begin, row_end) (row = n * H + h), all channels.
// Reduce: adds channel c's values into s_dy[c] and s_xmu[c].
template <FusedBnOp kOp, typename scalar_x, typename scalar_z, typename scalar_o>
void process_rows(const FusedBnParams& p, int64_t row_begin, int64_t row_end, float* s_dy, float* s_xmu) {
  const Operands<scalar_x, scalar_z, scalar_o> t{static_cast<const scalar_x*>(p.x),
                                                 static_cast<const scalar_z*>(p.grad_z),
                                                 static_cast<scalar_o*>(p.out)};
  const Strides4 &sx = p.x_stride, &sz = p.grad_z_stride, &so = p.out_stride;
  // One value: x at offset ox, grad_z at oz, out/grad_x at oo, channel c.
  const auto value = [&](int64_t c, int64_t ox, int64_t oz, int64_t oo) {
    const float x = static_cast<float>(t.x[ox]);
    const float y = bn_affine(x, p.scale[c], p.shift[c]);
    if constexpr (kOp == FusedBnOp::kForward) {
      t.out[oo] = static_cast<scalar_o>(relu_value(y));
    } else {
      const float dy = relu_grad(static_cast<float>(t.grad_z[oz]), y);
      if constexpr (kOp == FusedBnOp::kBackwardReduce) {
        s_dy[c] += dy;
        s_xmu[c] += dy * (x - p.mean[c]);
      } else {
        const float dx = bn_backward_dx(dy, x, p.scale[c], p.mean[c], p.a[c], p.b[c]);
        t.out[oo] = static_cast<scalar_o>(p.accumulate ? static_cast<float>(t.out[oo]) + dx : dx);
      }
    }
  };
  const bool channels_inner = x_channels_innermost(p);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / p.height, h = row % p.height;
    const int64_t bx = n * sx.n + h * sx.h, bz = n * sz.n + h * sz.h, bo = n * so.n + h * so.h;
    if (channels_inner) {
      for (int64_t w = 0; w < p.width; ++w) {
        for (int64_t c = 0; c < p.channels; ++c) {
          value(c, bx + w * sx.w + c * sx.c, bz + w * sz.w + c * sz.c, bo + w * so.w + c * so.c);
        }
      }
    } else {
      for (int64_t c = 0; c < p.channels; ++c) {
        for (int64_t w = 0; w < p.width; ++w) {
          value(c, bx + w * sx.w + c * sx.c, bz + w * sz.w + c * sz.c, bo + w * so.w + c * so.c);
        }
      }
    }
  }
}

template <FusedBnOp kOp, typename scalar_x, typename scalar_z, typename scalar_o>
void run_pass(const FusedBnParams& p) {
  const int64_t rows = p.batch * p.height;
  const int64_t values_per_row = std::max<int64_t>(1, p.width * p.channels);
  if constexpr (kOp != FusedBnOp::kBackwardReduce) {
    const int64_t grain = std::max<int64_t>(1, kMinValuesPerTask / values_per_row);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      process_rows<kOp, scalar_x, scalar_z, scalar_o>(p, begin, end, nullptr, nullptr);
    });
  } else {
    const int64_t rows_per_block = std::max<int64_t>(1, kValuesPerBlock / std::max<int64_t>(1, p.width));
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    const int64_t c = p.channels;
    std::vector<float> partial(static_cast<size_t>(2 * blocks * c), 0.f);  // [2][blocks][C]
    float* part_dy = partial.data();
    float* part_xmu = part_dy + blocks * c;
    const int64_t grain = std::max<int64_t>(1, kMinValuesPerTask / (rows_per_block * values_per_row));
    at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t row_begin = blk * rows_per_block;
        process_rows<kOp, scalar_x, scalar_z, scalar_o>(p, row_begin, std::min(rows, row_begin + rows_per_block),
                                                        part_dy + blk * c, part_xmu + blk * c);
      }
    });
    // Pairwise tree over the blocks, the same order for any thread count.
    for (int64_t step = 1; step < blocks; step *= 2) {
      for (int64_t blk = 0; blk + step < blocks; blk += 2 * step) {
        for (int64_t j = 0; j < c; ++j) {
          part_dy[blk * c + j] += part_dy[(blk + step) * c + j];
          part_xmu[blk * c + j] += part_xmu[(blk + step) * c + j];
        }
      }
    }
    std::copy(part_dy, part_dy + c, p.sum_dy);
    std::copy(part_xmu, part_xmu + c, p.sum_dy_xmu);
  }
}

// Instantiates only the dtype combinations a pass can see: grad_z is float32 or x's dtype (the
// forward pass has none), out/grad_x any of the three (the reduce pass has none).
template <FusedBnOp kOp>
void dispatch_pass(const FusedBnParams& p, at::ScalarType x_dtype, at::ScalarType z_dtype, at::ScalarType o_dtype,
                   const char* name) {
  if (p.channels == 0 || p.batch * p.height * p.width == 0) return;  // reduce: ops.cpp allocated zero sums
  dispatch_value_dtype(x_dtype, name, [&](auto x_tag) {
    using scalar_x = typename decltype(x_tag)::type;
    const auto with_out = [&](auto z_tag) {
      using scalar_z = typename decltype(z_tag)::type;
      if constexpr (kOp == FusedBnOp::kBackwardReduce) {
        run_pass<kOp, scalar_x, scalar_z, float>(p);
      } else {
        dispatch_value_dtype(o_dtype, name, [&](auto o_tag) {
          run_pass<kOp, scalar_x, scalar_z, typename decltype(o_tag)::type>(p);
        });
      }
    };
    if constexpr (kOp == FusedBnOp::kForward) {
      with_out(TypeTag<scalar_x>{});
    } else {
      dispatch_grad_z_dtype<scalar_x>(z_dtype, with_out);
    }
  });
}

}  // namespace

void bn_relu_out_cpu_launch(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift,
                            const at::Tensor& out) {
  dispatch_pass<FusedBnOp::kForward>(make_forward_params(x, scale, shift, out), x.scalar_type(), x.scalar_type(),
                                     out.scalar_type(), "bn_relu_out_cpu");
}

void bn_relu_backward_reduce_cpu_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                        const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& sum_dy,
                                        const at::Tensor& sum_dy_xmu) {
  dispatch_pass<FusedBnOp::kBackwardReduce>(make_reduce_params(grad_z, x, scale, shift, mean, sum_dy, sum_dy_xmu),
                                            x.scalar_type(), grad_z.scalar_type(), at::kFloat,
                                            "bn_relu_backward_reduce_cpu");
}

void bn_backward_apply_cpu_launch(const at::Tensor& grad_z, const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& grad_x, bool accumulate) {
  dispatch_pass<FusedBnOp::kBackwardApply>(make_apply_params(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate),
                                           x.scalar_type(), grad_z.scalar_type(), grad_x.scalar_type(),
                                           "bn_backward_apply_cpu");
}

void channel_affine_cpu_launch(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& weight,
                               const at::Tensor& bias, double eps, const at::Tensor& invstd, const at::Tensor& scale,
                               const at::Tensor& shift) {
  const float *m = mean.const_data_ptr<float>(), *v = var.const_data_ptr<float>();
  const float *w = weight.const_data_ptr<float>(), *b = bias.const_data_ptr<float>();
  float *is = invstd.mutable_data_ptr<float>(), *sc = scale.mutable_data_ptr<float>();
  float* sh = shift.mutable_data_ptr<float>();
  const float e = static_cast<float>(eps);
  for (int64_t c = 0; c < mean.numel(); ++c) channel_affine(m[c], v[c], w[c], b[c], e, is + c, sc + c, sh + c);
}

void channel_bn_backward_cpu_launch(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu, const at::Tensor& invstd,
                                    int64_t count, bool batch, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& d_gamma) {
  const float *dy = sum_dy.const_data_ptr<float>(), *dyx = sum_dy_xmu.const_data_ptr<float>();
  const float* is = invstd.const_data_ptr<float>();
  float *pa = a.mutable_data_ptr<float>(), *pb = b.mutable_data_ptr<float>(), *pg = d_gamma.mutable_data_ptr<float>();
  const float m = static_cast<float>(count);
  for (int64_t c = 0; c < sum_dy.numel(); ++c) channel_bn_backward(dy[c], dyx[c], is[c], m, batch, pa + c, pb + c, pg + c);
}

}  // namespace densenet_fast
