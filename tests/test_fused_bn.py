"""fused_bn: the compiled passes of the "cuda" backend's fused batch norm (bn_relu_out,
bn_relu_backward_reduce, bn_backward_apply; CPU and CUDA kernels) against the float64 references
densenet_fast.reference.fused_bn_*_ref, on the tensors the dense block really passes them: channel
slices of wider NCHW / channels_last buffers at unaligned offsets, written into slices of other
buffers, every storage dtype.

Tolerance policy. The references compute in float64 on the very same input values (upcast, no
requantisation), and the kernels compute in fp32, so an error has two sources only, each bounded
below with a 2x margin:
* the fp32 arithmetic: each rounding is at most U32 = 2^-24 of the magnitude it rounds, so a
  result built from R roundings is within R * U32 * T of exact, T the magnitude of its terms
  (for y = x * scale + shift, T = |x * scale| + |shift|). Taken per tensor (the max of T).
* the final store into out's / grad_x's dtype: half an ulp, i.e. at most the unit roundoff u of
  that dtype times the value, hence rtol = 2u.
The reduce pass sums M = N*H*W terms in fp32; its error is bounded by REDUCE_ROUNDINGS * U32 *
sum|terms| (see the comment there). No fp16/bf16 reference is run: the inputs are exact in fp32,
so there is no low-precision computation to compare with; the only low-precision step is the
final store, which the rtol above covers exactly.

The ReLU mask: where y = x * scale + shift is within rounding of 0, the fp32 kernels and the
float64 reference may put it on different sides, which changes a backward result by a whole
grad_z value. The tests zero grad_z there (|y| < MASK_MARGIN * T) so that both masks give the same
dy; such points carry no information about the kernels anyway.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import assert_close_report
from tolerances import assert_close

from densenet_fast import _ext
from densenet_fast.ops import fused_bn
from densenet_fast.reference import (bn_backward_ref, channel_affine_ref, channel_bn_backward_ref, channel_stats_ref,
                                     fused_bn_backward_apply_ref, fused_bn_backward_reduce_ref, fused_bn_relu_ref)

NOT_BUILT = f"densenet_fast._C is not built: {_ext.IMPORT_ERROR}"
needs_extension = pytest.mark.skipif(not _ext.HAS_C, reason=NOT_BUILT)
NO_CUDA = "needs a CUDA device (none visible)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
OPS = ["bn_relu_out", "bn_relu_backward_reduce", "bn_backward_apply"]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
U32 = 2.0 ** -24  # unit roundoff of fp32, the arithmetic of every kernel
# rtol of a value stored in this dtype: twice the unit roundoff (half an ulp, relative).
STORE_RTOL = {F32: 2 * 2.0 ** -24, F16: 2 * 2.0 ** -11, BF16: 2 * 2.0 ** -8}
# fp32 roundings per result, doubled: y = x * scale + shift has 2.
FORWARD_ROUNDINGS = 4
# dx = scale * (dy - a - (x - mean) * b) has 5, the accumulation grad_x + dx a 6th.
APPLY_ROUNDINGS = 12
# Sums of M terms: the kernels add at most ~256 values serially (CPU blocks of 256 values, GPU
# threads a few dozen), then combine partials in trees: the worst case is ~270 roundings of
# sum|terms|, but random-sign terms make the roundings cancel like a random walk, ~sqrt(270) = 16
# of them (measured on the CPU kernel over all cases below: under 1). 16 still catches a lost or
# doubled term, an error of about sum|terms| / M, i.e. at least 2000 U32 for M = 8192.
REDUCE_ROUNDINGS = 16
# grad_z is zeroed where |y| < MASK_MARGIN * T (the module docstring): 1e-5 is ~170 fp32 roundings.
MASK_MARGIN = 1e-5

# (N, C, H, W, x buffer channels, x first channel, out buffer channels, out first channel
#  [, grad_z buffer channels, grad_z first channel]):
# x = F[:, first:first + C] of F (N, F channels, H, W); out/grad_x/grad_z likewise in their own buffers.
# grad_z is by default the last C channels of an (out channels + 5)-channel buffer, another offset
# than out's; that buffer is never 16-byte aligned per pixel in channels_last, so the geometries
# that test the NHWC vector path of the backward passes place grad_z explicitly.
SLICES = [
    # a layer's input at channel 24 + 12*l with an odd count, odd 5 x 7 image: no vector path applies
    pytest.param((3, 13, 5, 7, 64, 24, 40, 3), id="c13-at24-5x7"),
    # batch 1 (M = H*W only), 37 channels = 4 full fp16 vector groups of 8 + a tail of 5
    pytest.param((1, 37, 5, 7, 80, 36, 37, 0), id="c37-at36-batch1"),
    # a block prefix F[:, :24] written at channel 8 of a 48-wide buffer: every base pointer, pixel
    # and plane stride 16-byte aligned, so both GPU vector paths run (NHWC and NCHW, H*W = 64)
    pytest.param((2, 24, 8, 8, 48, 0, 48, 8), id="c24-prefix-8x8-aligned"),
    # offset 12: 16-byte aligned for fp32 (vector path, 4 values), not for fp16/bf16 (scalar path);
    # 36 channels = 4 fp16 groups + a tail of 4, H*W = 16
    pytest.param((2, 36, 4, 4, 60, 12, 60, 12), id="c36-at12-4x4"),
    # 1 x 1 images: spatial strides are arbitrary and both layouts put the channels innermost
    pytest.param((5, 12, 1, 1, 40, 13, 12, 0), id="c12-1x1"),
    # M = 8192 per channel, whole buffers: several GPU blocks per channel, merged by the finalize kernel
    pytest.param((8, 24, 32, 32, 24, 0, 24, 0), id="c24-32x32-whole"),
    # x at channel 8 of 32, out at 16 of 40, grad_z at 24 of 48: in channels_last every operand's
    # base and pixel stride are 16-byte aligned, so all three passes take the GPU's NHWC vector path,
    # with a tail group (22 channels = 2 x 8 + 6 for fp16/bf16, 5 x 4 + 2 for fp32)
    pytest.param((2, 22, 3, 5, 32, 8, 40, 16, 48, 24), id="c22-nhwc-vector-tail"),
    # the same alignment with H*W = 1024 and M = 9216 per channel: the vector paths of both layouts
    # with several blocks per channel (NCHW fp16 too: 9216 / 8 = 1152 accesses per channel, more
    # than one block of 256 threads x 4 accesses)
    pytest.param((9, 24, 32, 32, 40, 8, 32, 8, 40, 16), id="c24-vector-9x32x32"),
]
OUT_LAYOUTS = ["same", "other"]  # out/grad_z/grad_x in x's layout, or in the other one (mixed strides)


def make_buffer(n, c, h, w, dtype, layout, device, seed, mean_scale=2.0):
    """A block-buffer-like tensor whose channels have different means and spreads (0.5 to 2), so
    that a channel mix-up or an offset error shows."""
    gen = torch.Generator().manual_seed(seed)
    mean = (torch.rand(c, generator=gen) * 2 - 1) * mean_scale
    spread = 0.5 + 1.5 * torch.rand(c, generator=gen)
    data = torch.randn(n, c, h, w, generator=gen) * spread.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    return data.to(device=device, dtype=dtype).contiguous(memory_format=layout)


def poisoned_buffer(n, c, h, w, dtype, layout, device):
    """A buffer full of NaN: any element a kernel writes by mistake, or reads instead of writing, shows."""
    return torch.full((n, c, h, w), float("nan"), dtype=dtype, device=device).contiguous(memory_format=layout)


class Case:
    """The inputs of one test: x and grad_z slices, per-channel vectors, an out/grad_x slice."""

    def __init__(self, geometry, x_dtype, layout, out_layout, device, z_dtype=None, out_dtype=None, seed=0):
        n, c, h, w, fc, first, oc, ofirst, *z_slice = geometry
        zc, zfirst = z_slice or (oc + 5, oc + 5 - c)
        x_layout = LAYOUTS[layout]
        other = LAYOUTS["channels_last" if layout == "nchw" else "nchw"]
        o_layout = x_layout if out_layout == "same" else other
        self.x = make_buffer(n, fc, h, w, x_dtype, x_layout, device, seed)[:, first:first + c]
        gen = torch.Generator().manual_seed(seed + 1)
        sign = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0)  # gamma can be negative
        self.scale = (sign * (0.5 + 1.5 * torch.rand(c, generator=gen))).to(device)
        self.mean = channel_stats_ref(self.x)[0].float()
        # shift = beta - mean * scale with beta ~ N(0, 1): about half of the values pass the ReLU
        self.shift = (torch.randn(c, generator=gen).to(device) - self.mean * self.scale).float()
        y = self.x.double() * self.scale.double().view(1, -1, 1, 1) + self.shift.double().view(1, -1, 1, 1)
        t = self.x.double().abs() * self.scale.double().abs().view(1, -1, 1, 1) + self.shift.double().abs().view(
            1, -1, 1, 1)
        self.t_max = float(t.max())  # the magnitude the fp32 arithmetic of y rounds
        if z_dtype is not None:
            zbuf = make_buffer(n, zc, h, w, z_dtype, o_layout, device, seed + 2, mean_scale=0.0)
            self.grad_z = zbuf[:, zfirst:zfirst + c]
            self.grad_z.masked_fill_(y.abs() < MASK_MARGIN * self.t_max, 0)
        if out_dtype is not None:
            self.out_buf = poisoned_buffer(n, oc, h, w, out_dtype, o_layout, device)
            self.out = self.out_buf[:, ofirst:ofirst + c]
            self.out_slice = (ofirst, ofirst + c)

    def fill_out(self, seed):
        """Real values in the out slice (grad_x before an accumulating apply); the rest stays NaN."""
        vals = make_buffer(*self.out.shape, self.out.dtype, torch.contiguous_format, self.out.device, seed, 0.0)
        self.out.copy_(vals)

    def check_rest_untouched(self, name):
        lo, hi = self.out_slice
        rest = torch.cat([self.out_buf[:, :lo], self.out_buf[:, hi:]], dim=1)
        assert bool(rest.isnan().all()), f"{name}: wrote outside its slice ({int((~rest.isnan()).sum())} values)"


def train_a_b(case, sum_dy, sum_dy_xmu):
    """Training-mode a, b (a = sum_dy / M, b = invstd^2 * sum_dy_xmu / M) from float64 sums."""
    m = case.x.numel() // case.x.shape[1]
    var = channel_stats_ref(case.x)[1]
    invstd = torch.rsqrt(var + 1e-5)
    return (sum_dy / m).float(), (invstd ** 2 * sum_dy_xmu / m).float()


# ---- values ---------------------------------------------------------------------------------

# (x dtype, out dtype): the block's cases (out in x's dtype; fp32 data into a low-precision
# scratch buffer under autocast; low-precision data into fp32) and one cross pair.
FORWARD_DTYPES = [(F32, F32), (F16, F16), (BF16, BF16), (F32, F16), (F32, BF16), (F16, F32), (BF16, F32)]


@needs_extension
@pytest.mark.parametrize("geometry", SLICES)
@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("x_dtype, out_dtype", FORWARD_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_out(device, x_dtype, out_dtype, layout, out_layout, geometry):
    case = Case(geometry, x_dtype, layout, out_layout, device, out_dtype=out_dtype)
    fused_bn.bn_relu_out(case.x, case.scale, case.shift, case.out)
    name = f"bn_relu_out {device} {x_dtype}->{out_dtype}"
    assert_close_report(case.out, fused_bn_relu_ref(case.x, case.scale, case.shift),
                        FORWARD_ROUNDINGS * U32 * case.t_max, STORE_RTOL[out_dtype], name)
    case.check_rest_untouched(name)


# (x dtype, grad_z dtype): grad_z is float32 or x's dtype.
REDUCE_DTYPES = [(F32, F32), (F16, F16), (F16, F32), (BF16, BF16), (BF16, F32)]


def check_reduce(sums, case, name):
    sum_dy, sum_dy_xmu = sums
    assert sum_dy.dtype == sum_dy_xmu.dtype == F32 and sum_dy.shape == (case.x.shape[1],)
    ref_dy, ref_xmu = fused_bn_backward_reduce_ref(case.grad_z, case.x, case.scale, case.shift, case.mean)
    abs_z = case.grad_z.double().abs()
    abs_xmu = (case.x.double() - case.mean.double().view(1, -1, 1, 1)).abs()
    # sum |terms| per channel, upper bounds (ignoring the mask); the max over channels
    t_dy = float(abs_z.sum(dim=(0, 2, 3)).max())
    t_xmu = float((abs_z * abs_xmu).sum(dim=(0, 2, 3)).max())
    assert_close_report(sum_dy, ref_dy, REDUCE_ROUNDINGS * U32 * t_dy, 0.0, f"{name} sum_dy")
    assert_close_report(sum_dy_xmu, ref_xmu, REDUCE_ROUNDINGS * U32 * t_xmu, 0.0, f"{name} sum_dy_xmu")


@needs_extension
@pytest.mark.parametrize("geometry", SLICES)
@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("x_dtype, z_dtype", REDUCE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_backward_reduce(device, x_dtype, z_dtype, layout, out_layout, geometry):
    case = Case(geometry, x_dtype, layout, out_layout, device, z_dtype=z_dtype)
    sums = fused_bn.bn_relu_backward_reduce(case.grad_z, case.x, case.scale, case.shift, case.mean)
    check_reduce(sums, case, f"reduce {device} x {x_dtype} grad_z {z_dtype}")


# (x dtype, grad_z dtype, grad_x dtype): the block's fp32 gradient buffer for every data dtype,
# gradients in the data dtype, and a low-precision grad_x of fp32 data.
APPLY_DTYPES = [(F32, F32, F32), (F16, F16, F32), (F16, F32, F32), (BF16, BF16, F32), (BF16, BF16, BF16),
                (F32, F32, F16)]
# (accumulate, BN mode): the block's accumulation into G[:, :C_l], the first write, and eval mode.
APPLY_MODES = [pytest.param(True, "train", id="accumulate-train"), pytest.param(False, "train", id="write-train"),
               pytest.param(True, "eval", id="accumulate-eval")]


@needs_extension
@pytest.mark.parametrize("geometry", SLICES)
@pytest.mark.parametrize("out_layout", OUT_LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("accumulate, mode", APPLY_MODES)
@pytest.mark.parametrize("x_dtype, z_dtype, gx_dtype", APPLY_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("device", DEVICES)
def test_bn_backward_apply(device, x_dtype, z_dtype, gx_dtype, accumulate, mode, layout, out_layout, geometry):
    case = Case(geometry, x_dtype, layout, out_layout, device, z_dtype=z_dtype, out_dtype=gx_dtype)
    if mode == "train":
        a, b = train_a_b(case, *fused_bn_backward_reduce_ref(case.grad_z, case.x, case.scale, case.shift, case.mean))
    else:
        a = b = torch.zeros_like(case.scale)
    if accumulate:  # else the slice stays NaN: the kernel must not read it
        case.fill_out(seed=7)
    before = case.out.clone()
    fused_bn.bn_backward_apply(case.grad_z, case.x, case.scale, case.shift, case.mean, a, b, case.out, accumulate)
    ref = fused_bn_backward_apply_ref(case.grad_z, case.x, case.scale, case.shift, case.mean, a, b, before,
                                      accumulate)
    # the magnitude the fp32 arithmetic rounds: |grad_x| + |scale| * (|dy| + |a| + |x - mean| * |b|)
    per_c = lambda v: v.double().abs().view(1, -1, 1, 1)  # noqa: E731
    t = per_c(case.scale) * (case.grad_z.double().abs() + per_c(a)
                             + (case.x.double() - case.mean.double().view(1, -1, 1, 1)).abs() * per_c(b))
    if accumulate:
        t = t + before.double().abs()
    name = f"apply {device} x {x_dtype} grad_z {z_dtype} grad_x {gx_dtype} accumulate={accumulate} {mode}"
    assert_close_report(case.out, ref, APPLY_ROUNDINGS * U32 * float(t.max()), STORE_RTOL[gx_dtype], name)
    case.check_rest_untouched(name)


@needs_extension
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_passes_compose_to_training_batch_norm_backward(device, layout):
    # reduce + apply with a = sum_dy / M, b = invstd^2 sum_dy_xmu / M, scale = gamma * invstd is
    # the training-mode BN gradient (reference.bn_backward_ref) of dy = grad_z * [y > 0].
    case = Case((4, 20, 6, 5, 44, 12, 44, 12), F32, layout, "same", device, z_dtype=F32, out_dtype=F32)
    mean, var = channel_stats_ref(case.x)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = (case.scale.double() / invstd).float()  # so that scale == gamma * invstd (to fp32 rounding)
    sums = fused_bn.bn_relu_backward_reduce(case.grad_z, case.x, case.scale, case.shift, case.mean)
    a, b = train_a_b(case, *(s.double() for s in sums))
    fused_bn.bn_backward_apply(case.grad_z, case.x, case.scale, case.shift, case.mean, a, b, case.out, False)
    y = case.x.double() * case.scale.double().view(1, -1, 1, 1) + case.shift.double().view(1, -1, 1, 1)
    dy = torch.where(y > 0, case.grad_z.double(), 0.0)
    ref_dx, _, _ = bn_backward_ref(dy, case.x.double(), mean, invstd, gamma.double())
    assert_close(case.out, ref_dx, F32, f"composed BN backward {device} {layout}")


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_reduce_is_deterministic(device):
    # Two-stage partial sums in a fixed tree, no atomics: bitwise the same every call.
    case = Case((8, 24, 32, 32, 48, 12, 24, 0), F16, "channels_last", "same", device, z_dtype=F32)
    first = fused_bn.bn_relu_backward_reduce(case.grad_z, case.x, case.scale, case.shift, case.mean)
    for _ in range(3):
        again = fused_bn.bn_relu_backward_reduce(case.grad_z, case.x, case.scale, case.shift, case.mean)
        assert all(torch.equal(f, g) for f, g in zip(first, again))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    # No value per channel: the sums are zeros and nothing is written; no channel: empty sums.
    for shape in [(0, 5, 3, 3), (2, 5, 0, 3), (2, 0, 3, 3)]:
        x = torch.randn(shape, device=device)
        c = shape[1]
        vec = torch.ones(c, device=device)
        out = torch.empty_like(x)
        fused_bn.bn_relu_out(x, vec, vec, out)
        sum_dy, sum_dy_xmu = fused_bn.bn_relu_backward_reduce(x, x, vec, vec, vec)
        assert torch.equal(sum_dy, torch.zeros(c, device=device)) and torch.equal(sum_dy_xmu, sum_dy)
        fused_bn.bn_backward_apply(x, x, vec, vec, vec, vec, vec, out, True)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_bn_relu_out_in_place(device):
    # out may be x itself (full overlap): each value is read before it is written, by the same thread.
    case = Case((2, 24, 8, 8, 48, 8, 24, 0), F16, "channels_last", "same", device)
    expected = fused_bn_relu_ref(case.x, case.scale, case.shift)
    fused_bn.bn_relu_out(case.x, case.scale, case.shift, case.x)
    assert_close_report(case.x, expected, FORWARD_ROUNDINGS * U32 * case.t_max, STORE_RTOL[F16], "in-place bn_relu_out")


# ---- registration, errors, opcheck, compile ---------------------------------------------------


@needs_extension
@pytest.mark.parametrize("op", OPS + ["channel_stats", "channel_affine", "channel_bn_backward", "dense_block_forward",
                                      "dense_block_backward"])
def test_cpu_and_cuda_kernels_registered(op):
    # setup.py builds the extension only with nvcc, so a loaded _C must carry every CUDA kernel
    # too; this runs without a GPU and catches a kernel left out of TORCH_LIBRARY_IMPL(.., CUDA, ..).
    name = f"densenet_fast::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_C", False)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", "no module densenet_fast._C (simulated)")
    x = torch.randn(1, 2, 3, 3)
    vec = torch.ones(2)
    for call in [lambda: fused_bn.bn_relu_out(x, vec, vec, x.clone()),
                 lambda: fused_bn.bn_relu_backward_reduce(x, x, vec, vec, vec),
                 lambda: fused_bn.bn_backward_apply(x, x, vec, vec, vec, vec, vec, x.clone(), False)]:
        with pytest.raises(RuntimeError, match="fused_bn") as info:
            call()
        assert _ext.BUILD_COMMAND in str(info.value)


def good_args(device):
    """Valid (grad_z, x, scale, shift, mean, a, b, grad_x) for the bad-input cases to spoil one of."""
    x = make_buffer(2, 9, 3, 4, F32, torch.channels_last, device, seed=3)[:, 2:7]
    vec = lambda s: torch.rand(5, generator=torch.Generator().manual_seed(s)).to(device)  # noqa: E731
    return dict(grad_z=torch.randn_like(x), x=x, scale=vec(1), shift=vec(2), mean=vec(3), a=vec(4), b=vec(5),
                grad_x=torch.zeros_like(x))


def call_op(op, args):
    g = args
    if op == "bn_relu_out":
        return fused_bn.bn_relu_out(g["x"], g["scale"], g["shift"], g["grad_x"])
    if op == "bn_relu_backward_reduce":
        return fused_bn.bn_relu_backward_reduce(g["grad_z"], g["x"], g["scale"], g["shift"], g["mean"])
    return fused_bn.bn_backward_apply(g["grad_z"], g["x"], g["scale"], g["shift"], g["mean"], g["a"], g["b"],
                                      g["grad_x"], True)


def _partial_overlap(args):
    # grad_x / out shares memory with x, shifted by one value: a partial overlap
    base = torch.randn(2 * 5 * 3 * 4 + 1, device=args["x"].device)
    return dict(args, x=base[:-1].view(2, 5, 3, 4), grad_x=base[1:].view(2, 5, 3, 4),
                grad_z=torch.randn(2, 5, 3, 4, device=args["x"].device))


# (ops it applies to, spoil(args) -> args, exception, message naming the tensor)
BAD_INPUTS = [
    pytest.param(OPS, lambda g: dict(g, x=g["x"][0]), ValueError, "x must have 4 dims, got 3", id="x-3d"),
    pytest.param(OPS, lambda g: dict(g, x=g["x"].double()), TypeError,
                 "x must be float32, float16 or bfloat16, got Double", id="x-float64"),
    pytest.param(OPS, lambda g: dict(g, scale=g["scale"][:4]), ValueError,
                 r"scale must have shape \(C,\) = \(5,\)", id="scale-length"),
    pytest.param(OPS, lambda g: dict(g, shift=g["shift"].half()), TypeError, "shift must be float32, got Half",
                 id="shift-half"),
    pytest.param(OPS[1:], lambda g: dict(g, mean=torch.zeros(10, device=g["x"].device)[::2]), ValueError,
                 "mean must be contiguous", id="mean-strided"),
    pytest.param(OPS[2:], lambda g: dict(g, a=g["a"].view(5, 1)), ValueError, r"a must have shape \(C,\)",
                 id="a-2d"),
    pytest.param(OPS[2:], lambda g: dict(g, b=g["b"][:1]), ValueError, r"b must have shape \(C,\)", id="b-length"),
    pytest.param(OPS[1:], lambda g: dict(g, grad_z=g["grad_z"][:, :4]), ValueError,
                 "grad_z must have the shape of x", id="grad_z-shape"),
    pytest.param(OPS[1:], lambda g: dict(g, grad_z=g["grad_z"].bfloat16()), TypeError,
                 "grad_z must be float32 or the dtype of x", id="grad_z-dtype"),
    pytest.param(OPS[2:], lambda g: dict(g, grad_x=g["grad_x"][:1]), ValueError,
                 "grad_x must have the shape of x", id="grad_x-shape"),
    pytest.param(OPS[:1], lambda g: dict(g, grad_x=g["grad_x"][:1]), ValueError, "out must have the shape of x",
                 id="out-shape"),
    pytest.param(OPS[:1], lambda g: dict(g, grad_x=g["grad_x"].int()), TypeError,
                 "out must be float32, float16 or bfloat16, got Int", id="out-int"),
    pytest.param(OPS[2:], lambda g: dict(g, grad_x=torch.zeros(1, 5, 3, 4, device=g["x"].device).expand(2, 5, 3, 4)),
                 ValueError, "grad_x must not have overlapping elements", id="grad_x-expanded"),
    pytest.param(OPS[:1], _partial_overlap, ValueError, "out must not partially overlap x", id="out-overlaps-x"),
    pytest.param(OPS[2:], _partial_overlap, ValueError, "grad_x must not partially overlap x", id="grad_x-overlaps-x"),
]


@needs_extension
@pytest.mark.parametrize("ops, spoil, error, message", BAD_INPUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_naming_the_tensor(device, ops, spoil, error, message):
    for op in ops:
        with pytest.raises(error, match=message):
            call_op(op, spoil(good_args(device)))


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("tensor", ["grad_z", "scale", "mean", "a", "grad_x"])
def test_tensor_on_another_device_is_named(tensor):
    args = good_args("cuda")
    args[tensor] = args[tensor].cpu()
    for op in OPS:
        if op == "bn_relu_out" and tensor in ("grad_z", "mean", "a") or op == "bn_relu_backward_reduce" and tensor in (
                "a", "grad_x"):
            continue
        name = "out" if op == "bn_relu_out" and tensor == "grad_x" else tensor
        with pytest.raises(RuntimeError, match=f"{name} must be on the device of x"):
            call_op(op, args)


def opcheck_samples(device):
    """Per op, argument tuples covering both layouts, unaligned slices and low precision."""
    samples = {op: [] for op in OPS}
    for geometry, layout, x_dtype, gx_dtype in [((3, 13, 5, 7, 64, 24, 40, 3), "nchw", F32, F32),
                                                ((2, 24, 8, 8, 48, 0, 48, 8), "channels_last", F16, F32),
                                                ((1, 12, 3, 5, 40, 13, 12, 0), "channels_last", BF16, BF16)]:
        case = Case(geometry, x_dtype, layout, "same", device, z_dtype=x_dtype, out_dtype=gx_dtype)
        case.fill_out(seed=5)
        k = (case.x, case.scale, case.shift)
        samples["bn_relu_out"].append((*k, case.out))
        samples["bn_relu_backward_reduce"].append((case.grad_z, *k, case.mean))
        for accumulate in (False, True):
            samples["bn_backward_apply"].append((case.grad_z, *k, case.mean, case.scale, case.shift, case.out,
                                                 accumulate))
    return samples


@needs_extension
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, op):
    for args in opcheck_samples(device)[op]:
        torch.library.opcheck(getattr(torch.ops.densenet_fast, op).default, args)


@needs_extension
def test_torch_compile_fullgraph():
    # aot_eager traces the fake kernels (and functionalizes the two mutating ops) without a C++ compile.
    case = Case((3, 13, 5, 7, 64, 24, 40, 3), F32, "channels_last", "same", "cpu", z_dtype=F32, out_dtype=F32)

    def passes(grad_z, x, scale, shift, mean, out):
        fused_bn.bn_relu_out(x, scale, shift, out)
        sum_dy, sum_dy_xmu = fused_bn.bn_relu_backward_reduce(grad_z, x, scale, shift, mean)
        grad_x = torch.zeros_like(x)
        fused_bn.bn_backward_apply(grad_z, x, scale, shift, mean, sum_dy, sum_dy_xmu, grad_x, True)
        return out * 2, grad_x

    args = (case.grad_z, case.x, case.scale, case.shift, case.mean)
    eager_out = torch.empty_like(case.out)
    compiled_out = torch.empty_like(case.out)
    expected = passes(*args, eager_out)
    got = torch.compile(passes, fullgraph=True, backend="aot_eager")(*args, compiled_out)
    for g, e in zip(got, expected):
        assert_close_report(g, e, 0.0, 0.0, "compiled fused_bn passes")
    assert_close_report(compiled_out, eager_out, 0.0, 0.0, "compiled bn_relu_out's out")


# ---- per-channel vectors: channel_affine, channel_bn_backward ----------------------------------
# Each result is a short chain of fp32 operations on fp32 inputs: invstd 3 roundings (add, sqrt,
# divide), scale 4, shift (one fma) 5; a 1, b 3, d_gamma 1; relative to the float64 reference of
# the same inputs, doubled as elsewhere.  shift = bias - mean * scale may cancel, so its tolerance
# is relative to |bias| + |mean * scale|.

def _vectors(c, device, seed):
    g = torch.Generator().manual_seed(seed)
    # a large mean against a small variance (the design note's stress case) and a zero variance
    mean = torch.randn(c, generator=g) * 1000
    var = torch.rand(c, generator=g) * 2
    var[0] = 0.0
    return [t.to(device) for t in (mean, var, 0.5 + torch.rand(c, generator=g), torch.randn(c, generator=g))]


@needs_extension
@pytest.mark.parametrize("channels", [1, 37, 300])
@pytest.mark.parametrize("device", DEVICES)
def test_channel_affine(device, channels):
    mean, var, weight, bias = _vectors(channels, device, 30)
    invstd, scale, shift = fused_bn.channel_affine(mean, var, weight, bias, 1e-5)
    r_invstd, r_scale, r_shift = channel_affine_ref(mean, var, weight, bias, 1e-5)
    assert_close_report(invstd, r_invstd, 0.0, 6 * U32, "invstd")
    assert_close_report(scale, r_scale, 0.0, 8 * U32, "scale")
    bound = 10 * U32 * (bias.double().abs() + (mean.double() * r_scale).abs())
    assert ((shift.double().cpu() - r_shift.cpu()).abs() <= bound.cpu()).all(), (shift, r_shift)


@needs_extension
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "fixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_channel_bn_backward(device, batch):
    g = torch.Generator().manual_seed(31)
    sum_dy, sum_dy_xmu = (torch.randn(45, generator=g) * 100).to(device), torch.randn(45, generator=g).to(device)
    invstd = (0.1 + torch.rand(45, generator=g) * 10).to(device)
    a, b, d_gamma = fused_bn.channel_bn_backward(sum_dy, sum_dy_xmu, invstd, 4096 * 3, batch)
    r_a, r_b, r_d_gamma = channel_bn_backward_ref(sum_dy, sum_dy_xmu, invstd, 4096 * 3, batch)
    assert_close_report(a, r_a, 0.0, 2 * U32, "a")
    assert_close_report(b, r_b, 0.0, 6 * U32, "b")
    assert_close_report(d_gamma, r_d_gamma, 0.0, 2 * U32, "d_gamma")
    if not batch:
        assert (a == 0).all() and (b == 0).all()


CHANNEL_BAD_INPUTS = [
    ("channel_affine", lambda v: (v[0].view(1, -1), *v[1:]), ValueError, "mean must have 1 dims"),
    ("channel_affine", lambda v: (v[0], v[1][:3], *v[2:]), ValueError, "var must have shape (C,) = (5,) like mean"),
    ("channel_affine", lambda v: (*v[:2], v[2].double(), v[3]), TypeError, "weight must be float32, got Double"),
    ("channel_affine", lambda v: (*v[:3], torch.zeros(10)[::2]), ValueError, "bias must be contiguous"),
    ("channel_bn_backward", lambda v: (v[0], v[1][:2], v[2]), ValueError, "sum_dy_xmu must have shape (C,) = (5,)"),
    ("channel_bn_backward", lambda v: (v[0], v[1], v[2].half()), TypeError, "invstd must be float32, got Half"),
]


@needs_extension
@pytest.mark.parametrize("op,spoil,error,message", CHANNEL_BAD_INPUTS, ids=[m for _, _, _, m in CHANNEL_BAD_INPUTS])
def test_channel_ops_bad_inputs(op, spoil, error, message):
    vectors = [torch.rand(5) + 0.5 for _ in range(4)]
    fn = getattr(torch.ops.densenet_fast, op)
    args = spoil(vectors if op == "channel_affine" else vectors[:3])
    extra = (1e-5,) if op == "channel_affine" else (64, True)
    with pytest.raises(error, match=re.escape(message)):
        fn(*args, *extra)


@needs_extension
def test_channel_bn_backward_needs_a_positive_count():
    v = torch.ones(3)
    with pytest.raises(ValueError, match="count must be positive"):
        torch.ops.densenet_fast.channel_bn_backward(v, v, v, 0, True)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_channel_ops_opcheck(device):
    mean, var, weight, bias = _vectors(11, device, 32)
    torch.library.opcheck(torch.ops.densenet_fast.channel_affine.default, (mean, var, weight, bias, 1e-3))
    for batch in (True, False):
        torch.library.opcheck(torch.ops.densenet_fast.channel_bn_backward.default, (mean, var, weight, 77, batch))
