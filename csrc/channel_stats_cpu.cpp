// channel_stats on the CPU: at::parallel_for over channel ranges, Welford along each image row,
// rows merged into the channel's total with Chan's formula (channel_stats.h).
//
// Merging per row keeps every Welford run short (W values), so the running mean never drifts
// far from the values it is updated with, and the merge tree is as deep as the number of rows.
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "channel_stats.h"

namespace densenet_fast {
namespace {

// Values per parallel task: below this, threading costs more than it saves.
constexpr int64_t kMinValuesPerTask = 1 << 15;

template <typename scalar_t>
void channel_stats_range(const ChannelStatsParams& p, int64_t c_begin, int64_t c_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const int64_t nc = c_end - c_begin;
  const Welford<acc_t> empty{acc_t(0), acc_t(0), 0};
  std::vector<Welford<acc_t>> total(nc, empty);
  std::vector<acc_t> pivot(nc);  // each channel's first value (channel_stats.h)
  for (int64_t c = 0; c < nc; ++c) pivot[c] = static_cast<acc_t>(x[(c_begin + c) * p.stride_c]);

  // channels_last slices: visit each pixel of a row once and update every channel of the range
  // from it; planar slices: walk one channel's rows in order.
  if (channels_innermost(p)) {
    std::vector<Welford<acc_t>> row(nc);
    for (int64_t n = 0; n < p.batch; ++n) {
      for (int64_t h = 0; h < p.height; ++h) {
        const scalar_t* x_row = x + n * p.stride_n + h * p.stride_h + c_begin * p.stride_c;
        std::fill(row.begin(), row.end(), empty);
        for (int64_t w = 0; w < p.width; ++w) {
          const scalar_t* px = x_row + w * p.stride_w;
          for (int64_t c = 0; c < nc; ++c) {
            welford_push(row[c], static_cast<acc_t>(px[c * p.stride_c]) - pivot[c]);
          }
        }
        for (int64_t c = 0; c < nc; ++c) total[c] = welford_merge(total[c], row[c]);
      }
    }
  } else {
    for (int64_t c = 0; c < nc; ++c) {
      const scalar_t* x_c = x + (c_begin + c) * p.stride_c;
      const acc_t pivot_c = pivot[c];
      for (int64_t n = 0; n < p.batch; ++n) {
        for (int64_t h = 0; h < p.height; ++h) {
          const scalar_t* x_row = x_c + n * p.stride_n + h * p.stride_h;
          Welford<acc_t> row = empty;
          for (int64_t w = 0; w < p.width; ++w) {
            welford_push(row, static_cast<acc_t>(x_row[w * p.stride_w]) - pivot_c);
          }
          total[c] = welford_merge(total[c], row);
        }
      }
    }
  }

  acc_t* mean = static_cast<acc_t*>(p.mean);
  acc_t* var = static_cast<acc_t*>(p.var);
  for (int64_t c = 0; c < nc; ++c) {
    mean[c_begin + c] = pivot[c] + total[c].mean;
    var[c_begin + c] = total[c].m2 / static_cast<acc_t>(total[c].count);
  }
}

}  // namespace

void channel_stats_cpu_launch(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  const ChannelStatsParams p = make_channel_stats_params(x, mean, var);
  const int64_t values_per_channel = p.batch * p.height * p.width;
  const int64_t grain = std::max<int64_t>(1, kMinValuesPerTask / values_per_channel);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu", [&] {
    at::parallel_for(0, p.channels, grain, [&](int64_t begin, int64_t end) {
      channel_stats_range<scalar_t>(p, begin, end);
    });
  });
}

}  // namespace densenet_fast
