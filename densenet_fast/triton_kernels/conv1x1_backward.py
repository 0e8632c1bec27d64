"""The backward of bn_relu_conv1x1 in Triton: dense_block.md, backward steps 5 and 6.

Forward (``bn_relu_conv1x1``): y = x * scale + shift (scale = gamma * invstd,
shift = beta - mean * scale), z = relu(y) rounded to x's dtype, Bt[m, o] = sum_c z[m, c] W[o, c]
over the M = N*H*W rows. Given dBt = grad_out:

  dz[m, c]  = sum_o dBt[m, o] W[o, c]              (a GEMM with K = B, the bottleneck width)
  dy        = dz * [y > 0]
  dbeta     = sum_m dy,  dgamma = sum_m dy * xhat,  xhat = (x - mean) * invstd
  dx        = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M)   (training-mode BN, batch stats)
            = gamma * invstd * dy                                        (fixed statistics)
  dW[o, c]  = sum_m dBt[m, o] z[m, c]              (a GEMM reducing over M)

dz and dy have C channels (C_l, up to ~1000) and M rows: they are never stored (dense_block.md,
"dZ1 ... do not keep one per layer"). Two passes over the same (row range, channel block) grid:

1. ``_conv1x1_bwd_reduce_kernel``: program (p, cb) walks rows [p*R, (p+1)*R) tile by tile. Per tile
   it loads the dBt tile with ALL B columns (BLOCK_B = next_pow2(B) >= 16) and the x tile, forms
   dz = dBt_tile @ W[:, cb] (the W block is loaded once per program and stays in registers), the
   mask, dy, and z = relu(y) recomputed on the fly (the prologue of the weight gradient). It
   accumulates three partials in registers: sum dy, sum dy * xhat (BLOCK_C each) and
   dBt_tile^T @ z (BLOCK_B x BLOCK_C, the weight gradient restricted to its rows), and writes
   them to row p of (P, C) / (P, B, C) float32 workspaces. The weight gradient is fused here
   because it needs the same two tiles: a separate wgrad kernel would read x a third time.
2. ``_conv1x1_bwd_dx_kernel``: recomputes the dz tile (K = B is cheap to redo) and does
   grad_x_acc += dx in place (load, add in float32, store): G[:, :C_l] already holds the
   contributions of later layers, which the BN-backward contributions add to.

``_sum_parts_kernel`` then sums each workspace over its P rows in a fixed order: no atomics, so
the results are the same bits on every run. The workspaces are small: P is a few programs per
SM divided among the channel blocks (and at most M/512 rows), so the (P, B, C) one is bounded by a
constant times B*C, not by M.

Precision: both GEMM operands are cast to x's dtype (dBt too when it comes in float32, as the
forward feeds the GEMM with x's dtype) and tl.dot accumulates in float32; float32 data use TF32
exactly when cuDNN's convolutions may (ops.precision.dot_precision), else "ieee". The mask, xhat,
the per-channel sums and dx are float32.

Reference: autograd of ``densenet_fast.reference.bn_relu_conv1x1_ref`` (with the batch statistics
computed from x inside the graph when batch_stats=True), and ``bn_backward_ref`` for step 6.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import (NCHW_FP32, INTERPRET, autotune, cdiv, config_list, device_sms, device_smem_optin, nchw_fp32_list,
               next_power_of_2, single_stage_first)
from ..ops.precision import dot_precision
from ..ops.bn_relu import forward_scale_shift
from .indexing import contiguous_rows, row_nhw, row_run
from .channel_stats import check_activation, check_channel_vectors, is_1x1_weight

__all__ = ["bn_relu_conv1x1_backward_triton"]

OP_NAME = "densenet_fast::triton_bn_relu_conv1x1_backward"


def _cfg(bm: int, bc: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=warps, num_stages=stages)


# Pass 1 holds a BLOCK_B x BLOCK_C float32 weight-gradient accumulator, the W block and a
# BLOCK_M x BLOCK_B dBt tile: configs whose BLOCK_B * BLOCK_C exceeds PASS1_MAX_BC, or whose
# estimated shared memory (_smem_estimate) exceeds the device's, are dropped for the given
# bottleneck width (B = 48..128 for DenseNet-BC/121, 192 for densenet161) and dtype. The two
# passes' defaults run 32-row tiles on 8 warps: 64 rows on 4 warps spilled 8-824 bytes of stack
# per thread with triton 3.8 and up to 2,088 with 3.6 (sm_90, DenseNet-121 and -BC layers), 64
# rows on 8 warps none with 3.8 but 280-400 with 3.6 in NCHW, 32 rows on 8 none with either, in
# every dtype and layout (scripts/triton_aot_check.py). Timed on the 2026-11-27 lease (H200, fp32
# TF32 NCHW, DenseNet-BC-100 shapes; benchmarks/results/gpu-2026-11-27-h200/autotune.jsonl; each
# config's time over the best, geometric mean), the defaults took 1.93x (pass 1) and 1.12x (pass 2).
# The faster ones keep stack: pass 1's (128, 32) on 4 warps (1.13x) 1.3-1.5 KB in fp16/bf16 on
# DenseNet-121 with triton 3.8, the one-stage (32, 32) (1.38x) 40 bytes in fp32 with triton 3.6;
# pass 2's (64, 32) on 4 warps, 2 stages (1.06x) 688 bytes in fp32 NCHW with triton 3.6. So the
# defaults stay; autotuning (on by default) picks among all of them.
CONFIGS_REDUCE_SM90: List[triton.Config] = [
    _cfg(32, 64, 8, 3), _cfg(64, 64, 8, 3), _cfg(128, 64, 8, 3), _cfg(64, 32, 4, 4), _cfg(128, 32, 4, 3),
    _cfg(32, 64, 4, 3), _cfg(64, 128, 8, 3), _cfg(64, 32, 4, 2), _cfg(64, 64, 4, 3),
]
CONFIGS_REDUCE_SM80: List[triton.Config] = [
    _cfg(32, 64, 8, 3), _cfg(64, 64, 8, 3), _cfg(64, 32, 4, 3), _cfg(128, 32, 4, 3), _cfg(32, 64, 4, 3),
    _cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2),
]
# Float32 NCHW operands (x, or a float32 grad_out): pass 1 runs single_stage_first's list of the
# above, since its pipelined tiles stage through one shared-memory bank (triton_kernels.NCHW_FP32).
# Pass 2 holds the W block and dz tile only; it streams x in and grad_x_acc in and out.
CONFIGS_DX_SM90: List[triton.Config] = [
    _cfg(32, 64, 8, 3), _cfg(64, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 128, 4, 3),
    _cfg(256, 64, 8, 3), _cfg(64, 32, 4, 4), _cfg(64, 32, 4, 2), _cfg(64, 64, 4, 3),
]
CONFIGS_DX_SM80: List[triton.Config] = [
    _cfg(32, 64, 8, 3), _cfg(64, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 128, 4, 3), _cfg(128, 128, 8, 2),
    _cfg(64, 32, 4, 4), _cfg(64, 32, 4, 2),
]
PASS1_MAX_BC = 8192
PASS2_MAX_BC = 16384
# Always a candidate: fits in shared memory for B <= 256 even with float32 operands (where every
# pipelined config may not), so the autotuner never runs out of configs.
SAFE_CONFIG = _cfg(32, 32, 4, 1)
# float32 data with IEEE dots (TF32 off, ops.precision): tl.dot lowers to FMAs on registers, and
# every config above then spills 4-20 KB of local memory per thread (sm_90, B = 128: 32 registers
# and 13,376 bytes of stack for pass 1's default, 13,200 for pass 2's; scripts/triton_aot_check.py).
# These single-stage small tiles compile with no stack for B = 128 in both layouts (pass 1:
# 123-184 registers, pass 2: 62-104); for B = 256 (densenet161) pass 1 keeps 0-24 bytes.
CONFIGS_REDUCE_FMA: List[triton.Config] = [_cfg(16, 32, 8, 1), _cfg(32, 16, 8, 1), _cfg(16, 16, 4, 1)]
CONFIGS_DX_FMA: List[triton.Config] = [_cfg(32, 32, 8, 1), _cfg(16, 64, 4, 1), _cfg(32, 16, 4, 1)]
# Rows per program: the same for every config (the workspace shape does not depend on the config),
# a multiple of ROW_ALIGN, the largest BLOCK_M of any config, where the rows are many, so that no
# tile straddles two programs. Where they are few (M = 4,096 at DenseNet-BC-100's 8x8 block,
# 3,136 at DenseNet-121's 7x7), a multiple of SMALL_ROW_ALIGN: the kernels mask each tile at
# their program's last row, so a larger tile only runs part empty there. See _row_split.
ROW_ALIGN = 256
SMALL_ROW_ALIGN = 64
# Fewest rows per program: pass 1 writes a (B + 2) x C float32 partial sum per row program, which
# the sum then reads (at M = 4,096, C = 512, B = 48 and 32 programs, 3.3 MB against x's 8 MB in
# float32), so it also keeps that workspace within x's bytes; pass 2 writes none.
PASS1_MIN_ROWS = 128
PASS2_MIN_ROWS = 64
# The interpreter runs programs one after another in Python: one fixed small config (tl.dot needs
# tiles of at least 16) and two row tiles per program, so that the tests cover the in-program
# accumulation, the cross-program sum and the ragged last tile even on 5x7 images.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_C": 16}
INTERPRET_ROWS_PER_PROG = 32


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _conv1x1_bwd_reduce_kernel(g_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, ws_ptr,
                               M, C, C_BUCKET, B, HW, W, ROWS_PER_PROG,
                               sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_c,
                               INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr, BLOCK_B: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_x = cols.to(tl.int64) * sx_c
    obs = tl.arange(0, BLOCK_B)
    bmask = obs < B
    col_g = obs.to(tl.int64) * sg_c
    # W[:, cb] (B x BLOCK_C), once per program; padded rows/columns are 0 and add nothing to dz.
    wblk = tl.load(w_ptr + obs[:, None].to(tl.int64) * sw_o + cols[None, :].to(tl.int64) * sw_c,
                   mask=bmask[:, None] & cmask[None, :], other=0.0).to(dt)
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    istd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    row0 = pid_p * ROWS_PER_PROG
    row_end = tl.minimum(row0 + ROWS_PER_PROG, M)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        # row m = (n, h, w), int64 offsets (a block buffer can exceed 2^31 elements)
        n, h, w = row_nhw(rows, HW, W)
        g_row = contiguous_rows(n, h, w, sg_n, sg_h, sg_w, ROW_RUN, BLOCK_M)
        x_row = contiguous_rows(n, h, w, sx_n, sx_h, sx_w, ROW_RUN, BLOCK_M)
        g = tl.load(g_ptr + g_row[:, None] + col_g[None, :], mask=rmask[:, None] & bmask[None, :], other=0.0).to(dt)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + x_row[:, None] + col_x[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        y = x * sc[None, :] + sh[None, :]
        pos = (y > 0) & mask
        dz = tl.dot(g, wblk, input_precision=INPUT_PRECISION)
        dy = tl.where(pos, dz, 0.0)
        xhat = (x - mu[None, :]) * istd[None, :]
        acc_db += tl.sum(dy, axis=0)
        acc_dg += tl.sum(dy * xhat, axis=0)
        # z exactly as the forward fed its GEMM: relu in float32, rounded to x's dtype
        z = tl.where(pos, y, 0.0).to(dt)
        acc_w = tl.dot(tl.trans(g), z, acc=acc_w, input_precision=INPUT_PRECISION)
    # This program's row of the (P, (B + 2) * C) workspace: [dW (B x C) | dbeta (C) | dgamma (C)].
    ws_part = ws_ptr + pid_p.to(tl.int64) * (B + 2) * C
    tl.store(ws_part + obs[:, None].to(tl.int64) * C + cols[None, :], acc_w, mask=bmask[:, None] & cmask[None, :])
    tl.store(ws_part + B * C + cols, acc_db, mask=cmask)
    tl.store(ws_part + (B + 1) * C + cols, acc_dg, mask=cmask)


@triton.jit
def _conv1x1_bwd_dx_kernel(g_ptr, x_ptr, w_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                           dbeta_ptr, dgamma_ptr, gx_ptr, INV_M,
                           M, C, C_BUCKET, B, HW, W, ROWS_PER_PROG,
                           sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_c,
                           sgx_n, sgx_c, sgx_h, sgx_w,
                           BATCH_STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROW_RUN: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    col_x = cols.to(tl.int64) * sx_c
    col_gx = cols.to(tl.int64) * sgx_c
    obs = tl.arange(0, BLOCK_B)
    bmask = obs < B
    col_g = obs.to(tl.int64) * sg_c
    wblk = tl.load(w_ptr + obs[:, None].to(tl.int64) * sw_o + cols[None, :].to(tl.int64) * sw_c,
                   mask=bmask[:, None] & cmask[None, :], other=0.0).to(dt)
    sc = tl.load(scale_ptr + cols, mask=cmask, other=0.0)
    sh = tl.load(shift_ptr + cols, mask=cmask, other=0.0)
    if BATCH_STATS:
        mu = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        istd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
        c1 = tl.load(dbeta_ptr + cols, mask=cmask, other=0.0) * INV_M  # dbeta / M
        c2 = tl.load(dgamma_ptr + cols, mask=cmask, other=0.0) * INV_M  # dgamma / M
    row0 = pid_p * ROWS_PER_PROG
    row_end = tl.minimum(row0 + ROWS_PER_PROG, M)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        n, h, w = row_nhw(rows, HW, W)
        g_row = contiguous_rows(n, h, w, sg_n, sg_h, sg_w, ROW_RUN, BLOCK_M)
        x_row = contiguous_rows(n, h, w, sx_n, sx_h, sx_w, ROW_RUN, BLOCK_M)
        g = tl.load(g_ptr + g_row[:, None] + col_g[None, :], mask=rmask[:, None] & bmask[None, :], other=0.0).to(dt)
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + x_row[:, None] + col_x[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        y = x * sc[None, :] + sh[None, :]
        dz = tl.dot(g, wblk, input_precision=INPUT_PRECISION)
        dy = tl.where(y > 0, dz, 0.0)
        if BATCH_STATS:
            # Ioffe & Szegedy's training-mode BN backward: the batch mean and variance depend on x.
            xhat = (x - mu[None, :]) * istd[None, :]
            dx = sc[None, :] * (dy - c1[None, :] - xhat * c2[None, :])
        else:
            dx = sc[None, :] * dy
        gx_row = contiguous_rows(n, h, w, sgx_n, sgx_h, sgx_w, ROW_RUN, BLOCK_M)
        gx_ptrs = gx_ptr + gx_row[:, None] + col_gx[None, :]
        old = tl.load(gx_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx_ptrs, (old + dx).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_parts_kernel(ws_ptr, out_ptr, P, NCOL, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[j] = sum_p ws[p, j] for a contiguous (P, NCOL) float32 workspace, in a fixed order."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NCOL
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & cmask[None, :]
        v = tl.load(ws_ptr + parts[:, None].to(tl.int64) * NCOL + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + cols, acc, mask=cmask)


# --------------------------------------------------------------------------------------------
# Autotuning (compiled kernels only)
# --------------------------------------------------------------------------------------------


def _smem_estimate(pass_name: str, cfg: triton.Config, block_b: int, elem: int) -> int:
    """Bytes of shared memory a config needs, roughly: the pipelined dBt and x tiles (num_stages
    copies), the W block, and the dot operands staged through shared memory. Only a filter: a
    config that still does not fit fails to launch while autotuning and is skipped."""
    bm, bc, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_C"], cfg.num_stages
    tiles = st * bm * (block_b + bc) * elem + block_b * bc * elem
    if pass_name == "reduce":
        return tiles + bm * block_b * elem + bm * bc * elem  # dBt^T and z for the weight gradient
    return tiles


@functools.lru_cache(maxsize=None)
def _tuned(pass_name: str, configs_name: str, block_b: int, elem: int, smem: int):
    """The autotuned kernel of one pass for one config list ("sm90", "sm80" or "fma", see
    config_list; pass 1 also "sm90_nchw_fp32", "sm80_nchw_fp32", see nchw_fp32_list), bottleneck
    tile width, operand size (bytes) and shared-memory limit."""
    # C (the layer's prefix width C_l) changes with every layer: the key holds its power-of-two
    # bucket instead, so a block autotunes a handful of times rather than once per layer.
    # The key holds the channel strides: a config that fits a NCHW specialisation (stride 1 along
    # the rows) may need more shared memory in the channels_last one, so each layout tunes anew.
    if pass_name == "reduce":
        kernel, limit = _conv1x1_bwd_reduce_kernel, PASS1_MAX_BC
        configs = {"sm90": CONFIGS_REDUCE_SM90, "sm80": CONFIGS_REDUCE_SM80, "fma": CONFIGS_REDUCE_FMA,
                   "sm90" + NCHW_FP32: single_stage_first(CONFIGS_REDUCE_SM90),
                   "sm80" + NCHW_FP32: single_stage_first(CONFIGS_REDUCE_SM80)}[configs_name]
        key, restore = ["M", "C_BUCKET", "B", "sg_c", "sx_c", "INPUT_PRECISION", "ROW_RUN"], None
    else:
        kernel, limit = _conv1x1_bwd_dx_kernel, PASS2_MAX_BC
        configs = {"sm90": CONFIGS_DX_SM90, "sm80": CONFIGS_DX_SM80, "fma": CONFIGS_DX_FMA}[configs_name]
        # Benchmarking runs the kernel many times: restore the accumulator after each run.
        key = ["M", "C_BUCKET", "B", "sg_c", "sx_c", "sgx_c", "BATCH_STATS", "INPUT_PRECISION", "ROW_RUN"]
        restore = ["gx_ptr"]
    fits = [c for c in configs
            if block_b * c.kwargs["BLOCK_C"] <= limit and _smem_estimate(pass_name, c, block_b, elem) <= smem]
    safe = configs[-1] if configs_name == "fma" else SAFE_CONFIG  # an fma list's last tile is its smallest
    if all(c is not safe for c in fits):
        fits.append(safe)
    return autotune(configs=fits, key=key, restore_value=restore)(kernel)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _row_split(x: Tensor, m: int, c: int, programs_per_sm: int, min_rows: int, max_parts: int = 0
               ) -> Tuple[int, int]:
    """(rows_per_program, programs along the rows) for an (M rows) x (C channels) grid."""
    if INTERPRET:
        return INTERPRET_ROWS_PER_PROG, cdiv(m, INTERPRET_ROWS_PER_PROG)
    return row_split(m, c, device_sms(x.device), programs_per_sm, min_rows, max_parts)


def row_split(m: int, c: int, sms: int, programs_per_sm: int, min_rows: int, max_parts: int = 0
              ) -> Tuple[int, int]:
    """_row_split on a GPU with `sms` multiprocessors: about programs_per_sm programs per SM in all
    (nominally 64 channels per program), each over at least min_rows rows, and at most max_parts
    row programs (0: no limit).

    Until the twentieth session the rows per program were always a multiple of ROW_ALIGN (256)
    and pass 1 took at least 512: at M = 4,096 (DenseNet-BC-100's 8x8 block) that is 8 row
    programs in pass 1 and 16 in pass 2, each looping 8-16 times over 32-row tiles. The H200's
    autotuning log (2026-11-27) timed both passes there at 35-40 us whether C was 256 or 512, with
    the smallest tile (the most programs) fastest: a latency-bound loop, where the bytes would
    take 2-6 us at the copy rate. Small problems now split into tiles of SMALL_ROW_ALIGN rows."""
    col_blocks = cdiv(c, 64)  # nominal: the grid's channel dimension depends on the config
    parts = min(cdiv(programs_per_sm * sms, col_blocks), cdiv(m, min_rows))
    parts = max(1, min(parts, max_parts) if max_parts > 0 else parts)
    rows = cdiv(m, parts)
    align = ROW_ALIGN if rows > 2 * ROW_ALIGN else SMALL_ROW_ALIGN
    rows = cdiv(rows, align) * align
    return rows, cdiv(m, rows)


def _sum_parts(ws: Tensor) -> Tensor:
    """(P, ...) float32 contiguous workspace -> (...) float32, summed over P deterministically."""
    parts = ws.shape[0]
    out = torch.empty(ws.shape[1:], dtype=torch.float32, device=ws.device)
    ncol = out.numel()
    block_n = 128 if INTERPRET else 256
    _sum_parts_kernel[(cdiv(ncol, block_n),)](ws, out, parts, ncol, BLOCK_P=16, BLOCK_N=block_n,
                                                     num_warps=4)
    return out


def _check_inputs(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor,
                  beta: Tensor, batch_stats: bool, grad_x_acc: Tensor) -> None:
    """Validate the arguments (messages name the tensor)."""
    check_activation(x, "x")
    n, c, h, w = x.shape
    check_channel_vectors(x, mean=mean, invstd=invstd, gamma=gamma, beta=beta)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not is_1x1_weight(weight, c):
        raise ValueError(f"weight must have shape (B, {c}) or (B, {c}, 1, 1), got {list(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    b = weight.shape[0]
    check_activation(grad_out, "grad_out")
    if grad_out.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"grad_out must be x's dtype ({x.dtype}) or float32, got {grad_out.dtype}")
    if tuple(grad_out.shape) != (n, b, h, w):
        raise ValueError(f"grad_out must have shape {[n, b, h, w]} (N, B, H, W of x and weight), "
                         f"got {list(grad_out.shape)}")
    if grad_out.device != x.device:
        raise ValueError(f"grad_out must be on x's device {x.device}, got {grad_out.device}")
    if not isinstance(grad_x_acc, Tensor):
        raise TypeError(f"grad_x_acc must be a Tensor, got {type(grad_x_acc).__name__}")
    if tuple(grad_x_acc.shape) != (n, c, h, w):
        raise ValueError(f"grad_x_acc must have x's shape {[n, c, h, w]}, got {list(grad_x_acc.shape)}")
    if grad_x_acc.dtype != torch.float32:
        raise TypeError(f"grad_x_acc must be float32 (the block's gradient buffer), got {grad_x_acc.dtype}")
    if grad_x_acc.device != x.device:
        raise ValueError(f"grad_x_acc must be on x's device {x.device}, got {grad_x_acc.device}")
    if any(s == 0 and d > 1 for s, d in zip(grad_x_acc.stride(), grad_x_acc.shape)):
        raise ValueError(f"grad_x_acc must not be an expanded tensor (a zero stride, strides "
                         f"{list(grad_x_acc.stride())}): the kernel accumulates into it in place")
    if not isinstance(batch_stats, bool):
        raise TypeError(f"batch_stats must be a bool, got {type(batch_stats).__name__}")


def bn_relu_conv1x1_backward_triton(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                                    gamma: Tensor, beta: Tensor, batch_stats: bool, grad_x_acc: Tensor, *,
                                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of Bt = conv1x1(relu(bn(x)), weight); ACCUMULATES the input gradient into grad_x_acc.

    grad_out:   (N, B, H, W) dBt, x's dtype or float32, any strides.
    x:          (N, C, H, W) float32/float16/bfloat16, any strides: the channel prefix F[:, :C_l] of
                the block buffer (NCHW or channels_last), read in place.
    weight:     (B, C) or (B, C, 1, 1), any float dtype (cast to x's dtype for the GEMMs).
    mean, invstd, gamma, beta: (C,) float32; y = (x - mean) * invstd * gamma + beta.
    batch_stats: True when mean/invstd are the batch statistics of x itself (training-mode BN:
                the full BN gradient), False for fixed statistics (dx = gamma * invstd * dy).
    grad_x_acc: (N, C, H, W) float32, any strides (the slice G[:, :C_l] of the block's gradient
                buffer): grad_x_acc += dx in place, never overwritten.
    scale, shift: the forward's (C,) float32 vectors (ops.bn_relu.scale_shift of the above), when the
                caller has them; else computed here by the same function.
    Returns (grad_gamma, grad_beta, grad_weight): (C,) float32, (C,) float32, and grad_weight
    shaped like `weight` in weight's dtype (summed in float32), all three contiguous views of one
    allocation for float32 weights. Deterministic (no atomics).
    Raises ValueError / TypeError naming the offending tensor.
    """
    _check_inputs(grad_out, x, weight, mean, invstd, gamma, beta, batch_stats, grad_x_acc)
    n, c, h, w = x.shape
    b = weight.shape[0]
    m = n * h * w
    # The forward's operands: y = x * scale + shift, so the ReLU mask here is the forward's.
    scale, shift = forward_scale_shift(mean, invstd, gamma, beta, scale, shift)
    mean_c, invstd_c = mean.contiguous(), invstd.contiguous()
    block_b = max(16, next_power_of_2(b))
    precision = dot_precision(x.dtype)  # TF32 for fp32 data as cuDNN convs; ignored for fp16/bf16
    # W[o, c] at o * stride(0) + c * stride(1): a Conv2d weight read as (B, C), no view needed
    strides = (*grad_out.stride(), *x.stride(), *weight.stride()[:2])
    common = (grad_out, x, weight, scale, shift, mean_c, invstd_c)

    # Pass 1: per-program partial sums of dBt^T z, dy and dy * xhat, one workspace row per program
    # (one allocation and one deterministic sum for the three).
    # the float32 workspace holds at most as many bytes as x
    ws_parts = m * x.element_size() // (4 * (b + 2))
    rows1, parts1 = _row_split(x, m, c, programs_per_sm=2, min_rows=PASS1_MIN_ROWS, max_parts=max(1, ws_parts))
    ws = torch.empty((parts1, (b + 2) * c), dtype=torch.float32, device=x.device)
    c_bucket = next_power_of_2(c)
    args1 = (*common, ws, m, c, c_bucket, b, h * w, w, rows1, *strides)
    run1 = row_run(grad_out, x, rows_per_program=(rows1,))
    if INTERPRET:
        grid1 = (parts1, cdiv(c, INTERPRET_CONFIG["BLOCK_C"]))
        _conv1x1_bwd_reduce_kernel[grid1](*args1, INPUT_PRECISION=precision, ROW_RUN=run1, BLOCK_B=block_b,
                                          num_warps=4, **INTERPRET_CONFIG)
    else:
        tune = (block_b, x.element_size(), device_smem_optin(x.device))

        def grid1(meta):
            return (parts1, cdiv(c, meta["BLOCK_C"]))

        _tuned("reduce", nchw_fp32_list(x, precision, grad_out), *tune)[grid1](*args1, INPUT_PRECISION=precision,
                                                                              ROW_RUN=run1, BLOCK_B=block_b)
    sums = _sum_parts(ws)
    del ws
    grad_beta, grad_gamma = sums[b * c:(b + 1) * c], sums[(b + 1) * c:]

    # Pass 2: recompute dz, grad_x_acc += dx (the kernel scales the sums by 1 / M; without batch
    # statistics it does not read them).
    rows2, parts2 = _row_split(x, m, c, programs_per_sm=4, min_rows=PASS2_MIN_ROWS)
    args2 = (*common, grad_beta, grad_gamma, grad_x_acc, 1.0 / m, m, c, c_bucket, b, h * w, w, rows2, *strides,
             *grad_x_acc.stride())
    run2 = row_run(grad_out, x, grad_x_acc, rows_per_program=(rows2,))
    if INTERPRET:
        grid2 = (parts2, cdiv(c, INTERPRET_CONFIG["BLOCK_C"]))
        _conv1x1_bwd_dx_kernel[grid2](*args2, BATCH_STATS=batch_stats, INPUT_PRECISION=precision, ROW_RUN=run2,
                                      BLOCK_B=block_b, num_warps=4, **INTERPRET_CONFIG)
    else:
        def grid2(meta):
            return (parts2, cdiv(c, meta["BLOCK_C"]))

        _tuned("dx", config_list(x, precision), *tune)[grid2](*args2, BATCH_STATS=batch_stats,
                                                              INPUT_PRECISION=precision, ROW_RUN=run2, BLOCK_B=block_b)

    grad_weight = sums[:b * c].view(weight.shape).to(weight.dtype)  # (B, C) row-major = the weight's order
    return grad_gamma, grad_beta, grad_weight


# --------------------------------------------------------------------------------------------
# Custom op
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(OP_NAME, mutates_args=("grad_x_acc",))
def triton_bn_relu_conv1x1_backward(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                                    gamma: Tensor, beta: Tensor, batch_stats: bool, grad_x_acc: Tensor
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """torch.ops.densenet_fast.triton_bn_relu_conv1x1_backward: :func:`bn_relu_conv1x1_backward_triton`
    as a custom op (mutates grad_x_acc).  The launcher's three results are views of one allocation;
    a custom op's outputs may not alias each other, so the two (C,) vectors are copied out."""
    grad_gamma, grad_beta, grad_weight = bn_relu_conv1x1_backward_triton(
        grad_out, x, weight, mean, invstd, gamma, beta, batch_stats, grad_x_acc)
    return grad_gamma.clone(), grad_beta.clone(), grad_weight


@triton_bn_relu_conv1x1_backward.register_fake
def _triton_bn_relu_conv1x1_backward_fake(grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor,
                                          invstd: Tensor, gamma: Tensor, beta: Tensor, batch_stats: bool,
                                          grad_x_acc: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    c = x.shape[1]
    return (x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32),
            weight.new_empty(weight.shape))
