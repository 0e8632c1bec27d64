"""channel_stats: the compiled op (CPU and CUDA kernels) and its plain-PyTorch path against
densenet_fast.reference.channel_stats_ref, on the tensors the dense block really passes it:
channel slices of a wider buffer, NCHW and channels_last, all floating dtypes.

Tolerance policy. The statistics are fp32 for fp16/bf16/fp32 data (fp64 for fp64), and the
reference is computed in fp64 on the very same values (upcast, no requantisation), so the only
error measured is the kernels' accumulation error; the input's own rounding is not part of it.
That is also why there is no comparison with a reference run in fp16/bf16 here: such a reference
rounds its result to 3 significant digits and would only hide accumulation errors.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DispatchLog, assert_close_report

from densenet_fast import _ext
from densenet_fast.ops.channel_stats import channel_stats, channel_stats_torch, stats_dtype
from densenet_fast.reference import channel_stats_ref

NO_CUDA = "needs a CUDA device (none visible)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
IMPLS = ["kernel", "torch"]

# (mean atol, mean rtol, var atol, var rtol) by input dtype, against the fp64 reference.
# - fp32 accumulation (fp32/fp16/bf16 data): measured errors are below 1e-6 of the spread for the
#   mean and 1e-6 relative for the variance (Welford on pivot-shifted data, Chan merges), with
#   M up to 32768 values per channel. 1e-5 leaves a 10x margin and is still 1e4x below what
#   E[x^2] - E[x]^2 in fp32 loses on the large-mean case (see test_large_mean_defeats_naive...).
#   The mean rtol of 5e-7 (4 fp32 ulps) is for means like 1000, which fp32 stores only to 0.5 ulp.
#   The data have a spread of 0.5 to 2, so the atols are relative to the spread.
# - fp64 accumulation (fp64 data): the reference, itself an fp64 computation, is off by up to
#   ~1e-15 (mean) and ~1e-13 (variance, measured for torch.var_mean on the large-mean case);
#   a 10x margin over that is still 1e7x tighter than fp32 accumulation could pass.
TOLERANCES = {
    torch.float32: (1e-5, 5e-7, 1e-6, 1e-5),
    torch.float16: (1e-5, 5e-7, 1e-6, 1e-5),
    torch.bfloat16: (1e-5, 5e-7, 1e-6, 1e-5),
    torch.float64: (1e-13, 1e-14, 1e-14, 1e-12),
}

# (N, C, H, W, buffer channels, first channel): x = F[:, first:first + C] of F (N, buffer, H, W).
SLICES = [
    # a layer's k = 12 new channels at an offset that no vector width divides, odd 7 x 5 image
    pytest.param(3, 12, 7, 5, 40, 13, id="c12-at13-of40"),
    # batch 1: M = H * W only; 24 channels = one partial 32-channel group on the GPU
    pytest.param(1, 24, 9, 11, 37, 5, id="c24-at5-of37-batch1"),
    # a block prefix wider than one CPU task and several 32-channel GPU groups, tiny image
    pytest.param(2, 300, 3, 5, 317, 7, id="c300-at7-of317"),
    # 1 x 1 images: spatial strides are arbitrary and both layouts put the channels innermost
    pytest.param(5, 12, 1, 1, 40, 13, id="c12-1x1"),
    # M = 32768 per channel: several GPU blocks per channel, merged by the finalize kernel
    pytest.param(8, 24, 64, 64, 24, 0, id="c24-64x64-whole"),
]


def make_buffer(n, c, h, w, dtype, layout, device, mean_scale=3.0, seed=0):
    """A block-buffer-like tensor whose channels have different means (|mean| <= mean_scale)
    and spreads (0.5 to 2), so that a channel mix-up or an offset error shows."""
    gen = torch.Generator().manual_seed(seed)
    mean = (torch.rand(c, generator=gen) * 2 - 1) * mean_scale
    spread = 0.5 + 1.5 * torch.rand(c, generator=gen)
    data = torch.randn(n, c, h, w, generator=gen) * spread.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    return data.to(device=device, dtype=dtype).contiguous(memory_format=layout)


def kernel_op(device_type: str):
    """The compiled op, or a skip saying why there is no kernel for this device."""
    if device_type not in _ext.kernel_devices("channel_stats"):
        pytest.skip(f"no compiled {device_type} kernel: {_ext.IMPORT_ERROR or 'built without it'}")
    return torch.ops.densenet_fast.channel_stats.default


def run(impl: str, x: torch.Tensor):
    return channel_stats_torch(x) if impl == "torch" else kernel_op(x.device.type)(x)


def check_stats(stats, x: torch.Tensor, name: str) -> None:
    mean, var = stats
    ref_mean, ref_var = channel_stats_ref(x)
    assert mean.dtype == var.dtype == stats_dtype(x.dtype), f"{name}: statistics dtype {mean.dtype}"
    assert mean.device == var.device == x.device
    mean_atol, mean_rtol, var_atol, var_rtol = TOLERANCES[x.dtype]
    assert_close_report(mean, ref_mean, mean_atol, mean_rtol, f"{name} mean")
    assert_close_report(var, ref_var, var_atol, var_rtol, f"{name} var")


@pytest.mark.parametrize("n, c, h, w, buffer_c, first", SLICES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_on_buffer_slices(device, impl, dtype, layout, n, c, h, w, buffer_c, first):
    buf = make_buffer(n, buffer_c, h, w, dtype, layout, device)
    x = buf[:, first:first + c]
    check_stats(run(impl, x), x, f"{impl} {device} {dtype}")


# A mean 1000x the spread: E[x^2] - E[x]^2 cancels almost every digit of the variance here.
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_large_mean_small_spread(device, impl, dtype, layout):
    buf = make_buffer(4, 40, 33, 31, dtype, layout, device) + 1000
    x = buf[:, 13:25]
    check_stats(run(impl, x), x, f"{impl} {device} {dtype} mean+1000")


def test_large_mean_defeats_naive_formula():
    # The tolerances above are tight enough to catch the cancellation-prone formula.
    x = make_buffer(4, 12, 33, 31, torch.float32, torch.contiguous_format, "cpu") + 1000
    naive_var = (x * x).mean(dim=(0, 2, 3)) - x.mean(dim=(0, 2, 3)) ** 2
    _, ref_var = channel_stats_ref(x)
    _, _, var_atol, var_rtol = TOLERANCES[torch.float32]
    with pytest.raises(AssertionError, match="elements differ"):
        assert_close_report(naive_var, ref_var, var_atol, var_rtol, "naive var")


@pytest.mark.parametrize("device", DEVICES)
def test_public_function_uses_kernel_when_built(device):
    x = make_buffer(2, 40, 5, 7, torch.float32, torch.channels_last, device)[:, 13:25]
    mean, var = channel_stats(x)
    expected = (torch.ops.densenet_fast.channel_stats(x) if device in _ext.kernel_devices("channel_stats")
                else channel_stats_torch(x))
    assert torch.equal(mean, expected[0]) and torch.equal(var, expected[1])


BAD_INPUTS = [
    pytest.param(lambda d: torch.randn(3, 4, 5, device=d), ValueError, "x must have 4 dims, got 3", id="3d"),
    pytest.param(lambda d: torch.ones(2, 3, 4, 4, dtype=torch.int32, device=d), TypeError,
                 "x must be a floating-point tensor, got", id="int"),
    # float8 is a floating-point dtype that no kernel reads: named before anything is allocated
    pytest.param(lambda d: torch.ones(2, 3, 4, 4, device=d).to(torch.float8_e4m3fn), TypeError,
                 "x must be float32, float64, float16 or bfloat16, got", id="float8"),
    pytest.param(lambda d: torch.randn(0, 3, 4, 4, device=d), ValueError,
                 "x must have at least one element per channel", id="empty-batch"),
]


@pytest.mark.parametrize("make, error, message", BAD_INPUTS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_naming_x(device, impl, make, error, message):
    with pytest.raises(error, match=message):
        run(impl, make(device))


def _our_ops() -> DispatchLog:
    return DispatchLog(lambda func, args: func.name() if func.namespace == "densenet_fast" else None)


@pytest.mark.parametrize("make, error, message", BAD_INPUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_public_function_checks_before_the_op(device, make, error, message):
    """channel_stats() names bad input itself, before the compiled op runs (its C++ exception did
    not survive on one GPU machine), with the op's own message."""
    kernel_op(device)
    x = make(device)
    with _our_ops() as calls, pytest.raises(error, match=message):
        channel_stats(x)
    assert not calls.entries, f"the op ran on bad input: {calls.entries}"
    with _our_ops() as calls:
        channel_stats(make_buffer(2, 5, 3, 3, torch.float32, torch.contiguous_format, device))
    assert calls.entries == ["densenet_fast::channel_stats"], calls.entries


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    op = kernel_op(device)
    samples = [
        make_buffer(3, 40, 7, 5, torch.float32, torch.contiguous_format, device)[:, 13:25],
        make_buffer(1, 37, 9, 11, torch.float16, torch.channels_last, device)[:, 5:29],
        # requires_grad: exercises the autograd formula registered in ops/channel_stats.py
        make_buffer(2, 20, 3, 5, torch.float64, torch.contiguous_format, device)[:, 3:15].requires_grad_(),
    ]
    for x in samples:
        torch.library.opcheck(op, (x,))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_float64(impl):
    buf = make_buffer(2, 9, 3, 5, torch.float64, torch.channels_last, "cpu").requires_grad_()
    assert torch.autograd.gradcheck(lambda b: run(impl, b[:, 2:7]), (buf,))


def test_torch_compile_fullgraph():
    # aot_eager traces the fake kernel and the autograd formula without spending a C++ compile.
    x = make_buffer(3, 40, 7, 5, torch.float32, torch.channels_last, "cpu")[:, 13:25]
    compiled = torch.compile(channel_stats, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x), channel_stats(x)):
        assert_close_report(got, want, 0.0, 0.0, "compiled channel_stats")
