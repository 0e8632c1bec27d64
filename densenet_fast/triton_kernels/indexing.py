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
    """(n, h, w) of row m = (n * H + h) * W + w, as int64 (a block buffer can exceed 2^31
    elements).  HW = H * W."""
    r = rows.to(tl.int64)
    n = r // HW
    hw = r % HW
    return n, hw // W, hw % W
