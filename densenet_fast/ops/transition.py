"""Transition, head and stem norm: pool(relu(bn(F))), optionally followed by a 1x1 conv, as one Function.

Transition (Huang et al.): conv1x1 then avg_pool2x2 of relu(bn(F)).  Average pooling and a 1x1
conv are both linear, so conv(pool(z)) == pool(conv(z)); pooling first runs the GEMM on 4x fewer
rows.  Head (norm5 + ReLU + global average pool, torchvision's DenseNet.forward): the same with a
global pool and no conv.  Stem (norm0 + relu0 + pool0, ImageNet models): the 3x3/2 max pool with
padding 1 ("max3"), no conv; its backward takes the argmax of each window from the rebuilt chunk
(the same values give the same argmax), so neither the pool's input nor its int64 indices are
kept: at DenseNet-121's batch 64 that is 294 MiB fewer saved for the whole step.

Neither stores relu(bn(F)): it is rebuilt chunk by chunk (by input channel, which splits BN, ReLU,
pooling and the 1x1 conv's gradients exactly), so the transients are one chunk plus the pooled map.
The BatchNorm reads the block's statistics cache when given (training mode), so F is not reduced
again.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .amp import autocast_dtype, autocast_disabled
from .channel_stats import stats_dtype
from .checks import check_input, check_pool_input
from .conv1x1 import conv1x1, conv1x1_backward
from .bn_relu import NormStats, norm_stats_for, relu_backward_, uses_batch_stats
from .dense_block import (BlockKernels, Destination, GradHandoff, buffer_memory_format, check_chunk, check_kernels,
                          chunk_size, may_share_memory, untracked_alias)

aten = torch.ops.aten

POOLS = ("none", "avg2", "global", "max3")
_OWN_GRAD = ("avg2", "max3")  # pools whose backward makes a new gradient tensor (not a view of the incoming one)
_MAX3 = ([3, 3], [2, 2], [1, 1])  # torchvision's pool0: MaxPool2d(kernel_size=3, stride=2, padding=1)


def pooled_size(h: int, w: int, pool: str) -> Tuple[int, int]:
    return {"global": (1, 1), "avg2": (h // 2, w // 2), "none": (h, w),
            "max3": ((h - 1) // 2 + 1, (w - 1) // 2 + 1)}[pool]


def _pool(z: Tensor, pool: str) -> Tensor:
    if pool == "global":
        return z.mean(dim=(2, 3), keepdim=True)
    if pool == "max3":
        return F.max_pool2d(z, *_MAX3)
    return F.avg_pool2d(z, 2, 2) if pool == "avg2" else z


def _pool_backward(grad_p: Tensor, z: Tensor, pool: str) -> Tensor:
    if pool == "global":
        return (grad_p / (z.shape[2] * z.shape[3])).expand_as(z)
    if pool == "avg2":
        return aten.avg_pool2d_backward(grad_p, z, [2, 2], [2, 2], [0, 0], False, True, None)
    if pool == "max3":
        _, index = aten.max_pool2d_with_indices(z, *_MAX3)
        return aten.max_pool2d_with_indices_backward(grad_p, z, *_MAX3, [1, 1], False, index)
    return grad_p


def _pooled(kernels: BlockKernels, fbuf: Tensor, stats: NormStats, weight: Tensor, bias: Tensor, eps: float,
            pool: str, chunk: int) -> Tensor:
    n, c, h, w = fbuf.shape
    ho, wo = pooled_size(h, w, pool)
    pooled = torch.empty((n, c, ho, wo), dtype=fbuf.dtype, device=fbuf.device,
                         memory_format=buffer_memory_format(fbuf))
    for a in range(0, c, chunk):
        e = min(c, a + chunk)
        zc = kernels.bn_relu_chunk(fbuf[:, a:e], stats.slice(a, e), weight[a:e], bias[a:e], eps)
        pooled[:, a:e] = _pool(zc, pool)
    return pooled


def _bn_relu_pool_backward(kernels: BlockKernels, fbuf: Tensor, stats: NormStats, weight: Tensor, bias: Tensor,
                           eps: float, pool: str, chunk: int, grad_p: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_f, grad_weight, grad_bias) of pool(relu(bn(fbuf))) given grad_p, relu(bn(.)) rebuilt
    chunk by chunk."""
    grad_f = torch.empty_like(fbuf)
    grad_w = torch.empty_like(weight)
    grad_b = torch.empty_like(bias)
    c = fbuf.shape[1]
    for a in range(0, c, chunk):
        e = min(c, a + chunk)
        xc = fbuf[:, a:e]
        sc = stats.slice(a, e)
        zc = kernels.bn_relu_chunk(xc, sc, weight[a:e], bias[a:e], eps)
        gz = _pool_backward(grad_p[:, a:e], zc, pool)
        if pool in _OWN_GRAD:
            # gz is a new tensor: mask it in place and let relu(bn(.)) go before the BN backward
            # (masking again, as the kernels' BN-ReLU backward does, changes nothing)
            relu_backward_(gz, zc)
            zc = None
        grad_w[a:e], grad_b[a:e] = kernels.bn_relu_chunk_backward(gz, xc, zc, sc, weight[a:e], bias[a:e], eps,
                                                                  grad_f[:, a:e])
    return grad_f, grad_w, grad_b


def write_result(res: Tensor, out: Optional[Destination]) -> Tensor:
    """res, or a copy of it in out's tensor returned as an untracked alias (see Destination)."""
    if out is None:
        return res
    return untracked_alias(out.tensor.copy_(res))


class BNReLUPoolConvFunction(torch.autograd.Function):
    """apply(kernels, fbuf, stats, weight, bias, conv_weight|None, eps, pool, chunk, out|None) -> out.

    The BN-ReLU passes are the kernels' bn_relu_chunk(_backward) (ATen's fused batch norm for the
    torch backend, the extension's kernels for cuda); pooling and the GEMM are ATen's.
    """

    @staticmethod
    def forward(ctx, kernels, fbuf, stats, weight, bias, conv_weight, eps, pool, chunk, out=None, handoff=None):
        pooled = _pooled(kernels, fbuf, stats, weight, bias, eps, pool, chunk)
        if conv_weight is None:
            out = write_result(pooled, out)
        elif out is None:
            out = conv1x1(pooled, conv_weight)
        else:
            out = untracked_alias(conv1x1(pooled, conv_weight, out=out.tensor))
        ctx.kernels, ctx.stats, ctx.eps, ctx.pool, ctx.chunk = kernels, stats, eps, pool, chunk
        ctx.has_conv = conv_weight is not None
        ctx.handoff = handoff
        ctx.save_for_backward(fbuf, weight, bias, *([conv_weight] if conv_weight is not None else []))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("densenet_fast: double backward through the fused transition/head is not supported")
        fbuf, weight, bias, *rest = ctx.saved_tensors
        kernels, stats, eps, pool, chunk = ctx.kernels, ctx.stats, ctx.eps, ctx.pool, ctx.chunk
        grad_conv = None
        if ctx.has_conv:
            conv_weight = rest[0]
            pooled = _pooled(kernels, fbuf, stats, weight, bias, eps, pool, chunk)
            grad_p, grad_conv = conv1x1_backward(grad_out, pooled, conv_weight)
            del pooled
        else:
            grad_p = grad_out
        grad_f, grad_w, grad_b = _bn_relu_pool_backward(kernels, fbuf, stats, weight, bias, eps, pool, chunk, grad_p)
        if ctx.handoff is not None:
            ctx.handoff.offer(grad_f, fbuf)
        return None, grad_f, None, grad_w, grad_b, grad_conv, None, None, None, None, None


def _check_no_internal_overlap(t: Tensor, what: str) -> None:
    """t is written in place: no two of its elements may share memory (an expanded tensor), as
    torch's out= arguments must not.  Strides that do not nest (each, in increasing order, at
    least the extent of the dimensions below it) are refused too: torch's own check gives up on
    them, and all but contrived ones of them overlap."""
    extent = 1  # elements spanned by the dimensions of smaller stride
    nested = True
    for stride, size in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        nested = nested and stride >= extent
        extent += (size - 1) * stride
    if not nested:
        raise ValueError(f"{what} may have elements that share memory (strides {t.stride()} for shape "
                         f"{tuple(t.shape)}, e.g. an expanded tensor); it is written in place, so each element "
                         "needs its own memory")


def _check_call(fbuf: Tensor, norm: nn.BatchNorm2d, conv_weight: Optional[Tensor], pool: str, kernels: BlockKernels,
                chunk: int, cache: Optional[Tuple[Tensor, Tensor]]) -> None:
    """bn_relu_pool_conv's arguments, with errors that name them (the modules check their inputs
    first, with their own names)."""
    where = "bn_relu_pool_conv"
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.affine:
        raise ValueError(f"{where}: norm must be an affine nn.BatchNorm2d, got {norm!r}")
    check_kernels(kernels, where)
    check_chunk(chunk, where, "chunk")
    check_input(fbuf, where, norm.num_features, norm.weight, norm.training, name="fbuf")
    if pool == "avg2":
        check_pool_input(fbuf, where, name="fbuf")
    c = norm.num_features
    if conv_weight is not None and (not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4
                                    or tuple(conv_weight.shape[1:]) != (c, 1, 1)):
        got = tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight).__name__
        raise ValueError(f"{where}: conv_weight must be a 1x1 convolution's weight (C_out, {c}, 1, 1), got {got}")
    if cache is not None:  # a block's (mean, var) of every channel; empty ones (eval mode) mean none
        sdt = stats_dtype(fbuf.dtype)
        ok = isinstance(cache, (tuple, list)) and len(cache) == 2 and all(
            isinstance(t, Tensor) and t.dim() == 1 and t.numel() in (0, c) and t.dtype == sdt
            and t.device == fbuf.device for t in cache)
        if not ok:
            got = ([f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
                    for t in cache] if isinstance(cache, (tuple, list)) else type(cache).__name__)
            raise ValueError(f"stats (the statistics cache) must be a (mean, var) pair of ({c},) {sdt} tensors on "
                             f"{fbuf.device} (the batch statistics of the input's channels), got {got}")


def _check_out(out: Tensor, fbuf: Tensor, cout: int, pool: str) -> None:
    n, _, h, w = fbuf.shape
    ho, wo = pooled_size(h, w, pool)
    if not isinstance(out, Tensor) or tuple(out.shape) != (n, cout, ho, wo):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"out must have shape {(n, cout, ho, wo)} (N, C_out, H', W' of the result), got {got}")
    if out.dtype != fbuf.dtype or out.device != fbuf.device:
        raise TypeError(f"out must have the result's dtype and device ({fbuf.dtype}, {fbuf.device}; the autocast "
                        f"dtype under autocast), got {out.dtype} on {out.device}")
    if out.requires_grad:
        raise ValueError("out must not require grad (it is written in place; the result carries the graph)")
    _check_no_internal_overlap(out, "out")
    if not torch.compiler.is_compiling() and may_share_memory(out, fbuf):
        raise ValueError("out shares memory with the input x, which the transition still reads; write into "
                         "another tensor (the next block's buffer)")


def _norm_stats(fbuf: Tensor, norm: nn.BatchNorm2d, kernels: BlockKernels, cache: Optional[Tuple[Tensor, Tensor]],
                chunk: int) -> Tuple[NormStats, int]:
    """The statistics norm applies to fbuf (the cache, the batch's, or the running ones; the
    running statistics move once in training mode) and the channels per chunk."""
    local_count = fbuf.shape[0] * fbuf.shape[2] * fbuf.shape[3]
    count = kernels.total_count(local_count)
    if uses_batch_stats(norm):
        have_cache = cache is not None and cache[0].numel() == fbuf.shape[1]
        mean, var = cache if have_cache else kernels.channel_stats(fbuf)
        stats = norm_stats_for(norm, mean, var, fbuf.shape[1], count, kernels.group)
    else:
        stats = norm_stats_for(norm, None, None, fbuf.shape[1], count)
    return stats, chunk_size(chunk, local_count, fbuf.shape[1])


class StemFunction(torch.autograd.Function):
    """apply(kernels, x, image, conv_weight, conv_bias|None, conv_args, stats, weight, bias, eps,
    chunk) -> max_pool3x3/2(relu(bn(x))), x = conv(image, conv_weight, conv_bias, *conv_args)
    computed by the caller (without autograd).  x is not kept: backward computes it again from
    the image (which the conv's own backward keeps anyway)."""

    @staticmethod
    def forward(ctx, kernels, x, image, conv_weight, conv_bias, conv_args, stats, weight, bias, eps, chunk):
        pooled = _pooled(kernels, x, stats, weight, bias, eps, "max3", chunk)
        ctx.kernels, ctx.conv_args, ctx.stats, ctx.eps, ctx.chunk = kernels, conv_args, stats, eps, chunk
        ctx.has_bias = conv_bias is not None
        ctx.save_for_backward(image, conv_weight, weight, bias, *([conv_bias] if ctx.has_bias else []))
        return pooled

    @staticmethod
    def backward(ctx, grad_p):
        if torch.is_grad_enabled():
            raise RuntimeError("densenet_fast: double backward through the fused stem is not supported")
        image, conv_weight, weight, bias, *rest = ctx.saved_tensors
        conv_bias = rest[0] if ctx.has_bias else None
        stride, padding, dilation, groups = ctx.conv_args
        x = F.conv2d(image, conv_weight, conv_bias, stride, padding, dilation, groups)
        grad_x, grad_w, grad_b = _bn_relu_pool_backward(ctx.kernels, x, ctx.stats, weight, bias, ctx.eps, "max3",
                                                        ctx.chunk, grad_p)
        del x
        needs = ctx.needs_input_grad
        grad_image, grad_cw, grad_cb = aten.convolution_backward(
            grad_x, image, conv_weight, [conv_weight.shape[0]] if ctx.has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [needs[2], needs[3], ctx.has_bias and needs[4]])
        return None, None, grad_image, grad_cw, grad_cb, None, None, grad_w, grad_b, None, None


def fusable_stem_conv(conv: nn.Module) -> bool:
    """Whether stem_conv_bn_relu_pool can take conv: an nn.Conv2d padding with zeros by integers."""
    return (type(conv) is nn.Conv2d and "forward" not in conv.__dict__ and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def stem_conv_bn_relu_pool(image: Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d, *, kernels: BlockKernels,
                           chunk: int = 0, check: Optional[Callable[[Tensor], None]] = None) -> Tensor:
    """max_pool2d(relu(norm(conv(image))), 3, 2, 1): torchvision's DenseNet stem (conv0, norm0,
    relu0, pool0) as one Function that keeps nothing the size of conv(image) for backward: it
    keeps the image (as the conv alone would) and computes conv(image) again in backward.  At
    DenseNet-121's batch 64 that is 196 MiB fewer for the whole step, for one more stem
    convolution (about 1% of the step's arithmetic).  norm's running statistics move once in
    training mode.  check(conv(image)) runs before anything else (input checks).  The conv must
    pad with zeros by integer amounts (fusable_stem_conv)."""
    device_type = image.device.type
    dt = autocast_dtype(device_type)
    weight, bias = conv.weight, conv.bias
    if dt is not None:  # what autocast would run the conv in; the casts carry the weights' gradients
        image, weight = image.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    conv_args = (conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.no_grad(), autocast_disabled(device_type):
        x = F.conv2d(image, weight, bias, *conv_args)
    if check is not None:
        check(x)
    stats, chunk = _norm_stats(x, norm, kernels, None, chunk)
    with autocast_disabled(device_type):
        return StemFunction.apply(kernels, x, image, weight, bias, conv_args, stats, norm.weight, norm.bias, norm.eps,
                                  chunk)


def bn_relu_pool_conv(fbuf: Tensor, norm: nn.BatchNorm2d, conv_weight: Optional[Tensor], *, pool: str,
                      kernels: BlockKernels, cache: Optional[Tuple[Tensor, Tensor]] = None,
                      chunk: int = 0, out: Optional[Tensor] = None, handoff: Optional[GradHandoff] = None) -> Tensor:
    """conv1x1(pool(relu(norm(fbuf)))) (no conv when conv_weight is None), norm reading the cache.

    fbuf: (N, C, H, W) (a dense block's output buffer, or the stem conv's output).
    pool: "avg2" (2x2/2 average: transition), "global" (head), "none" (stem norm0 + relu0), "max3"
    (3x3/2 max with padding 1: norm0 + relu0 + pool0 of the ImageNet stem).
    cache: the block's (mean, var) of every channel of fbuf, or None to compute them here.
    chunk: channels of relu(bn(fbuf)) rebuilt at a time (0: the block's rule, ~CHUNK_ELEMENTS
    values per chunk).  out: optional (N, C_out, H', W') tensor to write the result into, any
    strides -- the channel prefix of the next block's buffer, so that the block need not copy its
    input (DenseBlock.forward_with_stats(buffer=...)); the result then shares out's memory.
    handoff: the GradHandoff of the block that produced fbuf (fbuf's only consumer is this), so
    that the block's backward adopts this backward's gradient of fbuf as its G.
    Returns (N, C_out, H', W').  norm's running statistics move once in training mode.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    _check_call(fbuf, norm, conv_weight, pool, kernels, chunk, cache)
    if out is not None and torch.compiler.is_compiling():
        # The aliasing of `out` below is eager-only; traced, the result is computed and copied.
        res = bn_relu_pool_conv(fbuf, norm, conv_weight, pool=pool, kernels=kernels, cache=cache, chunk=chunk)
        _check_out(out, res, res.shape[1], "none")
        with torch.no_grad():
            out.copy_(res)
        return res
    device_type = fbuf.device.type
    dt = autocast_dtype(device_type)
    if dt is not None:
        fbuf = fbuf.to(dt)
        conv_weight = conv_weight.to(dt) if conv_weight is not None else None
    dest = None
    if out is not None:  # checked before the running statistics move
        _check_out(out, fbuf, fbuf.shape[1] if conv_weight is None else conv_weight.shape[0], pool)
        dest = Destination(out)
    stats, chunk = _norm_stats(fbuf, norm, kernels, cache, chunk)
    with autocast_disabled(device_type):
        fused = kernels.pool_conv(fbuf, stats, norm.weight, norm.bias, norm.eps, conv_weight, pool, dest, handoff)
        if fused is not None:
            return fused
        return BNReLUPoolConvFunction.apply(kernels, fbuf, stats, norm.weight, norm.bias, conv_weight, norm.eps, pool,
                                            chunk, dest, None if torch.compiler.is_compiling() else handoff)
