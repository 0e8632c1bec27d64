"""bn_relu_conv3x3 in Triton: the dense layer's 3x3 convolution, out = conv3x3(relu(Bt * scale + shift)),
forward (with the batch statistics of out) and backward.

Forward (dense_block.md, forward step 3): an implicit GEMM over the M = N*H*W output pixels,
    out[m, o] = sum_{tap, c} Z[m + tap, c] * W[o, c, tap],   Z = relu(Bt * scale + shift),
with the reduction over the 9 taps x B input channels flattened into one loop (so the compiler
pipelines across taps). The A tile of tap (kh, kw) is Bt read at the shifted pixel (h+kh-1, w+kw-1)
through its strides (in elements, int64 offsets: NCHW, channels_last or a channel slice, in
place); BN and ReLU are applied in float32 as it is loaded, and taps outside the image are set to
0 AFTER BN-ReLU (zero padding pads Z, not Bt: relu(shift) would be wrong). The tile is rounded to
Bt's dtype for tl.dot, which accumulates in float32 (float32 data: TF32 exactly when cuDNN's
convolutions may, ops.precision.dot_precision, else "ieee"). The weight (K, B, 3, 3) is read
through its strides and cast to Bt's dtype. The epilogue rounds to the output dtype, stores
into ``out`` through its strides (in the block, the channel
slice F[:, C_l:C_l+K] of the block buffer: writing it IS the concatenation), and writes per-program
(mean, M2) of the stored values to a workspace merged by channel_stats.merge_partial_stats (Chan's
formula, no atomics: deterministic). These are the statistics cache's entries for the new channels.

Backward (dense_block.md, backward steps 3-4), three kernels, no atomics:
1. dgrad: dZ = dgrad3x3(dOut, W), the same implicit GEMM with the taps transposed
   (dZ[h, w] = sum_{tap, o} dOut[h-kh+1, w-kw+1, o] * W[o, c, kh, kw]). The epilogue recomputes
   Y = Bt * scale + shift exactly as the forward did, masks dY = dZ * [Y > 0], and writes the
   per-program per-channel sums of dY and dY * xhat (xhat = (Bt - mean) * invstd) to workspaces,
   summed afterwards by torch (a fixed-order reduction: deterministic). In eval mode (batch_stats
   False) it writes dX = gamma * invstd * dY straight into grad_x; in training mode it writes dY
   (float32: into grad_x itself when Bt is float32, else into a float32 temporary of B channels).
2. (training mode only) one elementwise pass, the BN backward (Ioffe & Szegedy 2015):
       dX = gamma * invstd * (dY - dbeta / M - xhat * dgamma / M),  dbeta = sum dY, dgamma = sum dY xhat.
3. wgrad: dW[o, c, tap] = sum_m dOut[m, o] * Z[m + tap, c], with Z recomputed from Bt on the fly
   (never stored). Program (p, tap, c-block) reduces the rows [p*R, (p+1)*R) into a (B, K) tile of
   tap `tap` of a (P, K, B, 9) float32 workspace; the P partials are summed by torch
   (deterministic), which leaves grad_weight's own (K, B, 3, 3) memory order.
dOut may be float32 (the block's gradient buffer G is float32 when F is fp16/bf16) or Bt's dtype;
it is rounded to Bt's dtype for the GEMMs, as a naive mixed-precision model's conv backward sees it.

References: ``densenet_fast.reference.bn_relu_conv3x3_ref`` and ``bn_backward_ref``.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import (NCHW_FP32, INTERPRET, autotune, autotune_lists, cdiv, config_list, device_sms, nchw_fp32_list,
               next_power_of_2)
from ..ops.precision import dot_precision
from ..ops.bn_relu import forward_scale_shift
from .indexing import contiguous_rows, row_nhw, row_run
from .channel_stats import (check_activation, check_channel_vectors, empty_like_layout, is_channels_last,
                            merge_partial_stats, store_tile_stats)

__all__ = ["bn_relu_conv3x3_triton", "bn_relu_conv3x3_backward_triton"]

OP_NAME = "densenet_fast::triton_bn_relu_conv3x3"
OP_NAME_OUT = "densenet_fast::triton_bn_relu_conv3x3_out"
OP_NAME_BACKWARD = "densenet_fast::triton_bn_relu_conv3x3_backward"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cfg(names: Tuple[str, str], a: int, b: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({names[0]: a, names[1]: b}, num_warps=warps, num_stages=stages)


# Small candidate lists. The dense layer's sizes: K = growth rate (12, 32: the narrow GEMM side,
# chosen on the host as one power-of-two tile, not tuned), B = bn_size * K (48, 128), M = N*H*W
# large. Hopper has more shared memory: deeper pipelines and 256-row tiles.
# sm_90 defaults (the first config: what runs with autotuning off). The forward's runs its 128-row
# tile on 8 warps: on 4 it spilled in NCHW (sm_90, DenseNet-121 layer: float32 TF32 584 bytes of
# stack per thread, fp16/bf16 288-336; scripts/triton_aot_check.py). float32 NCHW data has its
# own lists (below). Float32 defaults keep no stack with triton 3.6 or 3.8
# (tests/test_triton_compile.py). Timed on the 2026-11-27 lease (H200, triton 3.6, fp32 TF32
# NCHW, DenseNet-BC-100 shapes; benchmarks/results/gpu-2026-11-27-h200/autotune.jsonl; each
# config's time over the best, geometric mean): the dgrad's fastest, (64, 64) on 4 warps (1.00x
# against the default's 1.15x), keeps 80 bytes of stack on DenseNet-121's float32 NCHW layer; the
# wgrad's, (64, 64) on 4 warps (1.00x against 1.08x), 144 bytes with triton 3.6. So the defaults
# stay; autotuning (on by default) picks among all of them.
_FWD = ("BLOCK_M", "BLOCK_K")  # rows x input channels per tap
CONFIGS_FWD_SM90: List[triton.Config] = [
    _cfg(_FWD, 128, 32, 8, 3), _cfg(_FWD, 128, 64, 4, 3), _cfg(_FWD, 64, 32, 4, 4),
    _cfg(_FWD, 64, 64, 4, 4), _cfg(_FWD, 256, 32, 8, 3), _cfg(_FWD, 128, 32, 4, 3),
]
CONFIGS_FWD_SM80: List[triton.Config] = [
    _cfg(_FWD, 128, 32, 8, 3), _cfg(_FWD, 64, 32, 4, 4), _cfg(_FWD, 128, 64, 8, 3),
    _cfg(_FWD, 64, 64, 4, 3),
]
_DGRAD = ("BLOCK_M", "BLOCK_N")  # rows x bottleneck channels
CONFIGS_DGRAD_SM90: List[triton.Config] = [
    _cfg(_DGRAD, 128, 64, 8, 3), _cfg(_DGRAD, 128, 128, 8, 3), _cfg(_DGRAD, 64, 64, 4, 4),
    _cfg(_DGRAD, 64, 128, 4, 3), _cfg(_DGRAD, 256, 64, 8, 3), _cfg(_DGRAD, 128, 64, 4, 3),
]
CONFIGS_DGRAD_SM80: List[triton.Config] = [
    _cfg(_DGRAD, 128, 64, 8, 3), _cfg(_DGRAD, 64, 64, 4, 4), _cfg(_DGRAD, 128, 128, 8, 3),
    _cfg(_DGRAD, 64, 128, 4, 3),
]
_WGRAD = ("BLOCK_M", "BLOCK_C")  # reduction rows x bottleneck channels
CONFIGS_WGRAD_SM90: List[triton.Config] = [
    _cfg(_WGRAD, 64, 64, 8, 3), _cfg(_WGRAD, 128, 64, 4, 3), _cfg(_WGRAD, 64, 128, 8, 3),
    _cfg(_WGRAD, 128, 128, 8, 3), _cfg(_WGRAD, 64, 64, 4, 3),
]
CONFIGS_WGRAD_SM80: List[triton.Config] = [
    _cfg(_WGRAD, 64, 64, 8, 3), _cfg(_WGRAD, 128, 64, 4, 3), _cfg(_WGRAD, 64, 128, 4, 3),
]
# The forward on float32 NCHW data with TF32 dots: with num_stages > 1 triton stages the A tile
# (rows x input channels, contiguous along the rows in NCHW) through an unswizzled shared buffer
# across its fastest dimension, a 32-way bank conflict per copy (triton_kernels.NCHW_FP32; the
# wgrad's tiles do the same and get single_stage_first's lists). The 2026-11-27 lease timed only
# pipelined configs on that case: the best took 0.27 ms for a DenseNet-BC-100 32x32 layer (0.68
# GFLOP, 16 MB), ~70x its byte floor, while dgrad, reading the same layout without the staging, ran
# at a fifth of the time on 4x fewer loads. These single-stage tiles come first (the default with
# autotuning off: the 128-row tile on 8 warps, which keeps no stack on DenseNet-121's layer, where
# on 4 warps it spilled 416 bytes on sm_90 and 544 on sm_80); the pipelined ones stay candidates.
# Measured on the next lease (H200, fp32 NCHW, default configs): triton+graph on DenseNet-BC-100
# went from 34.9 to 26.5 ms and on DenseNet-121 from 129.2 to 103.5 ms (benchmarks/NOTES-gpu.md).
CONFIGS_FWD_SM90_NCHW_FP32: List[triton.Config] = [
    _cfg(_FWD, 128, 32, 8, 1), _cfg(_FWD, 64, 32, 4, 1), _cfg(_FWD, 128, 32, 4, 1), *CONFIGS_FWD_SM90,
]
CONFIGS_FWD_SM80_NCHW_FP32: List[triton.Config] = [
    _cfg(_FWD, 128, 32, 8, 1), _cfg(_FWD, 64, 32, 4, 1), _cfg(_FWD, 128, 32, 4, 1), *CONFIGS_FWD_SM80,
]
# float32 data with IEEE dots (TF32 off, ops.precision): tl.dot lowers to FMAs on registers, where
# the pipelined configs above spill (sm_90, DenseNet-121 layer, NCHW: 968 / 992 / 120 bytes of
# stack per thread for the forward / dgrad / wgrad defaults; scripts/triton_aot_check.py). Single
# stage tiles compile with none in either layout, on DenseNet-121's and DenseNet-BC's layers. The
# forward's 64-row tile leads: since the NCHW rows are promised contiguous (indexing.row_run), the
# 128-row one keeps 16 bytes of stack on DenseNet-121's layer with triton 3.6 (128 registers).
CONFIGS_FWD_FMA: List[triton.Config] = [
    _cfg(_FWD, 64, 32, 8, 1), _cfg(_FWD, 128, 32, 8, 1), _cfg(_FWD, 64, 32, 4, 1), _cfg(_FWD, 32, 32, 4, 1),
]
CONFIGS_DGRAD_FMA: List[triton.Config] = [
    _cfg(_DGRAD, 128, 64, 8, 1), _cfg(_DGRAD, 64, 64, 8, 1), _cfg(_DGRAD, 128, 32, 8, 1),
    _cfg(_DGRAD, 64, 32, 4, 1),
]
CONFIGS_WGRAD_FMA: List[triton.Config] = [
    _cfg(_WGRAD, 64, 64, 8, 1), _cfg(_WGRAD, 32, 64, 8, 1), _cfg(_WGRAD, 32, 128, 8, 1), _cfg(_WGRAD, 16, 64, 4, 1),
]
# wgrad programs reduce whole multiples of this many rows (>= every BLOCK_M above).
WGRAD_ROW_QUANTUM = 128

# The interpreter runs programs one after another in Python: one fixed small config (tl.dot
# needs tiles of at least 16), no autotuning. Two wgrad tiles per program, so the tests cover the
# in-program accumulation, the cross-program sum and the ragged last part even on 5x7 images.
INTERPRET_FWD = {"BLOCK_M": 16, "BLOCK_K": 16}
INTERPRET_DGRAD = {"BLOCK_M": 16, "BLOCK_N": 16}
INTERPRET_WGRAD = {"BLOCK_M": 16, "BLOCK_C": 16}
INTERPRET_WGRAD_ROWS = 32


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _bn_relu_conv3x3_fwd_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr, ws_mean_ptr, ws_m2_ptr,
                                M, B, KOUT, H, W,
                                sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w,
                                so_n, so_c, so_h, so_w,
                                INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n, h, w = row_nhw(rows, H * W, W)
    x_row = contiguous_rows(n, h, w, sx_n, sx_h, sx_w, ROW_RUN, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < KOUT
    w_col = cols.to(tl.int64) * sw_o
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_kb = (B + BLOCK_K - 1) // BLOCK_K
    # One flat loop over (tap, channel block): tap = (kh, kw), input pixel (h + kh - 1, w + kw - 1).
    for it in range(0, 9 * num_kb):
        tap = it // num_kb
        kh = tap // 3
        kw = tap % 3
        ks = (it - tap * num_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < B
        hs = h + (kh - 1)
        ws = w + (kw - 1)
        inside = rmask & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        amask = inside[:, None] & kmask[None, :]
        a = tl.load(x_ptr + (x_row + ((kh - 1) * sx_h + (kw - 1) * sx_w))[:, None] + ks[None, :].to(tl.int64) * sx_c,
                    mask=amask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + ks, mask=kmask, other=0.0)
        sh = tl.load(shift_ptr + ks, mask=kmask, other=0.0)
        # Zero padding applies to Z (after BN-ReLU): out-of-image taps contribute exactly 0.
        z = tl.where(amask, tl.maximum(a * sc[None, :] + sh[None, :], 0.0), 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + ks[:, None].to(tl.int64) * sw_c + w_col[None, :] + kh * sw_h + kw * sw_w,
                    mask=kmask[:, None] & nmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(z, b, acc=acc, input_precision=INPUT_PRECISION)
    mask = rmask[:, None] & nmask[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    o_row = contiguous_rows(n, h, w, so_n, so_h, so_w, ROW_RUN, BLOCK_M)
    tl.store(out_ptr + o_row[:, None] + cols[None, :].to(tl.int64) * so_c, y, mask=mask)
    store_tile_stats(y, mask, rmask, nmask, ws_mean_ptr, ws_m2_ptr, pid_m * KOUT + cols)


@triton.jit
def _conv3x3_dgrad_kernel(g_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, gamma_ptr,
                          dst_ptr, ws_ptr,
                          M, B, KOUT, H, W,
                          sg_n, sg_c, sg_h, sg_w, sw_o, sw_c, sw_h, sw_w,
                          sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
                          STORE_DX: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n, h, w = row_nhw(rows, H * W, W)
    g_row = contiguous_rows(n, h, w, sg_n, sg_h, sg_w, ROW_RUN, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # bottleneck channels c
    cmask = cols < B
    w_col = cols.to(tl.int64) * sw_c
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    num_kb = (KOUT + BLOCK_K - 1) // BLOCK_K
    # dZ[h, w, c] = sum_{kh, kw, o} dOut[h - kh + 1, w - kw + 1, o] * W[o, c, kh, kw]
    for it in range(0, 9 * num_kb):
        tap = it // num_kb
        kh = tap // 3
        kw = tap % 3
        ks = (it - tap * num_kb) * BLOCK_K + tl.arange(0, BLOCK_K)  # output channels o
        kmask = ks < KOUT
        hs = h - (kh - 1)
        ws = w - (kw - 1)
        inside = rmask & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        a = tl.load(g_ptr + (g_row - ((kh - 1) * sg_h + (kw - 1) * sg_w))[:, None] + ks[None, :].to(tl.int64) * sg_c,
                    mask=inside[:, None] & kmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + ks[:, None].to(tl.int64) * sw_o + w_col[None, :] + kh * sw_h + kw * sw_w,
                    mask=kmask[:, None] & cmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc=acc, input_precision=INPUT_PRECISION)
    # Epilogue: the ReLU mask from Y recomputed as the forward computed it, then the BN sums.
    mask = rmask[:, None] & cmask[None, :]
    col64 = cols.to(tl.int64)
    x_row = contiguous_rows(n, h, w, sx_n, sx_h, sx_w, ROW_RUN, BLOCK_M)
    xv = tl.load(x_ptr + x_row[:, None] + col64[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    istd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    y = xv * sc[None, :] + sh[None, :]
    dy = tl.where(mask & (y > 0.0), acc, 0.0)
    xhat = (xv - mu[None, :]) * istd[None, :]
    ws_off = pid_m * 2 * B + cols  # this program's row of the (P, 2B) workspace: [sum dy | sum dy * xhat]
    tl.store(ws_ptr + ws_off, tl.sum(dy, axis=0), mask=cmask)
    tl.store(ws_ptr + ws_off + B, tl.sum(dy * xhat, axis=0), mask=cmask)
    d_row = contiguous_rows(n, h, w, sd_n, sd_h, sd_w, ROW_RUN, BLOCK_M)
    d_ptrs = dst_ptr + d_row[:, None] + col64[None, :] * sd_c
    if STORE_DX:  # eval mode: dX = gamma * invstd * dY, in x's dtype
        ga = tl.load(gamma_ptr + cols, mask=cmask, other=0.0)
        tl.store(d_ptrs, (dy * (ga * istd)[None, :]).to(dst_ptr.dtype.element_ty), mask=mask)
    else:  # training mode: dY in float32, finished by _bn_backward_dx_kernel
        tl.store(d_ptrs, dy, mask=mask)


@triton.jit
def _bn_backward_dx_kernel(dy_ptr, x_ptr, mean_ptr, invstd_ptr, gamma_ptr, dbeta_ptr, dgamma_ptr, dx_ptr,
                           M, B, H, W, inv_m,
                           sy_n, sy_c, sy_h, sy_w, sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
                           ROW_RUN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n, h, w = row_nhw(rows, H * W, W)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < B
    col64 = cols.to(tl.int64)
    mask = rmask[:, None] & cmask[None, :]
    y_row = contiguous_rows(n, h, w, sy_n, sy_h, sy_w, ROW_RUN, BLOCK_M)
    x_row = contiguous_rows(n, h, w, sx_n, sx_h, sx_w, ROW_RUN, BLOCK_M)
    d_row = contiguous_rows(n, h, w, sd_n, sd_h, sd_w, ROW_RUN, BLOCK_M)
    dy = tl.load(dy_ptr + y_row[:, None] + col64[None, :] * sy_c, mask=mask, other=0.0)
    xv = tl.load(x_ptr + x_row[:, None] + col64[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    istd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    ga = tl.load(gamma_ptr + cols, mask=cmask, other=0.0)
    mdb = tl.load(dbeta_ptr + cols, mask=cmask, other=0.0) * inv_m  # sum(dY) / M
    mdg = tl.load(dgamma_ptr + cols, mask=cmask, other=0.0) * inv_m  # sum(dY * xhat) / M
    xhat = (xv - mu[None, :]) * istd[None, :]
    dx = (ga * istd)[None, :] * (dy - mdb[None, :] - xhat * mdg[None, :])
    tl.store(dx_ptr + d_row[:, None] + col64[None, :] * sd_c, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv3x3_wgrad_kernel(g_ptr, x_ptr, scale_ptr, shift_ptr, ws_ptr,
                          M, B, KOUT, H, W, ROWS_PER_PROG,
                          sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w,
                          INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_c = tl.program_id(2)
    num_ob = (KOUT + BLOCK_O - 1) // BLOCK_O
    tap = pid_t // num_ob
    kh = tap // 3
    kw = tap % 3
    os_ = (pid_t % num_ob) * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = os_ < KOUT
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < B
    sc = tl.load(scale_ptr + cs, mask=cmask, other=0.0)
    sh = tl.load(shift_ptr + cs, mask=cmask, other=0.0)
    g_col = os_.to(tl.int64) * sg_c
    x_col = cs.to(tl.int64) * sx_c
    # The (B, K) tile of tap (kh, kw): dW^T[c, o] = sum_m Z[m + tap, c] * dOut[m, o]. B, the
    # larger side, is the MMA's M dimension.
    acc = tl.zeros([BLOCK_C, BLOCK_O], dtype=tl.float32)
    row0 = pid_p * ROWS_PER_PROG
    row_end = tl.minimum(row0 + ROWS_PER_PROG, M)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        n, h, w = row_nhw(rows, H * W, W)
        g_row = contiguous_rows(n, h, w, sg_n, sg_h, sg_w, ROW_RUN, BLOCK_M)
        x_row = contiguous_rows(n, h, w, sx_n, sx_h, sx_w, ROW_RUN, BLOCK_M)
        g = tl.load(g_ptr + g_row[:, None] + g_col[None, :],
                    mask=rmask[:, None] & omask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        hs = h + (kh - 1)
        ws = w + (kw - 1)
        inside = rmask & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        zmask = cmask[:, None] & inside[None, :]
        xt = tl.load(x_ptr + x_col[:, None] + (x_row + ((kh - 1) * sx_h + (kw - 1) * sx_w))[None, :],
                     mask=zmask, other=0.0).to(tl.float32)
        zt = tl.where(zmask, tl.maximum(xt * sc[:, None] + sh[:, None], 0.0), 0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(zt, g, acc=acc, input_precision=INPUT_PRECISION)
    # workspace (P, K, B, 9): the sum over P is already grad_weight's (K, B, 3, 3) order
    ws_off = ((pid_p * KOUT + os_[None, :]).to(tl.int64) * B + cs[:, None]) * 9 + tap
    tl.store(ws_ptr + ws_off, acc, mask=cmask[:, None] & omask[None, :])


# Keys: the sizes, the layout (sx_c is 1 for channels_last data) and the precision; triton adds
# the tensors' dtypes itself.
_FWD_KEY = ["M", "B", "KOUT", "H", "W", "sx_c", "INPUT_PRECISION", "ROW_RUN", "BLOCK_N"]
_TUNED_FWD = {**autotune_lists(_bn_relu_conv3x3_fwd_kernel, _FWD_KEY, CONFIGS_FWD_SM90, CONFIGS_FWD_SM80,
                               CONFIGS_FWD_FMA),
              **{arch + NCHW_FP32: autotune(configs=configs, key=_FWD_KEY)(_bn_relu_conv3x3_fwd_kernel)
                 for arch, configs in (("sm90", CONFIGS_FWD_SM90_NCHW_FP32), ("sm80", CONFIGS_FWD_SM80_NCHW_FP32))}}


_TUNED_DGRAD = autotune_lists(_conv3x3_dgrad_kernel,
                              ["M", "B", "KOUT", "H", "W", "sx_c", "sg_c", "STORE_DX", "INPUT_PRECISION", "ROW_RUN",
                               "BLOCK_K"],
                              CONFIGS_DGRAD_SM90, CONFIGS_DGRAD_SM80, CONFIGS_DGRAD_FMA)
_TUNED_WGRAD = autotune_lists(_conv3x3_wgrad_kernel, ["M", "B", "KOUT", "H", "W", "ROWS_PER_PROG", "sx_c", "sg_c",
                                                      "INPUT_PRECISION", "ROW_RUN", "BLOCK_O"],
                              CONFIGS_WGRAD_SM90, CONFIGS_WGRAD_SM80, CONFIGS_WGRAD_FMA, nchw_fp32=True)


# triton 3.8 (not 3.6) on sm_90 stages the wgrad's 64 x 16 float32 gradient tile of channels_last
# data (growth rate <= 16 beside 16-bit x: DenseNet-BC under AMP) through one shared-memory bank
# when pipelined (aot.unswizzled_staging).
_GRAD_TILE_STAGED_BADLY = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2]) > (3, 6)


def wgrad_config_list(x: Tensor, grad_out: Tensor, precision: str, block_o: int) -> str:
    """The wgrad's config list: nchw_fp32_list's, or its single-stage-first list also where
    _GRAD_TILE_STAGED_BADLY says the pipelined tiles conflict on a float32 gradient tile."""
    name = nchw_fp32_list(x, precision, grad_out)
    if (name == "sm90" and _GRAD_TILE_STAGED_BADLY and block_o == 16 and grad_out.dtype == torch.float32
            and x.dtype != torch.float32):
        return name + NCHW_FP32
    return name


def _narrow_tile(k: int) -> int:
    """The tile over the K = growth-rate side: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return min(64, max(16, next_power_of_2(k)))


# --------------------------------------------------------------------------------------------
# Input checks (messages name the tensor, style.md)
# --------------------------------------------------------------------------------------------


def _check_tensor(t, name: str, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def _check_weight(x: Tensor, weight: Tensor) -> None:
    _check_tensor(weight, "weight", x)
    b = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != b or tuple(weight.shape[2:]) != (3, 3) or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (K, {b}, 3, 3) (K >= 1 output channels, {b} = x's channels), "
                         f"got {list(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")


def _check_forward(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Optional[Tensor]) -> None:
    check_activation(x, "x")
    check_channel_vectors(x, scale=scale, shift=shift)
    _check_weight(x, weight)
    if out is not None:
        _check_tensor(out, "out", x)
        want = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
        if tuple(out.shape) != want:
            raise ValueError(f"out must have shape {list(want)} (N, K, H, W), got {list(out.shape)}")
        if out.dtype != x.dtype:
            raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")


def _check_backward(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                    gamma: Tensor, beta: Tensor) -> None:
    check_activation(x, "x")
    _check_weight(x, weight)
    check_channel_vectors(x, mean=mean, invstd=invstd, gamma=gamma, beta=beta)
    _check_tensor(grad_out, "grad_out", x)
    want = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    if tuple(grad_out.shape) != want:
        raise ValueError(f"grad_out must have shape {list(want)} (N, K, H, W), got {list(grad_out.shape)}")
    if grad_out.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"grad_out must be float32 or x's dtype {x.dtype}, got {grad_out.dtype}")


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _forward_into(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                  stats_out: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Launch the forward kernel writing ``out`` (checked); returns the stats (mean, var) of out,
    written into stats_out's tensors when given (checked)."""
    n, b, h, w = x.shape
    kout = weight.shape[0]
    m = n * h * w
    block_n = _narrow_tile(kout)
    precision = dot_precision(x.dtype)  # TF32 for fp32 data as cuDNN convs; ignored for fp16/bf16
    args = (x, scale.contiguous(), shift.contiguous(), weight, out)
    sizes = (m, b, kout, h, w, *x.stride(), *weight.stride(), *out.stride())
    n_blocks = cdiv(kout, block_n)
    run = row_run(x, out)
    if INTERPRET:
        block_m = INTERPRET_FWD["BLOCK_M"]
        parts = cdiv(m, block_m)
        ws_mean = torch.empty((parts, kout), dtype=torch.float32, device=x.device)
        ws_m2 = torch.empty_like(ws_mean)
        _bn_relu_conv3x3_fwd_kernel[(parts, n_blocks)](
            *args, ws_mean, ws_m2, *sizes, INPUT_PRECISION=precision, ROW_RUN=run, BLOCK_N=block_n, num_warps=4,
            **INTERPRET_FWD)
    else:
        tuned = _TUNED_FWD[nchw_fp32_list(x, precision)]
        # Sized for the smallest BLOCK_M: autotuning runs every config; the chosen one writes
        # rows [0, cdiv(M, its BLOCK_M)) on its final run, and only those are merged.
        min_block_m = min(c.kwargs["BLOCK_M"] for c in tuned.configs)
        ws_mean = torch.empty((cdiv(m, min_block_m), kout), dtype=torch.float32, device=x.device)
        ws_m2 = torch.empty_like(ws_mean)

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]), n_blocks)

        tuned[grid](*args, ws_mean, ws_m2, *sizes, INPUT_PRECISION=precision, ROW_RUN=run, BLOCK_N=block_n)
        block_m = tuned.best_config.kwargs["BLOCK_M"]
        parts = cdiv(m, block_m)
    return merge_partial_stats(ws_mean, ws_m2, parts, block_m, m, out=stats_out)


def _check_stats_out(stats_out: Optional[Tuple[Tensor, Tensor]], x: Tensor, kout: int) -> None:
    if stats_out is None:
        return
    if not isinstance(stats_out, (tuple, list)) or len(stats_out) != 2:
        raise TypeError(f"stats_out must be a (mean, var) pair of tensors, got {type(stats_out).__name__}")
    for name, t in zip(("stats_out[0] (mean)", "stats_out[1] (var)"), stats_out):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (kout,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({kout},) float32 tensor (one value per output "
                             f"channel), got shape {list(t.shape)}, {t.dtype}, strides {list(t.stride())}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def bn_relu_conv3x3_triton(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                           out: Optional[Tensor] = None, stats_out: Optional[Tuple[Tensor, Tensor]] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """out = conv2d(relu(x * scale + shift), weight, padding=1), and the batch statistics of out.

    x:      (N, B, H, W) float32/float16/bfloat16, any strides: the bottleneck Bt of a dense layer
            (NCHW, channels_last, or a channel slice of a wider buffer), read in place.
    scale:  (B,) float32, gamma * invstd;   shift: (B,) float32, beta - mean * scale.
    weight: (K, B, 3, 3), any float dtype (cast to x's dtype for the GEMM).
    out:    optional (N, K, H, W) tensor of x's dtype with any strides, written in place (in the
            block: F[:, C_l:C_l+K], the layer's channels of the block buffer); it must not overlap
            x. When None, a new tensor in x's layout (channels_last when x's channel stride is
            its smallest).
    stats_out: optional (mean, var) pair of contiguous (K,) float32 tensors that receive the
            statistics (in the block: the statistics cache at the layer's channels).
    Zero padding applies after BN-ReLU. Returns (out, mean, var): mean/var (K,) float32, the
    biased batch statistics of out as stored (rounded to its dtype); stats_out's tensors when
    given. Raises ValueError / TypeError naming the offending tensor.
    """
    _check_forward(x, scale, shift, weight, out)
    _check_stats_out(stats_out, x, weight.shape[0])
    if out is None:
        out = empty_like_layout(x, weight.shape[0], x.dtype)
    mean, var = _forward_into(x, scale, shift, weight, out, stats_out)
    return out, mean, var


def _wgrad_rows_per_prog(x: Tensor, m: int, tiles_per_part: int) -> int:
    """Rows reduced by one wgrad program: about 4 programs per SM in all, whole row quanta."""
    if INTERPRET:
        return INTERPRET_WGRAD_ROWS
    sms = device_sms(x.device)
    parts = max(1, min(cdiv(4 * sms, tiles_per_part), cdiv(m, WGRAD_ROW_QUANTUM)))
    return cdiv(cdiv(m, parts), WGRAD_ROW_QUANTUM) * WGRAD_ROW_QUANTUM


def bn_relu_conv3x3_backward_triton(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                                    gamma: Tensor, beta: Tensor, batch_stats: bool, *,
                                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None
                                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of out = conv2d(relu(bn(x)), weight, padding=1), bn(x) = (x - mean) * invstd * gamma + beta.

    grad_out: (N, K, H, W), float32 or x's dtype, any strides (in the block: the channel slice
              G[:, C_l:C_l+K] of the float32 gradient buffer), read in place; rounded to x's dtype
              for the GEMMs.
    x:        (N, B, H, W) float32/float16/bfloat16, any strides: the bottleneck Bt.
    weight:   (K, B, 3, 3), any float dtype.
    mean, invstd, gamma, beta: (B,) float32.
    batch_stats: True when mean/invstd are x's own batch statistics (training-mode BN: the full
              BN backward, dX = gamma*invstd*(dY - sum(dY)/M - xhat*sum(dY*xhat)/M)); False for
              running statistics (eval mode: dX = gamma*invstd*dY).
    Returns (grad_x, grad_gamma, grad_beta, grad_weight): grad_x (N, B, H, W) in x's dtype and
    layout, grad_gamma = sum(dY * xhat) and grad_beta = sum(dY) (B,) float32 (sums over N, H, W;
    contiguous views of one allocation), grad_weight (K, B, 3, 3) contiguous in weight's dtype.
    Deterministic (no atomics).
    """
    _check_backward(grad_out, x, weight, mean, invstd, gamma, beta)
    n, b, h, w = x.shape
    kout = weight.shape[0]
    m = n * h * w
    precision = dot_precision(x.dtype)
    mean, invstd, gamma = mean.contiguous(), invstd.contiguous(), gamma.contiguous()
    # The forward's scale/shift (given, or computed by the function the forward used), so that the
    # ReLU mask [Y > 0] recomputed here is the forward's.
    scale, shift = forward_scale_shift(mean, invstd, gamma, beta, scale, shift)
    store_dx = not batch_stats
    grad_x = empty_like_layout(x, b, x.dtype)
    # Training mode keeps dY in float32 until the BN sums are known: in grad_x itself when x is
    # float32, else in a B-channel float32 temporary.
    dst = grad_x if (store_dx or x.dtype == torch.float32) else empty_like_layout(x, b, torch.float32)

    # 1. dgrad + ReLU mask + per-program BN sums
    block_k = _narrow_tile(kout)
    d_args = (grad_out, weight, x, scale, shift, mean, invstd, gamma, dst)
    d_sizes = (m, b, kout, h, w, *grad_out.stride(), *weight.stride(), *x.stride(), *dst.stride())
    d_run = row_run(grad_out, x, dst)
    if INTERPRET:
        block_m = INTERPRET_DGRAD["BLOCK_M"]
        parts = cdiv(m, block_m)
        ws = torch.empty((parts, 2, b), dtype=torch.float32, device=x.device)  # rows of (dbeta, dgamma)
        grid = (parts, cdiv(b, INTERPRET_DGRAD["BLOCK_N"]))
        _conv3x3_dgrad_kernel[grid](*d_args, ws, *d_sizes, STORE_DX=store_dx,
                                    INPUT_PRECISION=precision, ROW_RUN=d_run, BLOCK_K=block_k, num_warps=4,
                                    **INTERPRET_DGRAD)
    else:
        tuned = _TUNED_DGRAD[config_list(x, precision)]
        min_block_m = min(c.kwargs["BLOCK_M"] for c in tuned.configs)  # see _forward_into
        ws = torch.empty((cdiv(m, min_block_m), 2, b), dtype=torch.float32, device=x.device)

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]), cdiv(b, meta["BLOCK_N"]))

        tuned[grid](*d_args, ws, *d_sizes, STORE_DX=store_dx, INPUT_PRECISION=precision, ROW_RUN=d_run,
                    BLOCK_K=block_k)
        parts = cdiv(m, tuned.best_config.kwargs["BLOCK_M"])
    grad_beta, grad_gamma = ws[:parts].sum(dim=0).unbind(0)  # one reduction for both BN sums

    # 2. training mode: the BN backward, elementwise
    if batch_stats:
        if INTERPRET:
            block_m, block_c, warps = 16, 16, 4
        elif is_channels_last(x):
            block_m, block_c, warps = 64, min(64, next_power_of_2(b)), 4  # channels contiguous
        else:
            block_m, block_c, warps = 128, min(16, next_power_of_2(b)), 4  # rows contiguous
        _bn_backward_dx_kernel[(cdiv(m, block_m), cdiv(b, block_c))](
            dst, x, mean, invstd, gamma, grad_beta, grad_gamma, grad_x, m, b, h, w, 1.0 / m,
            *dst.stride(), *x.stride(), *grad_x.stride(), ROW_RUN=row_run(dst, x, grad_x),
            BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)

    # 3. wgrad with Z recomputed from x
    block_o = _narrow_tile(kout)
    o_blocks = cdiv(kout, block_o)
    rows_per_prog = _wgrad_rows_per_prog(x, m, 9 * o_blocks * cdiv(b, 64))
    parts = cdiv(m, rows_per_prog)
    # Every config writes every row of the workspace (parts does not depend on the config).
    ws_w = torch.empty((parts, kout, b, 3, 3), dtype=torch.float32, device=x.device)
    w_args = (grad_out, x, scale, shift, ws_w, m, b, kout, h, w, rows_per_prog, *grad_out.stride(), *x.stride())
    w_run = row_run(grad_out, x, rows_per_program=(rows_per_prog,))
    if INTERPRET:
        grid = (parts, 9 * o_blocks, cdiv(b, INTERPRET_WGRAD["BLOCK_C"]))
        _conv3x3_wgrad_kernel[grid](*w_args, INPUT_PRECISION=precision, ROW_RUN=w_run, BLOCK_O=block_o,
                                    num_warps=4, **INTERPRET_WGRAD)
    else:
        tuned = _TUNED_WGRAD[wgrad_config_list(x, grad_out, precision, block_o)]

        def grid(meta):
            return (parts, 9 * o_blocks, cdiv(b, meta["BLOCK_C"]))

        tuned[grid](*w_args, INPUT_PRECISION=precision, ROW_RUN=w_run, BLOCK_O=block_o)
    grad_weight = ws_w.sum(dim=0).to(weight.dtype)  # (K, B, 3, 3): the kernels write (P, K, B, 9) rows
    return grad_x, grad_gamma, grad_beta, grad_weight


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile traces them through their fake implementations)
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=())
def triton_bn_relu_conv3x3(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """torch.ops.densenet_fast.triton_bn_relu_conv3x3: :func:`bn_relu_conv3x3_triton` (out allocated)."""
    return bn_relu_conv3x3_triton(x, scale, shift, weight)


@triton_bn_relu_conv3x3.register_fake
def _triton_bn_relu_conv3x3_fake(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor
                                 ) -> Tuple[Tensor, Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    k = weight.shape[0]
    return (empty_like_layout(x, k, x.dtype), x.new_empty((k,), dtype=torch.float32),
            x.new_empty((k,), dtype=torch.float32))


@torch.library.custom_op(OP_NAME_OUT, mutates_args=("out",))
def triton_bn_relu_conv3x3_out(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor
                               ) -> Tuple[Tensor, Tensor]:
    """torch.ops.densenet_fast.triton_bn_relu_conv3x3_out: :func:`bn_relu_conv3x3_triton` writing
    ``out`` in place (e.g. the block buffer's channel slice); returns (mean, var) of out."""
    _, mean, var = bn_relu_conv3x3_triton(x, scale, shift, weight, out=out)
    return mean, var


@triton_bn_relu_conv3x3_out.register_fake
def _triton_bn_relu_conv3x3_out_fake(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor
                                     ) -> Tuple[Tensor, Tensor]:
    k = weight.shape[0]
    return x.new_empty((k,), dtype=torch.float32), x.new_empty((k,), dtype=torch.float32)


@torch.library.custom_op(OP_NAME_BACKWARD, mutates_args=())
def triton_bn_relu_conv3x3_backward(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                                    gamma: Tensor, beta: Tensor, batch_stats: bool
                                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """torch.ops.densenet_fast.triton_bn_relu_conv3x3_backward: :func:`bn_relu_conv3x3_backward_triton`.
    Its grad_gamma and grad_beta are views of one allocation; a custom op's outputs may not alias
    each other, so they are copied out."""
    grad_x, grad_gamma, grad_beta, grad_weight = bn_relu_conv3x3_backward_triton(
        grad_out, x, weight, mean, invstd, gamma, beta, batch_stats)
    return grad_x, grad_gamma.clone(), grad_beta.clone(), grad_weight


@triton_bn_relu_conv3x3_backward.register_fake
def _triton_bn_relu_conv3x3_backward_fake(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                                          invstd: Tensor, gamma: Tensor, beta: Tensor, batch_stats: bool
                                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    b = x.shape[1]
    return (empty_like_layout(x, b, x.dtype), x.new_empty((b,), dtype=torch.float32),
            x.new_empty((b,), dtype=torch.float32), weight.new_empty(tuple(weight.shape)))
