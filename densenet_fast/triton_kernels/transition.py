"""The DenseNet transition in Triton: out = conv1x1(avgpool2x2(relu(bn(x))), W), forward and backward.

Average pooling and a 1x1 conv are both linear, so pooling first equals torchvision's conv-then-pool
(dense_block.md, "Transition and head") and the GEMM runs over the P = N * (H//2) * (W//2) pooled
rows, 4x fewer than M = N*H*W. Floor semantics as F.avg_pool2d(z, 2, 2): an odd last row/column
of x is dropped by the pooling (it still counts in the batch statistics, see below).

Forward, one kernel (``_bn_relu_pool_conv1x1_kernel``), a GEMM out[p, o] = sum_c zp[p, c] W[o, c]:
  the A-operand load reads the 4 pixels of pooled row p (strides in elements, NCHW or
  channels_last, int64 offsets), applies z = relu(x * scale + shift) to each in float32, averages
  them and rounds the mean to x's dtype. In NCHW (window_run > 1) a tile's windows are read one
  row of pixels at a time, as runs of consecutive elements (two loads of twice the rows, each
  window's pair then summed), not as four loads of every other pixel; the backward reads x and
  writes dx the same way. The pooled map zp is never stored. W is read transposed
  through its strides and cast to x's dtype; tl.dot accumulates in float32 (float32 data: TF32
  exactly when cuDNN's convolutions may, else "ieee": ops.precision.dot_precision). The tile is
  stored through out's strides, so out may be a channel slice of the next block's buffer,
  written in place.

Backward, with scale = gamma * invstd, shift = beta - mean * scale, y = x * scale + shift,
dpool = grad_out @ W (per pooled pixel, K = Cout), dz = dpool / 4 at each of the 4 source pixels
(0 at a dropped odd row/column), dy = dz * [y > 0]:
  1. ``_pool_conv1x1_wgrad_kernel``: grad_W[o, c] = sum_p grad_out[p, o] * zp[p, c], zp rebuilt on
     the fly exactly as the forward rounds it. The P rows are split across SPLITS programs per
     (o, c) tile; each writes an fp32 partial to a (SPLITS, Cout, C) workspace, summed in a fixed
     order on the host (no atomics: deterministic).
  2. ``_pool_conv1x1_dgrad_kernel``, a GEMM dpool = grad_out @ W per (pooled rows, channels) tile
     whose epilogue visits the 4 source pixels. Batch-norm backward (Ioffe & Szegedy 2015):
         dbeta = sum dy,  dgamma = sum dy * xhat,  xhat = (x - mean) * invstd   (sums over M pixels)
         batch_stats=True  (training mode, mean/invstd are x's own batch statistics):
             dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)
         batch_stats=False (fixed statistics): dx = gamma * invstd * dy
     dx needs the complete sums, and C can be ~1000 with H*W large, so no C-channel full-resolution
     fp32 intermediate is stored (dense_block.md, backward): pass 1 writes only per-tile partial
     sums of dy and dy*xhat to a (tiles, C) workspace (and, with fixed statistics, dx itself, so
     one pass suffices); pass 2 (batch statistics only) recomputes the dpool tile (the GEMM's K is
     Cout, cheap to redo) and writes dx. Partials are summed on the host in a fixed order.
  3. ``_dropped_pixels_dgrad_kernel``: dx at the pixels the pooling drops (dy = 0 there, but with
     batch statistics dx = -gamma * invstd * (dbeta + xhat * dgamma) / M is not 0).
  The dots run in x's dtype: grad_out (x's dtype or float32, e.g. the fp32 gradient buffer of an
  fp16 block) is rounded to x's dtype for the tensor cores, as autocast's conv backward would.

Reference: ``densenet_fast.reference.transition_ref`` (conv, then pool); the plain-PyTorch backend
is ``densenet_fast.ops.transition``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import INTERPRET, autotune_lists, cdiv, device_arch, device_sms, nchw_fp32_list
from ..ops.precision import dot_precision
from ..ops.bn_relu import forward_scale_shift
from .indexing import contiguous_rows, row_nhw, row_run
from .channel_stats import (SUPPORTED_DTYPES, check_activation, check_channel_vectors, empty_like_layout,
                            is_1x1_weight)

__all__ = ["bn_relu_pool_conv1x1_triton", "bn_relu_pool_conv1x1_backward_triton", "window_run"]

OP_NAME = "densenet_fast::triton_bn_relu_pool_conv1x1"
OUT_OP_NAME = "densenet_fast::triton_bn_relu_pool_conv1x1_out"
BACKWARD_OP_NAME = "densenet_fast::triton_bn_relu_pool_conv1x1_backward"


def _cfg(names: Tuple[str, str, str], blocks: Tuple[int, int, int], warps: int, stages: int) -> triton.Config:
    return triton.Config(dict(zip(names, blocks)), num_warps=warps, num_stages=stages)


_FWD = ("BLOCK_M", "BLOCK_N", "BLOCK_K")     # pooled rows, Cout, C (the reduction)
_DGRAD = ("BLOCK_P", "BLOCK_C", "BLOCK_O")   # pooled rows, C, Cout (the reduction)
_WGRAD = ("BLOCK_O", "BLOCK_C", "BLOCK_P")   # Cout, C, pooled rows (the reduction)

# Transitions: C = 128..1024 input channels, Cout = C / 2 (compression 0.5), P = N*H*W/4 rows.
# The forward A load is 4 pixel loads plus BN-ReLU per element, so BLOCK_K stays at 32-64; the
# dgrad epilogue reads 4 x tiles and writes 4 dx tiles, so its tiles stay at <= 128x128.
# Hopper has more shared memory: deeper pipelines. The forward and dgrad defaults run on 8 warps:
# on 4 they spilled in NCHW (sm_90, DenseNet-121's first transition: 8-104 and 128-416 bytes of
# stack per thread), on 8 none (scripts/triton_aot_check.py); the dgrad's 64-row tile kept 32
# bytes with triton 3.6, its 32-row default none. Timed on the 2026-11-27 lease (H200, fp32 TF32
# NCHW, DenseNet-BC-100 shapes; benchmarks/results/gpu-2026-11-27-h200/autotune.jsonl), the
# forward's (64, 128, 32) on 4 warps took 1.10x the best time in geometric mean and the 8-warp
# default (128, 64, 32) 1.65x; but the former keeps 64 bytes of stack on DenseNet-121's first
# transition in float32 NCHW (48 in fp16/bf16), so the default stays (autotuning picks).
FWD_CONFIGS_SM90: List[triton.Config] = [
    _cfg(_FWD, (128, 64, 32), 8, 3), _cfg(_FWD, (128, 128, 32), 8, 3), _cfg(_FWD, (64, 64, 32), 4, 4),
    _cfg(_FWD, (64, 128, 32), 4, 3), _cfg(_FWD, (128, 64, 64), 8, 3), _cfg(_FWD, (256, 64, 32), 8, 3),
]
FWD_CONFIGS_SM80: List[triton.Config] = [
    _cfg(_FWD, (128, 64, 32), 8, 3), _cfg(_FWD, (64, 64, 32), 4, 4), _cfg(_FWD, (128, 128, 32), 8, 2),
    _cfg(_FWD, (64, 128, 32), 4, 3), _cfg(_FWD, (64, 64, 64), 4, 3),
]
DGRAD_CONFIGS_SM90: List[triton.Config] = [
    _cfg(_DGRAD, (32, 64, 32), 8, 3), _cfg(_DGRAD, (64, 64, 32), 8, 3), _cfg(_DGRAD, (128, 64, 32), 8, 3),
    _cfg(_DGRAD, (64, 128, 32), 8, 3),
    _cfg(_DGRAD, (128, 128, 32), 8, 3), _cfg(_DGRAD, (64, 64, 64), 4, 3), _cfg(_DGRAD, (32, 64, 32), 4, 4),
]
DGRAD_CONFIGS_SM80: List[triton.Config] = [
    _cfg(_DGRAD, (32, 64, 32), 8, 3), _cfg(_DGRAD, (64, 64, 32), 8, 3), _cfg(_DGRAD, (128, 64, 32), 8, 3),
    _cfg(_DGRAD, (64, 128, 32), 8, 2),
    _cfg(_DGRAD, (64, 64, 64), 4, 3), _cfg(_DGRAD, (32, 64, 32), 4, 3),
]
WGRAD_CONFIGS_SM90: List[triton.Config] = [
    _cfg(_WGRAD, (64, 64, 32), 4, 3), _cfg(_WGRAD, (128, 64, 32), 8, 3), _cfg(_WGRAD, (64, 128, 32), 8, 3),
    _cfg(_WGRAD, (128, 128, 32), 8, 3), _cfg(_WGRAD, (64, 64, 64), 4, 3),
]
WGRAD_CONFIGS_SM80: List[triton.Config] = [
    _cfg(_WGRAD, (64, 64, 32), 4, 3), _cfg(_WGRAD, (128, 64, 32), 8, 2), _cfg(_WGRAD, (64, 128, 32), 8, 2),
    _cfg(_WGRAD, (64, 64, 64), 4, 3),
]
# Float32 NCHW operands: the forward and the wgrad run single_stage_first's lists of the above, since
# their pipelined tiles stage through one shared-memory bank (triton_kernels.NCHW_FP32).
# float32 data with IEEE dots (TF32 off, ops.precision): tl.dot lowers to FMAs on registers, where
# the pipelined forward and wgrad configs spill (sm_90, DenseNet-121's first transition, NCHW: 384
# and 672 bytes of stack per thread for the defaults; scripts/triton_aot_check.py). These single
# stage tiles compile with none in either layout (the dgrad default, on 8 warps, has none either).
FWD_CONFIGS_FMA: List[triton.Config] = [  # (128, 64, 32) on 8 warps keeps 16 bytes with triton 3.6
    _cfg(_FWD, (64, 64, 32), 8, 1), _cfg(_FWD, (128, 64, 32), 8, 1), _cfg(_FWD, (64, 64, 32), 4, 1),
]
WGRAD_CONFIGS_FMA: List[triton.Config] = [
    _cfg(_WGRAD, (64, 64, 32), 8, 1), _cfg(_WGRAD, (64, 128, 32), 8, 1), _cfg(_WGRAD, (64, 64, 32), 4, 1),
    _cfg(_WGRAD, (32, 64, 32), 4, 1),
]
# The interpreter runs programs one after another in Python: fixed small tiles (tl.dot needs >= 16),
# no autotuning. WGRAD_ROWS_PER_SPLIT = 2 tiles: tests with P > 32 pooled rows cover both the
# in-program loop and the cross-split sum.
INTERPRET_FWD = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
INTERPRET_DGRAD = {"BLOCK_P": 16, "BLOCK_C": 16, "BLOCK_O": 16}
INTERPRET_WGRAD = {"BLOCK_O": 16, "BLOCK_C": 16, "BLOCK_P": 16}
INTERPRET_WGRAD_ROWS_PER_SPLIT = 32
# The compiled wgrad's splits span whole multiples of this many pooled rows (a multiple of its BLOCK_Ps), so
# that each split's tiles start where row_run's groups do.
WGRAD_ROW_ALIGN = 128
# The kernels read the windows' pixels in pairs (twice the rows per load, then a sum of each pair)
# only where a run of consecutive top-row pixels is at least this long (two windows; 16 bytes in
# float32). A run of 2 (W / 2 odd, as at DenseNet-121's 14x14 transition) gives 8-byte loads of
# the doubled tile, and the wgrad's default then kept 48 bytes of stack (sm_90, float32 NCHW,
# triton 3.8) where the four-load form keeps none; at 28x28 (a run of 4) it needed fewer registers
# than that form (174 against 255).
WINDOW_RUN_MIN = 4
# Dropped-pixel kernel (at most N * (H + W) pixels per channel): a fixed config everywhere.
EDGE_BLOCKS = (16, 16) if INTERPRET else (64, 32)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _pooled_bn_relu(x_ptr, top_left, col_off, mask, sc, sh, sx_h, sx_w):
    """mean over the 2x2 window of relu(x * sc + sh) in float32, 0 where masked.

    top_left: (R,) int64 offsets of each window's (2ho, 2wo) pixel; col_off: (CB,) int64 channel
    offsets; sc, sh: (CB,) float32 (0 at padded channels, so those give relu(0) = 0).
    """
    ptr = x_ptr + top_left[:, None] + col_off[None, :]
    s = tl.maximum(tl.load(ptr, mask=mask, other=0.0).to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
    s += tl.maximum(tl.load(ptr + sx_w, mask=mask, other=0.0).to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
    s += tl.maximum(tl.load(ptr + sx_h, mask=mask, other=0.0).to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
    s += tl.maximum(tl.load(ptr + sx_h + sx_w, mask=mask, other=0.0).to(tl.float32) * sc[None, :]
                    + sh[None, :], 0.0)
    return tl.where(mask, s * 0.25, 0.0)


@triton.jit
def _window_pairs(first, HWO, WO, BLOCK: tl.constexpr):
    """(pairs, n, ho, w2) of the pixels of one row of BLOCK pooled rows' 2x2 windows, pooled rows
    [first, first + BLOCK) (first: a multiple of BLOCK, or of the run): entry j = 2 * i + dw is
    pixel (2 * ho (+ 1 in the bottom row), w2 = 2 * wo + dw) of the block's i-th pooled row
    (n, ho, wo), so pairs = 2 * pooled row + dw. Along either row of the windows these are the rows
    of a view x[:, :, 0:2HO:2, 0:2WO] or x[:, :, 1:2HO:2, 0:2WO], whose contiguous runs the launcher
    passes (window_run) for contiguous_rows: in NCHW each window's two pixels, and the windows of
    one pooled row, are consecutive elements."""
    pairs = 2 * first + tl.arange(0, 2 * BLOCK)
    n, ho, w2 = row_nhw(pairs, 2 * HWO, 2 * WO)
    return pairs, n, ho, w2


@triton.jit
def _pooled_bn_relu_pairs(x_ptr, top_row, bottom_row, col_off, pair_mask, mask, sc, sh,
                          BLOCK: tl.constexpr, BLOCK_COL: tl.constexpr):
    """_pooled_bn_relu from the windows' pixel pairs (_window_pairs; top_row, bottom_row: their
    (2 * BLOCK,) offsets in each row of the windows, pair_mask: (2 * BLOCK, BLOCK_COL)): two loads
    of consecutive elements instead of four of every other one, then each window's two columns
    summed (a reshape, within a thread where triton keeps a pair's rows in its registers).
    mask: (BLOCK, BLOCK_COL), the pooled tile's."""
    s = tl.maximum(tl.load(x_ptr + top_row[:, None] + col_off[None, :], mask=pair_mask, other=0.0).to(tl.float32)
                   * sc[None, :] + sh[None, :], 0.0)
    s += tl.maximum(tl.load(x_ptr + bottom_row[:, None] + col_off[None, :], mask=pair_mask, other=0.0
                            ).to(tl.float32) * sc[None, :] + sh[None, :], 0.0)
    s = tl.sum(tl.reshape(s, (BLOCK, 2, BLOCK_COL)), axis=1)
    return tl.where(mask, s * 0.25, 0.0)


@triton.jit
def _bn_relu_pool_conv1x1_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr,
                                 P, K, COUT, HWO, WO,
                                 sx_n, sx_c, sx_h, sx_w, sw_o, sw_k, so_n, so_c, so_h, so_w,
                                 INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr, WIN_RUN: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < P
    n, ho, wo = row_nhw(rows, HWO, WO)
    x_win = n * sx_n + (2 * ho) * sx_h + (2 * wo) * sx_w  # each 2x2 window's top-left pixel (every other one)
    o_row = contiguous_rows(n, ho, wo, so_n, so_h, so_w, ROW_RUN, BLOCK_M)  # pooled rows: contiguous in NCHW
    if WIN_RUN > 1:  # NCHW: read the windows' pixel pairs as runs of consecutive elements
        pairs, pn, pho, pw = _window_pairs(pid_m * BLOCK_M, HWO, WO, BLOCK_M)
        top_row = contiguous_rows(pn, 2 * pho, pw, sx_n, sx_h, sx_w, WIN_RUN, 2 * BLOCK_M)
        bottom_row = contiguous_rows(pn, 2 * pho + 1, pw, sx_n, sx_h, sx_w, WIN_RUN, 2 * BLOCK_M)
        pair_rmask = pairs < 2 * P
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < COUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        sc = tl.load(scale_ptr + ks, mask=kmask, other=0.0)
        sh = tl.load(shift_ptr + ks, mask=kmask, other=0.0)
        if WIN_RUN > 1:
            z = _pooled_bn_relu_pairs(x_ptr, top_row, bottom_row, ks.to(tl.int64) * sx_c,
                                      pair_rmask[:, None] & kmask[None, :], rmask[:, None] & kmask[None, :],
                                      sc, sh, BLOCK_M, BLOCK_K)
        else:
            z = _pooled_bn_relu(x_ptr, x_win, ks.to(tl.int64) * sx_c, rmask[:, None] & kmask[None, :],
                                sc, sh, sx_h, sx_w)
        z = z.to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :] * sw_o,
                    mask=kmask[:, None] & nmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(z, b, acc=acc, input_precision=INPUT_PRECISION)
    tl.store(out_ptr + o_row[:, None] + cols[None, :].to(tl.int64) * so_c, acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _pool_conv1x1_wgrad_kernel(g_ptr, x_ptr, scale_ptr, shift_ptr, ws_ptr,
                               P, C, COUT, HWO, WO, ROWS_PER_SPLIT,
                               sg_n, sg_o, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w,
                               INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr, WIN_RUN: tl.constexpr,
                               BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = outs < COUT
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_off = cols.to(tl.int64) * sx_c
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_O, BLOCK_C], dtype=tl.float32)
    row0 = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row0 + ROWS_PER_SPLIT, P)
    for start in range(row0, row_end, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        rmask = rows < row_end
        n, ho, wo = row_nhw(rows, HWO, WO)
        g_row = contiguous_rows(n, ho, wo, sg_n, sg_h, sg_w, ROW_RUN, BLOCK_P)
        # grad_out^T tile (BLOCK_O, BLOCK_P); zero at padded rows, so they add nothing
        gt = tl.load(g_ptr + outs[:, None].to(tl.int64) * sg_o + g_row[None, :],
                     mask=omask[:, None] & rmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        if WIN_RUN > 1:
            pairs, pn, pho, pw = _window_pairs(start, HWO, WO, BLOCK_P)
            top_row = contiguous_rows(pn, 2 * pho, pw, sx_n, sx_h, sx_w, WIN_RUN, 2 * BLOCK_P)
            bottom_row = contiguous_rows(pn, 2 * pho + 1, pw, sx_n, sx_h, sx_w, WIN_RUN, 2 * BLOCK_P)
            z = _pooled_bn_relu_pairs(x_ptr, top_row, bottom_row, col_off,
                                      (pairs < 2 * row_end)[:, None] & cmask[None, :], rmask[:, None] & cmask[None, :],
                                      sc, sh, BLOCK_P, BLOCK_C)
        else:
            z = _pooled_bn_relu(x_ptr, n * sx_n + (2 * ho) * sx_h + (2 * wo) * sx_w, col_off,
                                rmask[:, None] & cmask[None, :], sc, sh, sx_h, sx_w)
        z = z.to(x_ptr.dtype.element_ty)
        acc = tl.dot(gt, z, acc=acc, input_precision=INPUT_PRECISION)
    ws_off = (pid_s * COUT + outs)[:, None].to(tl.int64) * C + cols[None, :]
    tl.store(ws_ptr + ws_off, acc, mask=omask[:, None] & cmask[None, :])


@triton.jit
def _window_dx(xv, mask, dz, sc, sh, mu, istd, k1, k2, CENTERED: tl.constexpr):
    """(dy, xhat, dx) at a tile of window pixels xv (float32) whose pooled gradient is dz."""
    # the forward's pre-activation, bit for bit (same scale/shift, same expression): same ReLU mask
    y = xv * sc + sh
    dy = tl.where(mask & (y > 0), dz, 0.0)
    xhat = (xv - mu) * istd
    if CENTERED:
        dx = sc * (dy - k1 - xhat * k2)
    else:
        dx = sc * dy
    return dy, xhat, dx


@triton.jit
def _pool_conv1x1_dgrad_kernel(g_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                               k1_ptr, k2_ptr, gx_ptr, ws_dy_ptr, ws_dyx_ptr,
                               P, C, COUT, HWO, WO,
                               sg_n, sg_o, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_c,
                               sgx_n, sgx_c, sgx_h, sgx_w,
                               COMPUTE_SUMS: tl.constexpr, WRITE_DX: tl.constexpr, CENTERED: tl.constexpr,
                               INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr, WIN_RUN: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rmask = rows < P
    n, ho, wo = row_nhw(rows, HWO, WO)
    g_row = contiguous_rows(n, ho, wo, sg_n, sg_h, sg_w, ROW_RUN, BLOCK_P)
    x_win = n * sx_n + (2 * ho) * sx_h + (2 * wo) * sx_w
    gx_win = n * sgx_n + (2 * ho) * sgx_h + (2 * wo) * sgx_w
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    c64 = cols.to(tl.int64)
    # dpool tile = grad_out[rows, :] @ W[:, cols]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for o0 in range(0, COUT, BLOCK_O):
        outs = o0 + tl.arange(0, BLOCK_O)
        omask = outs < COUT
        a = tl.load(g_ptr + g_row[:, None] + outs[None, :].to(tl.int64) * sg_o,
                    mask=rmask[:, None] & omask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + outs[:, None] * sw_o + cols[None, :] * sw_c,
                    mask=omask[:, None] & cmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)
    dz = acc * 0.25  # the average's gradient, the same at each of the 4 source pixels
    mask = rmask[:, None] & cmask[None, :]
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
    sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)[None, :]
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
    istd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)[None, :]
    if CENTERED:
        k1 = tl.load(k1_ptr + cols, mask=cmask, other=0.0)[None, :]
        k2 = tl.load(k2_ptr + cols, mask=cmask, other=0.0)[None, :]
    else:
        k1 = 0.0
        k2 = 0.0
    s_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    s_dyx = tl.zeros([BLOCK_C], dtype=tl.float32)
    if WIN_RUN > 1:  # NCHW: each window row's pixel pairs as runs of consecutive elements
        pairs, pn, pho, pw = _window_pairs(pid_p * BLOCK_P, HWO, WO, BLOCK_P)
        pmask = (pairs < 2 * P)[:, None] & cmask[None, :]
        dz2 = tl.reshape(tl.broadcast_to(dz[:, None, :], (BLOCK_P, 2, BLOCK_C)), (2 * BLOCK_P, BLOCK_C))
        for dh in tl.static_range(2):  # the windows' top, then bottom row
            x_row = contiguous_rows(pn, 2 * pho + dh, pw, sx_n, sx_h, sx_w, WIN_RUN, 2 * BLOCK_P)
            gx_row = contiguous_rows(pn, 2 * pho + dh, pw, sgx_n, sgx_h, sgx_w, WIN_RUN, 2 * BLOCK_P)
            xv = tl.load(x_ptr + x_row[:, None] + c64[None, :] * sx_c, mask=pmask, other=0.0).to(tl.float32)
            dy, xhat, dx = _window_dx(xv, pmask, dz2, sc, sh, mu, istd, k1, k2, CENTERED)
            if COMPUTE_SUMS:
                s_dy += tl.sum(dy, axis=0)
                s_dyx += tl.sum(dy * xhat, axis=0)
            if WRITE_DX:
                tl.store(gx_ptr + gx_row[:, None] + c64[None, :] * sgx_c, dx.to(gx_ptr.dtype.element_ty), mask=pmask)
    else:
        for i in tl.static_range(4):
            dh = i // 2
            dw = i % 2
            xv = tl.load(x_ptr + (x_win + dh * sx_h + dw * sx_w)[:, None] + c64[None, :] * sx_c,
                         mask=mask, other=0.0).to(tl.float32)
            dy, xhat, dx = _window_dx(xv, mask, dz, sc, sh, mu, istd, k1, k2, CENTERED)
            if COMPUTE_SUMS:
                s_dy += tl.sum(dy, axis=0)
                s_dyx += tl.sum(dy * xhat, axis=0)
            if WRITE_DX:
                tl.store(gx_ptr + (gx_win + dh * sgx_h + dw * sgx_w)[:, None] + c64[None, :] * sgx_c,
                         dx.to(gx_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_SUMS:
        tl.store(ws_dy_ptr + pid_p * C + cols, s_dy, mask=cmask)
        tl.store(ws_dyx_ptr + pid_p * C + cols, s_dyx, mask=cmask)


@triton.jit
def _dropped_pixels_dgrad_kernel(x_ptr, scale_ptr, mean_ptr, invstd_ptr, k1_ptr, k2_ptr, gx_ptr,
                                 ROWS, E, NCOL, C, H, W,
                                 sx_n, sx_c, sx_h, sx_w, sgx_n, sgx_c, sgx_h, sgx_w,
                                 CENTERED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx at the pixels the floor pooling drops, where dy = 0. Per image, the E of them are
    enumerated as the last column (rows h < NCOL, NCOL = 2*(H//2) when W is odd, else 0), then
    the last row (all W columns, when H is odd)."""
    pid_e = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    rmask = rows < ROWS
    # int32 division (a 64-bit one is emulated on the GPU, see indexing.row_nhw), int64 offsets
    n32 = rows // E
    e = rows - n32 * E
    n = n32.to(tl.int64)
    in_col = e < NCOL
    h = tl.where(in_col, e, H - 1).to(tl.int64)
    w = tl.where(in_col, W - 1, e - NCOL).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    c64 = cols.to(tl.int64)
    mask = rmask[:, None] & cmask[None, :]
    if CENTERED:
        xv = tl.load(x_ptr + (n * sx_n + h * sx_h + w * sx_w)[:, None] + c64[None, :] * sx_c,
                     mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)[None, :]
        mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)[None, :]
        istd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)[None, :]
        k1 = tl.load(k1_ptr + cols, mask=cmask, other=0.0)[None, :]
        k2 = tl.load(k2_ptr + cols, mask=cmask, other=0.0)[None, :]
        xhat = (xv - mu) * istd
        dx = sc * (0.0 - k1 - xhat * k2)
    else:
        dx = tl.zeros([BLOCK_E, BLOCK_C], dtype=tl.float32)
    tl.store(gx_ptr + (n * sgx_n + h * sgx_h + w * sgx_w)[:, None] + c64[None, :] * sgx_c,
             dx.to(gx_ptr.dtype.element_ty), mask=mask)


_FWD_TUNED = autotune_lists(_bn_relu_pool_conv1x1_kernel, ["P", "K", "COUT", "INPUT_PRECISION", "ROW_RUN", "WIN_RUN"],
                            FWD_CONFIGS_SM90, FWD_CONFIGS_SM80, FWD_CONFIGS_FMA, nchw_fp32=True)
_WGRAD_TUNED = autotune_lists(_pool_conv1x1_wgrad_kernel, ["P", "C", "COUT", "INPUT_PRECISION", "ROW_RUN",
                                                             "WIN_RUN"],
                              WGRAD_CONFIGS_SM90, WGRAD_CONFIGS_SM80, WGRAD_CONFIGS_FMA, nchw_fp32=True)
_DGRAD_TUNED = autotune_lists(_pool_conv1x1_dgrad_kernel,  # no fma list: indexed by device_arch
                              ["P", "C", "COUT", "COMPUTE_SUMS", "WRITE_DX", "CENTERED", "INPUT_PRECISION",
                               "ROW_RUN", "WIN_RUN"],
                              DGRAD_CONFIGS_SM90, DGRAD_CONFIGS_SM80)


# --------------------------------------------------------------------------------------------
# Input checks (messages name the tensor, style.md)
# --------------------------------------------------------------------------------------------


def _check_x(x: Tensor) -> None:
    check_activation(x, "x")
    if x.shape[2] < 2 or x.shape[3] < 2:
        raise ValueError(f"x must have H >= 2 and W >= 2 (one 2x2 pooling window at least), "
                         f"got {x.shape[2]}x{x.shape[3]}")


def _check_weight(weight: Tensor, x: Tensor) -> None:
    """The kernels read W[o, c] at o * stride(0) + c * stride(1), a Conv2d weight without a view."""
    c = x.shape[1]
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not is_1x1_weight(weight, c):
        raise ValueError(f"weight must have shape (Cout, {c}) or (Cout, {c}, 1, 1) (its input channels "
                         f"must match x's {c}), got {list(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")


def _check_pooled(t: Tensor, name: str, x: Tensor, cout: int, dtypes: Tuple[torch.dtype, ...]) -> None:
    """t: (N, Cout, H//2, W//2), any strides (out, or grad_out)."""
    n, _, h, w = x.shape
    shape = [n, cout, h // 2, w // 2]
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if list(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} (N, Cout, H//2, W//2), got {list(t.shape)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be {names} (x is {x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def window_run(*tensors: Tensor, rows_per_program: Sequence[int] = ()) -> int:
    """The run (indexing.row_run) of the 2x2 windows' pixels of full-resolution tensors (N, C, H, W)
    as the kernels walk them (_window_pairs): the rows of the views t[:, :, 0:2HO:2, 0:2WO] (top)
    and t[:, :, 1:2HO:2, 0:2WO] (bottom, offsets counted from t's start), two per pooled row; 1
    (the kernels then read the four pixels apiece) below WINDOW_RUN_MIN. NCHW: up to the largest
    power of two dividing 2 * WO and W; channels_last: 1.
    rows_per_program: pooled rows, as the launcher splits them."""
    views = [t[:, :, 0:t.shape[2] // 2 * 2:2, 0:t.shape[3] // 2 * 2] for t in tensors]
    run = row_run(*views, rows_per_program=tuple(2 * rows for rows in rows_per_program))
    for t in tensors:  # the bottom row's pixels, stride(2) further, start their groups at multiples of G too
        while t.stride(2) % run:
            run //= 2
    return run if run >= WINDOW_RUN_MIN else 1


def _empty_output(x: Tensor, cout: int) -> Tensor:
    return empty_like_layout(x, cout, x.dtype, (x.shape[2] // 2, x.shape[3] // 2))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def bn_relu_pool_conv1x1_triton(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                out: Optional[Tensor] = None) -> Tensor:
    """out = conv1x1(avg_pool2d(relu(x * scale + shift), 2, 2), weight): a DenseNet transition.

    x:      (N, C, H, W) float32/float16/bfloat16, H, W >= 2, any strides: a dense block's output
            buffer (or a channel slice of one), NCHW or channels_last, read in place.
    scale:  (C,) float32, gamma * invstd;   shift: (C,) float32, beta - mean * scale.
    weight: (Cout, C) or (Cout, C, 1, 1), any float dtype, cast to x's dtype for the GEMM.
    out:    optional (N, Cout, H//2, W//2) tensor of x's dtype with any strides (e.g. the channel
            prefix of the next block's buffer), written in place; None allocates one in x's layout.
    relu(bn(x)) is evaluated in float32, averaged over each 2x2 window (floor semantics: an odd
    last row/column is dropped), rounded to x's dtype, and multiplied by W with float32
    accumulation. Returns out. Raises ValueError / TypeError naming the offending tensor.
    """
    _check_x(x)
    check_channel_vectors(x, scale=scale, shift=shift)
    _check_weight(weight, x)
    n, c, h, w = x.shape
    cout = weight.shape[0]
    if out is None:
        out = _empty_output(x, cout)
    else:
        _check_pooled(out, "out", x, cout, (x.dtype,))
    ho, wo = h // 2, w // 2
    p = n * ho * wo
    precision = dot_precision(x.dtype)  # TF32 for fp32 data as cuDNN convs; ignored for fp16/bf16
    args = (x, scale.contiguous(), shift.contiguous(), weight, out,
            p, c, cout, ho * wo, wo, *x.stride(), *weight.stride()[:2], *out.stride())
    runs = dict(ROW_RUN=row_run(out), WIN_RUN=window_run(x))
    if INTERPRET:
        grid = (cdiv(p, INTERPRET_FWD["BLOCK_M"]), cdiv(cout, INTERPRET_FWD["BLOCK_N"]))
        _bn_relu_pool_conv1x1_kernel[grid](*args, INPUT_PRECISION=precision, **runs, num_warps=4, **INTERPRET_FWD)
    else:
        with torch.cuda.device(x.device):
            _FWD_TUNED[nchw_fp32_list(x, precision)][
                lambda meta: (cdiv(p, meta["BLOCK_M"]), cdiv(cout, meta["BLOCK_N"]))
            ](*args, INPUT_PRECISION=precision, **runs)
    return out


def _wgrad_splits(p: int, cout: int, c: int, device: torch.device) -> Tuple[int, int]:
    """(splits, rows per split) of the wgrad reduction over the P pooled rows. Depends only on the
    problem (not on the autotuned tile), so the partials are summed in the same order every call."""
    if INTERPRET:
        rows = INTERPRET_WGRAD_ROWS_PER_SPLIT
        return cdiv(p, rows), rows
    sms = device_sms(device)
    tiles = cdiv(cout, 64) * cdiv(c, 64)
    # ~2 programs per SM in all, each over at least one aligned group of rows. The fp32 workspace,
    # SPLITS * Cout * C floats, stays under ~(2 * SMs + tiles) 64x64 tiles (4.4 MB on 132 SMs).
    # Until the twentieth session each split also took at least 512 rows: at DenseNet-BC-100's
    # second transition (P = 4,096 pooled rows, 15 tiles) that left 8 splits, 120 programs of 16
    # row tiles each, the latency-bound shape of the 1x1 backward's pass 1 there
    # (conv1x1_backward.row_split); now 16 splits.
    splits = max(1, min(cdiv(2 * sms, tiles), cdiv(p, WGRAD_ROW_ALIGN)))
    rows = cdiv(cdiv(p, splits), WGRAD_ROW_ALIGN) * WGRAD_ROW_ALIGN  # splits start at aligned rows (row_run)
    return cdiv(p, rows), rows


def bn_relu_pool_conv1x1_backward_triton(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                                         invstd: Tensor, gamma: Tensor, beta: Tensor, batch_stats: bool, *,
                                         scale: Optional[Tensor] = None, shift: Optional[Tensor] = None
                                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of out = conv1x1(avg_pool2d(relu(bn(x)), 2, 2), weight).

    grad_out: (N, Cout, H//2, W//2), any strides, x's dtype or float32.
    x:        (N, C, H, W) float32/float16/bfloat16, any strides (the forward's input).
    weight:   (Cout, C) or (Cout, C, 1, 1), any float dtype.
    mean, invstd, gamma, beta: (C,) float32; the forward used scale = gamma * invstd and
              shift = beta - mean * scale.
    scale, shift: the forward's (C,) float32 vectors when the caller has them; else computed here
              by the function the forward used (ops.bn_relu.scale_shift).
    batch_stats: True when mean/invstd are x's own batch statistics (training-mode BN: dx has the
              mean-subtraction terms), False for fixed (running) statistics.
    Returns (grad_x, grad_gamma, grad_beta, grad_weight): grad_x (N, C, H, W) in x's dtype and
    layout, grad_gamma and grad_beta (C,) float32, grad_weight in weight's dtype and shape.
    Beyond grad_x, only O(C * (Cout + P / BLOCK)) float32 workspace is allocated.
    """
    _check_x(x)
    _check_weight(weight, x)
    check_channel_vectors(x, mean=mean, invstd=invstd, gamma=gamma, beta=beta)
    cout = weight.shape[0]
    _check_pooled(grad_out, "grad_out", x, cout, tuple(dict.fromkeys((x.dtype, torch.float32))))
    if not isinstance(batch_stats, bool):
        raise TypeError(f"batch_stats must be a bool, got {type(batch_stats).__name__}")
    n, c, h, w = x.shape
    precision = dot_precision(x.dtype)
    ho, wo = h // 2, w // 2
    p, m = n * ho * wo, n * h * w
    dev = x.device
    scale, shift = forward_scale_shift(mean, invstd, gamma, beta, scale, shift)
    mean, invstd = mean.contiguous(), invstd.contiguous()
    grad_x = empty_like_layout(x, c, x.dtype)

    # 1. grad_weight: split-K partials over the pooled rows, summed in a fixed order.
    splits, rows_per_split = _wgrad_splits(p, cout, c, dev)
    ws_w = torch.empty((splits, cout, c), dtype=torch.float32, device=dev)
    wgrad_args = (grad_out, x, scale, shift, ws_w, p, c, cout, ho * wo, wo, rows_per_split,
                  *grad_out.stride(), *x.stride())
    w_runs = dict(ROW_RUN=row_run(grad_out, rows_per_program=(rows_per_split,)),
                  WIN_RUN=window_run(x, rows_per_program=(rows_per_split,)))
    if INTERPRET:
        grid = (cdiv(cout, INTERPRET_WGRAD["BLOCK_O"]), cdiv(c, INTERPRET_WGRAD["BLOCK_C"]), splits)
        _pool_conv1x1_wgrad_kernel[grid](*wgrad_args, INPUT_PRECISION=precision, **w_runs, num_warps=4,
                                         **INTERPRET_WGRAD)
    else:
        with torch.cuda.device(dev):
            _WGRAD_TUNED[nchw_fp32_list(x, precision, grad_out)][
                lambda meta: (cdiv(cout, meta["BLOCK_O"]), cdiv(c, meta["BLOCK_C"]), splits)
            ](*wgrad_args, INPUT_PRECISION=precision, **w_runs)
    grad_weight = (ws_w[0] if splits == 1 else ws_w.sum(dim=0)).to(weight.dtype).view(weight.shape)
    del ws_w

    # 2. dpool GEMM + BN backward: pass 1 (sums, and dx when the statistics are fixed), pass 2.
    if INTERPRET:
        tuned = None
        min_block_p = INTERPRET_DGRAD["BLOCK_P"]
    else:
        tuned = _DGRAD_TUNED[device_arch(dev)]
        # Sized for the smallest BLOCK_P: autotuning runs every config; the chosen one writes rows
        # [0, cdiv(P, its BLOCK_P)) on its final run, and only those are summed.
        min_block_p = min(cfg.kwargs["BLOCK_P"] for cfg in tuned.configs)
    ws_dy = torch.empty((cdiv(p, min_block_p), c), dtype=torch.float32, device=dev)
    ws_dyx = torch.empty_like(ws_dy)
    k1 = torch.zeros(c, dtype=torch.float32, device=dev)
    k2 = torch.zeros_like(k1)
    d_runs = dict(ROW_RUN=row_run(grad_out), WIN_RUN=window_run(x, grad_x))

    def dgrad(compute_sums: bool, write_dx: bool, centered: bool) -> int:
        """Launches one pass; returns its BLOCK_P (rows per partial-sum row)."""
        args = (grad_out, x, weight, scale, shift, mean, invstd, k1, k2, grad_x, ws_dy, ws_dyx,
                p, c, cout, ho * wo, wo, *grad_out.stride(), *x.stride(), *weight.stride()[:2], *grad_x.stride())
        flags = dict(COMPUTE_SUMS=compute_sums, WRITE_DX=write_dx, CENTERED=centered, INPUT_PRECISION=precision,
                     **d_runs)
        if tuned is None:
            grid = (cdiv(p, INTERPRET_DGRAD["BLOCK_P"]), cdiv(c, INTERPRET_DGRAD["BLOCK_C"]))
            _pool_conv1x1_dgrad_kernel[grid](*args, **flags, num_warps=4, **INTERPRET_DGRAD)
            return INTERPRET_DGRAD["BLOCK_P"]
        with torch.cuda.device(dev):
            tuned[lambda meta: (cdiv(p, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"]))](*args, **flags)
        return tuned.best_config.kwargs["BLOCK_P"]

    block_p = dgrad(compute_sums=True, write_dx=not batch_stats, centered=False)
    parts = cdiv(p, block_p)
    grad_beta = ws_dy[:parts].sum(dim=0)
    grad_gamma = ws_dyx[:parts].sum(dim=0)
    if batch_stats:
        k1.copy_(grad_beta / m)
        k2.copy_(grad_gamma / m)
        dgrad(compute_sums=False, write_dx=True, centered=True)

    # 3. Pixels dropped by the floor pooling (odd H and/or W).
    ncol = 2 * ho if w % 2 else 0
    e = ncol + (w if h % 2 else 0)
    if e:
        block_e, block_c = EDGE_BLOCKS
        grid = (cdiv(n * e, block_e), cdiv(c, block_c))
        _dropped_pixels_dgrad_kernel[grid](
            x, scale, mean, invstd, k1, k2, grad_x, n * e, e, ncol, c, h, w, *x.stride(), *grad_x.stride(),
            CENTERED=batch_stats, BLOCK_E=block_e, BLOCK_C=block_c, num_warps=4)
    return grad_x, grad_gamma, grad_beta, grad_weight


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def triton_bn_relu_pool_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor) -> Tensor:
    """torch.ops.densenet_fast.triton_bn_relu_pool_conv1x1: :func:`bn_relu_pool_conv1x1_triton`
    allocating its output."""
    return bn_relu_pool_conv1x1_triton(x, scale, shift, weight)


@triton_bn_relu_pool_conv1x1.register_fake
def _triton_bn_relu_pool_conv1x1_fake(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor) -> Tensor:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    return _empty_output(x, weight.shape[0])


@torch.library.custom_op(OUT_OP_NAME, mutates_args=("out",))
def triton_bn_relu_pool_conv1x1_out(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor) -> None:
    """torch.ops.densenet_fast.triton_bn_relu_pool_conv1x1_out: :func:`bn_relu_pool_conv1x1_triton`
    writing into ``out`` (e.g. the channel prefix of the next block's buffer)."""
    bn_relu_pool_conv1x1_triton(x, scale, shift, weight, out=out)


@triton_bn_relu_pool_conv1x1_out.register_fake
def _triton_bn_relu_pool_conv1x1_out_fake(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                                          out: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    return None


@torch.library.custom_op(BACKWARD_OP_NAME, mutates_args=())
def triton_bn_relu_pool_conv1x1_backward(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                                         invstd: Tensor, gamma: Tensor, beta: Tensor, batch_stats: bool
                                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch.ops.densenet_fast.triton_bn_relu_pool_conv1x1_backward:
    :func:`bn_relu_pool_conv1x1_backward_triton` as a custom op."""
    return bn_relu_pool_conv1x1_backward_triton(grad_out, x, weight, mean, invstd, gamma, beta, batch_stats)


@triton_bn_relu_pool_conv1x1_backward.register_fake
def _triton_bn_relu_pool_conv1x1_backward_fake(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                                               invstd: Tensor, gamma: Tensor, beta: Tensor, batch_stats: bool
                                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    c = x.shape[1]
    grad_x = empty_like_layout(x, x.shape[1], x.dtype)
    return (grad_x, x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32),
            weight.new_empty(weight.shape))
