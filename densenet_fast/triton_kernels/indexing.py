"""Index arithmetic shared by the Triton kernels.

Every kernel walks the M = N*H*W "rows" of an (N, C, H, W) tensor with arbitrary strides (a
channel slice of an NCHW or channels_last block buffer) and turns a row index into (n, h, w), then
into an element offset with the tensor's own strides: that is how the kernels read channel slices
in place, whatever the layout.

The divisions of row_nhw hide from triton that consecutive rows of an NCHW tensor are consecutive
elements, so on its own it lays a (rows x channels) tile out with a warp's threads along the
channels, each thread in another channel plane: one cache line per thread, 32 per load (the same
holds for its stores).  It only found the rows itself when W was a multiple of 16 (DenseNet-BC's
32x32 and 16x16 images, not 8x8 or DenseNet-121's 56, 28, 14, 7).  row_run (host) says how many
consecutive rows are consecutive elements, and contiguous_rows (in a kernel) tells triton so.
"""

from __future__ import annotations

import os
from typing import Sequence

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ROW_HINTS", "ROW_RUN_MAX", "contiguous_rows", "row_nhw", "row_run"]

# DENSENET_FAST_TRITON_ROW_HINTS=0 (read at import) withdraws the promise: row_run returns 1 and
# the kernels compile as they did before it, to time the hints side by side or to rule them out.
ROW_HINTS = os.environ.get("DENSENET_FAST_TRITON_ROW_HINTS", "1") != "0"

# The largest run row_run reports: the kernels' largest row tile.  contiguous_rows caps it at the
# tile it hints anyway; the cap only keeps the number of distinct constexpr values (compilations) small.
ROW_RUN_MAX = 256


def row_run(*tensors: Tensor, rows_per_program: Sequence[int] = ()) -> int:
    """The largest power of two G (at most ROW_RUN_MAX) such that in every tensor (N, C, H, W),
    rows m = (n * H + h) * W + w in each aligned group [k * G, (k + 1) * G) are G consecutive
    elements whose first one's row offset (n * stride_n + h * stride_h + w * stride_w) is a
    multiple of G. It is 1 unless each row of pixels is contiguous (NCHW, not channels_last).
    When the rows of pixels follow each other too (a whole NCHW image), a group may span several
    of them; else (a crop, every other row of pixels) G divides W and groups stay within a row.
    The tensors share the row grid (the same N, H, W). A kernel whose programs start their rows at
    multiples of some count (a reduction's rows per program) passes those counts: G divides them
    too, so each tile's groups stay aligned.

    This is exactly what contiguous_rows promises triton. A G that claims too much gives wrong
    results on a GPU (a vectorised access across an image's end), so it is exact, and
    tests/test_triton_indexing.py checks it on strides."""
    if not ROW_HINTS:
        return 1
    run = ROW_RUN_MAX
    for t in tensors:
        n, _, h, w = t.shape
        s_n, _, s_h, s_w = t.stride()
        hw = h * w
        if hw <= 1:
            return 1
        step = s_w if w > 1 else s_h  # the element step between consecutive pixels of a row
        if step != 1:
            return 1
        if h > 1 and w > 1 and s_h != w:   # rows of pixels apart: groups within one, each at a multiple of G
            run = min(run, w & -w)
            while s_h % run:
                run //= 2
        else:
            run = min(run, hw & -hw)       # image ends fall on multiples of HW
        while n > 1 and s_n % run:         # each image starts at a multiple of G
            run //= 2
    for rows in rows_per_program:
        while rows % run:
            run //= 2
    return run


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


@triton.jit
def contiguous_rows(n, h, w, s_n, s_h, s_w, RUN: tl.constexpr, BLOCK: tl.constexpr):
    """n * s_n + h * s_h + w * s_w, the element offsets of BLOCK consecutive rows (n, h, w from
    row_nhw) starting at a multiple of BLOCK, marked as row_run promised: each aligned group of
    RUN rows is RUN consecutive elements starting at a multiple of RUN.  Triton then walks the rows
    with a warp's threads (coalesced) and vectorises where masks allow.  Adding a scalar to the
    result (a 3x3 tap's shift) keeps the contiguity; triton works out the sum's divisibility.

    The offsets are computed here, not passed in: a hint on a function's argument is lost when
    triton inlines the function, one on a value computed inside it stays on that operation."""
    off = n * s_n + h * s_h + w * s_w
    if RUN >= BLOCK:
        off = tl.max_contiguous(tl.multiple_of(off, BLOCK), BLOCK)
    elif RUN > 1:
        off = tl.max_contiguous(tl.multiple_of(off, RUN), RUN)
    return off
