"""The "cuda" backend: the block's per-layer primitives with the compiled extension's kernels
(csrc/) for every batch-norm pass and cuBLAS/cuDNN (through ATen) for the GEMMs and the 3x3 conv.

Per layer, with scale = gamma * invstd and shift = beta - mean * scale computed once (tiny):
  bottleneck             bn_relu_out of each input-channel chunk of F[:, :C_l] into ONE reused
                         scratch chunk (one pass: read x, write z), then the chunk's 1x1-conv GEMM
                         accumulated into Bt (cuBLAS, beta = 1); norm2's statistics with the
                         extension's channel_stats
  layer_output           bn_relu_out of Bt, cuDNN conv3x3, written into F[:, C_l:C_l+k]
  layer_output_backward  cuDNN dgrad/wgrad, then bn_relu_backward_reduce (the ReLU mask
                         recomputed from Bt: no mask or BN-ReLU output kept) and bn_backward_apply
  bottleneck_backward    per chunk: bn_relu_out (z rebuilt into the scratch), the 1x1 GEMMs,
                         bn_relu_backward_reduce, and bn_backward_apply accumulating straight into
                         G[:, :C_l] (accumulate=True): no chunk-sized dX is ever formed
  plain layers (bn_size=0) layer_output of the prefix forward, and bottleneck_backward's chunk
                         loop with cuDNN's 3x3 dgrad/wgrad in backward
  transition, head, stem ops.transition's chunked Function with bn_relu_chunk(_backward) on the
                         same three kernels; the pooling and the 1x1 GEMM (on the pooled rows) are ATen's
Against the torch backend this removes the separate ReLU, threshold_backward and add passes, and
the allocations of per-chunk transients.

Float64 data (the kernels read fp32/fp16/bf16) and synchronized batch norm run the plain-PyTorch
primitives of the base class.

The layer loop itself: issued from Python, the ~100 small ops per layer cost more host time than
the GPU spends on most of them (an eager DenseNet-BC-100 step is host-bound).  So by default a
block runs as ONE op per direction, torch.ops.densenet_fast.dense_block_forward / _backward
(csrc/dense_block.cpp), which performs exactly the steps of the methods below, on the same kernels,
in C++.  The methods still run where that op does not apply (CudaBlockKernels._whole: dropout,
synchronized BN, float64, torch.compile tracing, the meta device) and with whole=False.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from ..reference import has_bottleneck
from .bn_relu import bn_affine, norm_stats_for, uses_batch_stats
from .conv1x1 import conv1x1, conv1x1_backward
from .dense_block import FusedBlockKernels, chunk_size, conv3x3_backward
from .precision import with_conv_precision

__all__ = ["CudaBlockKernels"]

aten = torch.ops.aten

WHOLE_BLOCK_ENV = "DENSENET_FAST_WHOLE_BLOCK"


def _ops():
    return torch.ops.densenet_fast


# The device types with a compiled dense_block_forward and _backward, fixed once the extension is
# loaded (a module constant: Dynamo warned about tracing through an lru_cache here, H200, torch 2.11).
_WHOLE_BLOCK_DEVICES = _ext.kernel_devices("dense_block_forward") & _ext.kernel_devices("dense_block_backward")


def _channel_affine(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float):
    return _ops().channel_affine(mean, var, weight, bias, eps)


def _scratch_like(x: Tensor, channels: int) -> Tensor:
    n, _, h, w = x.shape
    channels_last = x.stride(1) == 1 and x.shape[1] > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)


def _bn_backward(grad_z: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor, shift: Tensor,
                 batch: bool, count: int, grad_x: Tensor, accumulate: bool) -> Tuple[Tensor, Tensor]:
    """grad_x (+)= the BN-ReLU backward of grad_z; returns (d_gamma, d_beta) in float32.

    Training-mode BN (batch statistics of x itself): a = sum(dy) / M, b = invstd^2 sum(dy (x - mean)) / M;
    fixed statistics: a = b = 0.  d_gamma = invstd * sum(dy (x - mean)), d_beta = sum(dy).
    """
    sum_dy, sum_dy_xmu = _ops().bn_relu_backward_reduce(grad_z, x, scale, shift, mean)
    a, b, d_gamma = _ops().channel_bn_backward(sum_dy, sum_dy_xmu, invstd.contiguous(), count, batch)
    _ops().bn_backward_apply(grad_z, x, scale, shift, mean, a, b, grad_x, accumulate)
    return d_gamma, sum_dy


@dataclass
class WholeBlockRecords:
    """What dense_block_forward keeps for dense_block_backward (csrc/dense_block.h), and that
    backward (block_backward calls it for records that are not a per-layer list)."""

    saved: List[Tensor]        # per layer: invstd1, scale1, shift1, invstd2, scale2, shift2
    mean1: List[Tensor]        # per layer: the means norm1 / norm2 normalised with
    mean2: List[Tensor]
    batch1: List[int]          # 1: batch statistics (training-mode BN backward), 0: fixed ones
    batch2: List[int]
    bottlenecks: List[Tensor]  # each layer's Bt (save_bottleneck), else empty
    steps: List[int]
    count: int                 # N*H*W

    def backward(self, fbuf: Tensor, gbuf: Tensor, params: Sequence[Tensor], c0: int) -> List[Tensor]:
        """Adds each layer's input gradient into gbuf (which holds dLoss/dF) and returns the
        gradient of every parameter, in params' order."""
        return with_conv_precision(fbuf, _ops().dense_block_backward, fbuf, gbuf, c0, list(params), self.saved,
                                   self.mean1, self.mean2, self.batch1, self.batch2, self.bottlenecks, self.steps,
                                   self.count)


class CudaBlockKernels(FusedBlockKernels):
    """BlockKernels on the extension's kernels (the statistics and every BN pass) and ATen GEMMs.

    whole=True runs a block's layer loop in C++ (torch.ops.densenet_fast.dense_block_forward /
    dense_block_backward) wherever it applies: one op call per block and direction instead of
    ~100 Python-issued ops per layer.  Elsewhere, and with whole=False, the per-layer methods
    below run, on the same kernels.  whole=None (what backend="cuda" uses) reads the environment
    variable DENSENET_FAST_WHOLE_BLOCK: "0" selects the per-layer path (to compare the two),
    anything else or unset the C++ loop."""

    def __init__(self, group=None, whole: Optional[bool] = None) -> None:
        from .channel_stats import channel_stats
        # The ops have CPU kernels too: tests run this class on the CPU (backend "cuda" itself
        # refuses CPU inputs in backends.resolve_backend).
        super().__init__(name="cuda", stats=channel_stats, group=group)
        self.whole = os.environ.get(WHOLE_BLOCK_ENV, "1") != "0" if whole is None else whole

    def _whole(self, spec, fbuf: Tensor) -> bool:
        """Whether the C++ layer loop covers this call.  It does not cover dropout (its mask's
        seed is drawn per layer in Python), synchronized BN and float64 (not _fused), tracing
        (torch.compile sees the per-layer ops instead) and the meta device (the memory planner
        must see each transient), nor layers without a bottleneck (bn_size=0)."""
        return (self.whole and not torch.compiler.is_compiling() and self._fused(fbuf)
                and fbuf.device.type in _WHOLE_BLOCK_DEVICES
                and not any(layer.drop_rate > 0 and layer.training for layer in spec.layers)
                and all(has_bottleneck(layer) for layer in spec.layers))

    def whole_block_forward(self, spec, fbuf, params, c0):
        if not self._whole(spec, fbuf):
            return None
        layers = spec.layers
        c_total = fbuf.shape[1]
        k = layers[0].conv2.out_channels
        count = spec.count  # N*H*W: no process group here (_fused)
        empty = fbuf.new_empty(0, dtype=torch.float32)
        mean = fbuf.new_empty(c_total, dtype=torch.float32) if spec.compute_stats else empty
        var = fbuf.new_empty(c_total, dtype=torch.float32) if spec.compute_stats else empty
        stats1: List[Optional[Tensor]] = []
        stats2: List[Optional[Tensor]] = []
        batch1, batch2, steps = [], [], []
        for l, layer in enumerate(layers):
            cl = c0 + l * k
            bottleneck = layer.conv1.out_channels
            for bn, channels, stats, flags in ((layer.norm1, cl, stats1, batch1),
                                               (layer.norm2, bottleneck, stats2, batch2)):
                if uses_batch_stats(bn):
                    stats += [None, None]
                    flags.append(1)
                else:
                    fixed = norm_stats_for(bn, None, None, channels, count)
                    stats += [fixed.mean.float().contiguous(), fixed.var.float()]
                    flags.append(0)
            steps.append(chunk_size(spec.chunk_channels, count, cl, bottleneck))
        saved, bt_stats, bottlenecks = with_conv_precision(
            fbuf, _ops().dense_block_forward, fbuf, mean, var, c0, list(params),
            [layer.norm1.eps for layer in layers], [layer.norm2.eps for layer in layers], stats1, stats2, steps,
            spec.compute_stats, spec.save_bottleneck)
        pending: List[Tuple[Any, Tensor, Tensor]] = []
        mean1, mean2 = [], []
        computed = iter(bt_stats)
        for l, layer in enumerate(layers):
            cl = c0 + l * k
            if batch1[l]:
                m1 = mean[:cl]
                mean1.append(m1)
                pending.append((layer.norm1, m1, var[:cl]))
            else:
                mean1.append(stats1[2 * l])
            if batch2[l]:
                m2, v2 = next(computed), next(computed)
                mean2.append(m2)
                pending.append((layer.norm2, m2, v2))
            else:
                mean2.append(stats2[2 * l])
        return mean, var, WholeBlockRecords(saved, mean1, mean2, batch1, batch2, bottlenecks, steps, count), pending

    def _bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step) -> Tuple[Tensor, Tensor]:
        """(Bt, the scratch): Bt accumulated chunk by chunk through one scratch, which holds the
        last chunk's relu(bn1(.)) afterwards -- the whole z1 when the prefix is one chunk."""
        _, _, scale, shift = bn_affine(stats1, g1, b1, eps, kernel=_channel_affine)
        scratch = _scratch_like(fbuf, min(step, cl))
        bt: Optional[Tensor] = None
        for a in range(0, cl, step):
            e = min(cl, a + step)
            z = scratch[:, : e - a]
            _ops().bn_relu_out(fbuf[:, a:e], scale[a:e], shift[a:e], z)
            bt = conv1x1(z, w1[:, a:e], out=bt, accumulate=bt is not None)
        return bt, scratch

    def bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats):
        if not self._fused(fbuf):
            return super().bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats)
        bt, _ = self._bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step)
        return bt, (self.channel_stats(bt) if want_stats else None)

    def recompute_bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step):
        """As BlockKernels.recompute_bottleneck, with this backend's rule for keeping z1: the 3x3
        backward holds ~3 B-channel tensors (Bt, z2 or dBt, dz2), bottleneck_backward B + 2 cl
        (dBt, z1, dz1; the BN backward adds into G in place), so z1 is kept when 2 B <= cl."""
        if not self._fused(fbuf):
            return super().recompute_bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step)
        bt, scratch = self._bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step)
        return bt, (scratch if step >= cl and 2 * w1.shape[0] <= cl else None)

    def layer_output(self, bt, stats2, g2, b2, eps, w2, dst, stats_out=None):
        if not self._fused(bt):
            return super().layer_output(bt, stats2, g2, b2, eps, w2, dst, stats_out)
        _, _, scale, shift = bn_affine(stats2, g2, b2, eps, kernel=_channel_affine)
        z2 = torch.empty_like(bt)
        _ops().bn_relu_out(bt, scale, shift, z2)
        dst.copy_(F.conv2d(z2, w2, padding=1))
        return None

    def layer_output_backward(self, d_out, bt, stats2, g2, b2, eps, w2):
        if not self._fused(bt):
            return super().layer_output_backward(d_out, bt, stats2, g2, b2, eps, w2)
        mean, invstd, scale, shift = bn_affine(stats2, g2, b2, eps, kernel=_channel_affine)
        z2 = torch.empty_like(bt)
        _ops().bn_relu_out(bt, scale, shift, z2)
        d_z2, d_w2 = conv3x3_backward(d_out.to(bt.dtype), z2, w2)
        del z2
        d_bt = torch.empty_like(bt)
        count = bt.shape[0] * bt.shape[2] * bt.shape[3]
        d_g2, d_b2 = _bn_backward(d_z2, bt, mean, invstd, scale, shift, stats2.batch, count, d_bt, False)
        return d_bt, d_g2.to(g2.dtype), d_b2.to(b2.dtype), d_w2

    def bottleneck_backward(self, d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1=None):
        if not self._fused(fbuf):
            return super().bottleneck_backward(d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1)
        return self._prefix_backward(d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1, conv1x1_backward)

    def plain_layer_output_backward(self, d_out, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc):
        if not self._fused(fbuf):
            return super().plain_layer_output_backward(d_out, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc)
        d_w1, d_g1, d_b1 = self._prefix_backward(d_out.to(fbuf.dtype), fbuf, cl, stats1, g1, b1, eps, w1, step,
                                                 grad_acc, None, conv3x3_backward)
        return d_g1, d_b1, d_w1

    @staticmethod
    def _prefix_backward(d_y, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1, conv_backward):
        """The backward of y = conv(relu(bn1(F[:, :cl])), w1) (a 1x1 bottleneck or a plain
        layer's 3x3), chunk by chunk: bn_relu_out rebuilds the chunk into one scratch (unless z1,
        the kept whole prefix, is given), the conv's dgrad/wgrad, then the ReLU-masked BN backward
        added straight into grad_acc.  Returns (d_w1, d_g1, d_b1)."""
        mean, invstd, scale, shift = bn_affine(stats1, g1, b1, eps, kernel=_channel_affine)
        count = fbuf.shape[0] * fbuf.shape[2] * fbuf.shape[3]
        scratch = _scratch_like(fbuf, min(step, cl)) if z1 is None else z1
        parts = []  # (d_w1, d_g1, d_b1) of each chunk: one chunk needs no copy, several one cat each
        for a in range(0, cl, step):
            e = min(cl, a + step)
            xc = fbuf[:, a:e]
            z = scratch[:, : e - a]
            if z1 is None:
                _ops().bn_relu_out(xc, scale[a:e], shift[a:e], z)
            d_z, d_wc = conv_backward(d_y, z, w1[:, a:e])
            d_gc, d_bc = _bn_backward(d_z, xc, mean[a:e], invstd[a:e], scale[a:e], shift[a:e], stats1.batch, count,
                                      grad_acc[:, a:e], True)
            parts.append((d_wc, d_gc, d_bc))
            del d_z
        d_w1, d_g1, d_b1 = parts[0] if len(parts) == 1 else [torch.cat(p, dim=i)
                                                              for p, i in zip(zip(*parts), (1, 0, 0))]
        return d_w1, d_g1.to(g1.dtype), d_b1.to(b1.dtype)

    def bn_relu_chunk(self, x, stats, weight, bias, eps):
        if not self._fused(x):
            return super().bn_relu_chunk(x, stats, weight, bias, eps)
        _, _, scale, shift = bn_affine(stats, weight, bias, eps, kernel=_channel_affine)
        z = _scratch_like(x, x.shape[1])
        _ops().bn_relu_out(x, scale, shift, z)
        return z

    def bn_relu_chunk_backward(self, grad_z, x, z, stats, weight, bias, eps, grad_x):
        if not self._fused(x):
            return super().bn_relu_chunk_backward(grad_z, x, z, stats, weight, bias, eps, grad_x)
        mean, invstd, scale, shift = bn_affine(stats, weight, bias, eps, kernel=_channel_affine)
        count = x.shape[0] * x.shape[2] * x.shape[3]
        d_w, d_b = _bn_backward(grad_z, x, mean, invstd, scale, shift, stats.batch, count, grad_x, False)
        return d_w.to(weight.dtype), d_b.to(bias.dtype)


# ---- fake (meta) kernels of the whole-block ops, for torch.library.opcheck and tracing ----

if _ext.HAS_C:

    @torch.library.register_fake("densenet_fast::dense_block_forward")
    def _dense_block_forward_fake(fbuf: Tensor, mean: Tensor, var: Tensor, c0: int, params: Sequence[Tensor],
                                  eps1: Sequence[float], eps2: Sequence[float], stats1: Sequence[Optional[Tensor]],
                                  stats2: Sequence[Optional[Tensor]], steps: Sequence[int], compute_stats: bool,
                                  save_bottleneck: bool) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        k = params[5].shape[0]
        saved: List[Tensor] = []
        bt_stats: List[Tensor] = []
        bottlenecks: List[Tensor] = []
        for l in range(len(params) // 6):
            cl, b = c0 + l * k, params[6 * l + 2].shape[0]
            # each BN's (invstd, scale, shift) are the rows of one (3, C) allocation, as in C++
            saved += [*fbuf.new_empty((3, cl), dtype=torch.float32).unbind(0),
                      *fbuf.new_empty((3, b), dtype=torch.float32).unbind(0)]
            if stats2[2 * l] is None:
                bt_stats += [fbuf.new_empty(b, dtype=torch.float32) for _ in range(2)]
            if save_bottleneck:
                bottlenecks.append(_scratch_like(fbuf, b))
        return saved, bt_stats, bottlenecks

    @torch.library.register_fake("densenet_fast::dense_block_backward")
    def _dense_block_backward_fake(fbuf: Tensor, gbuf: Tensor, c0: int, params: Sequence[Tensor],
                                   saved: Sequence[Tensor], mean1: Sequence[Tensor], mean2: Sequence[Tensor],
                                   batch1: Sequence[int], batch2: Sequence[int], bottlenecks: Sequence[Tensor],
                                   steps: Sequence[int], count: int) -> List[Tensor]:
        grads: List[Tensor] = []
        for l in range(len(params) // 6):
            g1, b1, w1, g2, b2, w2 = params[6 * l: 6 * l + 6]
            # conv1's weight gradient is a GEMM result (contiguous); conv2's comes from ATen's
            # convolution_backward, whose layout follows its input relu(bn(Bt)) (Bt's layout) and
            # the weight: ask ATen's meta kernel, as the real call would decide.
            bt = bottlenecks[l] if len(bottlenecks) else _scratch_like(fbuf, w1.shape[0])
            z2 = torch.empty_like(bt)
            d_out = torch.empty_like(z2[:, : w2.shape[0]])
            _, d_w2, _ = aten.convolution_backward(d_out, z2, w2, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   [False, True, False])
            contiguous = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in (g1, b1, w1, g2, b2)]
            grads += contiguous + [d_w2]
        return grads
