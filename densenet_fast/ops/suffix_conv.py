"""A convolution of a block buffer's channel suffix whose backward hands the gradient of the whole
buffer to the block (GradHandoff).

FC-DenseNet's classifier reads its last block's whole buffer F, and each transition up reads the
new channels of the block below it, F[:, C0:].  Through nn.Conv2d (and a slice) autograd gives
the block a gradient of F's size, which the block's backward copies into its own gradient buffer
G: two buffer-sized tensors at once, at full resolution the step's peak.  This Function computes
the same convolution, and its backward writes the gradient of F into one F-sized tensor (zeros in
the channels before the suffix, as the slice's backward would) and offers that tensor to the
block, which adopts it as G (dense_block.GradHandoff: adopted only when autograd hands the block
that very tensor, in G's dtype).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .amp import autocast_dtype
from .dense_block import GradHandoff

__all__ = ["suffix_conv"]

aten = torch.ops.aten


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool, stride: Tuple[int, int]) -> Tensor:
    # F.conv2d / F.conv_transpose2d, as the modules call them (autocast casts these).
    return F.conv_transpose2d(x, weight, bias, stride) if transposed else F.conv2d(x, weight, bias, stride)


class SuffixConvFunction(torch.autograd.Function):
    """apply(fbuf, start, weight, bias|None, transposed, stride, handoff) ->
    convolution(fbuf[:, start:], weight, bias) without padding or dilation."""

    @staticmethod
    def forward(ctx: Any, fbuf: Tensor, start: int, weight: Tensor, bias: Optional[Tensor], transposed: bool,
                stride: Tuple[int, int], handoff: GradHandoff) -> Tensor:
        ctx.start, ctx.transposed, ctx.stride, ctx.handoff = start, transposed, stride, handoff
        ctx.has_bias = bias is not None
        ctx.save_for_backward(fbuf, weight)
        return _conv(fbuf[:, start:], weight, bias, transposed, stride)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], ...]:
        fbuf, weight = ctx.saved_tensors
        start = ctx.start
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]]
        grad_x, grad_w, grad_b = aten.convolution_backward(
            grad_y, fbuf[:, start:], weight, [weight.shape[1 if ctx.transposed else 0]] if ctx.has_bias else None,
            ctx.stride, [0, 0], [1, 1], ctx.transposed, [0, 0], 1, mask)
        grad_f = grad_x
        if grad_x is not None:
            if start > 0 or grad_x.stride() != fbuf.stride():
                # The slice's gradient as one tensor laid out as F: zeros before the suffix.
                grad_f = torch.empty_like(fbuf)
                grad_f[:, :start].zero_()
                grad_f[:, start:].copy_(grad_x)
                del grad_x
            ctx.handoff.offer(grad_f, fbuf)
        return grad_f, None, grad_w, grad_b, None, None, None


def suffix_conv(fbuf: Tensor, start: int, weight: Tensor, bias: Optional[Tensor], handoff: Optional[GradHandoff],
                *, transposed: bool = False, stride: Sequence[int] = (1, 1)) -> Tensor:
    """convolution(fbuf[:, start:], weight, bias, stride) with no padding (transposed: a
    transposed convolution), as nn.Conv2d / nn.ConvTranspose2d with padding 0 compute it.

    handoff: the GradHandoff given to the dense block that produced fbuf, when this convolution is
    fbuf's only consumer: its backward then offers the gradient of fbuf to the block's backward.
    Used where that gradient can be adopted (float32/float64 data, autograd on, no autocast, not
    under torch.compile); anywhere else, and with handoff None, it is the plain convolution.
    """
    stride = (int(stride[0]), int(stride[1]))
    usable = (handoff is not None and torch.is_grad_enabled() and fbuf.requires_grad
              and fbuf.dtype in (torch.float32, torch.float64) and weight.dtype == fbuf.dtype
              and autocast_dtype(fbuf.device.type) is None and not torch.compiler.is_compiling())
    if not usable:
        return _conv(fbuf[:, start:], weight, bias, transposed, stride)
    return SuffixConvFunction.apply(fbuf, start, weight, bias, transposed, stride, handoff)
