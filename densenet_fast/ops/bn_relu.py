"""BN-ReLU with externally supplied statistics: the plain-PyTorch ("torch" backend) building blocks.

Every norm in the efficient DenseNet (norm1 of each layer, norm2, the transition's norm, norm5)
normalises with statistics it did not compute itself: the block's per-channel cache in training
mode, the running buffers in eval mode.  These helpers feed those statistics to ATen's fused
kernels (batch_norm with training=False for the forward, native_batch_norm_backward with
train=True for the backward), so one BN-ReLU costs one elementwise pass and its backward one
reduction plus one elementwise pass, with no intermediate kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .channel_stats import channel_stats_torch, stats_dtype

aten = torch.ops.aten


@dataclass
class NormStats:
    """The statistics one BatchNorm applies, for channels [0, C) of its input.

    mean, var: (C,) float32 (float64 for float64 data); var is the biased variance.
    batch: True when they are batch statistics (training-mode BN: the backward must include the
    terms through mean and var), False for running statistics (eval mode: an affine map).
    """

    mean: Tensor
    var: Tensor
    batch: bool
    count: Optional[int] = None   # values per channel over the whole process group (sync BN)
    group: Any = None             # torch.distributed group whose backward sums are reduced, or None
    # bn_affine's results for these statistics (the block keeps each layer's NormStats for its
    # backward, so the recompute there reuses the forward's vectors)
    memo: Dict[Any, Tuple[Tensor, ...]] = field(default_factory=dict, repr=False, compare=False)

    def slice(self, c0: int, c1: int) -> "NormStats":
        if c0 == 0 and c1 == self.mean.shape[0]:
            return self  # the whole range (a block's single chunk): no slices, and the memo is shared
        return NormStats(self.mean[c0:c1], self.var[c0:c1], self.batch, self.count, self.group)


def scale_shift(mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """(scale, shift), float32 (C,): scale = weight * invstd, shift = bias - mean * scale (one addcmul).

    Every fused forward and every backward that recomputes a ReLU mask from x * scale + shift
    takes its vectors from here (or from bn_affine, which does), so the mask is the forward's bit
    for bit."""
    scale = weight.float() * invstd
    return scale, torch.addcmul(bias.float(), mean, scale, value=-1.0)


def forward_scale_shift(mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, scale: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """A backward kernel's (scale, shift), contiguous: the forward's when the caller passes them
    (bn_affine's memo), else scale_shift of the statistics, the function the forward used."""
    if scale is None or shift is None:
        scale, shift = scale_shift(mean, invstd, weight, bias)
    return scale.contiguous(), shift.contiguous()


_PLAIN_TYPES = (Tensor, nn.Parameter)
_is_cxx_fake = getattr(torch._C, "_is_fake_tensor", None)  # torch >= 2.14


def _plainly_real(t: Tensor) -> bool:
    """A cheap sufficient test that t is no fake tensor: a plain Tensor or Parameter that wraps
    nothing.  is_fake costs ~4 us per call and bn_affine runs ~5 times per layer per step."""
    return (type(t) in _PLAIN_TYPES and not torch._is_functional_tensor(t)
            and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and (_is_cxx_fake is None or not _is_cxx_fake(t)))


def _maybe_fake(t: Tensor) -> bool:
    """is_fake(t), asked only of tensors that _plainly_real cannot clear."""
    return not _plainly_real(t) and is_fake(t)


def _affine_key(weight: Tensor, bias: Tensor, eps: float) -> Optional[Tuple[Any, ...]]:
    """What bn_affine's result depends on besides the statistics; None (no memo) while tracing."""
    if torch.compiler.is_compiling():  # first: dynamo may not trace what follows
        return None
    if _maybe_fake(weight):
        return None
    if weight.is_inference() or bias.is_inference():  # they keep no version counter
        return None
    return eps, weight.data_ptr(), weight._version, bias.data_ptr(), bias._version


def bn_affine(stats: NormStats, weight: Tensor, bias: Tensor, eps: float, kernel: Optional[Callable[..., Any]] = None
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean, invstd, scale, shift), float32 contiguous (C,): the fused kernels' form of a BN,
    relu(x * scale + shift) == relu((x - mean) * invstd * weight + bias).

    kernel(mean, var, weight, bias, eps) -> (invstd, scale, shift), all float32 contiguous, computes
    the three in one launch (the extension's densenet_fast::channel_affine, which the "cuda" and
    "triton" backends pass where it has a kernel for the device); without it they are four tiny
    ATen launches.  Kept in stats.memo (per eps and parameter storage and version): a
    layer's backward asks for the same four vectors as its forward."""
    key = _affine_key(weight, bias, eps)
    hit = stats.memo.get(key) if key is not None else None
    if hit is not None:
        return hit  # type: ignore[return-value]
    mean = stats.mean.float().contiguous()
    if kernel is not None:
        invstd, scale, shift = kernel(mean, stats.var.float().contiguous(), weight.float().contiguous(),
                                      bias.float().contiguous(), eps)
    else:
        invstd = torch.rsqrt(stats.var.float() + eps)
        scale, shift = scale_shift(mean, invstd, weight, bias)
    if key is not None:
        stats.memo[key] = (mean, invstd, scale, shift)
    return mean, invstd, scale, shift


def uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """nn.BatchNorm2d's rule: batch statistics in training mode, or when it tracks none."""
    return bn.training or bn.running_mean is None


def update_running_stats_(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int) -> None:
    """Move bn's running statistics exactly as one nn.BatchNorm2d training forward would.

    mean, var: (C,) batch mean and BIASED batch variance; count = N*H*W values per channel.
    running_var takes the unbiased variance var * count / (count - 1); momentum=None means a
    cumulative average (factor 1 / num_batches_tracked); num_batches_tracked += 1.
    """
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        if bn.running_mean is None:
            return
        rm, rv = bn.running_mean, bn.running_var
        rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
        rv.mul_(1.0 - factor).add_(var.to(rv.dtype) * (count / (count - 1)), alpha=factor)


def update_running_stats_many_(items: List[Tuple[nn.BatchNorm2d, Tensor, Tensor]], count: int) -> None:
    """update_running_stats_ for many norms at once: the same arithmetic, as a handful of
    torch._foreach_* launches per block instead of six small kernels per norm (on a GPU a dense
    block's forward is otherwise dominated by launching them).  Norms with momentum=None (a
    cumulative average, whose factor depends on each norm's counter) take the one-by-one path.
    """
    fast: Dict[float, List[Tuple[nn.BatchNorm2d, Tensor, Tensor]]] = {}
    for bn, mean, var in items:
        if not (bn.training and bn.track_running_stats):
            continue
        if bn.momentum is None or bn.running_mean is None:
            update_running_stats_(bn, mean, var, count)
        else:
            fast.setdefault(float(bn.momentum), []).append((bn, mean, var))
    if not fast:
        return
    with torch.no_grad():
        counters = [bn.num_batches_tracked for group in fast.values() for bn, _, _ in group
                    if bn.num_batches_tracked is not None]
        if counters:
            torch._foreach_add_(counters, 1)
        for factor, group in fast.items():
            rms = [bn.running_mean for bn, _, _ in group]
            rvs = [bn.running_var for bn, _, _ in group]
            means = [m.to(rm.dtype) for (_, m, _), rm in zip(group, rms)]
            unbiased = torch._foreach_mul([v.to(rv.dtype) for (_, _, v), rv in zip(group, rvs)], count / (count - 1))
            torch._foreach_mul_(rms, 1.0 - factor)
            torch._foreach_add_(rms, means, alpha=factor)
            torch._foreach_mul_(rvs, 1.0 - factor)
            torch._foreach_add_(rvs, unbiased, alpha=factor)


def norm_stats_for(bn: nn.BatchNorm2d, cache_mean: Optional[Tensor], cache_var: Optional[Tensor],
                   channels: int, count: int, group: Any = None,
                   defer: Optional[List[Tuple[nn.BatchNorm2d, Tensor, Tensor]]] = None) -> NormStats:
    """The statistics `bn` applies to the first `channels` channels of a block buffer.

    In training mode they are the cached batch statistics (and the running buffers move once,
    now, or later through update_running_stats_many_ when `defer` is a list to append to);
    in eval mode they are a snapshot of the running buffers (tiny: saved for backward so that a
    later change to the buffers cannot corrupt the gradient).
    """
    if uses_batch_stats(bn):
        if cache_mean is None or cache_var is None:
            raise RuntimeError("internal: batch statistics requested but the block computed none")
        mean, var = cache_mean[:channels], cache_var[:channels]
        if defer is not None:
            defer.append((bn, mean, var))
        else:
            update_running_stats_(bn, mean, var, count)
        return NormStats(mean, var, True, count, group)
    stat_dtype = cache_mean.dtype if cache_mean is not None else bn.running_mean.dtype
    return NormStats(bn.running_mean.detach().to(stat_dtype, copy=True),
                     bn.running_var.detach().to(stat_dtype, copy=True), False)


def batch_stats(x: Tensor, stats_fn=None) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of x: (N, C, H, W), in float32 (float64 for float64 x).

    ATen's batch_norm_update_stats (the statistics half of training-mode batch norm, with no
    running buffers) uses Welford's algorithm like torch.var_mean, so inputs whose mean dwarfs
    their spread keep their variance, and measured 3-5x faster than var_mean over (0, 2, 3) on
    CPU.  Low-precision data is upcast per call (the slices passed here are one layer's k new
    channels, a bottleneck, or the block input), since that op returns statistics in x's dtype.
    """
    if stats_fn is not None:
        return stats_fn(x)
    if x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling() and not _maybe_fake(x):
        return torch.batch_norm_update_stats(_as_dtype(x, stats_dtype(x.dtype)), None, None, 0.0)
    # No meta/fake kernel exists for it (memory planning, tracing): the var_mean path.
    return channel_stats_torch(x)


def _packed_on_cpu(x: Tensor) -> Tensor:
    """x, or a packed copy of it when it is a channel slice of an NHWC block buffer on the CPU:
    ATen's CPU batch-norm backward has no vectorised path for that stride pattern (measured 10x
    slower than a copy plus the packed kernel).  NCHW slices are left alone: packing them gains
    ~1.4x on that kernel but its chunk-sized copy lifts the step's peak memory by ~13%.
    "meta" too: the memory planner runs the step on meta tensors and must see the CPU's copies.
    """
    if x.device.type not in ("cpu", "meta") or x.stride(1) != 1 or x.shape[1] == 1 or \
            x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=torch.channels_last)


def bn_relu(x: Tensor, stats: NormStats, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """relu(batch_norm(x)) with the given statistics; output in x's dtype and layout.

    x: (N, C, H, W), possibly a channel slice of a block buffer; weight, bias: (C,).
    ATen's batch_norm rather than x * scale + shift: the latter cancels catastrophically in fp32
    when the mean is large against the spread (x * scale and shift both ~ mean * scale).
    """
    sdt = stats.mean.dtype  # a model cast to bf16/fp16 still normalises with fp32 statistics
    y = F.batch_norm(x, stats.mean, stats.var, _as_dtype(weight, sdt), _as_dtype(bias, sdt), False, 0.0, eps)
    return y.relu_()


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t.to(dtype) without the call when t has it already (~1 us of host time each, several per
    layer and step)."""
    return t if t.dtype == dtype else t.to(dtype)


def bn_relu_backward(grad_z: Tensor, x: Tensor, z: Tensor, stats: NormStats, weight: Tensor,
                     eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of z = relu(bn(x)) for the statistics `stats`.

    grad_z, x, z: (N, C, H, W).  Returns (grad_x, grad_weight, grad_bias).
    With batch statistics this is the full training-mode BN gradient
      dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),
    i.e. it includes the paths through the (shared) mean and variance; with running statistics
    it is the affine map dx = gamma * invstd * dy.  The ReLU mask is z > 0 (same as y > 0).
    """
    return bn_backward(aten.threshold_backward(grad_z, z, 0), x, stats, weight, eps)


def relu_backward_(grad_z: Tensor, z: Tensor) -> Tensor:
    """grad_z masked by z > 0 in place (the ReLU's backward; grad_z must be the caller's own
    tensor): the caller may then drop z before the BN backward, one tensor fewer alive there."""
    return aten.threshold_backward.grad_input(grad_z, z, 0, grad_input=grad_z)


def bn_backward(grad_y: Tensor, x: Tensor, stats: NormStats, weight: Tensor, eps: float
                ) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of y = bn(x) for the statistics `stats` (bn_relu_backward after the ReLU's mask):
    (grad_x, grad_weight, grad_bias)."""
    x = _packed_on_cpu(x)
    if stats.batch and stats.group is not None:
        return _synced_bn_backward(grad_y, x, stats, weight, eps)
    # Statistics and weight in the accumulate type (float32 for 16-bit x): CUDA's channels_last
    # kernel requires it of save_mean / save_invstd ("expected scalar type Float but found Half" in
    # eval, where a model cast to fp16 has fp16 running statistics; H200, torch 2.11), and both
    # devices' mixed-type paths want weight and running statistics in that one dtype.
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    mean, var, w = _as_dtype(stats.mean, acc), _as_dtype(stats.var, acc), _as_dtype(weight, acc)
    invstd = torch.rsqrt(var + eps)
    # save_mean / save_invstd are passed in eval too: CUDA's kernel asserts they are defined on
    # its channels_last path ("save_mean should always be defined", seen on an H200, torch 2.11)
    running = (None, None) if stats.batch else (mean, var)
    gx, gw, gb = aten.native_batch_norm_backward(grad_y, x, w, *running, mean, invstd, stats.batch, eps,
                                                 [True, True, True])
    return gx, _as_dtype(gw, weight.dtype), _as_dtype(gb, weight.dtype)


def sync_stats(mean: Tensor, var: Tensor, count: int, group: Any) -> Tuple[Tensor, Tensor, int]:
    """Merge per-rank (count, mean, biased var) into the group's statistics (Chan et al.'s
    parallel formula, exact and stable: M2 = sum(M2_i + n_i * (mean_i - mean)^2)).

    mean, var: (C,) local statistics over `count` values per channel.  Returns the global
    (mean, biased var, count); every rank gets the same result.
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    local = torch.cat([torch.tensor([float(count)], dtype=mean.dtype, device=mean.device), mean, var])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered)            # (world, 1 + 2C)
    c = mean.numel()
    counts, means, variances = table[:, :1], table[:, 1:1 + c], table[:, 1 + c:]
    total = counts.sum()
    g_mean = (counts * means).sum(0) / total
    m2 = (counts * variances + counts * (means - g_mean) ** 2).sum(0)
    return g_mean, m2 / total, int(round(total.item()))


def _synced_bn_backward(grad_y: Tensor, x: Tensor, stats: NormStats, weight: Tensor, eps: float
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN backward whose sums over N, H, W run over the whole process group
    (torch.nn.SyncBatchNorm's semantics): sum(dy) and sum(dy * (x - mean)) are all-reduced and
    divided by the global count; the parameter gradients stay local (DDP reduces them).
    """
    import torch.distributed as dist

    shape = (1, -1, 1, 1)
    acc = stats.mean.dtype
    invstd = torch.rsqrt(stats.var + eps)
    xmu = x.to(acc) - stats.mean.view(shape)
    gy = grad_y.to(acc)
    local = torch.cat([gy.sum(dim=(0, 2, 3)), (gy * xmu).sum(dim=(0, 2, 3))])
    grad_bias, grad_weight = local[: invstd.numel()].clone(), local[invstd.numel():] * invstd
    dist.all_reduce(local, group=stats.group)
    c = invstd.numel()
    sum_dy, sum_dy_xmu = local[:c], local[c:]
    n = float(stats.count)
    grad_x = (gy - (sum_dy / n).view(shape) - xmu * (invstd * invstd * sum_dy_xmu / n).view(shape)) * \
        (weight.to(acc) * invstd).view(shape)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
