"""Index arithmetic shared by the Triton kernels.

Every kernel walks the M = N*H*W "rows" of an (N, C, H, W) tensor with arbitrary strides (a
channel slice of an NCHW or channels_last block buffer) and turns a row index into (n, h, w), then
into an element offset with the tensor's own strides: that is how the kernels read channel slices
in place, whatever the layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["row_nhw"]


@triton.jit
def row_nhw(rows, HW, W):
    """(n, h, w) of row m = (n * H + h) * W + w, as int64: the offsets built from them
    (n * stride_n, ...) can exceed 2^31 in a large block buffer.  HW = H * W.

    The divisions stay in rows' own type (int32: the kernels' row indices are int32 program
    offsets, so M < 2^31 already): a 64-bit division is emulated on NVIDIA GPUs, dozens of
    instructions and extra registers per row, which made the GEMM kernels spill."""
    n = rows // HW
    hw = rows - n * HW
    h = hw // W
    return n.to(tl.int64), h.to(tl.int64), (hw - h * W).to(tl.int64)
