"""The memory-efficient dense block as ONE autograd Function (../shared/design/dense_block.md).

Forward (training): one buffer F (N, C0 + L*k, H, W) per call; x0 is copied into F[:, :C0] and
every layer writes its k new channels into F[:, C_l:C_l+k] in place, so the concatenation costs
nothing.  A per-channel (mean, var) cache is filled once per channel -- for x0 when it enters and
for each layer's new channels right after they are produced -- and every norm1 reads it, so the
statistic passes are O(L) instead of O(L^2).  BN-ReLU outputs are transients, never saved.

Backward: one gradient buffer G shaped like F (float32 when F is half precision) starts as
dLoss/dF; layer l reads its complete output gradient G[:, C_l:C_l+k], recomputes what it needs
from F, and ACCUMULATES its input gradient into G[:, :C_l] (each layer's training-mode BN
gradient for its own use of the shared statistics; the contributions add).  The gradient of x0 is
G[:, :C0].

The bottleneck Bt = conv1x1(relu(bn1(F[:, :C_l]))) is either recomputed in backward
(save_bottleneck=False, the minimum-memory mode: only F and O(C) floats per layer are saved) or
saved (save_bottleneck=True: B = bn_size*k extra channels per layer kept, one 1x1 GEMM less per
layer in backward).

Layers without bottleneck (bn_size=0: new = conv3x3(relu(bn1(F[:, :C_l])))) take the same path
with the bottleneck's two steps replaced by one (plain_layer_output / _backward: a backend's
BN-ReLU-Conv3x3 applied to the prefix, and the bottleneck backward's chunk loop with a 3x3 conv):
norm1 reads the cache, relu(bn1(.)) of the prefix is at most a transient, and the input gradient
is accumulated into G chunk by chunk.

What a backend changes is only the kernel set (`BlockKernels`): the plain-PyTorch one feeds ATen's
fused batch_norm / native_batch_norm_backward / convolution_backward kernels with the cached
statistics; the "cuda" backend swaps in the compiled statistics kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..reference import has_bottleneck, is_int
from ..structure import LAYER_MATH, dense_block_issue, module_width, raise_structure_error
from .amp import autocast_dtype, autocast_disabled
from .checks import check_input
from .channel_stats import stats_dtype
from .conv1x1 import conv1x1, conv1x1_backward
from .bn_relu import NormStats, batch_stats, bn_backward, bn_relu, bn_relu_backward, norm_stats_for, relu_backward_, \
    sync_stats, update_running_stats_many_, uses_batch_stats

aten = torch.ops.aten

PARAMS_PER_LAYER = 6  # norm1.weight, norm1.bias, conv1.weight, norm2.weight, norm2.bias, conv2.weight
PLAIN_PARAMS_PER_LAYER = 3  # a layer without bottleneck (bn_size=0): norm1.weight, norm1.bias, conv1.weight


def conv3x3_backward(d_y: Tensor, z: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """(d_z, d_w) of y = conv2d(z, w, padding=1)."""
    d_z, d_w, _ = aten.convolution_backward(d_y, z, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                            [True, True, False])
    return d_z, d_w


def _chunked_bn_relu_conv_backward(d_y: Tensor, fbuf: Tensor, cl: int, stats1: "NormStats", g1: Tensor, b1: Tensor,
                                   eps: float, w1: Tensor, step: int, grad_acc: Tensor, z1: Optional[Tensor],
                                   conv_backward: Callable[[Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]
                                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward of y = conv(relu(bn1(F[:, :cl])), w1), `step` input channels at a time:
    grad_acc (G[:, :cl]) += dLoss/dF[:, :cl]; returns (d_w1, d_g1, d_b1).

    A convolution's input and weight gradients split exactly by input channel, and so does BN
    backward (per-channel sums): chunk by chunk, relu(bn(F)) is rebuilt, its gradient formed and
    added into G, so no C_l-channel intermediate ever exists.  z1: relu(bn1(F[:, :cl])) when the
    caller kept it (one chunk only), else None.
    """
    if step >= cl:  # one chunk: its gradients are the whole ones, no copies into a result
        if z1 is None:
            z1 = bn_relu(fbuf[:, :cl], stats1, g1, b1, eps)
        d_z1, d_w1 = conv_backward(d_y, z1, w1)
        relu_backward_(d_z1, z1)
        del z1  # freed here unless the caller kept it
        d_x, d_g1, d_b1 = bn_backward(d_z1, fbuf[:, :cl], stats1, g1, eps)
        del d_z1
        grad_acc.add_(d_x)
        return d_w1, d_g1, d_b1
    d_w1 = torch.empty_like(w1)
    d_g1 = torch.empty_like(g1)
    d_b1 = torch.empty_like(b1)
    for a in range(0, cl, step):
        e = min(cl, a + step)
        xc = fbuf[:, a:e]
        sc = stats1.slice(a, e)
        z1c = bn_relu(xc, sc, g1[a:e], b1[a:e], eps)
        d_z1c, d_w1c = conv_backward(d_y, z1c, w1[:, a:e])
        relu_backward_(d_z1c, z1c)
        del z1c
        d_xc, d_g1c, d_b1c = bn_backward(d_z1c, xc, sc, g1[a:e], eps)
        grad_acc[:, a:e].add_(d_xc)
        d_w1[:, a:e].copy_(d_w1c)
        d_g1[a:e].copy_(d_g1c)
        d_b1[a:e].copy_(d_b1c)
        del d_z1c, d_xc
    return d_w1, d_g1, d_b1


@dataclass
class BlockKernels:
    """The primitives a backend supplies, and the process group of synchronized BN.

    stats(x) -> (mean, biased var) in fp32/fp64 (None: torch.var_mean).  group: a
    torch.distributed process group over which batch statistics and BN backward sums are
    reduced (densenet_fast.convert_sync_batchnorm), or None for per-process BN.
    """

    name: str = "torch"
    stats: Optional[Callable[[Tensor], Tuple[Tensor, Tensor]]] = None
    group: Any = None

    def channel_stats(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        mean, var = batch_stats(x, self.stats)
        if self.group is None:
            return mean, var
        mean, var, _ = sync_stats(mean, var, x.numel() // x.shape[1], self.group)
        return mean, var

    def total_count(self, count: int) -> int:
        """Values per channel over the process group (count itself without sync)."""
        if self.group is None:
            return count
        import torch.distributed as dist
        t = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    # ---- the four per-layer primitives (plain PyTorch here; kernel backends override them) ----

    def bottleneck(self, fbuf: Tensor, cl: int, stats1: NormStats, g1: Tensor, b1: Tensor, eps: float,
                   w1: Tensor, step: int, want_stats: bool
                   ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
        """Bt = conv1x1(relu(bn1(F[:, :cl]))) (N, B, H, W) in F's layout, and, when want_stats,
        its per-channel batch (mean, var) (the norm2 statistics)."""
        bt = bn_relu_conv1x1(fbuf, cl, stats1, g1, b1, eps, w1, step)
        return bt, (self.channel_stats(bt) if want_stats else None)

    def layer_output(self, bt: Tensor, stats2: NormStats, g2: Tensor, b2: Tensor, eps: float, w2: Tensor,
                     dst: Tensor, stats_out: Optional[Tuple[Tensor, Tensor]] = None
                     ) -> Optional[Tuple[Tensor, Tensor]]:
        """dst <- conv3x3(relu(bn2(bt)), padding=1) (dst: the slice F[:, C_l:C_l+k]).  Returns the
        (mean, var) of what was written when the kernel produced them, else None.  stats_out: the
        statistics cache's (mean, var) at these channels, where a kernel that produces the
        statistics may write them directly (it then returns those tensors); ignored here."""
        z2 = bn_relu(bt, stats2, g2, b2, eps)
        dst.copy_(F.conv2d(z2, w2, padding=1))
        return None

    def layer_output_backward(self, d_out: Tensor, bt: Tensor, stats2: NormStats, g2: Tensor, b2: Tensor,
                              eps: float, w2: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradients of layer_output: (d_bt, d_g2, d_b2, d_w2).  d_out: (N, k, H, W), any float dtype."""
        z2 = bn_relu(bt, stats2, g2, b2, eps)
        d_z2, d_w2 = conv3x3_backward(d_out.to(bt.dtype), z2, w2)
        relu_backward_(d_z2, z2)
        del z2  # not alive through the BN backward: Bt, dY2 and dBt are
        d_bt, d_g2, d_b2 = bn_backward(d_z2, bt, stats2, g2, eps)
        return d_bt, d_g2, d_b2, d_w2

    def recompute_bottleneck(self, fbuf: Tensor, cl: int, stats1: NormStats, g1: Tensor, b1: Tensor, eps: float,
                             w1: Tensor, step: int) -> Tuple[Tensor, Optional[Tensor]]:
        """The backward's Bt (save_bottleneck=False), and z1 = relu(bn1(F[:, :cl])) when
        bottleneck_backward may reuse it instead of rebuilding it (else None).

        z1 is kept when the prefix is one chunk and holding it through layer_output_backward does
        not raise the layer's transient peak: that phase holds about 5 B-channel tensors (Bt, z2,
        dz2, the masked gradient, dBt), bottleneck_backward about B + 4 cl (dBt; z1, dz1, the
        masked gradient, dx), so keeping z1 costs nothing extra while cl + 5 B <= B + 4 cl, i.e.
        4 B <= 3 cl.  It saves one BN-ReLU pass over the prefix per layer.
        """
        if step >= cl and 4 * w1.shape[0] <= 3 * cl:
            z1 = bn_relu(fbuf[:, :cl], stats1, g1, b1, eps)
            return conv1x1(z1, w1), z1
        return self.bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step, False)[0], None

    def bottleneck_backward(self, d_bt: Tensor, fbuf: Tensor, cl: int, stats1: NormStats, g1: Tensor, b1: Tensor,
                            eps: float, w1: Tensor, step: int, grad_acc: Tensor, z1: Optional[Tensor] = None
                            ) -> Tuple[Tensor, Tensor, Tensor]:
        """Gradients of bottleneck: grad_acc (the slice G[:, :cl]) += dLoss/dF[:, :cl]; returns
        (d_w1, d_g1, d_b1).  z1: relu(bn1(F[:, :cl])) from recompute_bottleneck, or None.

        dgrad and wgrad of a 1x1 conv split exactly by input channel, and so does BN backward
        (per-channel sums): chunk by chunk, relu(bn(F)) is rebuilt, its gradient formed and added
        into G, so no C_l-channel intermediate ever exists.
        """
        return _chunked_bn_relu_conv_backward(d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1,
                                              conv1x1_backward)

    # ---- layers without a bottleneck (bn_size=0): BN-ReLU-Conv3x3 of the prefix ----

    def plain_layer_output(self, fbuf: Tensor, cl: int, stats1: NormStats, g1: Tensor, b1: Tensor, eps: float,
                           w1: Tensor, dst: Tensor, stats_out: Optional[Tuple[Tensor, Tensor]] = None
                           ) -> Optional[Tuple[Tensor, Tensor]]:
        """dst <- conv3x3(relu(bn1(F[:, :cl])), padding=1): a layer without bottleneck.  It is
        layer_output with the prefix in Bt's place, so each backend's BN-ReLU-Conv3x3 serves it
        (here relu(bn1(.)) of the prefix is a transient, one per layer at a time; the triton
        backend's kernel reads the prefix in place and writes the statistics of dst, see
        layer_output for stats_out and the result)."""
        return self.layer_output(fbuf[:, :cl], stats1, g1, b1, eps, w1, dst, stats_out)

    def plain_layer_output_backward(self, d_out: Tensor, fbuf: Tensor, cl: int, stats1: NormStats, g1: Tensor,
                                    b1: Tensor, eps: float, w1: Tensor, step: int, grad_acc: Tensor
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Gradients of plain_layer_output: grad_acc (G[:, :cl]) += dLoss/dF[:, :cl]; returns
        (d_g1, d_b1, d_w1).  Like bottleneck_backward, `step` input channels at a time: a 3x3
        conv's input and weight gradients split by input channel too, so relu(bn1(.)) and the
        gradients of the prefix exist one chunk at a time (FC-DenseNet's decoder layers read
        hundreds of full-resolution channels each)."""
        d_w1, d_g1, d_b1 = _chunked_bn_relu_conv_backward(d_out.to(fbuf.dtype), fbuf, cl, stats1, g1, b1, eps, w1,
                                                          step, grad_acc, None, conv3x3_backward)
        return d_g1, d_b1, d_w1

    # ---- BN-ReLU of a channel chunk, for ops.transition's chunked Function ----

    def bn_relu_chunk(self, x: Tensor, stats: NormStats, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        """relu(bn(x)) of a channel chunk x (N, c, H, W) (stats, weight, bias: its slices), a
        transient in x's layout."""
        return bn_relu(x, stats, weight, bias, eps)

    def bn_relu_chunk_backward(self, grad_z: Tensor, x: Tensor, z: Optional[Tensor], stats: NormStats,
                               weight: Tensor, bias: Tensor, eps: float, grad_x: Tensor) -> Tuple[Tensor, Tensor]:
        """grad_x <- dLoss/dx of z = relu(bn(x)) given grad_z (grad_x: (N, c, H, W), written, not
        accumulated); returns (d_weight, d_bias).  z None: grad_z is already masked by z > 0."""
        if z is None:
            gx, gw, gb = bn_backward(grad_z, x, stats, weight, eps)
        else:
            gx, gw, gb = bn_relu_backward(grad_z, x, z, stats, weight, eps)
        grad_x.copy_(gx)
        return gw, gb

    # ---- the whole block at once, for backends that run the layer loop natively ----

    def whole_block_forward(self, spec: "BlockSpec", fbuf: Tensor, params: Sequence[Tensor], c0: int
                            ) -> Optional[Tuple[Tensor, Tensor, Any, List[Tuple[nn.Module, Tensor, Tensor]]]]:
        """Run every layer of the block in one call: fbuf[:, :c0] holds the input and layer l
        writes fbuf[:, C_l:C_l+k].  Returns (mean, var, records, running-statistics updates) as
        block_forward would have them, or None to run the per-layer primitives instead (the
        default, and whatever a backend's loop does not cover).  records: an object with
        backward(fbuf, gbuf, params, c0), which adds each layer's input gradient into gbuf (dLoss/dF)
        and returns the gradient of every parameter, in params' order."""
        return None

    def pool_conv(self, fbuf: Tensor, stats: NormStats, weight: Tensor, bias: Tensor, eps: float,
                  conv_weight: Optional[Tensor], pool: str, out: Optional["Destination"] = None,
                  handoff: Optional["GradHandoff"] = None) -> Optional[Tensor]:
        """A backend's own differentiable transition/head, or None for ops.transition's chunked
        plain-PyTorch Function.  out: where to write the result (see Destination), or None;
        handoff: where its backward offers its gradient of fbuf (GradHandoff), or None."""
        return None


class Destination:
    """A tensor an autograd Function's forward writes its result into, handed over outside the
    Function's inputs.

    The transition writes its output straight into the channel prefix of the next block's buffer
    (the design's "transition writes into the next block's buffer").  Were that prefix an input of
    the Function, autograd would see an in-place write into a view and route the whole buffer's
    gradient through a CopySlices node (a full copy of it); handed over this way, autograd sees
    the result only as the Function's output (`untracked_alias`).
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def untracked_alias(t: Tensor) -> Tensor:
    """A tensor over t's memory (same storage, offset, shape and strides) that is not an autograd
    view of t and has its own version counter.

    For a Function output that lives inside a buffer another Function fills in later: writes into
    the buffer's other channels must not count as in-place modifications of this output (nothing
    saves it for backward, and the channels it covers are never written again).
    """
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(
        t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


class GradHandoff:
    """A block's gradient buffer G, allocated by the Function that consumes the block's F.

    The block's backward starts from G = dLoss/dF, which normally arrives as a tensor of F's size
    from F's consumer (the transition, the head) and is copied into a new G: two buffer-sized
    tensors at the start of the block's backward, the step's peak in DenseNet-BC.  When a model
    links the two Functions through one GradHandoff, the consumer's backward leaves its gradient
    tensor here (`tensor`) and the block adopts it as G (no copy, one buffer less) -- but only if
    the gradient autograd hands the block IS that tensor (same storage, offset and geometry, the
    handoff holding it alive meanwhile), laid out as F and in G's dtype: autograd summing it with
    another gradient of F makes a new tensor, which is copied as before.  A consumer leaves
    nothing when the user can see the gradient (hooks or retain_grad on F): the block
    accumulates into G in place.
    """

    __slots__ = ("tensor",)

    def __init__(self) -> None:
        self.tensor: Optional[Tensor] = None

    def offer(self, grad_f: Tensor, fbuf: Tensor) -> None:
        """From F's consumer's backward: its gradient of F, unless F's gradient is observed."""
        if not (fbuf.retains_grad or getattr(fbuf, "_backward_hooks", None)):
            self.tensor = grad_f

    def take(self, grad_f: Tensor, fbuf: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
        """grad_f itself when it is the offered tensor, shaped and strided as fbuf and in `dtype`
        (what G must be), else None; clears the offer."""
        offered, self.tensor = self.tensor, None
        if offered is None or offered.dtype != dtype or grad_f.dtype != dtype or grad_f.device != offered.device:
            return None
        same_memory = (grad_f.untyped_storage()._cdata == offered.untyped_storage()._cdata
                       and grad_f.storage_offset() == offered.storage_offset())
        geometry = (grad_f.shape, grad_f.stride())
        if not same_memory or geometry != (offered.shape, offered.stride()) or geometry != (fbuf.shape, fbuf.stride()):
            return None
        return offered


def _write_parts(parts: Sequence[Tensor], out: Tensor) -> None:
    start = 0
    for part in parts:
        out[:, start:start + part.shape[1]].copy_(part)
        start += part.shape[1]


class ConcatIntoFunction(torch.autograd.Function):
    """torch.cat(parts, 1) written into dest.tensor (a block buffer's channel prefix) instead of
    a new tensor; backward hands each part its channels of the gradient (views, no copy)."""

    @staticmethod
    def forward(ctx: Any, dest: Destination, *parts: Tensor) -> Tensor:
        _write_parts(parts, dest.tensor)
        ctx.splits = [(p.shape[1], p.dtype) for p in parts]
        return untracked_alias(dest.tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        grads, start = [], 0
        for width, dtype in ctx.splits:
            grads.append(grad[:, start:start + width].to(dtype))
            start += width
        return (None, *grads)


def concat_into(parts: Sequence[Tensor], out: Tensor) -> Tensor:
    """torch.cat(parts, 1) (parts: (N, C_i, H, W) with sum(C_i) == out.shape[1]) written into out,
    returned as a tensor over out's memory that carries the parts' graph -- handed to a block
    whose buffer out is a channel prefix of, the block reads it in place (no concatenation, no
    copy of its input).  Under torch.compile it is torch.cat (the block then copies it)."""
    if torch.compiler.is_compiling():
        return torch.cat(list(parts), 1).to(out.dtype)
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return ConcatIntoFunction.apply(Destination(out), *parts)
    _write_parts(parts, out)
    return out


# What the fused kernels of the "cuda" and "triton" backends read (fp32 accumulation for all).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FusedBlockKernels(BlockKernels):
    """Base of the kernel backends: what their kernels cover, the rest runs BlockKernels' plain
    PyTorch primitives (float64 data; synchronized BN, whose sums are all-reduced on the host)."""

    def _fused(self, x: Tensor) -> bool:
        return x.dtype in KERNEL_DTYPES and self.group is None

    def recompute_bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step):
        if not self._fused(fbuf):
            return super().recompute_bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step)
        return self.bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step, False)[0], None


@dataclass
class BlockSpec:
    """Everything about a block call that is not a differentiable tensor."""

    layers: Sequence[nn.Module]           # DenseLayer-like: norm1, conv1, norm2, conv2, drop_rate
    kernels: BlockKernels
    save_bottleneck: bool = False
    chunk_channels: int = 0               # input channels per chunk of the 1x1 conv; 0: auto
    compute_stats: bool = True            # fill the statistics cache (training-mode consumers)
    count: int = 0                        # values per channel (over the process group); set by forward
    buffer: Optional[Tensor] = None       # a preallocated F (new_block_buffer); x may already be its prefix
    handoff: Optional[GradHandoff] = None  # where F's consumer leaves G for the backward (GradHandoff)


@dataclass
class _LayerRecord:
    # Batch statistics: views of the block's cache, kept with bn_affine's memo (eager), or None
    # under torch.compile (a traced Function may not keep views of its intermediates; the
    # backward slices the cache again); eval: a snapshot of the running statistics.
    stats1: Optional[NormStats]
    stats2: Optional[NormStats]   # None for a layer without bottleneck
    seed: Optional[int]           # dropout: the generator seed that reproduces the mask
    bottleneck: Optional[Tensor] = None
    # dropout under torch.compile, which traces no torch.Generator: the keep-mask itself (bool,
    # one byte per new value of the layer), drawn from the default generator
    keep: Optional[Tensor] = None


def buffer_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when x is stored NHWC (and not also NCHW-contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def new_block_buffer(like: Tensor, channels: int, height: int, width: int,
                     dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised block buffer (N, channels, height, width) with like's batch size, device
    and memory format (like: (N, ., ., .)), of `dtype` or like's dtype."""
    return torch.empty((like.shape[0], channels, height, width), dtype=dtype or like.dtype, device=like.device,
                       memory_format=buffer_memory_format(like))


def is_channel_prefix(x: Tensor, fbuf: Tensor) -> bool:
    """True when x IS fbuf[:, :C0] (same memory, same strides), i.e. already in place.  Always
    False while torch.compile traces (it cannot compare data pointers; the copy is then kept)."""
    if torch.compiler.is_compiling():
        return False
    return (x.device == fbuf.device and x.dtype == fbuf.dtype and x.data_ptr() == fbuf.data_ptr()
            and x.shape[1] <= fbuf.shape[1] and x.stride() == fbuf.stride()
            and x.untyped_storage().data_ptr() == fbuf.untyped_storage().data_ptr())


def _memory_span(t: Tensor) -> Tuple[int, int]:
    """[first, last) byte addresses that t's elements can occupy (empty for an empty tensor)."""
    if t.numel() == 0:
        return 0, 0
    lo = t.storage_offset()  # torch strides are never negative
    hi = lo + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    base = t.untyped_storage().data_ptr()
    return base + lo * t.element_size(), base + (hi + 1) * t.element_size()


def may_share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether a and b may touch the same memory: their address spans intersect (conservative:
    interleaved but disjoint views count as sharing)."""
    if a.device != b.device or a.device.type == "meta" or a.numel() == 0 or b.numel() == 0:
        return False  # meta tensors have no memory (every data_ptr is 0)
    (a0, a1), (b0, b1) = _memory_span(a), _memory_span(b)
    return a0 < b1 and b0 < a1


def check_block_buffer(fbuf: Tensor, x: Tensor, channels: int) -> None:
    """buffer must be (N, channels, H, W) with x's batch and spatial size, dtype and device, a
    tensor that may be written, and x its channel prefix or apart from it."""
    n, _, h, w = x.shape
    if not isinstance(fbuf, Tensor) or tuple(fbuf.shape) != (n, channels, h, w):
        got = tuple(fbuf.shape) if isinstance(fbuf, Tensor) else type(fbuf).__name__
        raise ValueError(f"DenseBlock: buffer must have shape {(n, channels, h, w)} (N, C0 + L*k, H, W of the "
                         f"input x), got {got}")
    if fbuf.dtype != x.dtype or fbuf.device != x.device:
        raise TypeError(f"DenseBlock: buffer must match input x's dtype and device ({x.dtype}, {x.device}), got "
                        f"{fbuf.dtype} on {fbuf.device}")
    if buffer_memory_format(fbuf) == torch.contiguous_format and not fbuf.is_contiguous():
        raise ValueError("DenseBlock: buffer must be contiguous (NCHW) or channels_last, got strides "
                         f"{fbuf.stride()}")
    if fbuf.requires_grad:
        raise ValueError("DenseBlock: buffer must not require grad (it is written in place). A buffer serves one "
                         "call: one that requires grad is the F of an earlier call, whose backward it would corrupt; "
                         "allocate another (new_buffer)")
    if not torch.compiler.is_compiling() and not is_channel_prefix(x, fbuf) and may_share_memory(x, fbuf):
        raise ValueError("DenseBlock: input x shares memory with buffer but is not its channel prefix "
                         "buffer[:, :C0] (the block writes every channel of buffer)")


def dropout_mask(seed: int, like: Tensor, p: float) -> Tensor:
    """The scaled keep-mask (values 0 or 1/(1-p)) drawn from a generator seeded with `seed`.

    Drawing it again with the same seed on the same device gives the same mask, so backward
    regenerates it instead of keeping N*k*H*W values per layer alive.
    """
    keep = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if like.device.type == "meta":  # shape-only planning run: no generator exists there
        return keep
    if p >= 1:  # every value dropped (nn.Dropout(1.0)): zeros, not 0 / 0
        return keep.zero_()
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    keep.bernoulli_(1.0 - p, generator=gen)
    return keep.div_(1.0 - p)


# relu(bn(F)) is rebuilt CHUNK_ELEMENTS values (N*H*W*channels) at a time: small enough that the
# chunk's transients stay well below one block buffer (and below glibc's 32 MiB mmap threshold, so
# CPU allocations are recycled instead of page-faulted in every time), large enough that each chunk
# is still a GEMM with a long K.
CHUNK_ELEMENTS = 1 << 22


def chunk_size(spec_chunk: int, count: int, channels: int, floor: int = 0) -> int:
    """Input channels per chunk: spec_chunk when set, else ~CHUNK_ELEMENTS values, at least 16 and
    at least `floor` (never more than `channels`).

    A dense layer passes its bottleneck width (bn_size * k) as the floor: a chunk (z and its
    gradient) is then never narrower than Bt and d_Bt, which are alive beside it anyway, and each
    chunk's GEMM has K >= its N.  Without the floor, large images make chunks of a few channels
    (DenseNet-121 at batch 64, 224x224: 20 channels in block 1, 12 chunks for its last 224-channel
    prefix), and every chunk re-reads and re-writes the whole Bt (forward, recompute) or reads
    d_Bt twice (backward).
    """
    if spec_chunk > 0:
        return spec_chunk
    return min(channels, max(16, floor, CHUNK_ELEMENTS // max(count, 1)))


def bn_relu_conv1x1(fbuf: Tensor, cl: int, stats: NormStats, weight: Tensor, bias: Tensor, eps: float,
                    conv_weight: Tensor, step: int) -> Tensor:
    """conv1x1(relu(bn(F[:, :cl]))) accumulated over input-channel chunks of `step` channels.

    fbuf: (N, C, H, W) block buffer; conv_weight: (B, cl, 1, 1).  Returns Bt (N, B, H, W) in F's
    layout.  Only one chunk of relu(bn(.)) exists at a time.
    """
    if step >= cl:  # one chunk: the whole prefix, with no slices of the parameters
        return conv1x1(bn_relu(fbuf[:, :cl], stats, weight, bias, eps), conv_weight)
    out = None
    for a in range(0, cl, step):
        e = min(cl, a + step)
        zc = bn_relu(fbuf[:, a:e], stats.slice(a, e), weight[a:e], bias[a:e], eps)
        out = conv1x1(zc, conv_weight[:, a:e], out=out, accumulate=out is not None)
    return out


def draw_seed() -> int:
    # From the default CPU generator, so torch.manual_seed makes the whole block reproducible.
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())


def growth_rate_of(layers: Sequence[nn.Module]) -> int:
    """k, the channels each layer adds (its last conv's output channels)."""
    first = layers[0]
    return (first.conv2 if has_bottleneck(first) else first.conv1).out_channels


def _param_slices(layers: Sequence[nn.Module]) -> List[slice]:
    """Where each layer's tensors lie in block_params' list (6 per bottleneck layer, 3 per plain one)."""
    out, start = [], 0
    for layer in layers:
        n = PARAMS_PER_LAYER if has_bottleneck(layer) else PLAIN_PARAMS_PER_LAYER
        out.append(slice(start, start + n))
        start += n
    return out


def block_forward(spec: BlockSpec, x: Tensor, params: Sequence[Tensor]
                  ) -> Tuple[Tensor, Tensor, Tensor, Any]:
    """Run the block.  x: (N, C0, H, W).  Returns (F, mean, var, records).

    F: (N, C0 + L*k, H, W) in x's dtype and memory format.  mean, var: (C0 + L*k,) batch
    statistics of every channel of F (empty when spec.compute_stats is False).  records: what
    backward needs per layer (O(C) floats, a seed, optionally the bottleneck), a list of
    _LayerRecord, or the backend's own object when its whole_block_forward ran the block.
    """
    layers = spec.layers
    n, c0, h, w = x.shape
    k = growth_rate_of(layers)
    c_total = c0 + len(layers) * k
    count = spec.kernels.total_count(n * h * w)
    spec.count = count
    group = spec.kernels.group
    fbuf, spec.buffer = spec.buffer, None  # spec lives in ctx: holding F there would be a reference cycle
    if fbuf is None:
        fbuf = torch.empty((n, c_total, h, w), dtype=x.dtype, device=x.device, memory_format=buffer_memory_format(x))
        fbuf[:, :c0].copy_(x)
    else:
        check_block_buffer(fbuf, x, c_total)
        if not is_channel_prefix(x, fbuf):  # else the transition before the block wrote x in place
            fbuf[:, :c0].copy_(x)
    whole = spec.kernels.whole_block_forward(spec, fbuf, params, c0)
    if whole is not None:
        mean, var, block_records, pending = whole
        update_running_stats_many_(pending, count)
        return fbuf, mean, var, block_records
    sdt = stats_dtype(x.dtype)
    if spec.compute_stats:
        mean = torch.empty(c_total, dtype=sdt, device=x.device)
        var = torch.empty(c_total, dtype=sdt, device=x.device)
        mean[:c0], var[:c0] = spec.kernels.channel_stats(x)
    else:
        # two tensors, not one twice: the Function returns and saves both, and Dynamo cannot wire
        # one tensor saved twice (fullgraph compile in eval: "Placeholder node not found in env")
        mean, var = torch.empty(0, dtype=sdt, device=x.device), torch.empty(0, dtype=sdt, device=x.device)
    records: List[_LayerRecord] = []
    pending: List[Tuple[nn.Module, Tensor, Tensor]] = []  # running-statistics updates, applied together
    slices = _param_slices(layers)
    for l, layer in enumerate(layers):
        cl = c0 + l * k
        stats1 = norm_stats_for(layer.norm1, mean if spec.compute_stats else None, var, cl, count, group, pending)
        dst = fbuf[:, cl:cl + k]
        dropout = layer.drop_rate > 0 and layer.training
        # The cache's slots for these channels, which a kernel may fill itself (not with dropout
        # or sync BN: their statistics are taken after the kernel, below).
        stats_out = (mean[cl:cl + k], var[cl:cl + k]) if spec.compute_stats else None
        bt = stats2 = new_stats = None
        if not has_bottleneck(layer):
            g1, b1, w1 = params[slices[l]]
            new_stats = spec.kernels.plain_layer_output(fbuf, cl, stats1, g1, b1, layer.norm1.eps, w1, dst,
                                                        None if dropout or group is not None else stats_out)
        else:
            g1, b1, w1, g2, b2, w2 = params[slices[l]]
            batch2 = uses_batch_stats(layer.norm2)
            bt, bt_stats = spec.kernels.bottleneck(fbuf, cl, stats1, g1, b1, layer.norm1.eps, w1,
                                                   chunk_size(spec.chunk_channels, n * h * w, cl, w1.shape[0]),
                                                   batch2)
            if batch2:
                m2, v2 = bt_stats
                pending.append((layer.norm2, m2, v2))
                stats2 = NormStats(m2, v2, True, count, group)
            else:
                stats2 = norm_stats_for(layer.norm2, None, None, bt.shape[1], count)
            new_stats = spec.kernels.layer_output(bt, stats2, g2, b2, layer.norm2.eps, w2, dst,
                                                  None if dropout or group is not None else stats_out)
        seed = keep = None
        if dropout and torch.compiler.is_compiling():
            keep = torch.rand_like(dst, dtype=torch.float32) >= layer.drop_rate
            dst.mul_(keep).div_(1.0 - layer.drop_rate)
            new_stats = None
        elif dropout:
            seed = draw_seed()
            dst.mul_(dropout_mask(seed, dst, layer.drop_rate))
            new_stats = None
        if stats_out is not None:
            if new_stats is None or group is not None:
                new_stats = spec.kernels.channel_stats(dst)
            if new_stats[0] is not stats_out[0]:
                stats_out[0].copy_(new_stats[0])
            if new_stats[1] is not stats_out[1]:
                stats_out[1].copy_(new_stats[1])
        keep1 = not (stats1.batch and torch.compiler.is_compiling())
        records.append(_LayerRecord(stats1 if keep1 else None, stats2, seed,
                                    bt if spec.save_bottleneck else None, keep))
    update_running_stats_many_(pending, count)
    return fbuf, mean, var, records


def block_backward(spec: BlockSpec, fbuf: Tensor, mean: Tensor, var: Tensor, grad_f: Tensor,
                   params: Sequence[Tensor], records: Any, c0: int
                   ) -> Tuple[Tensor, List[Tensor]]:
    """Gradients of the block.  Returns (grad_x0 (N, C0, H, W), [grad per parameter])."""
    layers = spec.layers
    k = growth_rate_of(layers)
    acc_dtype = torch.float32 if fbuf.dtype in (torch.float16, torch.bfloat16) else fbuf.dtype
    gbuf = spec.handoff.take(grad_f, fbuf, acc_dtype) if spec.handoff is not None else None
    if gbuf is None:
        gbuf = torch.empty(fbuf.shape, dtype=acc_dtype, device=fbuf.device, memory_format=buffer_memory_format(fbuf))
        gbuf.copy_(grad_f)
    if not isinstance(records, list):  # whole_block_forward's
        return gbuf[:, :c0], records.backward(fbuf, gbuf, params, c0)
    grads: List[Optional[Tensor]] = [None] * len(params)
    count = fbuf.shape[0] * fbuf.shape[2] * fbuf.shape[3]
    slices = _param_slices(layers)
    for l in range(len(layers) - 1, -1, -1):
        layer, rec = layers[l], records[l]
        cl = c0 + l * k
        eps1 = layer.norm1.eps
        stats1 = rec.stats1 if rec.stats1 is not None else \
            NormStats(mean[:cl], var[:cl], True, spec.count, spec.kernels.group)
        d_out = gbuf[:, cl:cl + k]
        if rec.seed is not None:
            d_out = d_out * dropout_mask(rec.seed, fbuf[:, cl:cl + k], layer.drop_rate)
        elif rec.keep is not None:
            d_out = d_out * rec.keep / (1.0 - layer.drop_rate)
        if not has_bottleneck(layer):
            g1, b1, w1 = params[slices[l]]
            grads[slices[l]] = spec.kernels.plain_layer_output_backward(
                d_out, fbuf, cl, stats1, g1, b1, eps1, w1, chunk_size(spec.chunk_channels, count, cl), gbuf[:, :cl])
            continue
        g1, b1, w1, g2, b2, w2 = params[slices[l]]
        step = chunk_size(spec.chunk_channels, count, cl, w1.shape[0])
        bt, z1 = rec.bottleneck, None
        if bt is None:
            bt, z1 = spec.kernels.recompute_bottleneck(fbuf, cl, stats1, g1, b1, eps1, w1, step)
        d_bt, d_g2, d_b2, d_w2 = spec.kernels.layer_output_backward(d_out, bt, rec.stats2, g2, b2,
                                                                    layer.norm2.eps, w2)
        del d_out, bt
        d_w1, d_g1, d_b1 = spec.kernels.bottleneck_backward(d_bt, fbuf, cl, stats1, g1, b1, eps1, w1, step,
                                                            gbuf[:, :cl], z1)
        del d_bt, z1
        grads[slices[l]] = [d_g1, d_b1, d_w1, d_g2, d_b2, d_w2]
    return gbuf[:, :c0], grads


class DenseBlockFunction(torch.autograd.Function):
    """apply(spec, x, *params) -> (F, mean, var); mean/var are non-differentiable outputs."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x: Tensor, *params: Tensor):
        fbuf, mean, var, records = block_forward(spec, x, params)
        ctx.spec = spec
        ctx.records = records
        ctx.c0 = x.shape[1]
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(fbuf, mean, var, *params)
        ctx.mark_non_differentiable(mean, var)
        return fbuf, mean, var

    @staticmethod
    def backward(ctx, grad_f: Tensor, _grad_mean, _grad_var):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "densenet_fast: double backward (create_graph=True) through the memory-efficient dense block "
                "is not supported; build the model with memory_efficient=False for higher-order gradients")
        fbuf, mean, var, *params = ctx.saved_tensors
        grad_x, grads = block_backward(ctx.spec, fbuf, mean, var, grad_f, params, ctx.records, ctx.c0)
        # grad_x is G[:, :C0]: handed on as that view it would keep all of G alive through the
        # input's producer's backward (the transition's, the stem's); a copy of C0 channels lets
        # G go now (with the AMP cast, .to() makes the copy).  Only where C0 is at most half of
        # G: a larger copy (an FC-DenseNet up block's input is 3/4 of its buffer) would make the
        # moment of copying a new peak.
        if grad_x.dtype != ctx.x_dtype:
            grad_x = grad_x.to(ctx.x_dtype)
        elif 2 * ctx.c0 <= fbuf.shape[1]:
            grad_x = grad_x.clone(memory_format=buffer_memory_format(fbuf))
        return (None, grad_x, *grads)


def block_params(layers: Sequence[nn.Module], dtype: Optional[torch.dtype] = None) -> List[Tensor]:
    """The differentiable tensors of a block, in DenseBlockFunction order.

    Conv weights are cast to `dtype` (the autocast dtype) through a differentiable .to(), so their
    gradients flow back to the fp32 masters; BN affine parameters stay fp32 (as under autocast).
    """
    out: List[Tensor] = []
    for layer in layers:
        w1 = layer.conv1.weight if dtype is None else layer.conv1.weight.to(dtype)
        out += [layer.norm1.weight, layer.norm1.bias, w1]
        if has_bottleneck(layer):
            w2 = layer.conv2.weight if dtype is None else layer.conv2.weight.to(dtype)
            out += [layer.norm2.weight, layer.norm2.bias, w2]
    return out


def check_kernels(kernels: Any, where: str) -> None:
    if not isinstance(kernels, BlockKernels):
        raise TypeError(f"{where}: kernels must be a BlockKernels (densenet_fast.backends.kernels_for), "
                        f"got {type(kernels).__name__}")


def check_chunk(chunk: Any, where: str, name: str) -> None:
    """A chunk size in channels: an int >= 0, 0 meaning the automatic size (chunk_size)."""
    if not is_int(chunk) or chunk < 0:
        raise ValueError(f"{where}: {name} must be an int >= 0 (0: automatic), got {chunk!r}")


def run_dense_block(x: Tensor, layers: Sequence[nn.Module], kernels: BlockKernels, *,
                    save_bottleneck: bool = False, chunk_channels: int = 0, compute_stats: bool = True,
                    buffer: Optional[Tensor] = None, handoff: Optional[GradHandoff] = None
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Functional entry: the block over x (N, C0, H, W) -> (F, mean, var), after checking its
    arguments (x against the layers, the layers' structure, kernels, chunk_channels) with errors
    that name them.  See run_checked_dense_block for the rest; the modules, which check their
    own inputs, call that directly.
    """
    where = "run_dense_block"
    if isinstance(layers, nn.Module) or not isinstance(layers, Sequence) or len(layers) == 0:
        got = f"an empty {type(layers).__name__}" if isinstance(layers, Sequence) else type(layers).__name__
        raise ValueError(f"{where}: layers must be a non-empty sequence of dense layers (a block's: "
                         f"list(block.values())), got {got}")
    check_kernels(kernels, where)
    check_chunk(chunk_channels, where, "chunk_channels")
    first = layers[0]
    c0 = module_width(first._modules.get("norm1"))
    raise_structure_error(where, dense_block_issue([(f"layers[{i}]", layer) for i, layer in enumerate(layers)], c0,
                                                   growth_rate_of(layers)), LAYER_MATH)
    check_input(x, where, c0, first.conv1.weight, any(layer.training for layer in layers))
    return run_checked_dense_block(x, layers, kernels, save_bottleneck=save_bottleneck,
                                   chunk_channels=chunk_channels, compute_stats=compute_stats, buffer=buffer,
                                   handoff=handoff)


def run_checked_dense_block(x: Tensor, layers: Sequence[nn.Module], kernels: BlockKernels, *,
                            save_bottleneck: bool = False, chunk_channels: int = 0, compute_stats: bool = True,
                            buffer: Optional[Tensor] = None, handoff: Optional[GradHandoff] = None
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """run_dense_block without its argument checks (for callers that made them).

    handoff: a GradHandoff shared with F's only consumer (see there), or None.

    buffer: an uninitialised F (N, C0 + L*k, H, W) in x's dtype (the autocast dtype under
    autocast) to fill instead of allocating one; when x is its channel prefix (a transition wrote
    it there, ops.transition.bn_relu_pool_conv(out=...)) the copy of x is skipped.  F is returned
    and must not be reused by another call while this one's backward is pending.

    Handles autocast (the block runs in the autocast dtype with fp32 statistics and BN parameters,
    autocast itself disabled inside so that nothing is cast twice) and no_grad (no Function, no
    saved state; running statistics still move once in training mode, as nn.BatchNorm2d's do).
    """
    device_type = x.device.type
    cast = autocast_dtype(device_type)
    if cast is not None:
        x = x.to(cast)
    for layer in layers:
        if layer.norm1.affine is False or (has_bottleneck(layer) and layer.norm2.affine is False):
            raise ValueError("densenet_fast: dense layers need affine BatchNorm (affine=True)")
    compute_stats = compute_stats or any(uses_batch_stats(layer.norm1) for layer in layers)
    spec = BlockSpec(layers, kernels, save_bottleneck, chunk_channels, compute_stats, buffer=buffer,
                     handoff=None if torch.compiler.is_compiling() else handoff)
    params = block_params(layers, cast)
    with autocast_disabled(device_type):
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return DenseBlockFunction.apply(spec, x, *params)
        fbuf, mean, var, _ = block_forward(spec, x, [p.detach() for p in params])
        return fbuf, mean, var
