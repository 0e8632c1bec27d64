"""channel_stats in Triton: per-channel batch mean and biased variance, the statistics cache.

Two kernels, no atomics, so the result is deterministic (the same bits on every run):

1. ``_channel_stats_partial_kernel``: program (p, cb) reads rows [p*R, (p+1)*R) of the M = N*H*W
   rows of channels cb*BLOCK_C .. +BLOCK_C, tile by tile (BLOCK_M rows). Each tile's mean and
   M2 = sum((x - mean)^2) are computed two-pass in registers (so no E[x^2] - E[x]^2 cancellation)
   and merged into the program's running (count, mean, M2) with Chan et al.'s pairwise formula
       n = na + nb,  d = mb - ma,  mean = ma + d * nb / n,  M2 = M2a + M2b + d^2 * na * nb / n.
   The program writes its (mean, M2) to row p of a (P, C) float32 workspace. Counts are not
   stored: partial p covers min(R, M - p*R) rows, which the merge recomputes.
2. ``_chan_merge_kernel``: merges the P partials of each channel, BLOCK_P at a time (inside a
   block with the exact parallel form mean = sum(n_p m_p) / n, M2 = sum(M2_p + n_p (m_p - mean)^2),
   whose error in `mean` enters M2 only to second order; blocks are then merged with Chan's formula).
   ``bn_relu_conv1x1`` reuses it for the statistics of its output.

Chan, Golub & LeVeque, "Updating formulae and a pairwise algorithm for computing sample
variances" (1979). The plain-PyTorch reference is ``densenet_fast.reference.channel_stats_ref``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import INTERPRET, cdiv, device_sms, next_power_of_2
from .indexing import contiguous_rows, row_nhw, row_run

__all__ = ["channel_stats_triton", "merge_partial_stats", "check_activation", "check_channel_vectors",
           "is_channels_last"]

OP_NAME = "densenet_fast::triton_channel_stats"

# Data dtypes the kernels read; statistics and accumulation are always float32. (The interpreter
# has no bfloat16, so bf16 is tested on GPUs only.)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Shared host-side helpers (also used by bn_relu_conv1x1)
# --------------------------------------------------------------------------------------------


def check_activation(x: Tensor, name: str) -> None:
    """Raise if ``x`` cannot be read by the kernels; messages name the tensor (style.md)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dims (N, C, H, W), got {x.dim()}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[0] * x.shape[2] * x.shape[3] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one channel and one value per channel, "
                         f"got shape {list(x.shape)}")
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got device {x.device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1, set before import)")


def check_channel_vectors(x: Tensor, **vectors: Tensor) -> None:
    """Raise unless every named vector is a (C,) float32 tensor on x's device (C = x's channels):
    the per-channel scale/shift or mean/invstd/gamma/beta the kernels read."""
    c = x.shape[1]
    for name, t in vectors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != c:
            raise ValueError(f"{name} must have shape ({c},) (one value per channel of x), got {list(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def is_1x1_weight(weight: Tensor, k: int) -> bool:
    """Whether weight is a 1x1 conv's, (Cout, k) or (Cout, k, 1, 1) with Cout >= 1: the kernels read
    W[o, c] at o * stride(0) + c * stride(1) in both forms."""
    shape = tuple(weight.shape)
    return len(shape) in (2, 4) and shape[2:] in ((), (1, 1)) and shape[1] == k and shape[0] > 0


def is_channels_last(x: Tensor) -> bool:
    """Whether a 4-D tensor's channel stride is its smallest (over dims of size > 1).

    True for a channels_last buffer and for any channel slice of one, which
    ``torch.Tensor.is_contiguous(memory_format=torch.channels_last)`` rejects. Outputs are
    allocated in the layout this returns, by the kernels and by the fake implementations alike.
    """
    if x.shape[1] <= 1:
        return False
    spatial = [x.stride(d) for d in (2, 3) if x.shape[d] > 1]
    return bool(spatial) and x.stride(1) < min(spatial)


def empty_like_layout(x: Tensor, channels: int, dtype: torch.dtype, size: Optional[Tuple[int, int]] = None
                      ) -> Tensor:
    """An empty (N, channels, H', W') tensor of `dtype` in x's layout (channels_last when
    is_channels_last(x)): the launchers and the fakes allocate alike.  size: (H', W'), default x's."""
    n, _, h, w = x.shape
    h, w = size if size is not None else (h, w)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((n, channels, h, w), dtype=dtype, device=x.device, memory_format=fmt)


def merge_partial_stats(ws_mean: Tensor, ws_m2: Tensor, num_parts: int, rows_per_part: int, m: int,
                        out: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Merge per-part (mean, M2) rows into per-channel (mean, biased var).

    ws_mean, ws_m2: (>= num_parts, C) float32; part p covers min(rows_per_part, m - p*rows_per_part)
    rows. Returns (mean, var), each (C,) float32: out's two tensors when given (contiguous (C,)
    float32, e.g. the block's statistics cache at the layer's channels, written in place), else
    new ones.
    """
    c = ws_mean.shape[1]
    if out is not None:
        mean, var = out
    else:
        mean = torch.empty(c, dtype=torch.float32, device=ws_mean.device)
        var = torch.empty_like(mean)
    block_c = 16 if INTERPRET else min(128, next_power_of_2(c))
    block_p = 16 if INTERPRET else 32
    _chan_merge_kernel[(cdiv(c, block_c),)](
        ws_mean, ws_m2, mean, var, num_parts, c, m, rows_per_part,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return mean, var


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def store_tile_stats(y, mask, rmask, nmask, ws_mean_ptr, ws_m2_ptr, ws_off):
    """A GEMM epilogue's per-tile statistics: the (mean, M2) over the tile's valid rows of each
    column of y (BLOCK_M, BLOCK_N), the values as stored (already rounded to the output dtype),
    two-pass within the tile, stored at ws_off (BLOCK_N,) for merge_partial_stats."""
    yf = tl.where(mask, y.to(tl.float32), 0.0)
    cnt = tl.sum(rmask.to(tl.float32), axis=0)
    t_mean = tl.sum(yf, axis=0) / cnt
    d = tl.where(mask, yf - t_mean[None, :], 0.0)
    t_m2 = tl.sum(d * d, axis=0)
    tl.store(ws_mean_ptr + ws_off, t_mean, mask=nmask)
    tl.store(ws_m2_ptr + ws_off, t_m2, mask=nmask)


@triton.jit
def _channel_stats_partial_kernel(x_ptr, ws_mean_ptr, ws_m2_ptr, M, C, HW, W,
                                  stride_n, stride_c, stride_h, stride_w, ROWS_PER_PROG,
                                  ROW_RUN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * stride_c
    run_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    row0 = pid_p * ROWS_PER_PROG
    row_end = tl.minimum(row0 + ROWS_PER_PROG, M)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        # row m = (n, h, w) of an (N, C, H, W) tensor with arbitrary strides, int64 offsets
        # (a block buffer can exceed 2^31 elements)
        n, h, w = row_nhw(rows, HW, W)
        row_off = contiguous_rows(n, h, w, stride_n, stride_h, stride_w, ROW_RUN, BLOCK_M)
        mask = rmask[:, None] & cmask[None, :]
        v = tl.load(x_ptr + row_off[:, None] + col_off[None, :], mask=mask, other=0.0).to(tl.float32)
        cnt = tl.sum(rmask.to(tl.float32), axis=0)
        t_mean = tl.sum(v, axis=0) / cnt
        d = tl.where(mask, v - t_mean[None, :], 0.0)
        t_m2 = tl.sum(d * d, axis=0)
        # Chan's pairwise merge of (run_n, run_mean, run_m2) with (cnt, t_mean, t_m2)
        tot = run_n + cnt
        delta = t_mean - run_mean
        run_mean = run_mean + delta * (cnt / tot)
        run_m2 = run_m2 + t_m2 + delta * delta * (run_n * cnt / tot)
        run_n = tot
    ws_off = pid_p * C + cols
    tl.store(ws_mean_ptr + ws_off, run_mean, mask=cmask)
    tl.store(ws_m2_ptr + ws_off, run_m2, mask=cmask)


@triton.jit
def _chan_merge_kernel(ws_mean_ptr, ws_m2_ptr, mean_ptr, var_ptr, P, C, M, ROWS_PER_PART,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    run_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    run_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        pmask = parts < P
        # rows covered by each part (0 for the padding parts beyond P)
        cnt = tl.minimum(tl.maximum(M - parts * ROWS_PER_PART, 0), ROWS_PER_PART)
        cnt = tl.where(pmask, cnt, 0).to(tl.float32)
        mask = pmask[:, None] & cmask[None, :]
        off = parts[:, None] * C + cols[None, :]
        pm = tl.load(ws_mean_ptr + off, mask=mask, other=0.0)
        pm2 = tl.load(ws_m2_ptr + off, mask=mask, other=0.0)
        b_n = tl.sum(cnt, axis=0)
        b_mean = tl.sum(cnt[:, None] * pm, axis=0) / b_n
        d = pm - b_mean[None, :]
        b_m2 = tl.sum(pm2 + cnt[:, None] * d * d, axis=0)
        tot = run_n + b_n
        delta = b_mean - run_mean
        run_mean = run_mean + delta * (b_n / tot)
        run_m2 = run_m2 + b_m2 + delta * delta * (run_n * b_n / tot)
        run_n = tot
    tl.store(mean_ptr + cols, run_mean, mask=cmask)
    tl.store(var_ptr + cols, run_m2 / run_n, mask=cmask)


# --------------------------------------------------------------------------------------------
# Launcher and custom op
# --------------------------------------------------------------------------------------------


def _launch_config(x: Tensor, m: int, c: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_C, rows_per_program, num_warps) for an (M rows, C channels) reduction."""
    if INTERPRET:
        # Tiny tiles, two tiles per program: the tests then cover the in-program merge, the
        # cross-program merge and the ragged last tile even on 5x7 images.
        return 16, 16, 32, 1
    if is_channels_last(x):
        block_m, block_c = 64, min(64, next_power_of_2(c))  # channels contiguous
    else:
        block_m, block_c = 128, min(16, next_power_of_2(c))  # rows contiguous
    sms = device_sms(x.device)
    col_blocks = cdiv(c, block_c)
    # About 8 programs per SM in total; each walks a contiguous range of rows.
    parts = max(1, min(cdiv(8 * sms, col_blocks), cdiv(m, block_m)))
    rows_per_prog = cdiv(cdiv(m, parts), block_m) * block_m
    return block_m, block_c, rows_per_prog, 4


def channel_stats_triton(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance, read in place.

    x: (N, C, H, W) float32/float16/bfloat16, any strides: typically a channel slice F[:, a:b] of a
       dense block buffer, NCHW or channels_last (CUDA; CPU under TRITON_INTERPRET=1).
    Returns (mean, var), each (C,) float32, var = sum((x - mean)^2) / (N*H*W) (biased, as
    training-mode batch norm normalises). Raises ValueError / TypeError naming x.
    """
    check_activation(x, "x")
    n, c, h, w = x.shape
    m = n * h * w
    block_m, block_c, rows_per_prog, num_warps = _launch_config(x, m, c)
    parts = cdiv(m, rows_per_prog)
    ws_mean = torch.empty((parts, c), dtype=torch.float32, device=x.device)
    ws_m2 = torch.empty_like(ws_mean)
    grid = (parts, cdiv(c, block_c))
    _channel_stats_partial_kernel[grid](
        x, ws_mean, ws_m2, m, c, h * w, w, *x.stride(), rows_per_prog,
        ROW_RUN=row_run(x, rows_per_program=(rows_per_prog,)), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return merge_partial_stats(ws_mean, ws_m2, parts, rows_per_prog, m)


@torch.library.custom_op(OP_NAME, mutates_args=())
def triton_channel_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """torch.ops.densenet_fast.triton_channel_stats: :func:`channel_stats_triton` as a custom op."""
    return channel_stats_triton(x)


@triton_channel_stats.register_fake
def _triton_channel_stats_fake(x: Tensor) -> Tuple[Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)
