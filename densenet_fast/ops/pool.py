"""Dropout then 2x2 max pooling (FC-DenseNet's transition down) saving one byte per output.

max_pool2d(dropout(h, p), 2) through ATen keeps, for backward, the pool's input (h's size), the
int64 argmax of every output and the dropout mask (h's size again): two and a half times h.
Here backward gets the argmax's place in its 2x2 window (one uint8 per output, 1/16 of h in
float32) and the dropout seed, from which it draws the mask again (dense_block.dropout_mask).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dense_block import draw_seed, buffer_memory_format, dropout_mask

__all__ = ["dropout_max_pool2d"]


class DropoutMaxPool2dFunction(torch.autograd.Function):
    """apply(h, p, seed) -> max_pool2d(h * mask, 2, 2); seed None: no dropout."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, p: float, seed: Optional[int]) -> Tensor:
        z = h if seed is None else h * dropout_mask(seed, h, p)
        y, index = F.max_pool2d(z, 2, 2, return_indices=True)
        del z
        width = h.shape[3]
        # index is flat over each (H, W) plane; row % 2 and column % 2 place it in its window.
        where = ((index // width) % 2 * 2 + index % width % 2).to(torch.uint8)
        ctx.save_for_backward(where)
        ctx.p, ctx.seed, ctx.shape = p, seed, tuple(h.shape)
        ctx.memory_format = buffer_memory_format(h)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tuple[Optional[Tensor], None, None]:
        (where,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        ho, wo = grad_y.shape[2], grad_y.shape[3]
        slots = torch.arange(4, device=where.device, dtype=torch.uint8)
        # (N, C, Ho, Wo, 4): the gradient in its window slot, zero elsewhere -> (N, C, 2Ho, 2Wo)
        spread = grad_y.unsqueeze(-1) * (where.unsqueeze(-1) == slots).to(grad_y.dtype)
        spread = spread.view(n, c, ho, wo, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)
        if (2 * ho, 2 * wo) == (h, w):
            grad_h = spread.contiguous(memory_format=ctx.memory_format)
        else:  # odd sizes: the last row / column fed no window
            grad_h = torch.empty(ctx.shape, dtype=grad_y.dtype, device=grad_y.device, memory_format=ctx.memory_format)
            grad_h[:, :, 2 * ho:].zero_()
            grad_h[:, :, :, 2 * wo:].zero_()
            grad_h[:, :, :2 * ho, :2 * wo] = spread
        del spread
        if ctx.seed is not None:
            grad_h.mul_(dropout_mask(ctx.seed, grad_h, ctx.p))
        return grad_h, None, None


def dropout_max_pool2d(h: Tensor, p: float, training: bool) -> Tensor:
    """max_pool2d(F.dropout(h, p, training), 2, 2) for h (N, C, H, W) -> (N, C, H // 2, W // 2),
    keeping one uint8 per output for backward instead of h, the mask and int64 indices.  The
    dropout mask is drawn from densenet_fast's own seeded generator (as the dense layers' are), so
    it differs from F.dropout's draw; under torch.compile this is the plain ATen composition."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_max_pool2d: p must be in [0, 1), got {p}")
    if h.shape[2] < 2 or h.shape[3] < 2:
        raise ValueError(f"dropout_max_pool2d: input h must be at least 2x2, got shape {tuple(h.shape)}")
    if torch.compiler.is_compiling():
        return F.max_pool2d(F.dropout(h, p, training), 2, 2)
    seed = draw_seed() if training and p > 0 else None
    if not (torch.is_grad_enabled() and h.requires_grad):
        return F.max_pool2d(h if seed is None else h * dropout_mask(seed, h, p), 2, 2)
    return DropoutMaxPool2dFunction.apply(h, p, seed)
