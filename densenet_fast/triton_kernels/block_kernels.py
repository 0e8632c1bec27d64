"""The "triton" backend: the block's per-layer primitives (ops.dense_block.BlockKernels) as fused
Triton kernels.

  bottleneck             bn_relu_conv1x1_triton: BN-ReLU applied as the GEMM's A operand is read
                         from the buffer prefix (never stored), norm2's statistics in the epilogue
  layer_output           bn_relu_conv3x3_triton: implicit GEMM, zero padding after BN-ReLU, the
                         k new channels written straight into F[:, C_l:C_l+k] with their statistics
                         (the statistics cache's entries) from the epilogue
  layer_output_backward  bn_relu_conv3x3_backward_triton: dgrad with the ReLU mask and the BN sums
                         fused, one BN elementwise pass, wgrad with the prologue recomputed
  bottleneck_backward    bn_relu_conv1x1_backward_triton: two passes that never store dZ1, the
                         second accumulating dX1 into G[:, :C_l]
  transition             bn_relu_pool_conv1x1(_backward)_triton: pooling before the 1x1 conv
  channel_stats          channel_stats_triton (x0 and anything the kernels did not cover)

What the kernels do not cover runs the plain-PyTorch primitive of the base class: float64 data
(Triton's dots are fp32/fp16/bf16), synchronized batch norm (its statistics and backward sums are
all-reduced on the host side), and dropout (the block masks the layer's output after the kernel and
takes the statistics with channel_stats).

In eager mode the launchers are called directly (a torch.library custom op costs a Python dispatch
per call, and a DenseNet step is thousands of calls); while torch.compile traces, the same kernels
are called through their custom ops (densenet_fast::triton_*), which carry fake implementations.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ..ops.bn_relu import NormStats, batch_stats, bn_affine
from ..ops.dense_block import KERNEL_DTYPES, Destination, FusedBlockKernels, GradHandoff, untracked_alias
from .bn_relu_conv1x1 import bn_relu_conv1x1_triton
from .channel_stats import channel_stats_triton
from .conv1x1_backward import bn_relu_conv1x1_backward_triton
from .conv3x3 import bn_relu_conv3x3_backward_triton, bn_relu_conv3x3_triton
from .transition import bn_relu_pool_conv1x1_backward_triton, bn_relu_pool_conv1x1_triton

__all__ = ["TritonBlockKernels", "KERNEL_DTYPES"]


def _ops():
    return torch.ops.densenet_fast


def _compiling() -> bool:
    return torch.compiler.is_compiling()


@functools.lru_cache(maxsize=None)
def _affine_kernel(device_type: str) -> Optional[Callable[..., Any]]:
    """bn_affine's one-launch (invstd, scale, shift): the extension's densenet_fast::channel_affine
    where it has a kernel for the device, else None (four tiny ATen ops).  The per-channel vectors
    are computed twice per layer (norm1, norm2), so the op saves six launches per layer."""
    from .. import _ext
    if device_type not in _ext.kernel_devices("channel_affine"):
        return None
    from ..ops.cuda_block import _channel_affine
    return _channel_affine


def _affine(stats: NormStats, weight: Tensor, bias: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """bn_affine with the one-launch kernel in eager mode; while torch.compile traces, the four
    ATen ops (inductor fuses them, and dynamo does not trace the dispatcher query)."""
    kernel = None if _compiling() else _affine_kernel(stats.mean.device.type)
    return bn_affine(stats, weight, bias, eps, kernel=kernel)


def stats_triton_or_torch(x: Tensor) -> Tuple[Tensor, Tensor]:
    """channel_stats_triton for the dtypes it reads, the plain-PyTorch statistics otherwise."""
    if x.dtype not in KERNEL_DTYPES:
        return batch_stats(x)
    if _compiling():
        return _ops().triton_channel_stats(x)
    return channel_stats_triton(x)


class TritonBlockKernels(FusedBlockKernels):
    """BlockKernels whose four per-layer primitives and transition are Triton kernels."""

    def __init__(self, group=None) -> None:
        super().__init__(name="triton", stats=stats_triton_or_torch, group=group)

    def bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats):
        if not self._fused(fbuf):
            return super().bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats)
        _, _, scale, shift = _affine(stats1, g1, b1, eps)
        x = fbuf[:, :cl]
        if _compiling():
            bt, mean, var = _ops().triton_bn_relu_conv1x1(x, scale, shift, w1)
        else:  # the backward's recompute (want_stats False) skips the statistics epilogue
            bt, mean, var = bn_relu_conv1x1_triton(x, scale, shift, w1, stats=want_stats)
        return bt, ((mean, var) if want_stats else None)

    def layer_output(self, bt, stats2, g2, b2, eps, w2, dst, stats_out=None):
        if not self._fused(bt):
            return super().layer_output(bt, stats2, g2, b2, eps, w2, dst, stats_out)
        _, _, scale, shift = _affine(stats2, g2, b2, eps)
        if _compiling():
            mean, var = _ops().triton_bn_relu_conv3x3_out(bt, scale, shift, w2, dst)
        else:  # the statistics merged straight into the block's cache (stats_out), no copy
            _, mean, var = bn_relu_conv3x3_triton(bt, scale, shift, w2, out=dst, stats_out=stats_out)
        return mean, var

    def layer_output_backward(self, d_out, bt, stats2, g2, b2, eps, w2):
        if not self._fused(bt):
            return super().layer_output_backward(d_out, bt, stats2, g2, b2, eps, w2)
        mean, invstd, scale, shift = _affine(stats2, g2, b2, eps)  # the forward's, kept on stats2
        args = (d_out, bt, w2, mean, invstd, g2.float(), b2.float(), stats2.batch)
        if _compiling():
            d_bt, d_g2, d_b2, d_w2 = _ops().triton_bn_relu_conv3x3_backward(*args)
        else:
            d_bt, d_g2, d_b2, d_w2 = bn_relu_conv3x3_backward_triton(*args, scale=scale, shift=shift)
        return d_bt, d_g2.to(g2.dtype), d_b2.to(b2.dtype), d_w2

    def bottleneck_backward(self, d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1=None):
        if not self._fused(fbuf) or grad_acc.dtype != torch.float32:
            return super().bottleneck_backward(d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1)
        mean, invstd, scale, shift = _affine(stats1, g1, b1, eps)  # the forward's, kept on stats1
        args = (d_bt, fbuf[:, :cl], w1, mean, invstd, g1.float(), b1.float(), stats1.batch, grad_acc)
        if _compiling():
            d_g1, d_b1, d_w1 = _ops().triton_bn_relu_conv1x1_backward(*args)
        else:
            d_g1, d_b1, d_w1 = bn_relu_conv1x1_backward_triton(*args, scale=scale, shift=shift)
        return d_w1, d_g1.to(g1.dtype), d_b1.to(b1.dtype)

    def pool_conv(self, fbuf: Tensor, stats: NormStats, weight: Tensor, bias: Tensor, eps: float,
                  conv_weight: Optional[Tensor], pool: str, out: Optional[Destination] = None,
                  handoff: Optional[GradHandoff] = None) -> Optional[Tensor]:
        """The transition (pool 'avg2' with a conv) as Triton kernels, or None for the base path."""
        if pool != "avg2" or conv_weight is None or not self._fused(fbuf) or min(fbuf.shape[2:]) < 2:
            return None
        return TritonTransitionFunction.apply(fbuf, stats, weight, bias, conv_weight, eps, out, handoff)


class TritonTransitionFunction(torch.autograd.Function):
    """apply(fbuf, stats, weight, bias, conv_weight, eps, out|None, handoff|None) ->
    conv1x1(avgpool2x2(relu(bn(fbuf)))), written into out's tensor (the next block's buffer prefix)
    when given; backward offers its gradient of fbuf to the block's backward through handoff."""

    @staticmethod
    def forward(ctx, fbuf, stats, weight, bias, conv_weight, eps, out=None, handoff=None):
        _, _, scale, shift = _affine(stats, weight, bias, eps)
        if _compiling():
            res = _ops().triton_bn_relu_pool_conv1x1(fbuf, scale, shift, conv_weight)
            out = res if out is None else untracked_alias(out.tensor.copy_(res))
        elif out is None:
            out = bn_relu_pool_conv1x1_triton(fbuf, scale, shift, conv_weight)
        else:
            out = untracked_alias(bn_relu_pool_conv1x1_triton(fbuf, scale, shift, conv_weight, out=out.tensor))
        ctx.stats, ctx.eps = stats, eps
        ctx.handoff = None if _compiling() else handoff
        ctx.save_for_backward(fbuf, weight, bias, conv_weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("densenet_fast: double backward through the fused transition is not supported")
        fbuf, weight, bias, conv_weight = ctx.saved_tensors
        stats = ctx.stats
        mean, invstd, scale, shift = _affine(stats, weight, bias, ctx.eps)  # the forward's, kept on stats
        args = (grad_out, fbuf, conv_weight, mean, invstd, weight.float(), bias.float(), stats.batch)
        if _compiling():
            gx, gg, gb, gw = _ops().triton_bn_relu_pool_conv1x1_backward(*args)
        else:
            gx, gg, gb, gw = bn_relu_pool_conv1x1_backward_triton(*args, scale=scale, shift=shift)
        if ctx.handoff is not None:
            ctx.handoff.offer(gx, fbuf)
        return gx, None, gg.to(weight.dtype), gb.to(bias.dtype), gw, None, None, None
