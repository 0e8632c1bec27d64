"""fused_bn: the elementwise and reduction passes of the "cuda" backend's fused batch norm.

Every norm of the memory-efficient block normalises with statistics it did not compute itself
(the block's statistics cache, or the running buffers in eval mode), so with
``scale = gamma * invstd`` and ``shift = beta - mean * scale`` a BN-ReLU is ``relu(x * scale + shift)``
and its backward is one reduction plus one elementwise pass (csrc/bn_relu.h has the math):

  bn_relu_out              out = relu(x * scale + shift)
  bn_relu_backward_reduce  dy = grad_z * [x * scale + shift > 0]
                           -> sum(dy), sum(dy * (x - mean)) over N, H, W
  bn_backward_apply        dx = scale * (dy - a - (x - mean) * b);  grad_x = dx, or += dx

Training-mode BN backward uses ``a = sum_dy / M`` and ``b = invstd**2 * sum_dy_xmu / M``
(M = N*H*W); eval mode ``a = b = 0``. The ReLU mask is recomputed from x, so the BN-ReLU output is
never kept. All three read and write channel slices of the block buffers in place, whatever their
layout, and compute in fp32.

This module is the Python face of the ops ``torch.ops.densenet_fast.{bn_relu_out,
bn_relu_backward_reduce, bn_backward_apply}`` (schemas and checks in csrc/ops.cpp, kernels in
csrc/bn_relu*.{cpp,cu}): the functions that call them and their fake (meta) kernels for
torch.compile. They have no plain-PyTorch fallback: callers (the "cuda" backend) need the compiled
extension, and the functions say how to build it when it is missing. No autograd formula is
registered: they ARE the pieces of a backward. The references to test them against are
``densenet_fast.reference.fused_bn_*_ref``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _ext

__all__ = ["bn_relu_out", "bn_relu_backward_reduce", "bn_backward_apply", "channel_affine", "channel_bn_backward",
           "VALUE_DTYPES"]

# Storage dtypes of the 4-D operands (grad_z: float32 or x's dtype); the math is fp32.
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require(name: str) -> None:
    _ext.require_extension(f"densenet_fast.ops.fused_bn.{name} (the fused batch norm of backend='cuda')")


def bn_relu_out(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """out = relu(x * scale + shift), computed in fp32, stored in out's dtype, in place.

    x:     (N, C, H, W) float32/float16/bfloat16, any strides: a channel prefix F[:, :C_l] of the
           block buffer, NCHW or channels_last.
    scale, shift: (C,) float32 contiguous: gamma * invstd and beta - mean * gamma * invstd.
    out:   (N, C, H, W), any of the three dtypes, any strides (a chunk of a reused scratch buffer);
           written, never read. May be x itself, but may not partially overlap it.
    Equivalent to ``out.copy_(densenet_fast.reference.fused_bn_relu_ref(x, scale, shift))``.
    """
    _require("bn_relu_out")
    torch.ops.densenet_fast.bn_relu_out(x, scale, shift, out)


def bn_relu_backward_reduce(grad_z: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                            mean: Tensor) -> Tuple[Tensor, Tensor]:
    """The reduction of a BN-ReLU backward, with the ReLU mask recomputed from x.

    grad_z: (N, C, H, W) float32 or x's dtype, any strides: the gradient of relu(y).
    x, scale, shift: as for :func:`bn_relu_out` (y = x * scale + shift).
    mean:   (C,) float32 contiguous: the batch mean that normalised x.
    Returns (sum_dy, sum_dy_xmu), each (C,) float32, with dy = grad_z * [y > 0]:
        sum_dy[c] = sum over (n, h, w) of dy,   sum_dy_xmu[c] = sum of dy * (x - mean[c]),
    accumulated in fp32 in a fixed blocked tree (deterministic; no atomics). In BN terms
    dbeta = sum_dy and dgamma = invstd * sum_dy_xmu. Zeros when N*H*W == 0.
    """
    _require("bn_relu_backward_reduce")
    return torch.ops.densenet_fast.bn_relu_backward_reduce(grad_z, x, scale, shift, mean)


def bn_backward_apply(grad_z: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, a: Tensor,
                      b: Tensor, grad_x: Tensor, accumulate: bool) -> None:
    """The elementwise pass of a BN-ReLU backward, written (or added) into grad_x in place.

    grad_z, x, scale, shift, mean: as for :func:`bn_relu_backward_reduce`.
    a, b:   (C,) float32 contiguous. Training mode: a = sum_dy / M, b = invstd**2 * sum_dy_xmu / M
            (M = N*H*W); eval mode: a = b = 0.
    grad_x: (N, C, H, W) float32/float16/bfloat16, any strides: typically G[:, :C_l] of the block's
            fp32 gradient buffer. With dy = grad_z * [x * scale + shift > 0],
                dx = scale * (dy - a - (x - mean) * b)
            (the training-mode BN gradient gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)
            when a, b are as above), computed in fp32; grad_x = dx, or grad_x += dx when accumulate
            (the dense block adds each layer's contribution to the shared prefix).
    """
    _require("bn_backward_apply")
    torch.ops.densenet_fast.bn_backward_apply(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate)


def channel_affine(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward's per-channel vectors in one launch: (invstd, scale, shift), with
    invstd = 1 / sqrt(var + eps), scale = weight * invstd, shift = bias - mean * scale (one
    rounding, fma).  Every operand (C,) float32 contiguous on one device."""
    _require("channel_affine")
    return torch.ops.densenet_fast.channel_affine(mean, var, weight, bias, eps)


def channel_bn_backward(sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, count: int, batch: bool
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """The coefficients of :func:`bn_backward_apply` and the weight gradient in one launch:
    (a, b, d_gamma) with a = sum_dy / count and b = invstd**2 * sum_dy_xmu / count for batch
    statistics (a = b = 0 for fixed ones) and d_gamma = sum_dy_xmu * invstd.  Operands (C,)
    float32 contiguous on one device; count = N*H*W > 0."""
    _require("channel_bn_backward")
    return torch.ops.densenet_fast.channel_bn_backward(sum_dy, sum_dy_xmu, invstd, count, batch)


def _check_shapes(x: Tensor, per_channel: dict, same_shape: dict) -> None:
    # The shape checks of csrc/ops.cpp, with the same messages, for the fake kernels.
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims, got {x.dim()}")
    for name, v in per_channel.items():
        if v.dim() != 1 or v.shape[0] != x.shape[1]:
            raise ValueError(f"{name} must have shape (C,) = ({x.shape[1]},) for x of shape {list(x.shape)}, "
                             f"got {list(v.shape)}")
    for name, t in same_shape.items():
        if t.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x {list(x.shape)}, got {list(t.shape)}")


if _ext.HAS_C:

    @torch.library.register_fake("densenet_fast::bn_relu_out")
    def _bn_relu_out_fake(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
        _check_shapes(x, {"scale": scale, "shift": shift}, {"out": out})
        return None

    @torch.library.register_fake("densenet_fast::bn_relu_backward_reduce")
    def _bn_relu_backward_reduce_fake(grad_z: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                                      mean: Tensor) -> Tuple[Tensor, Tensor]:
        _check_shapes(x, {"scale": scale, "shift": shift, "mean": mean}, {"grad_z": grad_z})
        shape = (x.shape[1],)
        return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)

    @torch.library.register_fake("densenet_fast::bn_backward_apply")
    def _bn_backward_apply_fake(grad_z: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor, a: Tensor,
                                b: Tensor, grad_x: Tensor, accumulate: bool) -> None:
        _check_shapes(x, {"scale": scale, "shift": shift, "mean": mean, "a": a, "b": b},
                      {"grad_z": grad_z, "grad_x": grad_x})
        return None

    def _channel_vectors_fake(first: str, vectors: dict) -> Tuple[Tensor, Tensor, Tensor]:
        ref = vectors[first]
        if ref.dim() != 1:
            raise ValueError(f"{first} must have 1 dims, got {ref.dim()}")
        for name, v in vectors.items():
            if v.dim() != 1 or v.shape[0] != ref.shape[0]:
                raise ValueError(f"{name} must have shape (C,) = ({ref.shape[0]},) like {first}, got {list(v.shape)}")
        return tuple(torch.empty_like(ref, dtype=torch.float32) for _ in range(3))

    @torch.library.register_fake("densenet_fast::channel_affine")
    def _channel_affine_fake(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float
                             ) -> Tuple[Tensor, Tensor, Tensor]:
        return _channel_vectors_fake("mean", {"mean": mean, "var": var, "weight": weight, "bias": bias})

    @torch.library.register_fake("densenet_fast::channel_bn_backward")
    def _channel_bn_backward_fake(sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, count: int, batch: bool
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
        if count <= 0:
            raise ValueError(f"count must be positive (values per channel), got {count}")
        return _channel_vectors_fake("sum_dy", {"sum_dy": sum_dy, "sum_dy_xmu": sum_dy_xmu, "invstd": invstd})
