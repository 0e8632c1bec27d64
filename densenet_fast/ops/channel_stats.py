"""channel_stats: per-channel batch mean and biased variance, the dense block's statistics cache.

The op ``torch.ops.densenet_fast.channel_stats`` (csrc/ops.cpp, kernels in csrc/channel_stats*.
{cpp,cu}) reads a channel slice of a block buffer in place, whatever its strides, and computes
Welford / Chan statistics in fp32 (fp64 for fp64 data). This module is its Python face: the
dispatching function, the fake (meta) kernel for torch.compile, and the autograd formula.
Without the compiled extension, :func:`channel_stats` runs plain PyTorch instead
(:func:`channel_stats_torch`). The reference to test both against is
``densenet_fast.reference.channel_stats_ref``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import _ext

__all__ = ["channel_stats", "channel_stats_torch", "stats_dtype"]

OP_NAME = "densenet_fast::channel_stats"
# Input dtypes of the kernels (and of this module's checks, which repeat csrc/ops.cpp's).
STATS_INPUT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Device types with a compiled kernel, fixed at import so that torch.compile can trace the test.
_KERNEL_DEVICES = _ext.kernel_devices("channel_stats")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics of data in ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_input(x: Tensor) -> None:
    # The same messages and exception types as the CHECK macros of csrc/ops.cpp.
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims, got {x.dim()}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dtype not in STATS_INPUT_DTYPES:  # the float8 types are floating point too
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"x must have at least one element per channel, got shape {list(x.shape)}")


def channel_stats_torch(x: Tensor) -> Tuple[Tensor, Tensor]:
    """The plain-PyTorch path of :func:`channel_stats` (same shapes, dtypes and errors).

    fp16/bf16 data are upcast to fp32 first so that the statistics are fp32, as the kernels return
    them. Like the kernels, it reduces pivot-shifted data (each channel minus its first value, a
    constant for autograd): torch.var_mean is a Welford reduction, but on CUDA its fp32 deltas
    against a mean of 1000 lose digits of a spread near 1 (variance off by 1.4e-5 relative for
    bf16 data at mean 1000, where the kernels stay under 1e-6; H200, torch 2.11). Shifted, the
    values are of the spread's size, and 16-bit data shift exactly.
    """
    _check_input(x)
    data = x.to(stats_dtype(x.dtype))
    pivot = data[:1, :, :1, :1].detach()
    var, mean = torch.var_mean(data - pivot, dim=(0, 2, 3), correction=0)
    return mean + pivot.view(-1), var


def channel_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance.

    x: (N, C, H, W), any floating dtype, any strides: typically a channel slice F[:, a:b] of a
       dense block buffer, NCHW or channels_last, read in place (no copy).
    Returns (mean, var), each (C,), float32 (float64 for float64 x), with
       mean[c] = sum(x[:, c]) / M,   var[c] = sum((x[:, c] - mean[c]) ** 2) / M,   M = N * H * W
    (the biased variance that training-mode batch norm normalises with). Raises ValueError for a
    tensor that is not 4-D or has no value per channel, TypeError for a dtype other than float32,
    float64, float16 and bfloat16.
    Differentiable (gradients flow to x through both outputs).
    """
    if x.device.type in _KERNEL_DEVICES:
        # Checked here first, so that bad input through this function never depends on a C++
        # exception crossing the extension (one such throw killed the process on an H200
        # machine whose image compiles extensions with its own /opt/gcc; cause not established).
        _check_input(x)
        return torch.ops.densenet_fast.channel_stats(x)
    return channel_stats_torch(x)


if _ext.HAS_C:

    @torch.library.register_fake(OP_NAME)
    def _channel_stats_fake(x: Tensor) -> Tuple[Tensor, Tensor]:
        _check_input(x)
        shape, dtype = (x.shape[1],), stats_dtype(x.dtype)
        return x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)

    def _setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        mean, _ = output
        ctx.save_for_backward(x, mean)

    def _backward(ctx, grad_mean: Tensor, grad_var: Tensor) -> Tensor:
        # With M values per channel: d mean / d x = 1 / M and d var / d x = 2 (x - mean) / M
        # (the term through the mean vanishes because sum(x - mean) = 0).
        x, mean = ctx.saved_tensors
        shape = (1, -1, 1, 1)
        m = x.numel() // x.shape[1]
        grad = (x.to(mean.dtype) - mean.view(shape)) * (grad_var.view(shape) * (2.0 / m))
        grad = grad + grad_mean.view(shape) / m
        return grad.to(x.dtype)

    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
