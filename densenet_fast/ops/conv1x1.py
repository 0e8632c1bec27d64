"""1x1 convolution as a plain GEMM over the M = N*H*W rows (the "torch" backend's kernel).

A 1x1 conv is out[m, o] = sum_c z[m, c] * w[o, c].  Written as a GEMM on strided views it reads
channel slices of a block buffer in place (no copy), accumulates over input-channel chunks with
beta = 1 (so relu(bn(F)) never has to exist for the whole prefix at once), and on CPUs it runs
several times faster than the general convolution path for these shapes.

Layouts: NCHW data is a batch of (C, H*W) matrices; channels_last data is one (M, C) matrix whose
row stride is the buffer's full channel count.  Anything else falls back to ATen's convolution.

Precision: float32 GEMMs on a GPU use TF32 exactly when cuDNN's convolutions may (what the
nn.Conv2d they replace would do; ops.precision).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .precision import with_conv_precision

aten = torch.ops.aten


def _rows(x: Tensor) -> Optional[Tensor]:
    """(N, C, H, W) stored NHWC (a channel slice of an NHWC buffer is fine) -> (M, C) view, else None."""
    n, c, h, w = x.shape
    s_n, s_c, s_h, s_w = x.stride()
    if c > 1 and s_c != 1:
        return None
    rs = s_w if w > 1 else (s_h if h > 1 else (s_n if n > 1 else c))
    if rs < c or (h > 1 and s_h != rs * w) or (n > 1 and s_n != rs * h * w):
        return None
    # A view op, not as_strided: torch.compile's inductor may give an intermediate another layout
    # than the one traced, which as_strided (fixed strides) would then misread. flatten rather than
    # view(n * h * w, c): with dynamic shapes Dynamo spelled a merged size like h * w through a
    # stride symbol of another tensor, which inductor's layout then changed ("shape '[s77, 7, 1]' is
    # invalid for input of size 448*s77" compiling a backward); flatten takes the sizes it gets.
    return x.permute(0, 2, 3, 1).flatten(0, 2)


def _planes(x: Tensor) -> Optional[Tensor]:
    """(N, C, H, W) stored NCHW (a channel slice of an NCHW buffer is fine) -> (N, C, H*W) view, else None."""
    n, c, h, w = x.shape
    s_n, s_c, s_h, s_w = x.stride()
    if (w > 1 and s_w != 1) or (h > 1 and s_h != w):
        return None
    return x.flatten(2)  # a view op, not as_strided: see _rows


def conv1x1(z: Tensor, weight: Tensor, out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """out (+)= conv1x1(z, weight).

    z: (N, C, H, W), NCHW or channels_last, possibly a channel slice of a wider buffer.
    weight: (O, C, 1, 1) (may itself be an input-channel slice).  out: (N, O, H, W), allocated in
    z's layout when None; with accumulate=True the product is added to `out` (GEMM beta = 1).
    """
    return with_conv_precision(z, _conv1x1, z, weight, out, accumulate)


def _conv1x1(z: Tensor, weight: Tensor, out: Optional[Tensor], accumulate: bool) -> Tensor:
    n, c, h, w = z.shape
    o = weight.shape[0]
    w2 = weight.reshape(o, c)
    z_rows = _rows(z)
    if z_rows is not None and (out is None or _rows(out) is not None):
        if out is None:
            out = torch.empty((n, o, h, w), dtype=z.dtype, device=z.device, memory_format=torch.channels_last)
        out_rows = _rows(out)
        if accumulate:
            out_rows.addmm_(z_rows, w2.t())
        else:
            torch.mm(z_rows, w2.t(), out=out_rows)
        return out
    z_planes = _planes(z)
    if z_planes is not None and (out is None or _planes(out) is not None):
        if out is None:
            out = torch.empty((n, o, h, w), dtype=z.dtype, device=z.device)
        out_planes = _planes(out)
        if accumulate:
            out_planes.baddbmm_(w2.expand(n, o, c), z_planes)
        else:
            torch.bmm(w2.expand(n, o, c), z_planes, out=out_planes)
        return out
    res = F.conv2d(z, weight)
    if out is None:
        return res
    return out.add_(res) if accumulate else out.copy_(res)


def conv1x1_backward(grad_out: Tensor, z: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_z, grad_weight) of out = conv1x1(z, weight).

    grad_out: (N, O, H, W); z: (N, C, H, W) (a slice is fine); weight: (O, C, 1, 1).
    grad_z = weight^T applied per pixel; grad_weight[o, c] = sum_m grad_out[m, o] * z[m, c].
    """
    return with_conv_precision(z, _conv1x1_backward, grad_out, z, weight)


def _conv1x1_backward(grad_out: Tensor, z: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    n, c, h, w = z.shape
    o = weight.shape[0]
    w2 = weight.reshape(o, c)
    z_rows, g_rows = _rows(z), _rows(grad_out)
    if z_rows is not None and g_rows is not None:
        grad_z = torch.empty((n, c, h, w), dtype=z.dtype, device=z.device, memory_format=torch.channels_last)
        torch.mm(g_rows, w2, out=_rows(grad_z))
        grad_w = (g_rows.t() @ z_rows).view(o, c, 1, 1)
        return grad_z, grad_w
    z_planes, g_planes = _planes(z), _planes(grad_out)
    if z_planes is not None and g_planes is not None:
        # bmm with a broadcast (stride-0) weight: torch.matmul(2-D, 3-D) would fold the batch
        # into the rows and copy the (N, O, H*W) gradient transposed.
        grad_z = torch.bmm(w2.t().expand(n, c, o), g_planes).view(n, c, h, w)
        grad_w = torch.bmm(g_planes, z_planes.transpose(1, 2)).sum(0).view(o, c, 1, 1)
        return grad_z, grad_w
    grad_z, grad_w, _ = aten.convolution_backward(grad_out, z, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0],
                                                  1, [True, True, False])
    return grad_z, grad_w
