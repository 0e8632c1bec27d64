"""Tests of the Triton backward of the bottleneck, densenet_fast.triton_kernels.conv1x1_backward
(dense_block.md, backward steps 5-6): grad_gamma, grad_beta, grad_weight and grad_x_acc += dx.

Without a GPU they run on CPU tensors through triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before the kernels are imported); with a GPU the same tests run the compiled,
autotuned kernels, plus the bf16 and realistic-size tests marked GPU_ONLY. Shapes are tiny
because the interpreter runs every program in Python, one after another.

Every result is compared with float64 autograd through densenet_fast.reference.bn_relu_conv1x1_ref
on the same data (x as stored, weight and grad_out as passed, all upcast). With batch_stats=True
the reference computes the mean and variance of x inside the autograd graph, so its input gradient
is the full training-mode BN gradient; with batch_stats=False they are constants. The input
gradient is read back as (grad_x_acc after) - (grad_x_acc before), from a buffer pre-filled with
random values of the gradient's own scale.

Tolerance policy (style.md "Tests", tests/tolerances.py):

  quantity                      dtype      rule                                   why
  ----------------------------  ---------  -------------------------------------  ----------------------------------
  dx, dgamma, dbeta, dweight    float32    tolerances.TOLERANCES[float32]         ieee fp32 dots (no TF32) with
                                           (1e-5 max|ref|, rtol 1e-4)             K = B <= 24, sums of <= 70 rows,
                                                                                  one fp32 rounding of the
                                                                                  accumulation: ~10s of eps32 of
                                                                                  the max.
  dx, dgamma, dbeta, dweight    fp16/bf16  tolerances.assert_within_naive_error:  the kernel rounds z and dBt once
                                           <= 2x the error of the same autograd   to the input dtype and keeps
                                           run in the input dtype, + the atol     everything else in fp32; the
                                           floor of TOLERANCES[dtype]             naive run rounds every step.
  channels outside the slice    any        bit-identical                          the kernel must not write there.
  repeated calls                any        bit-identical                          no atomics, fixed sum order.
"""

from __future__ import annotations

import pytest
import torch

from densenet_fast.reference import bn_relu_conv1x1_ref, channel_stats_ref
from helpers import every_tile_test, gpu_tiles, skip_module_unless_triton_runs, tile_id, triton_device, triton_gpu_only

skip_module_unless_triton_runs()

# Float32 results are held to IEEE tolerances: no TF32 in the dots on a GPU (conftest.ieee_fp32).
pytestmark = pytest.mark.usefixtures("ieee_fp32")

from densenet_fast.triton_kernels import conv1x1_backward as backward_module  # noqa: E402
from densenet_fast.triton_kernels.conv1x1_backward import bn_relu_conv1x1_backward_triton  # noqa: E402
from tolerances import assert_close, assert_within_naive_error  # noqa: E402

DEVICE = triton_device()
GPU_ONLY = triton_gpu_only()
# The interpreter has no bfloat16.
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=GPU_ONLY)]
LAYOUTS = ["nchw", "channels_last"]
EPS = 1e-5

# (name, block buffer shape (N, C_buf, H, W), C = channels of the prefix x = F[:, :C], B)
CASES = [
    # C = 37: three 16-wide channel tiles, the last one ragged; the buffer is wider (40), so x's
    # strides are the buffer's. B = 24 is padded to a 32-wide bottleneck tile. 5x7 images, batch 2:
    # 70 rows = three row programs of 32 (two tiles each), the last one ragged.
    ("prefix37_b24", (2, 40, 5, 7), 37, 24),
    # batch 1, C = 20 (not a multiple of 8), B = 16: exactly one bottleneck tile.
    ("prefix20_batch1_b16", (1, 24, 5, 7), 20, 16),
    # 1x1 images: M = 3 rows, fewer than one tile; C = 13 is less than one channel tile.
    ("prefix13_1x1_b24", (3, 16, 1, 1), 13, 24),
]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _reference(x, grad_out, weight, mean, var, gamma, beta, batch_stats: bool):
    """Autograd of bn_relu_conv1x1_ref in the dtype of its arguments: (dx, dgamma, dbeta, dweight).

    batch_stats=True: mean and (biased) variance of x computed inside the graph (training-mode BN);
    False: `mean`, `var` are constants.
    """
    xr, g, b, w = (t.detach().clone().requires_grad_() for t in (x, gamma, beta, weight))
    if batch_stats:
        mean = xr.mean(dim=(0, 2, 3))
        var = (xr - mean[None, :, None, None]).pow(2).mean(dim=(0, 2, 3))
    out = bn_relu_conv1x1_ref(xr, mean, var, g, b, EPS, w)
    out.backward(grad_out.to(out.dtype))
    return xr.grad, g.grad, b.grad, w.grad


def _problem(shape, c: int, b: int, layout: str, dtype: torch.dtype, batch_stats: bool, seed: int):
    """Random data shaped like a dense layer's norm1/conv1 in the block: returns a dict."""
    g = torch.Generator().manual_seed(seed)
    n, c_buf, h, w = shape
    buf = _layout((torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 0.3).to(dtype), layout).to(DEVICE)
    x = buf[:, :c]
    mean, var = channel_stats_ref(x)
    if not batch_stats:  # running statistics, different from the batch's
        mean = mean + 0.2 * torch.randn(c, generator=g, dtype=torch.float64).to(DEVICE)
        var = var * (0.5 + torch.rand(c, generator=g, dtype=torch.float64).to(DEVICE))
    gamma = torch.rand(c, generator=g, dtype=torch.float64).to(DEVICE) + 0.5
    beta = torch.randn(c, generator=g, dtype=torch.float64).to(DEVICE) * 0.2
    weight = (torch.randn(b, c, 1, 1, generator=g, dtype=torch.float64) / c ** 0.5).to(DEVICE)
    grad_out = _layout(torch.randn(n, b, h, w, generator=g, dtype=torch.float64), layout).to(DEVICE)
    # The gradient buffer G: wider than the prefix, pre-filled (later layers' contributions).
    gbuf = _layout(torch.randn(n, c_buf, h, w, generator=g, dtype=torch.float64), layout).float().to(DEVICE)
    return dict(x=x, mean=mean, var=var, gamma=gamma, beta=beta, weight=weight, grad_out=grad_out, gbuf=gbuf)


def _run(p, x, grad_out, weight, grad_x_acc, batch_stats: bool):
    invstd = torch.rsqrt(p["var"] + EPS)
    return bn_relu_conv1x1_backward_triton(grad_out, x, weight, p["mean"].float(), invstd.float(),
                                           p["gamma"].float(), p["beta"].float(), batch_stats, grad_x_acc)


def _check(fast, x, grad_out, weight, p, batch_stats: bool, name: str) -> None:
    """fast = (dx, dgamma, dbeta, dweight) against float64 autograd (and the naive low-precision
    run for fp16/bf16 data), by the rules of the module docstring."""
    exact = _reference(x.double(), grad_out.double(), weight.double(), p["mean"], p["var"], p["gamma"],
                       p["beta"], batch_stats)
    names = ("dx", "dgamma", "dbeta", "dweight")
    if x.dtype == torch.float32:
        for f, e, q in zip(fast, exact, names):
            assert_close(f, e, torch.float32, f"{name} {q}")
        return
    lp = x.dtype
    naive = _reference(x, grad_out.to(lp), weight.to(lp), p["mean"].to(lp), p["var"].to(lp), p["gamma"].to(lp),
                       p["beta"].to(lp), batch_stats)
    for f, nv, e, q in zip(fast, naive, exact, names):
        assert_within_naive_error(f, nv, e, lp, f"{name} {q}")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch_stats", "fixed_stats"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,shape,c,b", CASES, ids=[case[0] for case in CASES])
def test_conv1x1_backward(name, shape, c, b, layout, dtype, batch_stats):
    p = _problem(shape, c, b, layout, dtype, batch_stats, seed=1)
    x, weight, grad_out = p["x"], p["weight"].to(dtype), p["grad_out"].to(dtype)
    gbuf = p["gbuf"]
    before = gbuf.clone()
    grad_gamma, grad_beta, grad_weight = _run(p, x, grad_out, weight, gbuf[:, :c], batch_stats)

    assert grad_gamma.dtype == torch.float32 and grad_beta.dtype == torch.float32
    assert grad_gamma.shape == (c,) and grad_beta.shape == (c,)
    assert grad_weight.shape == weight.shape and grad_weight.dtype == weight.dtype
    assert torch.equal(gbuf[:, c:], before[:, c:]), "channels outside grad_x_acc were written"
    dx = gbuf[:, :c].double() - before[:, :c].double()
    _check((dx, grad_gamma, grad_beta, grad_weight), x, grad_out, weight, p, batch_stats,
           f"{name} {layout} {dtype} batch_stats={batch_stats}")


_M = backward_module


TILES = gpu_tiles(_M.CONFIGS_REDUCE_SM90, _M.CONFIGS_REDUCE_SM80, _M.CONFIGS_REDUCE_FMA, _M.CONFIGS_DX_SM90,
                  _M.CONFIGS_DX_SM80, _M.CONFIGS_DX_FMA, [_M.SAFE_CONFIG])


@every_tile_test("tile", TILES, [tile_id(t) for t in TILES])
def test_every_gpu_tile(monkeypatch, tile, layout, dtype):
    # Both passes on each tile of either pass's lists (masks and loop bounds follow BLOCK_M and
    # BLOCK_C), which the interpreter's 16-wide default never exercises. M = 2*13*13 = 338 rows in
    # programs of as many rows as on a GPU: ROW_ALIGN in NCHW (256 and a ragged 82), SMALL_ROW_ALIGN
    # in channels_last (five of 64 and a ragged 18; the 128- and 256-row tiles then straddle their
    # program's end, where the kernels mask them). C = 73 of an 80-channel buffer: ragged against
    # every BLOCK_C. B = 48 in a 64-wide BLOCK_B. Training statistics in fp32, fixed ones in fp16
    # (both passes' other branch).
    monkeypatch.setattr(backward_module, "INTERPRET_CONFIG", tile)
    rows = backward_module.ROW_ALIGN if layout == "nchw" else backward_module.SMALL_ROW_ALIGN
    monkeypatch.setattr(backward_module, "INTERPRET_ROWS_PER_PROG", rows)
    batch_stats = dtype == torch.float32
    c = 73
    p = _problem((2, 80, 13, 13), c, 48, layout, dtype, batch_stats, seed=12)
    x, weight, grad_out = p["x"], p["weight"].to(dtype), p["grad_out"].to(dtype)
    before = p["gbuf"].clone()
    grads = _run(p, x, grad_out, weight, p["gbuf"][:, :c], batch_stats)
    assert torch.equal(p["gbuf"][:, c:], before[:, c:]), "channels outside grad_x_acc were written"
    dx = p["gbuf"][:, :c].double() - before[:, :c].double()
    _check((dx, *grads), x, grad_out, weight, p, batch_stats, f"tile {tile_id(tile)} {layout} {dtype}")


SPLIT_CASES = [  # (M, C, B, element size): DenseNet-BC-100's and DenseNet-121's layers, batch 64 and less
    (m, c, b, elem) for m, c, b in [(65536, 24, 48), (65536, 216, 48), (16384, 512, 48), (4096, 256, 48),
                                    (4096, 512, 48), (200704, 256, 128), (12544, 1024, 128), (3136, 1024, 128),
                                    (392, 1024, 128), (3136, 2208, 192), (338, 73, 48), (32, 40, 48), (1, 8, 16)]
    for elem in (4, 2)]


@pytest.mark.parametrize("sms", [132, 108, 1])
@pytest.mark.parametrize("m,c,b,elem", SPLIT_CASES)
def test_row_split(m, c, b, elem, sms):
    """The compiled launcher's row split (GPU only; the interpreter uses fixed programs): every row
    in exactly one program; rows per program a multiple of SMALL_ROW_ALIGN, and of ROW_ALIGN above
    2 * ROW_ALIGN; the programs' count bounded by the SM target, min_rows and pass 1's workspace
    cap. Small problems split finely: at DenseNet-BC-100's 8x8 block (M = 4,096) on an H100/H200,
    where rows of 256/512 left both passes latency-bound at 35-40 us (2026-11-27 autotuning log),
    each pass now runs at least 32 row programs (132 SMs)."""
    split = backward_module.row_split
    cdiv = backward_module.cdiv
    ws_parts = max(1, m * elem // (4 * (b + 2)))
    for pps, min_rows, cap in ((2, backward_module.PASS1_MIN_ROWS, ws_parts), (4, backward_module.PASS2_MIN_ROWS, 0)):
        rows, parts = split(m, c, sms, pps, min_rows, cap)
        assert parts == cdiv(m, rows) and (parts - 1) * rows < m <= parts * rows, (rows, parts)
        assert rows % backward_module.SMALL_ROW_ALIGN == 0, rows
        assert rows <= 2 * backward_module.ROW_ALIGN or rows % backward_module.ROW_ALIGN == 0, rows
        target = max(1, min(cdiv(pps * sms, cdiv(c, 64)), cdiv(m, min_rows), cap or m))
        assert parts <= target, (parts, target)
        # rounding the rows up to the alignment loses at most half of the target's programs
        assert parts >= target // 2 or rows == backward_module.SMALL_ROW_ALIGN, (parts, target, rows)
        if cap:  # pass 1's float32 workspace: within x's bytes, or a single program
            assert parts == 1 or parts * (b + 2) * c * 4 <= m * c * elem, (parts, m, c, b, elem)
        if m == 4096 and sms == 132:
            assert parts >= 32, (pps, parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_strides_and_dtypes(dtype):
    # Each operand in its own layout and at its own offset, as the block may hand them over:
    # x a channels_last prefix; dBt float32 (the fp32 gradient of an fp16 block), NCHW, a channel
    # slice of a wider tensor; weight a float32 (B, C) master copy; grad_x_acc an NCHW slice at an
    # unaligned channel offset of a wider buffer.
    c, b = 20, 16
    p = _problem((2, 24, 5, 7), c, b, "channels_last", dtype, True, seed=2)
    x = p["x"]
    g = torch.Generator().manual_seed(3)
    go_buf = torch.randn(2, b + 9, 5, 7, generator=g, dtype=torch.float32).to(DEVICE)
    grad_out = go_buf[:, 5:5 + b]
    weight = p["weight"].float().view(b, c)
    gbuf = torch.randn(2, c + 7, 5, 7, generator=g, dtype=torch.float32).to(DEVICE)
    before = gbuf.clone()
    grad_gamma, grad_beta, grad_weight = _run(p, x, grad_out, weight, gbuf[:, 3:3 + c], True)

    assert grad_weight.shape == (b, c) and grad_weight.dtype == torch.float32
    assert torch.equal(gbuf[:, :3], before[:, :3]) and torch.equal(gbuf[:, 3 + c:], before[:, 3 + c:])
    dx = gbuf[:, 3:3 + c].double() - before[:, 3:3 + c].double()
    _check((dx, grad_gamma, grad_beta, grad_weight.view(b, c, 1, 1)), x, grad_out, weight.view(b, c, 1, 1), p,
           True, f"mixed strides {dtype}")


def test_weight_2d_and_4d_agree_and_deterministic():
    c, b = 13, 24
    p = _problem((2, 16, 5, 7), c, b, "channels_last", torch.float32, True, seed=4)
    weight4 = p["weight"].float()
    grad_out = p["grad_out"].float()
    results = []
    for weight in (weight4, weight4.view(b, c), weight4):
        gbuf = p["gbuf"].clone()
        grads = _run(p, p["x"], grad_out, weight, gbuf[:, :c], True)
        assert grads[2].shape == weight.shape
        results.append((gbuf, grads[0], grads[1], grads[2].reshape(b, c)))
    for other in results[1:]:
        for t, u in zip(results[0], other):
            assert torch.equal(t, u), "repeated calls (2-D vs 4-D weight) differ in some bits"


def test_custom_op_opcheck_and_compile():
    c, b = 13, 16
    p = _problem((1, 16, 5, 7), c, b, "channels_last", torch.float32, True, seed=5)
    op = torch.ops.densenet_fast.triton_bn_relu_conv1x1_backward
    invstd = torch.rsqrt(p["var"] + EPS).float()
    bn = (p["mean"].float(), invstd, p["gamma"].float(), p["beta"].float())
    weight, grad_out = p["weight"].float(), p["grad_out"].float()
    for batch_stats in (True, False):
        args = (grad_out, p["x"], weight, *bn, batch_stats, p["gbuf"].clone()[:, :c])
        torch.library.opcheck(op.default, args)

    # torch.compile traces the op through its fake (aot_eager keeps this fast on a CPU) and keeps
    # the in-place accumulation.
    def f(grad_out, x, weight, mean, invstd, gamma, beta, gbuf):
        return op(grad_out, x, weight, mean, invstd, gamma, beta, True, gbuf[:, :c])

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    g1, g2 = p["gbuf"].clone(), p["gbuf"].clone()
    got, want = compiled(grad_out, p["x"], weight, *bn, g1), f(grad_out, p["x"], weight, *bn, g2)
    for i, (t, u) in enumerate(zip(got, want)):
        assert torch.equal(t, u), f"output {i} of the compiled function differs"
    assert torch.equal(g1, g2), "the compiled function accumulated differently"


def test_errors_name_the_tensor():
    n, c, h, w, b = 2, 12, 5, 7, 16
    x = torch.randn(n, c, h, w, device=DEVICE)
    weight = torch.randn(b, c, device=DEVICE)
    grad_out = torch.randn(n, b, h, w, device=DEVICE)
    bn = [torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE), torch.ones(c, device=DEVICE),
          torch.zeros(c, device=DEVICE)]
    gx = torch.zeros(n, c, h, w, device=DEVICE)

    def call(grad_out=grad_out, x=x, weight=weight, bn=bn, batch_stats=True, gx=gx):
        return bn_relu_conv1x1_backward_triton(grad_out, x, weight, *bn, batch_stats, gx)

    with pytest.raises(ValueError, match="x must have 4 dims .*got 3"):
        call(x=x[0])
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        call(x=x.long())
    with pytest.raises(ValueError, match=r"invstd must have shape \(12,\)"):
        call(bn=[bn[0], torch.ones(11, device=DEVICE), bn[2], bn[3]])
    with pytest.raises(TypeError, match="gamma must be float32, got torch.float16"):
        call(bn=[bn[0], bn[1], bn[2].half(), bn[3]])
    with pytest.raises(ValueError, match=r"weight must have shape \(B, 12\) or \(B, 12, 1, 1\)"):
        call(weight=torch.randn(b, 13, device=DEVICE))
    with pytest.raises(ValueError, match=r"grad_out must have shape \[2, 16, 5, 7\]"):
        call(grad_out=torch.randn(n, b + 1, h, w, device=DEVICE))
    with pytest.raises(TypeError, match=r"grad_out must be x's dtype \(torch.float16\) or float32, got torch.bfloat16"):
        call(x=x.half(), grad_out=grad_out.bfloat16())
    with pytest.raises(ValueError, match=r"grad_x_acc must have x's shape \[2, 12, 5, 7\]"):
        call(gx=torch.zeros(n, c + 1, h, w, device=DEVICE))
    with pytest.raises(TypeError, match="grad_x_acc must be float32 .*got torch.float16"):
        call(gx=gx.half())
    with pytest.raises(ValueError, match="grad_x_acc must not be an expanded tensor"):
        call(gx=torch.zeros(1, c, h, w, device=DEVICE).expand(n, c, h, w))
    with pytest.raises(TypeError, match="batch_stats must be a bool, got int"):
        call(batch_stats=1)
    assert torch.count_nonzero(gx) == 0, "a rejected call touched grad_x_acc"


# --------------------------------------------------------------------------------------------
# GPU only: autotuned configurations (each benchmarked, the accumulator restored) on real sizes
# --------------------------------------------------------------------------------------------


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c,b", [(372, 128), (100, 192)], ids=["late_layer_b128", "densenet161_b192"])
def test_conv1x1_backward_autotuned(c, b, layout, dtype):
    # A late layer of a wide block (C = 372 of a 400-channel buffer, bottleneck 128) and
    # densenet161's bottleneck (B = 192, padded to a 256-wide tile): many row programs, every
    # config benchmarked on the first call. If autotuning did not restore grad_x_acc, dx would
    # be accumulated once per benchmark run and fail the dx check.
    p = _problem((8, c + 28, 16, 16), c, b, layout, dtype, True, seed=6)
    x, weight, grad_out = p["x"], p["weight"].to(dtype), p["grad_out"].to(dtype)
    gbuf = p["gbuf"]
    before = gbuf.clone()
    grads = _run(p, x, grad_out, weight, gbuf[:, :c], True)
    assert torch.equal(gbuf[:, c:], before[:, c:])
    dx = gbuf[:, :c].double() - before[:, :c].double()
    _check((dx, *grads), x, grad_out, weight, p, True, f"autotuned C={c} B={b} {layout} {dtype}")
