"""bn_relu_conv1x1 in Triton: the dense layer's bottleneck, Bt = conv1x1(relu(F[:, :K] * scale + shift)),
with the batch statistics of Bt computed in the same pass.

A GEMM over the M = N*H*W rows: out[m, o] = sum_k relu(x[m, k] * scale[k] + shift[k]) * W[o, k].
- The A operand is read straight from the channel prefix of the block buffer (strides in elements,
  NCHW or channels_last); BN and ReLU are applied as the tile is loaded, so Z1 is never stored
  (dense_block.md, forward step 3). Padded K columns load scale = shift = 0 and W = 0, so they add 0.
- B = W (Cout, K), read transposed through its strides; both operands are cast to x's dtype for
  tl.dot, which accumulates in float32. float32 data use TF32 exactly when cuDNN's convolutions may
  (ops.precision.dot_precision; "ieee" otherwise, matching an fp32 conv to rounding); both triton
  3.6 and 3.8 accept the input_precision keyword.
- Epilogue: the tile is rounded to the output dtype and stored in x's layout; then, from the
  rounded values (the statistics describe exactly the tensor that is stored), each program writes
  its per-channel tile mean and M2 to row pid_m of a (P, Cout) workspace, merged by
  channel_stats.merge_partial_stats (Chan's formula, no atomics: deterministic). These are the
  norm2 statistics of dense_block.md's statistics cache, for free.

Reference: ``densenet_fast.reference.bn_relu_conv1x1_ref`` (with scale = gamma * invstd,
shift = beta - mean * scale).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import INTERPRET, autotune_lists, cdiv, config_list, next_power_of_2
from ..ops.precision import dot_precision
from .indexing import contiguous_rows, row_nhw, row_run
from .channel_stats import (check_activation, check_channel_vectors, empty_like_layout, is_1x1_weight,
                            merge_partial_stats, store_tile_stats)

__all__ = ["bn_relu_conv1x1_triton"]

OP_NAME = "densenet_fast::triton_bn_relu_conv1x1"


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Small candidate lists: Cout = bn_size * growth (48..128 for DenseNet-BC/121), K = C_l (tens to
# ~1000), M = N*H*W large. Hopper has more shared memory, so deeper pipelines and 128-wide tiles.
# The defaults run their 128-row tile on 8 warps: on 4 it needs more than 255 registers per thread
# and spilled in NCHW (sm_90, DenseNet-121 layer: 8-104 bytes of stack; sm_80: 56), on 8 none in
# any dtype or layout (scripts/triton_aot_check.py), with the same warps per SM.
CONFIGS_SM90: List[triton.Config] = [
    _cfg(128, 64, 32, 8, 4), _cfg(128, 128, 32, 8, 3), _cfg(64, 64, 64, 4, 4),
    _cfg(128, 64, 64, 4, 3), _cfg(64, 128, 32, 4, 4), _cfg(256, 64, 32, 8, 3),
    _cfg(128, 64, 32, 4, 4),  # the default on 4 warps (the default until 2026-11-26): to time against it
]
CONFIGS_SM80: List[triton.Config] = [
    _cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 4), _cfg(128, 128, 32, 8, 3),
    _cfg(64, 64, 64, 4, 3), _cfg(64, 128, 32, 4, 3),
]
# float32 data with IEEE dots (TF32 off, ops.precision): tl.dot lowers to FMAs on registers, where
# the pipelined configs spill in NCHW (sm_90: 48 bytes of stack per thread for the default on a
# DenseNet-121 layer, 112 with STATS=False; scripts/triton_aot_check.py). These single-stage tiles
# compile with none, in both layouts, on DenseNet-121's and DenseNet-BC's layers. The 64-row tile
# leads: since the NCHW rows are promised contiguous (indexing.row_run), the 128-row one keeps 8
# bytes of stack in DenseNet-121's STATS=False variant (triton 3.8, 80 registers).
CONFIGS_FMA: List[triton.Config] = [_cfg(64, 64, 32, 8, 1), _cfg(128, 64, 32, 8, 1), _cfg(64, 64, 32, 4, 1)]
# The interpreter runs programs one after another in Python: one fixed small config (tl.dot
# needs tiles of at least 16), no autotuning.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


@triton.jit
def _bn_relu_conv1x1_kernel(x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr, ws_mean_ptr, ws_m2_ptr,
                            M, K, COUT, HW, W, K_BUCKET,
                            sx_n, sx_c, sx_h, sx_w, sw_o, sw_k, so_n, so_c, so_h, so_w,
                            INPUT_PRECISION: tl.constexpr, STATS: tl.constexpr, ROW_RUN: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n, h, w = row_nhw(rows, HW, W)
    x_row = contiguous_rows(n, h, w, sx_n, sx_h, sx_w, ROW_RUN, BLOCK_M)
    o_row = contiguous_rows(n, h, w, so_n, so_h, so_w, ROW_RUN, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < COUT
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(x_ptr + x_row[:, None] + ks[None, :].to(tl.int64) * sx_c,
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + ks, mask=kmask, other=0.0)
        sh = tl.load(shift_ptr + ks, mask=kmask, other=0.0)
        z = tl.maximum(a * sc[None, :] + sh[None, :], 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + ks[:, None] * sw_k + cols[None, :] * sw_o,
                    mask=kmask[:, None] & nmask[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        acc = tl.dot(z, b, acc=acc, input_precision=INPUT_PRECISION)
    mask = rmask[:, None] & nmask[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + o_row[:, None] + cols[None, :].to(tl.int64) * so_c, y, mask=mask)
    if STATS:
        store_tile_stats(y, mask, rmask, nmask, ws_mean_ptr, ws_m2_ptr, pid_m * COUT + cols)


# K (the layer's prefix width C_l) changes with every layer: keyed on its power-of-two bucket
# instead, so a block autotunes a handful of times rather than once per layer.
_TUNED = autotune_lists(_bn_relu_conv1x1_kernel, ["M", "K_BUCKET", "COUT", "INPUT_PRECISION", "ROW_RUN"],
                        CONFIGS_SM90, CONFIGS_SM80, CONFIGS_FMA)


def _check_inputs(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor) -> None:
    """Validate the arguments (messages name the tensor)."""
    check_activation(x, "x")
    k = x.shape[1]
    check_channel_vectors(x, scale=scale, shift=shift)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a Tensor, got {type(weight).__name__}")
    if not is_1x1_weight(weight, k):
        raise ValueError(f"weight must have shape (Cout, {k}) or (Cout, {k}, 1, 1), got {list(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")


def bn_relu_conv1x1_triton(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stats: bool = True
                           ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Bt = conv1x1(relu(x * scale + shift), weight), and the batch statistics of Bt.

    x:      (N, K, H, W) float32/float16/bfloat16, any strides: the channel prefix F[:, :C_l] of a
            dense block buffer, NCHW or channels_last, read in place.
    scale:  (K,) float32, gamma * invstd;   shift: (K,) float32, beta - mean * scale.
    weight: (Cout, K) or (Cout, K, 1, 1), any float dtype (cast to x's dtype for the GEMM).
    Returns (out, mean, var): out (N, Cout, H, W) in x's dtype and layout (channels_last when x's
    channel stride is its smallest), mean/var (Cout,) float32, the biased batch statistics of out
    as stored; with stats=False (the backward's recompute of Bt, whose statistics the forward
    already has) the kernel skips them and mean/var are None. Raises ValueError / TypeError
    naming the offending tensor.
    """
    _check_inputs(x, scale, shift, weight)
    n, k, h, w = x.shape
    cout = weight.shape[0]
    m = n * h * w
    out = empty_like_layout(x, cout, x.dtype)
    precision = dot_precision(x.dtype)  # TF32 for fp32 data as cuDNN convs; ignored for fp16/bf16
    args = (x, scale.contiguous(), shift.contiguous(), weight, out)
    # W[o, c] at o * stride(0) + c * stride(1): a Conv2d weight read as (Cout, K), no view needed
    sizes = (m, k, cout, h * w, w, next_power_of_2(k), *x.stride(), *weight.stride()[:2], *out.stride())
    run = row_run(x, out)
    if INTERPRET:
        block_m = INTERPRET_CONFIG["BLOCK_M"]
        parts = cdiv(m, block_m)
        ws_mean, ws_m2 = _workspaces(stats, parts, cout, out)
        grid = (parts, cdiv(cout, INTERPRET_CONFIG["BLOCK_N"]))
        _bn_relu_conv1x1_kernel[grid](*args, ws_mean, ws_m2, *sizes, INPUT_PRECISION=precision, STATS=stats,
                                      ROW_RUN=run, num_warps=4, **INTERPRET_CONFIG)
    else:
        tuned = _TUNED[config_list(x, precision)]
        # Sized for the smallest BLOCK_M: autotuning runs every config; the chosen one writes
        # rows [0, cdiv(M, its BLOCK_M)) on its final run, and only those are merged.
        min_block_m = min(c.kwargs["BLOCK_M"] for c in tuned.configs)
        ws_mean, ws_m2 = _workspaces(stats, cdiv(m, min_block_m), cout, out)

        def grid(meta):
            return (cdiv(m, meta["BLOCK_M"]), cdiv(cout, meta["BLOCK_N"]))

        tuned[grid](*args, ws_mean, ws_m2, *sizes, INPUT_PRECISION=precision, STATS=stats, ROW_RUN=run)
        block_m = tuned.best_config.kwargs["BLOCK_M"]
        parts = cdiv(m, block_m)
    if not stats:
        return out, None, None
    mean, var = merge_partial_stats(ws_mean, ws_m2, parts, block_m, m)
    return out, mean, var


def _workspaces(stats: bool, parts: int, cout: int, out: Tensor) -> Tuple[Tensor, Tensor]:
    """The kernel's (parts, Cout) float32 partial-statistics rows; without stats the kernel never
    touches them, and out stands in for both pointers (no allocation)."""
    if not stats:
        return out, out
    ws_mean = torch.empty((parts, cout), dtype=torch.float32, device=out.device)
    return ws_mean, torch.empty_like(ws_mean)


@torch.library.custom_op(OP_NAME, mutates_args=())
def triton_bn_relu_conv1x1(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """torch.ops.densenet_fast.triton_bn_relu_conv1x1: :func:`bn_relu_conv1x1_triton` as a custom op."""
    return bn_relu_conv1x1_triton(x, scale, shift, weight)


@triton_bn_relu_conv1x1.register_fake
def _triton_bn_relu_conv1x1_fake(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor
                                 ) -> Tuple[Tensor, Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (N, C, H, W), got {x.dim()}")
    cout = weight.shape[0]
    stats = x.new_empty((cout,), dtype=torch.float32)
    return empty_like_layout(x, cout, x.dtype), stats, x.new_empty((cout,), dtype=torch.float32)
