"""The "cuda" backend: the block's per-layer primitives with the compiled extension's kernels
(csrc/) for every batch-norm pass and cuBLAS/cuDNN (through ATen) for the GEMMs and the 3x3 conv.

Per layer, with scale = gamma * invstd and shift = beta - mean * scale computed once (tiny):
  bottleneck             bn_relu_out of each input-channel chunk of F[:, :C_l] into ONE reused
                         scratch chunk (one pass: read x, write z), then the chunk's 1x1-conv GEMM
                         accumulated into Bt (cuBLAS, beta = 1); norm2's statistics with the
                         extension's channel_stats
  layer_output           bn_relu_out of Bt, cuDNN conv3x3, written into F[:, C_l:C_l+k]
  layer_output_backward  cuDNN dgrad/wgrad, then bn_relu_backward_reduce (the ReLU mask
                         recomputed from Bt: no mask or BN-ReLU output kept) and bn_backward_apply
  bottleneck_backward    per chunk: bn_relu_out (z rebuilt into the scratch), the 1x1 GEMMs,
                         bn_relu_backward_reduce, and bn_backward_apply accumulating straight into
                         G[:, :C_l] (accumulate=True): no chunk-sized dX is ever formed
  transition, head, stem ops.transition's chunked Function with bn_relu_chunk(_backward) on the
                         same three kernels; the pooling and the 1x1 GEMM (on the pooled rows) are ATen's
Against the torch backend this removes the separate ReLU, threshold_backward and add passes, and
the allocations of per-chunk transients.

Float64 data (the kernels read fp32/fp16/bf16) and synchronized batch norm run the plain-PyTorch
primitives of the base class.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .bn_relu import bn_affine
from .conv1x1 import conv1x1, conv1x1_backward
from .dense_block import FusedBlockKernels

__all__ = ["CudaBlockKernels"]

aten = torch.ops.aten


def _ops():
    return torch.ops.densenet_fast


def _scratch_like(x: Tensor, channels: int) -> Tensor:
    n, _, h, w = x.shape
    channels_last = x.stride(1) == 1 and x.shape[1] > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _bn_backward(grad_z: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                 batch: bool, count: int, grad_x: Tensor, accumulate: bool) -> Tuple[Tensor, Tensor]:
    """grad_x (+)= the BN-ReLU backward of grad_z; returns (d_gamma, d_beta) in float32.

    Training-mode BN (batch statistics of x itself): a = sum(dy) / M, b = invstd^2 sum(dy (x - mean)) / M;
    fixed statistics: a = b = 0.  d_gamma = invstd * sum(dy (x - mean)), d_beta = sum(dy).
    """
    sum_dy, sum_dy_xmu = _ops().bn_relu_backward_reduce(grad_z, x, scale, shift, mean)
    if batch:
        a = sum_dy / count
        b = invstd * invstd * sum_dy_xmu / count
    else:
        a = b = torch.zeros_like(sum_dy)
    _ops().bn_backward_apply(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate)
    return sum_dy_xmu * invstd, sum_dy


class CudaBlockKernels(FusedBlockKernels):
    """BlockKernels on the extension's kernels (the statistics and every BN pass) and ATen GEMMs."""

    def __init__(self, group=None) -> None:
        from .channel_stats import channel_stats
        # The ops have CPU kernels too: tests run this class on the CPU (backend "cuda" itself
        # refuses CPU inputs in backends.resolve_backend).
        super().__init__(name="cuda", stats=channel_stats, group=group)

    def bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats):
        if not self._fused(fbuf):
            return super().bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats)
        _, _, scale, shift = bn_affine(stats1, g1, b1, eps)
        scratch = _scratch_like(fbuf, min(step, cl))
        bt: Optional[Tensor] = None
        for a in range(0, cl, step):
            e = min(cl, a + step)
            z = scratch[:, : e - a]
            _ops().bn_relu_out(fbuf[:, a:e], scale[a:e], shift[a:e], z)
            bt = conv1x1(z, w1[:, a:e], out=bt, accumulate=bt is not None)
        return bt, (self.channel_stats(bt) if want_stats else None)

    def layer_output(self, bt, stats2, g2, b2, eps, w2, dst):
        if not self._fused(bt):
            return super().layer_output(bt, stats2, g2, b2, eps, w2, dst)
        _, _, scale, shift = bn_affine(stats2, g2, b2, eps)
        z2 = torch.empty_like(bt)
        _ops().bn_relu_out(bt, scale, shift, z2)
        dst.copy_(F.conv2d(z2, w2, padding=1))
        return None

    def layer_output_backward(self, d_out, bt, stats2, g2, b2, eps, w2):
        if not self._fused(bt):
            return super().layer_output_backward(d_out, bt, stats2, g2, b2, eps, w2)
        mean, invstd, scale, shift = bn_affine(stats2, g2, b2, eps)
        z2 = torch.empty_like(bt)
        _ops().bn_relu_out(bt, scale, shift, z2)
        d_z2, d_w2, _ = aten.convolution_backward(d_out.to(bt.dtype), z2, w2, None, [1, 1], [1, 1], [1, 1], False,
                                                  [0, 0], 1, [True, True, False])
        del z2
        d_bt = torch.empty_like(bt)
        count = bt.shape[0] * bt.shape[2] * bt.shape[3]
        d_g2, d_b2 = _bn_backward(d_z2, bt, mean, invstd, scale, shift, stats2.batch, count, d_bt, False)
        return d_bt, d_g2.to(g2.dtype), d_b2.to(b2.dtype), d_w2

    def bottleneck_backward(self, d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc):
        if not self._fused(fbuf):
            return super().bottleneck_backward(d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc)
        mean, invstd, scale, shift = bn_affine(stats1, g1, b1, eps)
        count = fbuf.shape[0] * fbuf.shape[2] * fbuf.shape[3]
        scratch = _scratch_like(fbuf, min(step, cl))
        parts = []  # (d_w1, d_g1, d_b1) of each chunk: one chunk needs no copy, several one cat each
        for a in range(0, cl, step):
            e = min(cl, a + step)
            xc = fbuf[:, a:e]
            z = scratch[:, : e - a]
            _ops().bn_relu_out(xc, scale[a:e], shift[a:e], z)
            d_z, d_wc = conv1x1_backward(d_bt, z, w1[:, a:e])
            d_gc, d_bc = _bn_backward(d_z, xc, mean[a:e], invstd[a:e], scale[a:e], shift[a:e], stats1.batch, count,
                                      grad_acc[:, a:e], True)
            parts.append((d_wc, d_gc, d_bc))
            del d_z
        d_w1, d_g1, d_b1 = parts[0] if len(parts) == 1 else [torch.cat(p, dim=i) for p, i in zip(zip(*parts), (1, 0, 0))]
        return d_w1, d_g1.to(g1.dtype), d_b1.to(b1.dtype)

    def bn_relu_chunk(self, x, stats, weight, bias, eps):
        if not self._fused(x):
            return super().bn_relu_chunk(x, stats, weight, bias, eps)
        _, _, scale, shift = bn_affine(stats, weight, bias, eps)
        z = _scratch_like(x, x.shape[1])
        _ops().bn_relu_out(x, scale, shift, z)
        return z

    def bn_relu_chunk_backward(self, grad_z, x, z, stats, weight, bias, eps, grad_x):
        if not self._fused(x):
            return super().bn_relu_chunk_backward(grad_z, x, z, stats, weight, bias, eps, grad_x)
        mean, invstd, scale, shift = bn_affine(stats, weight, bias, eps)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        d_w, d_b = _bn_backward(grad_z, x, mean, invstd, scale, shift, stats.batch, count, grad_x, False)
        return d_w.to(weight.dtype), d_b.to(bias.dtype)
