"""Tests of the Triton transition (densenet_fast.triton_kernels.transition):
out = conv1x1(avgpool2x2(relu(bn(x))), W) and its backward.

Without a GPU they run on CPU tensors through triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before the kernels are imported); with a GPU the same tests run the compiled,
autotuned kernels, plus the bf16 and realistic-size tests marked GPU_ONLY. Shapes are tiny because
the interpreter runs every program in Python, one after another.

Every result is compared with densenet_fast.reference.transition_ref (conv, then pool: the
torchvision order, so the test also checks that pooling first is the same map) evaluated in
float64 on the same data: the forward directly, the backward through float64 autograd. With
batch_stats=True the statistics are computed from x inside the autograd graph (channel_stats_ref
is differentiable, so this is training-mode batch norm's gradient), with batch_stats=False they
are constants that are not x's own statistics.

Tolerance policy (style.md "Tests", tests/tolerances.py):

  quantity                  dtype      rule                                     why
  ------------------------  ---------  ---------------------------------------  ---------------------------------
  out, grad_x, grad_gamma,  float32    tolerances.assert_close(.., float32):    fp32 arithmetic, ieee dots (no
  grad_beta, grad_weight               1e-5 * max|ref| + 1e-4 * |ref|           TF32), K <= 37 products and sums
                                                                                over <= 140 pixels; the float32
                                                                                mean/invstd the kernel is given
                                                                                are the float64 ones rounded
                                                                                (~1 ulp). Far above rounding
                                                                                (~10 ulp), far below a wrong term.
  the same                  fp16/bf16  tolerances.assert_within_naive_error:    the kernel rounds pooled z, the
                                       <= 2x the error of transition_ref run    GEMM operands and the result to
                                       (and differentiated) in the input dtype  the input dtype once and sums in
                                       + the TOLERANCES[dtype] atol floor       fp32; the naive run rounds at
                                                                                every op.
  out= / custom op / twice  any        bit-identical (torch.equal)              same kernels, same tiles.
"""

from __future__ import annotations

import pytest
import torch

from densenet_fast.reference import channel_stats_ref, transition_ref
from helpers import (every_tile_test, gpu_tiles, paired_tile_ids, paired_tiles, set_attrs,
                     skip_module_unless_triton_runs, tile_id, triton_device, triton_gpu_only)

skip_module_unless_triton_runs()

# Float32 results are held to IEEE tolerances: no TF32 in the dots on a GPU (conftest.ieee_fp32).
pytestmark = pytest.mark.usefixtures("ieee_fp32")

from densenet_fast.triton_kernels import transition as transition_module  # noqa: E402
from densenet_fast.triton_kernels.transition import (  # noqa: E402
    bn_relu_pool_conv1x1_backward_triton,
    bn_relu_pool_conv1x1_triton,
)
from builders import seeded_buffer  # noqa: E402
from tolerances import assert_close, assert_within_naive_error  # noqa: E402

DEVICE = triton_device()
GPU_ONLY = triton_gpu_only()
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16", marks=GPU_ONLY)]
LAYOUTS = ["nchw", "channels_last"]
EPS = 1e-5

# (name, buffer shape (N, C_buf, H, W), channel slice, Cout)
CASES = [
    # 37 channels (odd, not a multiple of the 16-wide tile) at offset 5 of a 48-channel buffer:
    # unaligned base pointer, the wider buffer's strides; 5x7: odd H and W, so the last row and
    # the last column are dropped by the pooling (and still get a gradient with batch statistics).
    ("slice37_5x7", (2, 48, 5, 7), slice(5, 42), 10),
    # even 4x8 image, the whole tensor, Cout = one full 16-wide tile; in NCHW the windows' pixels
    # are read in pairs (transition.window_run 8; the other cases' runs of 2 read them apiece)
    ("whole20_4x8", (2, 20, 4, 8), slice(0, 20), 16),
    # batch 1, 2x2: a single pooled pixel per image; the channel prefix of a wider buffer
    ("prefix20_batch1_2x2", (1, 32, 2, 2), slice(0, 20), 10),
    # 40 pooled rows: 3 row tiles of 16 (ragged last), 2 wgrad splits under the interpreter;
    # odd W only (the dropped pixels are one column)
    ("slice20_8x11_tiles", (2, 24, 8, 11), slice(4, 24), 16),
]
CASE_IDS = [case[0] for case in CASES]


def _buffer(shape, layout: str, dtype: torch.dtype, seed: int, loc: float = 0.0, spread: float = 1.0):
    return seeded_buffer(shape, layout, dtype, seed, DEVICE, loc, spread)


def _params(x, cout: int, seed: int):
    """float64 BN parameters and 1x1 weight (the weight already rounded to x's dtype, as the
    kernel uses it): gamma in [0.5, 1.5), beta ~ 0.2 N(0, 1), so about half the pixels pass ReLU."""
    c = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    gamma = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).float().double()
    beta = (torch.randn(c, generator=g, dtype=torch.float64) * 0.2).float().double()
    weight = (torch.randn(cout, c, 1, 1, generator=g, dtype=torch.float64) / c ** 0.5).to(x.dtype).double()
    # fixed ("running") statistics that are NOT x's own: exercises the uncentered backward
    run_mean = torch.randn(c, generator=g, dtype=torch.float64) * 0.3
    run_var = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    return [t.to(x.device) for t in (gamma, beta, weight, run_mean, run_var)]


def _kernel_vectors(mean, var):
    """float64 statistics -> the float32 (mean, invstd) the kernels take."""
    return mean.float(), torch.rsqrt(var + EPS).float()


def _compare(got, naive, exact, dtype, name):
    if dtype == torch.float32:
        assert_close(got, exact, torch.float32, name)
    else:
        assert_within_naive_error(got, naive, exact, dtype, name)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _forward_case(name, shape, channels, cout, layout, dtype, seed):
    x = _buffer(shape, layout, dtype, seed=seed, loc=0.3, spread=1.5)[:, channels]
    gamma, beta, weight, _, _ = _params(x, cout, seed)
    mean, var = channel_stats_ref(x)
    mean32, invstd32 = _kernel_vectors(mean, var)
    scale = gamma.float() * invstd32
    shift = beta.float() - mean32 * scale
    return x, (mean, var, gamma, beta, weight), scale, shift


def _check_forward(shape, channels, cout, layout, dtype, seed, name):
    """The forward on a _forward_case against the float64 reference (and the naive run in x's
    dtype for fp16/bf16)."""
    x, (mean, var, gamma, beta, weight), scale, shift = _forward_case(name, shape, channels, cout, layout, dtype,
                                                                      seed)
    out = bn_relu_pool_conv1x1_triton(x, scale, shift, weight.to(dtype))
    exact = transition_ref(x.double(), mean, var, gamma, beta, EPS, weight)
    naive = None
    if dtype != torch.float32:
        naive = transition_ref(x, *(t.to(dtype) for t in (mean, var, gamma, beta)), EPS, weight.to(dtype))
    _compare(out, naive, exact, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,shape,channels,cout", CASES, ids=CASE_IDS)
def test_forward(name, shape, channels, cout, layout, dtype):
    x, (mean, var, gamma, beta, weight), scale, shift = _forward_case(name, shape, channels, cout, layout,
                                                                      dtype, seed=1)
    out = bn_relu_pool_conv1x1_triton(x, scale, shift, weight.to(x.dtype))
    n, _, h, w = x.shape
    assert out.shape == (n, cout, h // 2, w // 2) and out.dtype == x.dtype
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), out.stride()
    exact = transition_ref(x.double(), mean, var, gamma, beta, EPS, weight)
    naive = None
    if dtype != torch.float32:
        naive = transition_ref(x, *(t.to(dtype) for t in (mean, var, gamma, beta)), EPS, weight.to(dtype))
    _compare(out, naive, exact, dtype, f"forward {name} {layout} {dtype}")


@pytest.mark.parametrize("out_layout", LAYOUTS)
@pytest.mark.parametrize("offset", [0, 3])
def test_forward_out_into_slice_of_poisoned_buffer(offset, out_layout):
    # The next block's buffer: the transition writes its channel prefix (offset 0) in place; offset
    # 3 is an unaligned middle slice. x is NCHW, so a channels_last out also checks that out's own
    # strides are used, not x's layout. Everything outside the slice must stay NaN.
    x, _, scale, shift = _forward_case("out", (2, 48, 5, 7), slice(5, 42), 10, "nchw", torch.float32, seed=2)
    weight = _params(x, 10, seed=2)[2].float()
    nxt = torch.full((2, 24, 2, 3), float("nan"), dtype=x.dtype, device=x.device)
    if out_layout == "channels_last":
        nxt = nxt.to(memory_format=torch.channels_last)
    target = nxt[:, offset:offset + 10]
    returned = bn_relu_pool_conv1x1_triton(x, scale, shift, weight, out=target)
    assert returned.data_ptr() == target.data_ptr() and returned.stride() == target.stride()
    want = bn_relu_pool_conv1x1_triton(x, scale, shift, weight)
    assert torch.equal(nxt[:, offset:offset + 10], want)
    rest = torch.cat([nxt[:, :offset].flatten(), nxt[:, offset + 10:].flatten()])
    assert bool(torch.isnan(rest).all()), "channels outside out were written"

    # the same through the mutating custom op
    nxt.fill_(float("nan"))
    torch.ops.densenet_fast.triton_bn_relu_pool_conv1x1_out(x, scale, shift, weight, nxt[:, offset:offset + 10])
    assert torch.equal(nxt[:, offset:offset + 10], want)
    rest = torch.cat([nxt[:, :offset].flatten(), nxt[:, offset + 10:].flatten()])
    assert bool(torch.isnan(rest).all()), "channels outside out were written (custom op)"


def test_forward_accepts_2d_weight():
    x, _, scale, shift = _forward_case("2d", (2, 20, 4, 6), slice(0, 20), 16, "channels_last", torch.float32, seed=3)
    weight = _params(x, 16, seed=3)[2].float()
    assert torch.equal(bn_relu_pool_conv1x1_triton(x, scale, shift, weight),
                       bn_relu_pool_conv1x1_triton(x, scale, shift, weight.view(16, 20)))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _reference_grads(x, grad_out, params, batch_stats: bool, dtype: torch.dtype):
    """(grad_x, grad_gamma, grad_beta, grad_weight) of transition_ref by autograd, in `dtype`."""
    gamma, beta, weight, run_mean, run_var = params
    xr = x.detach().to(dtype).requires_grad_()
    g, b, w = (t.detach().to(dtype).requires_grad_() for t in (gamma, beta, weight))
    if batch_stats:
        mean, var = channel_stats_ref(xr)  # inside the graph: training-mode batch norm
    else:
        mean, var = run_mean, run_var
    out = transition_ref(xr, mean, var, g, b, EPS, w)
    out.backward(grad_out.to(dtype))
    return xr.grad, g.grad, b.grad, w.grad


def _backward_case(shape, channels, cout, layout, dtype, seed, grad_dtype=None):
    x = _buffer(shape, layout, dtype, seed=seed, loc=0.3, spread=1.5)[:, channels]
    params = _params(x, cout, seed)
    n, _, h, w = x.shape
    # grad_out: a channel slice of a wider gradient buffer in the other layout than x
    other = "nchw" if layout == "channels_last" else "channels_last"
    grad_out = _buffer((n, cout + 5, h // 2, w // 2), other, grad_dtype or dtype, seed=seed + 50)[:, 2:2 + cout]
    return x, params, grad_out


def _run_backward(x, params, grad_out, batch_stats):
    gamma, beta, weight, run_mean, run_var = params
    mean, var = channel_stats_ref(x) if batch_stats else (run_mean, run_var)
    mean32, invstd32 = _kernel_vectors(mean, var)
    return bn_relu_pool_conv1x1_backward_triton(grad_out, x, weight.to(x.dtype), mean32, invstd32,
                                                gamma.float(), beta.float(), batch_stats)


def _check_backward(x, params, grad_out, batch_stats, name):
    got = _run_backward(x, params, grad_out, batch_stats)
    grad_x, grad_gamma, grad_beta, grad_weight = got
    assert grad_x.shape == x.shape and grad_x.dtype == x.dtype
    fmt = torch.channels_last if x.stride(1) == 1 else torch.contiguous_format
    assert grad_x.is_contiguous(memory_format=fmt), grad_x.stride()
    assert grad_gamma.dtype == torch.float32 and grad_beta.dtype == torch.float32
    assert grad_weight.shape == params[2].shape and grad_weight.dtype == x.dtype
    exact = _reference_grads(x.double(), grad_out.double(), params, batch_stats, torch.float64)
    naive = (None,) * 4
    if x.dtype != torch.float32:
        naive = _reference_grads(x, grad_out, params, batch_stats, x.dtype)
    for label, a, nv, e in zip(("grad_x", "grad_gamma", "grad_beta", "grad_weight"), got, naive, exact):
        _compare(a, nv, e, x.dtype, f"{name} {label}")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch_stats", "fixed_stats"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,shape,channels,cout", CASES, ids=CASE_IDS)
def test_backward(name, shape, channels, cout, layout, dtype, batch_stats):
    x, params, grad_out = _backward_case(shape, channels, cout, layout, dtype, seed=4)
    _check_backward(x, params, grad_out, batch_stats, f"backward {name} {layout} {dtype} batch_stats={batch_stats}")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch_stats", "fixed_stats"])
def test_backward_fp32_grad_out_for_fp16_x(batch_stats):
    # The block's gradient buffer is float32 when the activations are fp16 (dense_block.md).
    x, params, grad_out = _backward_case((2, 48, 5, 7), slice(5, 42), 10, "channels_last", torch.float16,
                                         seed=5, grad_dtype=torch.float32)
    _check_backward(x, params, grad_out, batch_stats, f"backward fp32 grad_out batch_stats={batch_stats}")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch_stats", "fixed_stats"])
def test_backward_odd_h_only(batch_stats):
    # Only the last row is dropped (no dropped column): the dropped-pixel enumeration's other branch.
    x, params, grad_out = _backward_case((2, 20, 5, 4), slice(0, 20), 10, "nchw", torch.float32, seed=6)
    _check_backward(x, params, grad_out, batch_stats, f"backward 5x4 batch_stats={batch_stats}")


def test_backward_deterministic():
    x, params, grad_out = _backward_case((2, 24, 8, 11), slice(4, 24), 16, "channels_last", torch.float32, seed=7)
    first = _run_backward(x, params, grad_out, True)
    second = _run_backward(x, params, grad_out, True)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two identical calls"


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


def test_custom_ops_opcheck_and_compile():
    x, (mean, var, gamma, beta, weight), scale, shift = _forward_case(
        "op", (2, 48, 5, 7), slice(5, 42), 10, "channels_last", torch.float32, seed=8)
    weight = weight.float()
    ops = torch.ops.densenet_fast
    torch.library.opcheck(ops.triton_bn_relu_pool_conv1x1.default, (x, scale, shift, weight))
    out = torch.empty(2, 10, 2, 3, device=x.device)
    torch.library.opcheck(ops.triton_bn_relu_pool_conv1x1_out.default, (x, scale, shift, weight, out))
    grad_out = torch.randn(2, 10, 2, 3, device=x.device)
    mean32, invstd32 = _kernel_vectors(mean, var)
    for batch_stats in (True, False):
        torch.library.opcheck(ops.triton_bn_relu_pool_conv1x1_backward.default,
                              (grad_out, x, weight, mean32, invstd32, gamma.float(), beta.float(), batch_stats))

    # torch.compile traces the ops through their fakes (aot_eager keeps this fast on a CPU).
    def f(x, scale, shift, weight, grad_out, mean, invstd, gamma, beta):
        out = ops.triton_bn_relu_pool_conv1x1(x, scale, shift, weight)
        grads = ops.triton_bn_relu_pool_conv1x1_backward(grad_out, x, weight, mean, invstd, gamma, beta, True)
        return (out, *grads)

    args = (x, scale, shift, weight, grad_out, mean32, invstd32, gamma.float(), beta.float())
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
    want = f(*args)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b) and a.stride() == b.stride(), f"output {i} of the compiled function differs"


# --------------------------------------------------------------------------------------------
# Errors name the tensor
# --------------------------------------------------------------------------------------------


def test_errors_name_the_tensor():
    x = torch.randn(2, 12, 5, 7, device=DEVICE)
    v = torch.ones(12, device=DEVICE)
    weight = torch.randn(6, 12, device=DEVICE)
    fwd = bn_relu_pool_conv1x1_triton
    with pytest.raises(ValueError, match="x must have 4 dims .*got 3"):
        fwd(x[0], v, v, weight)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        fwd(x.long(), v, v, weight)
    with pytest.raises(ValueError, match="x must have H >= 2 and W >= 2.*got 1x7"):
        fwd(x[:, :, :1], v, v, weight)
    with pytest.raises(ValueError, match="x must have H >= 2 and W >= 2.*got 5x1"):
        fwd(x[:, :, :, :1], v, v, weight)
    with pytest.raises(ValueError, match=r"scale must have shape \(12,\)"):
        fwd(x, torch.ones(11, device=DEVICE), v, weight)
    with pytest.raises(TypeError, match="shift must be float32, got torch.float16"):
        fwd(x, v, v.half(), weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(Cout, 12\).*must match x's 12.*got \[6, 13\]"):
        fwd(x, v, v, torch.randn(6, 13, device=DEVICE))
    with pytest.raises(TypeError, match="weight must be float32, float16 or bfloat16, got torch.float64"):
        fwd(x, v, v, weight.double())
    with pytest.raises(ValueError, match=r"out must have shape \[2, 6, 2, 3\].*got \[2, 6, 3, 3\]"):
        fwd(x, v, v, weight, out=torch.empty(2, 6, 3, 3, device=DEVICE))
    with pytest.raises(TypeError, match="out must be torch.float32 .*got torch.float16"):
        fwd(x, v, v, weight, out=torch.empty(2, 6, 2, 3, device=DEVICE, dtype=torch.float16))
    with pytest.raises(TypeError, match="out must be a Tensor"):
        fwd(x, v, v, weight, out=[0.0])

    bwd = bn_relu_pool_conv1x1_backward_triton
    g = torch.randn(2, 6, 2, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"grad_out must have shape \[2, 6, 2, 3\].*got \[2, 6, 2, 4\]"):
        bwd(torch.randn(2, 6, 2, 4, device=DEVICE), x, weight, v, v, v, v, True)
    with pytest.raises(TypeError, match="grad_out must be torch.float16 or torch.float32 .*got torch.float64"):
        bwd(g.double(), x.half(), weight, v, v, v, v, True)
    with pytest.raises(ValueError, match=r"invstd must have shape \(12,\)"):
        bwd(g, x, weight, v, torch.ones(13, device=DEVICE), v, v, True)
    with pytest.raises(TypeError, match="gamma must be float32, got torch.float64"):
        bwd(g, x, weight, v, v, v.double(), v, True)
    with pytest.raises(ValueError, match=r"weight must have shape \(Cout, 12\)"):
        bwd(g, x, torch.randn(6, 12, 3, 3, device=DEVICE), v, v, v, v, True)
    with pytest.raises(TypeError, match="batch_stats must be a bool, got int"):
        bwd(g, x, weight, v, v, v, v, 1)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="weight must be on x's device"):
            fwd(x, v, v, weight.cpu())
        with pytest.raises(ValueError, match="grad_out must be on x's device"):
            bwd(g.cpu(), x, weight, v, v, v, v, True)
    else:
        with pytest.raises(ValueError, match="weight must be on x's device cpu, got meta"):
            fwd(x, v, v, weight.to("meta"))
        with pytest.raises(ValueError, match="grad_out must be on x's device cpu, got meta"):
            bwd(g.to("meta"), x, weight, v, v, v, v, True)


# --------------------------------------------------------------------------------------------
# Every GPU tile in the interpreter
# --------------------------------------------------------------------------------------------

_M = transition_module
# (forward, dgrad, wgrad) tiles: every distinct tile of each kernel's lists runs in some case.
GPU_TILES = paired_tiles(gpu_tiles(_M.FWD_CONFIGS_SM90, _M.FWD_CONFIGS_SM80, _M.FWD_CONFIGS_FMA),
                         gpu_tiles(_M.DGRAD_CONFIGS_SM90, _M.DGRAD_CONFIGS_SM80),
                         gpu_tiles(_M.WGRAD_CONFIGS_SM90, _M.WGRAD_CONFIGS_SM80, _M.WGRAD_CONFIGS_FMA))


@every_tile_test("fwd,dgrad,wgrad", GPU_TILES, paired_tile_ids(GPU_TILES, ("fwd", "dgrad", "wgrad")))
def test_every_gpu_tile(monkeypatch, fwd, dgrad, wgrad, layout, dtype):
    # The tiles a GPU runs (masks and loop bounds follow them), which the interpreter's 16-wide
    # defaults never exercise. 27x28 images (odd H: a dropped pixel row), batch 2: P = 364
    # pooled rows, two row tiles of the widest (256), the second ragged; the wgrad splits them
    # into 200 + 164 rows, not a multiple of any BLOCK_P (a GPU's splits need not be either).
    # NCHW reads the windows' pixels in pairs (window_run 4), channels_last apiece.
    # C = 73 of an 80-channel buffer, Cout = 37: ragged against every channel tile. Training
    # statistics in fp32, fixed ones in fp16.
    set_attrs(monkeypatch, transition_module, INTERPRET_FWD=fwd, INTERPRET_DGRAD=dgrad, INTERPRET_WGRAD=wgrad,
              INTERPRET_WGRAD_ROWS_PER_SPLIT=200)
    name = f"fwd {tile_id(fwd)} dgrad {tile_id(dgrad)} wgrad {tile_id(wgrad)} {layout} {dtype}"
    shape, channels, cout = (2, 80, 27, 28), slice(3, 76), 37
    _check_forward(shape, channels, cout, layout, dtype, seed=21, name=f"{name} forward")
    x, params, grad_out = _backward_case(shape, channels, cout, layout, dtype, seed=22)
    _check_backward(x, params, grad_out, dtype == torch.float32, f"{name} backward")


@pytest.mark.parametrize("sms", [132, 108, 1])
@pytest.mark.parametrize("p,cout,c", [(16384, 108, 216), (4096, 150, 300), (50176, 128, 256), (3136, 512, 1024),
                                      (1024, 150, 300), (364, 37, 73), (1, 8, 16)])
def test_wgrad_splits(monkeypatch, p, cout, c, sms):
    """The compiled wgrad's split of the P pooled rows (the interpreter uses a fixed one): every row
    in one split, splits starting at multiples of WGRAD_ROW_ALIGN, about 2 programs per SM in all
    (so the float32 workspace stays bounded), and at DenseNet-BC-100's second transition (P =
    4,096, 15 tiles of 64x64) on 132 SMs 16 splits, not the 8 that a 512-row minimum left."""
    set_attrs(monkeypatch, transition_module, INTERPRET=False, device_sms=lambda device: sms)
    splits, rows = transition_module._wgrad_splits(p, cout, c, torch.device("cpu"))
    assert (splits - 1) * rows < p <= splits * rows and rows % transition_module.WGRAD_ROW_ALIGN == 0, (splits, rows)
    tiles = -(-cout // 64) * -(-c // 64)
    assert splits * tiles <= 2 * sms + tiles, (splits, tiles)
    if (p, sms) == (4096, 132):
        assert splits == 16, splits


# --------------------------------------------------------------------------------------------
# GPU only: autotuned configurations on realistic sizes
# --------------------------------------------------------------------------------------------


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_autotuned_realistic_size(layout, dtype):
    # A DenseNet-121-like transition on a slice of a wider buffer: C = 250 of 256 channels,
    # Cout = 125, 16x15 (odd W), batch 8: many row tiles, several K steps, wgrad splits.
    shape, channels, cout = (8, 256, 16, 15), slice(3, 253), 125
    _check_forward(shape, channels, cout, layout, dtype, seed=9, name=f"autotuned forward {layout} {dtype}")
    for batch_stats in (True, False):
        x, params, grad_out = _backward_case(shape, channels, cout, layout, dtype, seed=10)
        _check_backward(x, params, grad_out, batch_stats, f"autotuned backward {layout} {dtype} {batch_stats}")
