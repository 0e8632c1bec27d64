"""Tests of the Triton BN-ReLU-Conv3x3 kernels of a dense layer (densenet_fast.triton_kernels.conv3x3):
the forward with its output statistics, the ``out=`` variant writing a channel slice of the block
buffer, and the backward (dgrad + ReLU mask + BN backward, wgrad).

Without a GPU they run on CPU tensors through triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before this module imports the kernels); with a GPU the same tests run the
compiled, autotuned kernels, plus the bf16 and realistic-size tests marked GPU_ONLY. The
interpreter runs every program in Python, so the shapes are tiny and the case lists below are
chosen, not crossed: every odd case is there for a reason given beside it.

Tolerance policy (style.md, "Tests"; the same rules as tests/test_triton_kernels.py). Every result
is compared with the float64 reference (densenet_fast.reference.bn_relu_conv3x3_ref, its
gradients by float64 autograd) on the data as stored, and low-precision results also with the
reference run in the input dtype:

  quantity                   dtype       rule                                 why
  -------------------------  ----------  -----------------------------------  -----------------------------------
  out, and every gradient    float32     tolerances.TOLERANCES[float32]       <= 9*B = 180 (or 9*K) fp32
  (grad_x, grad_gamma,                   (1e-5 max|ref|, rtol 1e-4)           products per GEMM entry, ieee dots
  grad_beta, grad_weight)                                                     (no TF32), sums over M <= 70 rows:
                                                                              ~100 eps of the max at most.
  out, and every gradient    fp16/bf16   tolerances.assert_within_naive_      the kernels round BN-ReLU (and
                                         error: <= 2x the error of the        dOut) once to the input dtype and
                                         reference run in the input dtype     keep everything else in fp32; the
                                         + atol floor of TOLERANCES[dtype]    reference rounds every step.
  stats mean of out          any         |err| <= 16 eps32 max|out|           fp32 sums of exactly-read data;
                                                                              the summation order of M values.
  stats var of out           any         |err| <= 16 eps32 (1 + |mean|/std)   a stable (Chan) variance loses only
                                                 * var                        ~eps |mean|/std relative.
  out= / determinism         any         bit-identical                        the same kernel on the same data.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densenet_fast.reference import bn_relu_conv3x3_ref, channel_stats_ref
from helpers import (assert_close_report, every_tile_test, gpu_tiles, paired_tile_ids, paired_tiles, set_attrs,
                     skip_module_unless_triton_runs, tile_id, triton_device, triton_gpu_only)

skip_module_unless_triton_runs()

# Float32 results are held to IEEE tolerances: no TF32 in the dots on a GPU (conftest.ieee_fp32).
pytestmark = pytest.mark.usefixtures("ieee_fp32")

from densenet_fast.triton_kernels import conv3x3 as conv3x3_module  # noqa: E402
from densenet_fast.triton_kernels.conv3x3 import (  # noqa: E402
    bn_relu_conv3x3_backward_triton,
    bn_relu_conv3x3_triton,
)
from builders import seeded_buffer  # noqa: E402
from tolerances import assert_close, assert_within_naive_error  # noqa: E402

DEVICE = triton_device()
GPU_ONLY = triton_gpu_only()
# The interpreter has no bfloat16.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]
LAYOUTS = ["nchw", "channels_last"]
EPS32 = torch.finfo(torch.float32).eps
BN_EPS = 1e-5

# (name, buffer shape (N, C_buf, H, W), channel slice read as x, K output channels)
CASES = [
    # x = a 20-channel slice at the unaligned offset 7 of a 36-channel buffer (strides of the wide
    # buffer, base pointer not 16-byte aligned); B = 20 spans two 16-wide channel tiles, the last
    # ragged; K = 12 (growth rate of DenseNet-BC); odd 5x7 image: ragged row tiles, and row
    # tiles that straddle image rows and the two images of the batch.
    ("slice_b20_k12", (2, 36, 5, 7), slice(7, 27), 12),
    # batch 1, B = 13 and K = 5 (not multiples of 8 or of the tile), a 3x3 image where every pixel
    # but one touches the border, so the zero padding is most of the work.
    ("b13_k5_batch1_3x3", (1, 13, 3, 3), slice(0, 13), 5),
    # a 1x1 image: only the centre tap is ever inside.
    ("image_1x1", (2, 20, 1, 1), slice(0, 20), 12),
    # K = 70 > 64: two tiles over the output channels (the forward's column tiles, the dgrad's
    # reduction steps, the wgrad's o-blocks); 3x4 image, B = 6 (one ragged channel tile).
    ("k70", (1, 9, 3, 4), slice(2, 8), 70),
]
CASE_IDS = [c[0] for c in CASES]


def _buffer(shape, layout: str, dtype: torch.dtype, seed: int, loc: float = 0.0, spread: float = 1.0):
    return seeded_buffer(shape, layout, dtype, seed, DEVICE, loc, spread)


def _weight(k: int, b: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, b, 3, 3, generator=g, dtype=torch.float64) / (9 * b) ** 0.5).to(dtype).to(DEVICE)


def _bn_params(x, seed: int, running: bool = False):
    """BN parameters for x: returns (mean, var, gamma, beta) in float64 and the float32
    (scale, shift, mean, invstd, gamma, beta) the kernels take. With running=True, mean/var are
    "running statistics", deliberately not x's own batch statistics (eval mode)."""
    b = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    mean, var = channel_stats_ref(x)
    if running:
        mean = mean + 0.3 * torch.randn(b, generator=g, dtype=torch.float64).to(x.device)
        var = var * (0.5 + torch.rand(b, generator=g, dtype=torch.float64).to(x.device))
    gamma = torch.rand(b, generator=g, dtype=torch.float64).to(x.device) + 0.5
    # beta of both signs and up to ~0.6: relu(shift) != 0 for many channels, so padding before
    # BN-ReLU instead of after would be caught at every border pixel.
    beta = torch.randn(b, generator=g, dtype=torch.float64).to(x.device) * 0.3
    # What the kernels receive is float32; the reference sees exactly those values.
    mean, var, gamma, beta = (t.float().double() for t in (mean, var, gamma, beta))
    invstd = torch.rsqrt(var + BN_EPS)
    scale = gamma * invstd
    shift = beta - mean * scale
    f32 = [t.float() for t in (scale, shift, mean, invstd, gamma, beta)]
    return (mean, var, gamma, beta), f32


def _assert_stats(mean, var, out, name: str) -> None:
    """The stats rule of the module docstring, against channel_stats_ref(out) (float64)."""
    assert mean.dtype == torch.float32 and var.dtype == torch.float32, (mean.dtype, var.dtype)
    ref_mean, ref_var = channel_stats_ref(out)
    mean_atol = 16 * EPS32 * float(out.detach().double().abs().max())
    assert_close_report(mean, ref_mean, atol=mean_atol, rtol=0.0, name=f"{name} mean")
    std = ref_var.sqrt().clamp_min(1e-30)
    allowed = (16 * EPS32 * (1 + ref_mean.abs() / std) * ref_var).clamp_min(1e-300)
    assert_close_report(var.double() / allowed, ref_var / allowed, atol=1.0, rtol=0.0,
                        name=f"{name} var (in units of its allowance)")


def _expected_format(x):
    return torch.channels_last if x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _check_forward(x, k: int, seed: int, name: str, out=None, weight_dtype=None) -> torch.Tensor:
    weight = _weight(k, x.shape[1], seed + 100, weight_dtype or x.dtype)
    bn, (scale, shift, *_) = _bn_params(x, seed)
    got, mean, var = bn_relu_conv3x3_triton(x, scale, shift, weight, out=out)
    if out is not None:
        assert got is out
    assert got.shape == (x.shape[0], k, *x.shape[2:]) and got.dtype == x.dtype

    # The reference sees the data as stored in x's dtype and the weight as rounded to it (the
    # kernel casts the weight to x's dtype for the GEMM).
    w_x = weight.to(x.dtype)
    exact = bn_relu_conv3x3_ref(x.double(), *bn, BN_EPS, w_x.double())
    if x.dtype == torch.float32:
        assert_close(got, exact, torch.float32, f"{name} out")
    else:
        naive = bn_relu_conv3x3_ref(x, *(t.to(x.dtype) for t in bn), BN_EPS, w_x)
        assert_within_naive_error(got, naive, exact, x.dtype, f"{name} out")
    _assert_stats(mean, var, got, f"{name} stats of out")
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,shape,channels,k", CASES, ids=CASE_IDS)
def test_forward(name, shape, channels, k, layout, dtype):
    x = _buffer(shape, layout, dtype, seed=1, loc=0.3, spread=1.5)[:, channels]
    out = _check_forward(x, k, seed=2, name=f"forward {name} {layout} {dtype}")
    assert out.is_contiguous(memory_format=_expected_format(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_out_writes_only_its_slice(layout, dtype):
    # The block's use: out = F[:, C_l:C_l+K] of the block buffer, at the unaligned channel offset
    # 13 of a 40-channel buffer. F is poisoned with NaN first: every element of the slice must be
    # written, and no element outside it.
    x = _buffer((2, 36, 3, 5), layout, dtype, seed=3)[:, 7:27]
    buf = torch.full((2, 40, 3, 5), float("nan"), dtype=dtype, device=DEVICE)
    if layout == "channels_last":
        buf = buf.to(memory_format=torch.channels_last)
    out = buf[:, 13:25]
    # fp16 data with an fp32 weight: the kernel casts the weight to x's dtype.
    _check_forward(x, 12, seed=4, name=f"out= {layout} {dtype}", out=out, weight_dtype=torch.float32)
    assert bool(torch.isnan(buf[:, :13]).all()) and bool(torch.isnan(buf[:, 25:]).all()), \
        "the kernel wrote outside the out= slice"
    assert not bool(torch.isnan(out).any())
    # Deterministic, and the same bits as an allocated output (only the store strides differ).
    _, (scale, shift, *_) = _bn_params(x, seed=4)
    weight = _weight(12, 20, 104, torch.float32)
    first = bn_relu_conv3x3_triton(x, scale, shift, weight, out=out)
    second = bn_relu_conv3x3_triton(x, scale, shift, weight)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # stats_out: the statistics merged into slots of a wider cache (the block's mean/var at the
    # layer's channels), the same bits as returned vectors, and nothing written around them.
    cache = torch.full((2, 40), float("nan"), device=DEVICE)
    slots = (cache[0, 13:25], cache[1, 13:25])
    _, mean, var = bn_relu_conv3x3_triton(x, scale, shift, weight, out=out, stats_out=slots)
    assert mean is slots[0] and var is slots[1]
    assert torch.equal(mean, second[1]) and torch.equal(var, second[2])
    assert bool(torch.isnan(cache[:, :13]).all()) and bool(torch.isnan(cache[:, 25:]).all())


def test_forward_pads_after_bn_relu():
    # x = 0, scale = 1, shift = 1: Z = relu(0 * 1 + 1) = 1 inside the image, 0 outside. Padding
    # Bt before BN-ReLU would give Z = 1 outside as well, i.e. out = sum(W) at every pixel.
    x = torch.zeros(1, 5, 3, 4, device=DEVICE)
    weight = _weight(3, 5, 5, torch.float32)
    out, _, _ = bn_relu_conv3x3_triton(x, torch.ones(5, device=DEVICE), torch.ones(5, device=DEVICE), weight)
    expected = F.conv2d(torch.ones(1, 5, 3, 4, dtype=torch.float64, device=DEVICE), weight.double(), padding=1)
    assert_close(out, expected, torch.float32, "padding after BN-ReLU")


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _reference_grads(x, grad_out, weight, bn, batch_stats: bool, dtype: torch.dtype):
    """(grad_x, grad_gamma, grad_beta, grad_weight) of bn_relu_conv3x3_ref by autograd in `dtype`.

    batch_stats=True: the BN statistics are computed from x inside the graph (training-mode BN,
    so the gradient flows through them); False: bn's mean/var are constants (running stats).
    """
    mean, var, gamma, beta = bn
    xr = x.detach().to(dtype).requires_grad_()
    g = gamma.detach().to(dtype).requires_grad_()
    b = beta.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    if batch_stats:
        mu = xr.mean(dim=(0, 2, 3))
        v = (xr - mu.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
    else:
        mu, v = mean.to(dtype), var.to(dtype)
    out = bn_relu_conv3x3_ref(xr, mu, v, g, b, BN_EPS, w)
    out.backward(grad_out.to(dtype))
    return xr.grad, g.grad, b.grad, w.grad


def _check_backward(x, k: int, batch_stats: bool, grad_dtype: torch.dtype, seed: int, name: str):
    n, b, h, w = x.shape
    weight = _weight(k, b, seed + 100, x.dtype)
    bn, (_, _, mean, invstd, gamma, beta) = _bn_params(x, seed, running=not batch_stats)
    # dOut = G[:, 3:3+K], a channel slice of the (float32 in the block) gradient buffer, in x's layout.
    layout = "channels_last" if x.stride(1) == 1 else "nchw"
    grad_out = _buffer((n, k + 7, h, w), layout, grad_dtype, seed=seed + 200)[:, 3:3 + k]

    got = bn_relu_conv3x3_backward_triton(grad_out, x, weight, mean, invstd, gamma, beta, batch_stats)
    grad_x, grad_gamma, grad_beta, grad_weight = got
    assert grad_x.shape == x.shape and grad_x.dtype == x.dtype
    assert grad_x.is_contiguous(memory_format=_expected_format(x))
    assert grad_gamma.shape == (b,) and grad_gamma.dtype == torch.float32
    assert grad_beta.shape == (b,) and grad_beta.dtype == torch.float32
    assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype

    # The exact reference sees dOut as stored (fp32 or x's dtype); the kernels round it to x's
    # dtype for the GEMMs, as does the naive low-precision reference.
    exact = _reference_grads(x, grad_out.double(), weight, bn, batch_stats, torch.float64)
    names = ("grad_x", "grad_gamma", "grad_beta", "grad_weight")
    if x.dtype == torch.float32:
        for t, e, what in zip(got, exact, names):
            assert_close(t, e, torch.float32, f"{name} {what}")
    else:
        naive = _reference_grads(x, grad_out, weight, bn, batch_stats, x.dtype)
        for t, nv, e, what in zip(got, naive, exact, names):
            assert_within_naive_error(t, nv, e, x.dtype, f"{name} {what}")
    return got


@pytest.mark.parametrize("batch_stats", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward(layout, dtype, batch_stats):
    # The block's case: x = Bt (here a slice of a wider buffer, B = 20 over two channel tiles),
    # K = 12, dOut a slice of a float32 gradient buffer whatever x's dtype. Odd 3x5 image: two
    # row tiles, the first straddling the two images, the second ragged.
    x = _buffer((2, 36, 3, 5), layout, dtype, seed=10, loc=0.3, spread=1.5)[:, 7:27]
    _check_backward(x, 12, batch_stats, torch.float32, seed=11,
                    name=f"backward {layout} {dtype} batch_stats={batch_stats}")


# Odd shapes, float32, one layout each (the layouts and dtypes are crossed above).
BACKWARD_ODD = [
    # odd 5x7 image, M = 70: five row tiles, and three wgrad programs along M (32 + 32 + 6 rows,
    # two tiles each but the last): the cross-program sum of the weight gradient.
    ("slice_b20_k12_5x7", (2, 36, 5, 7), slice(7, 27), 12, "nchw", True),
    # batch 1, 3x3 image, B = 13, K = 5: nearly every tap of dgrad and wgrad is clipped.
    ("b13_k5_batch1_3x3", (1, 13, 3, 3), slice(0, 13), 5, "nchw", True),
    # 1x1 image: only the centre tap; M = 2 < one row tile. Eval mode: training-mode BN over
    # M = 2 values is degenerate (xhat = +-sqrt(var / (var + eps)), and the exact grad_x
    # (dy1 - dy2) / 2 * eps / (var + eps) is pure cancellation of O(1) terms).
    ("image_1x1", (2, 20, 1, 1), slice(0, 20), 12, "channels_last", False),
    # K = 70: two tiles of the dgrad reduction and two wgrad o-blocks.
    ("k70", (1, 9, 3, 4), slice(2, 8), 70, "channels_last", True),
]


@pytest.mark.parametrize("name,shape,channels,k,layout,batch_stats", BACKWARD_ODD,
                         ids=[c[0] for c in BACKWARD_ODD])
def test_backward_odd_shapes(name, shape, channels, k, layout, batch_stats):
    x = _buffer(shape, layout, torch.float32, seed=12, loc=-0.2)[:, channels]
    _check_backward(x, k, batch_stats, torch.float32, seed=13, name=f"backward {name}")


def test_backward_grad_out_in_input_dtype():
    # dOut may also arrive in x's dtype (fp16 here) rather than float32.
    x = _buffer((2, 36, 3, 5), "channels_last", torch.float16, seed=14)[:, 7:27]
    _check_backward(x, 12, True, torch.float16, seed=15, name="backward fp16 dOut")


def test_backward_deterministic():
    x = _buffer((2, 36, 3, 5), "nchw", torch.float32, seed=16)[:, 7:27]
    _, (_, _, mean, invstd, gamma, beta) = _bn_params(x, seed=16)
    weight = _weight(12, 20, 17, torch.float32)
    grad_out = _buffer((2, 12, 3, 5), "nchw", torch.float32, seed=18)
    first = bn_relu_conv3x3_backward_triton(grad_out, x, weight, mean, invstd, gamma, beta, True)
    second = bn_relu_conv3x3_backward_triton(grad_out, x, weight, mean, invstd, gamma, beta, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


def _small_inputs(layout: str = "channels_last"):
    # One row tile, one channel tile: opcheck runs each op several times.
    x = _buffer((1, 9, 3, 4), layout, torch.float32, seed=20)[:, 2:7]
    _, (scale, shift, mean, invstd, gamma, beta) = _bn_params(x, seed=20)
    weight = _weight(3, 5, 21, torch.float32)
    return x, scale, shift, mean, invstd, gamma, beta, weight


def test_custom_ops_opcheck():
    x, scale, shift, mean, invstd, gamma, beta, weight = _small_inputs()
    ops = torch.ops.densenet_fast
    torch.library.opcheck(ops.triton_bn_relu_conv3x3.default, (x, scale, shift, weight))
    buf = torch.zeros(1, 8, 3, 4, device=DEVICE).to(memory_format=torch.channels_last)
    torch.library.opcheck(ops.triton_bn_relu_conv3x3_out.default, (x, scale, shift, weight, buf[:, 1:4]))
    grad_out = _buffer((1, 3, 3, 4), "channels_last", torch.float32, seed=22)
    torch.library.opcheck(ops.triton_bn_relu_conv3x3_backward.default,
                          (grad_out, x, weight, mean, invstd, gamma, beta, True))


def test_custom_ops_compile_in_place():
    # The block's pattern under torch.compile: allocate the buffer, let the out op write a channel
    # slice of it in place, run the backward op; aot_eager traces through the fake
    # implementations and functionalizes the in-place write.
    x, scale, shift, mean, invstd, gamma, beta, weight = _small_inputs("nchw")
    ops = torch.ops.densenet_fast

    def f(x, scale, shift, weight, mean, invstd, gamma, beta):
        buf = torch.zeros(1, 8, 3, 4, device=x.device)
        stats = ops.triton_bn_relu_conv3x3_out(x, scale, shift, weight, buf[:, 2:5])
        grads = ops.triton_bn_relu_conv3x3_backward(buf[:, 2:5], x, weight, mean, invstd, gamma, beta, True)
        return (buf, *stats, *grads)

    args = (x, scale, shift, weight, mean, invstd, gamma, beta)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(*args), f(*args)
    for i, (t, u) in enumerate(zip(got, want)):
        assert torch.equal(t, u), f"output {i} of the compiled function differs"
    assert bool(got[0][:, 2:5].ne(0).any()) and bool(got[0][:, :2].eq(0).all())


# --------------------------------------------------------------------------------------------
# Errors name the tensor
# --------------------------------------------------------------------------------------------


def test_forward_errors_name_the_tensor():
    x = torch.randn(2, 8, 5, 7, device=DEVICE)
    scale, shift, weight = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE), torch.randn(4, 8, 3, 3)
    weight = weight.to(DEVICE)
    fwd = bn_relu_conv3x3_triton
    with pytest.raises(ValueError, match="x must have 4 dims .*got 3"):
        fwd(x[0], scale, shift, weight)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        fwd(x.long(), scale, shift, weight)
    with pytest.raises(ValueError, match=r"scale must have shape \(8,\)"):
        fwd(x, torch.ones(7, device=DEVICE), shift, weight)
    with pytest.raises(TypeError, match="shift must be float32, got torch.float16"):
        fwd(x, scale, shift.half(), weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, 8, 3, 3\).*got \[4, 9, 3, 3\]"):
        fwd(x, scale, shift, torch.randn(4, 9, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match=r"weight must have shape \(K, 8, 3, 3\).*got \[4, 8, 1, 1\]"):
        fwd(x, scale, shift, torch.randn(4, 8, 1, 1, device=DEVICE))
    with pytest.raises(TypeError, match="weight must be float32, float16 or bfloat16, got torch.float64"):
        fwd(x, scale, shift, weight.double())
    with pytest.raises(TypeError, match="weight must be a Tensor, got list"):
        fwd(x, scale, shift, [1.0])
    with pytest.raises(ValueError, match=r"out must have shape \[2, 4, 5, 7\] \(N, K, H, W\), got \[2, 5, 5, 7\]"):
        fwd(x, scale, shift, weight, out=torch.empty(2, 5, 5, 7, device=DEVICE))
    with pytest.raises(TypeError, match="out must have x's dtype torch.float32, got torch.float16"):
        fwd(x, scale, shift, weight, out=torch.empty(2, 4, 5, 7, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out must be on x's device"):
        fwd(x, scale, shift, weight, out=torch.empty(2, 4, 5, 7, device="meta"))
    vec = torch.empty(4, device=DEVICE)
    with pytest.raises(TypeError, match=r"stats_out must be a \(mean, var\) pair of tensors, got Tensor"):
        fwd(x, scale, shift, weight, stats_out=vec)
    with pytest.raises(ValueError, match=r"stats_out\[1\] \(var\) must be a contiguous \(4,\) float32 tensor.*"
                                         r"got shape \[5\]"):
        fwd(x, scale, shift, weight, stats_out=(vec, torch.empty(5, device=DEVICE)))
    with pytest.raises(ValueError, match=r"stats_out\[0\] \(mean\) must be a contiguous \(4,\) float32 tensor.*"
                                         r"torch.float64"):
        fwd(x, scale, shift, weight, stats_out=(vec.double(), vec))
    with pytest.raises(ValueError, match=r"stats_out\[0\] \(mean\) must be a contiguous.*strides \[2\]"):
        fwd(x, scale, shift, weight, stats_out=(torch.empty(8, device=DEVICE)[::2], vec))
    with pytest.raises(ValueError, match="stats_out\\[1\\] \\(var\\) must be on x's device"):
        fwd(x, scale, shift, weight, stats_out=(vec, torch.empty(4, device="meta")))


def test_backward_errors_name_the_tensor():
    x = torch.randn(2, 8, 5, 7, device=DEVICE)
    v = torch.ones(8, device=DEVICE)
    weight = torch.randn(4, 8, 3, 3, device=DEVICE)
    grad_out = torch.randn(2, 4, 5, 7, device=DEVICE)
    bwd = bn_relu_conv3x3_backward_triton
    with pytest.raises(ValueError, match=r"grad_out must have shape \[2, 4, 5, 7\] \(N, K, H, W\), got \[2, 4, 5, 6\]"):
        bwd(grad_out[..., :6], x, weight, v, v, v, v, True)
    with pytest.raises(TypeError, match="grad_out must be float32 or x's dtype torch.float16, got torch.bfloat16"):
        bwd(grad_out.bfloat16(), x.half(), weight, v, v, v, v, True)
    with pytest.raises(ValueError, match=r"invstd must have shape \(8,\)"):
        bwd(grad_out, x, weight, v, v[:7], v, v, True)
    with pytest.raises(TypeError, match="gamma must be float32, got torch.float64"):
        bwd(grad_out, x, weight, v, v, v.double(), v, True)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, 8, 3, 3\)"):
        bwd(grad_out, x, weight[:, :7], v, v, v, v, True)
    with pytest.raises(ValueError, match="beta must be on x's device"):
        bwd(grad_out, x, weight, v, v, v, torch.ones(8, device="meta"), True)


# --------------------------------------------------------------------------------------------
# Every GPU tile in the interpreter
# --------------------------------------------------------------------------------------------

_M = conv3x3_module
# (forward, dgrad, wgrad) tiles: every distinct tile of each kernel's lists runs in some case.
GPU_TILES = paired_tiles(
    gpu_tiles(_M.CONFIGS_FWD_SM90, _M.CONFIGS_FWD_SM80, _M.CONFIGS_FWD_SM90_NCHW_FP32,
              _M.CONFIGS_FWD_SM80_NCHW_FP32, _M.CONFIGS_FWD_FMA),
    gpu_tiles(_M.CONFIGS_DGRAD_SM90, _M.CONFIGS_DGRAD_SM80, _M.CONFIGS_DGRAD_FMA),
    gpu_tiles(_M.CONFIGS_WGRAD_SM90, _M.CONFIGS_WGRAD_SM80, _M.CONFIGS_WGRAD_FMA),
)


@every_tile_test("fwd,dgrad,wgrad", GPU_TILES, paired_tile_ids(GPU_TILES, ("fwd", "dgrad", "wgrad")))
def test_every_gpu_tile(monkeypatch, fwd, dgrad, wgrad, layout, dtype):
    # The tiles a GPU runs (masks and loop bounds follow them), which the interpreter's 16-wide
    # defaults never exercise. M = 2*13*13 = 338 rows: two row tiles of the widest (256), the
    # second ragged, and three wgrad programs of WGRAD_ROW_QUANTUM rows as on a GPU (the last
    # ragged). B = 48 at offset 3 of a 53-channel buffer: one and a half 32-wide channel steps,
    # narrower than the 64/128-wide dgrad tiles. K = 12.
    set_attrs(monkeypatch, conv3x3_module, INTERPRET_FWD=fwd, INTERPRET_DGRAD=dgrad, INTERPRET_WGRAD=wgrad,
              INTERPRET_WGRAD_ROWS=conv3x3_module.WGRAD_ROW_QUANTUM)
    x = _buffer((2, 53, 13, 13), layout, dtype, seed=40, loc=0.2)[:, 3:51]
    name = f"fwd {tile_id(fwd)} dgrad {tile_id(dgrad)} wgrad {tile_id(wgrad)} {layout} {dtype}"
    _check_forward(x, 12, seed=41, name=name)
    for batch_stats in (True, False):
        _check_backward(x, 12, batch_stats, torch.float32, seed=42, name=f"{name} batch_stats={batch_stats}")


# --------------------------------------------------------------------------------------------
# GPU only: autotuned configurations on realistic sizes
# --------------------------------------------------------------------------------------------


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("b,k,hw", [(48, 12, 32), (128, 32, 16)], ids=["bc_k12", "k32"])
def test_autotuned_block_sizes(b, k, hw, layout, dtype):
    # DenseNet-BC (k = 12, B = 48) on 32x32 and DenseNet-121-like (k = 32, B = 128) on 16x16,
    # batch 8: many row tiles and channel steps; every config is benchmarked. out and dOut are
    # channel slices of wider buffers at unaligned offsets, as in the block.
    x = _buffer((8, b + 5, hw, hw), layout, dtype, seed=30, loc=0.2)[:, 3:3 + b]
    buf = _buffer((8, 100, hw, hw), layout, dtype, seed=31)
    _check_forward(x, k, seed=32, name=f"autotuned forward {layout} {dtype}", out=buf[:, 37:37 + k])
    for batch_stats in (True, False):
        _check_backward(x, k, batch_stats, torch.float32, seed=33,
                        name=f"autotuned backward {layout} {dtype} batch_stats={batch_stats}")
