"""Tests of the standalone Triton kernels (densenet_fast.triton_kernels): channel_stats and the fused
BN-ReLU-Conv1x1 with its output statistics.

Without a GPU they run on CPU tensors through triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before any test module imports the kernels (@triton.jit reads it when it
decorates). With a GPU the same tests run on CUDA with the compiled, autotuned kernels, plus the
bf16 and autotuning tests marked below. Shapes are tiny because the interpreter runs every
program in Python, one after another. The interpreter runs one fixed 16-wide tile; the tiles of
the GPU config lists run in it too, in the every_gpu_tile tests (here and in the other kernels'
test files).

Tolerance policy (style.md, "Tests"). Every result is compared with a float64 reference
(densenet_fast.reference.*_ref on the same data upcast), and low-precision GEMM outputs also with
the reference run in the input dtype:

  quantity                   dtype       rule                                 why
  -------------------------  ----------  -----------------------------------  -----------------------------------
  stats mean                 any input   |err| <= 16 eps32 max|x|             fp32 sums of exactly-read data
                                                                              (fp16 widens to fp32 exactly);
                                                                              16 ulp of the largest value covers
                                                                              the summation order of M values.
  stats var                  any input   |err| <= 16 eps32 (1 + |mean|/std)   a stable (two-pass/Chan) variance
                                                 * var                        loses only ~eps * |mean|/std
                                                                              relative (the rounding of the
                                                                              tile means); E[x^2]-E[x]^2 would
                                                                              lose eps * (mean/std)^2.
  GEMM out                   float32     tolerances.TOLERANCES[float32]       K <= 40 fp32 products, ieee dot
                                         (1e-5 max|ref|, rtol 1e-4)           (no TF32): ~K eps of the max.
  GEMM out                   fp16/bf16   tolerances.assert_within_naive_      the kernel rounds BN-ReLU once to
                                         error: <= 2x the error of the        the input dtype and accumulates in
                                         reference run in the input dtype     fp32; the reference rounds every
                                         + atol floor of TOLERANCES[dtype]    step, so 2x its error is generous.
  stats of the GEMM output   any         the stats rule above, against the    the epilogue sees the rounded
                                         float64 stats of the stored output   values that are stored.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from densenet_fast.reference import bn_relu_conv1x1_ref, channel_stats_ref
from helpers import (assert_close_report, every_tile_test, gpu_tiles, skip_module_unless_triton_runs, tile_id,
                     triton_device, triton_gpu_only)

skip_module_unless_triton_runs()

# Float32 results are held to IEEE tolerances: no TF32 in the dots on a GPU (conftest.ieee_fp32).
pytestmark = pytest.mark.usefixtures("ieee_fp32")

from densenet_fast.triton_kernels import bn_relu_conv1x1 as conv1x1_module  # noqa: E402
from densenet_fast.triton_kernels.bn_relu_conv1x1 import bn_relu_conv1x1_triton  # noqa: E402
from densenet_fast.triton_kernels.channel_stats import channel_stats_triton  # noqa: E402
from builders import seeded_buffer  # noqa: E402
from tolerances import assert_close, assert_within_naive_error  # noqa: E402

DEVICE = triton_device()
GPU_ONLY = triton_gpu_only()
# The interpreter has no bfloat16.
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=GPU_ONLY)]
LAYOUTS = ["nchw", "channels_last"]
EPS32 = torch.finfo(torch.float32).eps

# (name, buffer shape (N, C_buf, H, W), channel slice) -- what real block buffers look like.
SLICES = [
    # a slice at an unaligned offset of a wider buffer (a middle layer's new channels): the base
    # pointer is not 16-byte aligned and the strides belong to the 40-channel buffer
    ("slice13_25", (2, 40, 5, 7), slice(13, 25)),
    # the channel prefix F[:, :24] (what norm1 of a layer reads), odd 5x7 image: ragged row tiles
    ("prefix24", (2, 40, 5, 7), slice(0, 24)),
    # batch 1, 13 channels (not a multiple of 8 or of the 16-wide channel tile), whole tensor
    ("whole13_batch1", (1, 13, 5, 7), slice(0, 13)),
]


def _buffer(shape, layout: str, dtype: torch.dtype, seed: int, loc: float = 0.0, spread: float = 1.0):
    return seeded_buffer(shape, layout, dtype, seed, DEVICE, loc, spread)


def _assert_stats(mean, var, x, name: str) -> None:
    """The stats rule of the module docstring, against channel_stats_ref(x) (float64)."""
    assert mean.dtype == torch.float32 and var.dtype == torch.float32, (mean.dtype, var.dtype)
    ref_mean, ref_var = channel_stats_ref(x)
    mean_atol = 16 * EPS32 * float(x.detach().double().abs().max())
    assert_close_report(mean, ref_mean, atol=mean_atol, rtol=0.0, name=f"{name} mean")
    std = ref_var.sqrt().clamp_min(1e-30)
    allowed = 16 * EPS32 * (1 + ref_mean.abs() / std) * ref_var
    # assert_close_report takes a scalar atol: compare the variance relative to its allowance.
    assert_close_report(var.double() / allowed.clamp_min(1e-300), ref_var / allowed.clamp_min(1e-300),
                        atol=1.0, rtol=0.0, name=f"{name} var (in units of its allowance)")


# --------------------------------------------------------------------------------------------
# channel_stats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,shape,channels", SLICES, ids=[s[0] for s in SLICES])
def test_channel_stats(name, shape, channels, layout, dtype):
    x = _buffer(shape, layout, dtype, seed=1, loc=0.5, spread=2.0)[:, channels]
    mean, var = channel_stats_triton(x)
    assert mean.shape == (x.shape[1],) and var.shape == (x.shape[1],)
    _assert_stats(mean, var, x, f"channel_stats {name} {layout} {dtype}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_channel_stats_stable_when_mean_is_1000x_spread(layout):
    # dense_block.md: "inputs whose mean is 1000x their spread must work". 1000 + N(0, 1).
    x = _buffer((2, 40, 5, 7), layout, torch.float32, seed=2, loc=1000.0, spread=1.0)[:, 13:25]
    mean, var = channel_stats_triton(x)
    _assert_stats(mean, var, x, f"channel_stats 1000x {layout}")
    # The case is hard: the textbook E[x^2] - E[x]^2 in fp32 is far outside the allowance.
    x32 = x.float()
    naive_var = (x32 * x32).mean(dim=(0, 2, 3)) - x32.mean(dim=(0, 2, 3)) ** 2
    _, ref_var = channel_stats_ref(x)
    assert float(((naive_var.double() - ref_var) / ref_var).abs().max()) > 16 * EPS32 * 1001


def test_channel_stats_deterministic():
    x = _buffer((2, 40, 5, 7), "channels_last", torch.float32, seed=3)[:, 13:25]
    first = channel_stats_triton(x)
    second = channel_stats_triton(x)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_channel_stats_custom_op():
    x = _buffer((2, 40, 5, 7), "channels_last", torch.float32, seed=4)[:, 13:25]
    mean, var = torch.ops.densenet_fast.triton_channel_stats(x)
    _assert_stats(mean, var, x, "triton_channel_stats op")
    torch.library.opcheck(torch.ops.densenet_fast.triton_channel_stats.default, (x,))


# --------------------------------------------------------------------------------------------
# bn_relu_conv1x1
# --------------------------------------------------------------------------------------------


def _bn_params(x, seed: int):
    """Batch statistics of x and random affine parameters; returns the float64 pieces for the
    reference and the (scale, shift) float32 pair the kernel takes."""
    k = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    mean, var = channel_stats_ref(x)
    gamma = torch.rand(k, generator=g, dtype=torch.float64).to(x.device) + 0.5
    beta = torch.randn(k, generator=g, dtype=torch.float64).to(x.device) * 0.2
    eps = 1e-5
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    return (mean, var, gamma, beta, eps), scale.float(), shift.float()


def _check_bn_relu_conv1x1(x, cout: int, seed: int, name: str) -> None:
    g = torch.Generator().manual_seed(seed + 100)
    weight = (torch.randn(cout, x.shape[1], 1, 1, generator=g, dtype=torch.float64)
              / x.shape[1] ** 0.5).to(x.device)
    bn, scale, shift = _bn_params(x, seed)
    out, mean, var = bn_relu_conv1x1_triton(x, scale, shift, weight.to(x.dtype))

    assert out.shape == (x.shape[0], cout, *x.shape[2:]) and out.dtype == x.dtype
    channels_last = x.stride(1) == 1
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    # The reference sees the data as stored in x's dtype and the weight as rounded to it.
    exact = bn_relu_conv1x1_ref(x.double(), *bn, weight.to(x.dtype).double())
    if x.dtype == torch.float32:
        assert_close(out, exact, torch.float32, f"{name} out")
    else:
        naive = bn_relu_conv1x1_ref(x, *(t.to(x.dtype) if torch.is_tensor(t) else t for t in bn),
                                    weight.to(x.dtype))
        assert_within_naive_error(out, naive, exact, x.dtype, f"{name} out")
    _assert_stats(mean, var, out, f"{name} stats of out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,shape,channels", SLICES, ids=[s[0] for s in SLICES])
@pytest.mark.parametrize("cout", [12, 24, 13])
def test_bn_relu_conv1x1(cout, name, shape, channels, layout, dtype):
    # cout 12/24: growth rates; 13: not a multiple of the 16-wide column tile.
    x = _buffer(shape, layout, dtype, seed=5, loc=0.3, spread=1.5)[:, channels]
    _check_bn_relu_conv1x1(x, cout, seed=6, name=f"bn_relu_conv1x1 {name} {layout} {dtype} cout={cout}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_relu_conv1x1_without_stats_writes_the_same_output(layout):
    # stats=False is the backward's recompute of Bt: the same GEMM, the statistics epilogue and
    # its merge skipped.  The output must be the stats=True output bit for bit (the backward's
    # ReLU masks and gradients are computed from it).
    x = _buffer((2, 40, 5, 7), layout, torch.float32, seed=8)[:, 3:27]
    _, scale, shift = _bn_params(x, seed=8)
    weight = torch.randn(13, 24, 1, 1, dtype=torch.float32, device=x.device)
    out, mean, var = bn_relu_conv1x1_triton(x, scale, shift, weight)
    again, no_mean, no_var = bn_relu_conv1x1_triton(x, scale, shift, weight, stats=False)
    assert no_mean is None and no_var is None and mean is not None
    assert again.stride() == out.stride()
    assert torch.equal(again, out)


def test_bn_relu_conv1x1_accepts_2d_weight_and_matches_4d():
    x = _buffer((2, 40, 5, 7), "nchw", torch.float32, seed=7)[:, :24]
    _, scale, shift = _bn_params(x, seed=7)
    weight = torch.randn(12, 24, 1, 1, dtype=torch.float32, device=x.device)
    a = bn_relu_conv1x1_triton(x, scale, shift, weight)
    b = bn_relu_conv1x1_triton(x, scale, shift, weight.view(12, 24))
    for t, u in zip(a, b):
        assert torch.equal(t, u)


def test_bn_relu_conv1x1_custom_op_and_compile():
    x = _buffer((1, 40, 5, 7), "channels_last", torch.float32, seed=8)[:, 13:25]
    _, scale, shift = _bn_params(x, seed=8)
    weight = torch.randn(12, 12, dtype=torch.float32, device=x.device)
    op = torch.ops.densenet_fast.triton_bn_relu_conv1x1
    torch.library.opcheck(op.default, (x, scale, shift, weight))

    # torch.compile traces both ops through their fake implementations (aot_eager keeps this
    # fast on a CPU; inductor treats custom ops as opaque calls in the same way).
    def f(x, scale, shift, weight):
        out, mean, var = op(x, scale, shift, weight)
        m2, v2 = torch.ops.densenet_fast.triton_channel_stats(out)
        return out, mean, var, m2, v2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(x, scale, shift, weight), f(x, scale, shift, weight)
    for i, (t, u) in enumerate(zip(got, want)):
        assert torch.equal(t, u), f"output {i} of the compiled function differs"
    assert got[0].stride() == want[0].stride()


# --------------------------------------------------------------------------------------------
# Errors name the tensor
# --------------------------------------------------------------------------------------------


def test_errors_name_the_tensor():
    # on the test device: on a GPU a CPU tensor would be refused for its device before its shape
    x = torch.randn(2, 12, 5, 7, device=DEVICE)
    scale, shift = torch.ones(12, device=DEVICE), torch.zeros(12, device=DEVICE)
    weight = torch.randn(24, 12, device=DEVICE)
    with pytest.raises(ValueError, match="x must have 4 dims .*got 3"):
        channel_stats_triton(x[0])
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int32"):
        channel_stats_triton(x.to(torch.int32))
    with pytest.raises(ValueError, match="x must have 4 dims .*got 3"):
        bn_relu_conv1x1_triton(x[0], scale, shift, weight)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16, got torch.int64"):
        bn_relu_conv1x1_triton(x.long(), scale, shift, weight)
    with pytest.raises(ValueError, match=r"scale must have shape \(12,\)"):
        bn_relu_conv1x1_triton(x, torch.ones(11, device=DEVICE), shift, weight)
    with pytest.raises(TypeError, match="shift must be float32, got torch.float16"):
        bn_relu_conv1x1_triton(x, scale, shift.half(), weight)
    with pytest.raises(ValueError, match=r"weight must have shape \(Cout, 12\)"):
        bn_relu_conv1x1_triton(x, scale, shift, torch.randn(24, 13, device=DEVICE))


# --------------------------------------------------------------------------------------------
# Every GPU tile in the interpreter
# --------------------------------------------------------------------------------------------


TILES_1X1 = gpu_tiles(conv1x1_module.CONFIGS_SM90, conv1x1_module.CONFIGS_SM80, conv1x1_module.CONFIGS_FMA)


@every_tile_test("tile", TILES_1X1, [tile_id(t) for t in TILES_1X1])
def test_bn_relu_conv1x1_every_gpu_tile(monkeypatch, tile, layout, dtype):
    # The tiles a GPU runs (masks and loop bounds follow BLOCK_M/N/K), which the interpreter's
    # 16-wide default never exercises. M = 2*13*13 = 338 rows: two row tiles of the widest
    # (256), the second ragged. C = 37 channels at offset 5 of a 44-channel buffer: a full and a
    # partial 32-wide K step, or one partial 64-wide one. Cout = 48: narrower than every BLOCK_N.
    monkeypatch.setattr(conv1x1_module, "INTERPRET_CONFIG", tile)
    x = _buffer((2, 44, 13, 13), layout, dtype, seed=21, loc=0.3, spread=1.5)[:, 5:42]
    _check_bn_relu_conv1x1(x, 48, seed=22, name=f"tile {tile_id(tile)} {layout} {dtype}")


# --------------------------------------------------------------------------------------------
# GPU only: autotuned configurations on realistic sizes
# --------------------------------------------------------------------------------------------


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bn_relu_conv1x1_autotuned_block_sizes(layout, dtype):
    # A late layer of a wide block: K = 372 channels read from a 400-channel buffer, bottleneck
    # width 48, 32x32 images: many row tiles, several K steps, every config benchmarked.
    x = _buffer((8, 400, 32, 32), layout, dtype, seed=9)[:, :372]
    _check_bn_relu_conv1x1(x, 48, seed=9, name=f"autotuned {layout} {dtype}")
    stats_x = _buffer((8, 400, 32, 32), layout, dtype, seed=10, loc=1000.0)[:, 13:372]
    mean, var = channel_stats_triton(stats_x)
    _assert_stats(mean, var, stats_x, f"channel_stats large {layout} {dtype}")


class _FakeTuner:
    """What _logged uses of triton's Autotuner: run, cache, configs_timings, base_fn."""

    def __init__(self, timed=True):
        self.cache, self.timed, self.runs = {}, timed, 0
        self.base_fn = types.SimpleNamespace(__name__="_fake_kernel")

    def run(self, m, **kwargs):
        self.runs += 1
        if (m,) not in self.cache:
            if self.timed:
                self.configs_timings = {"BLOCK_M: 64, num_warps: 8": 0.5, "BLOCK_M: 64, num_warps: 4": 0.75}
            self.cache[(m,)] = "BLOCK_M: 64, num_warps: 8"
        return m * 2


def test_autotune_log_appends_one_line_per_new_tuning(tmp_path):
    from densenet_fast.triton_kernels import _logged
    path = tmp_path / "autotune.jsonl"
    tuner = _logged(_FakeTuner(), str(path))
    assert [tuner.run(3), tuner.run(3), tuner.run(5)] == [6, 6, 10] and tuner.runs == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["key"] for r in lines] == [["3"], ["5"]]  # the second run of key 3 used the tuner's cache
    assert lines[0] == {"kernel": "_fake_kernel", "key": ["3"], "best": "BLOCK_M: 64, num_warps: 8",
                        "ms": {"BLOCK_M: 64, num_warps: 8": 0.5, "BLOCK_M: 64, num_warps: 4": 0.75}}
    # a choice made without timing (one config left after pruning): no timings, not the last tuning's
    untimed = _logged(_FakeTuner(timed=False), str(path))
    untimed.configs_timings = {"stale": 1.0}
    untimed.run(7)
    assert json.loads(path.read_text().splitlines()[-1])["ms"] is None


@pytest.mark.parametrize("arch", ["sm90", "sm80"])
def test_float32_nchw_operands_get_single_stage_tiles_first(monkeypatch, arch):
    """Float32 NCHW data with TF32 dots, where pipelined tiles stage through an unswizzled shared
    buffer (triton_kernels.NCHW_FP32), selects each affected kernel's list with an unpipelined
    tile first, which still holds every config of the architecture's list; other data, and IEEE
    dots, keep config_list's choice. tests/test_triton_compile.py checks what those defaults compile to."""
    import densenet_fast.triton_kernels as tk
    from densenet_fast.triton_kernels import conv1x1_backward, conv3x3, transition

    monkeypatch.setattr(tk, "device_arch", lambda device: arch)
    buf = torch.randn(2, 40, 5, 7)
    cl = buf.to(memory_format=torch.channels_last)
    nchw = arch + tk.NCHW_FP32
    assert tk.nchw_fp32_list(buf[:, 8:24], "tf32") == nchw
    assert tk.nchw_fp32_list(cl[:, 8:24], "tf32") == arch
    assert tk.nchw_fp32_list(buf.half(), "tf32") == arch
    assert tk.nchw_fp32_list(buf.half(), "tf32", buf[:, :3]) == nchw  # a float32 NCHW gradient beside it
    assert tk.nchw_fp32_list(cl.half(), "tf32", cl[:, :3]) == arch
    assert tk.nchw_fp32_list(buf, "ieee") == "fma"
    # the wgrad also for a 16-wide float32 gradient tile beside 16-bit x (triton 3.8 on sm_90)
    staged = arch == "sm90" and conv3x3._GRAD_TILE_STAGED_BADLY
    assert conv3x3.wgrad_config_list(cl.half()[:, :8], cl[:, :3], "tf32", 16) == (nchw if staged else arch)
    assert conv3x3.wgrad_config_list(cl.half()[:, :8], cl[:, :3], "tf32", 32) == arch
    assert conv3x3.wgrad_config_list(cl.half()[:, :8], cl.half()[:, :3], "tf32", 16) == arch
    lists = {"3x3 forward": conv3x3._TUNED_FWD, "3x3 wgrad": conv3x3._TUNED_WGRAD,
             "transition forward": transition._FWD_TUNED, "transition wgrad": transition._WGRAD_TUNED,
             "1x1 backward, pass 1": {name: conv1x1_backward._tuned("reduce", name, 64, 4, 1 << 20)
                                      for name in (arch, nchw)}}
    for kernel, tuned in lists.items():
        base, first = [str(c) for c in tuned[arch].configs], [str(c) for c in tuned[nchw].configs]
        assert tuned[nchw].configs[0].num_stages == 1, (kernel, first)
        if tk.AUTOTUNE:  # else each list holds its first config only
            assert set(base) <= set(first), (kernel, sorted(set(base) - set(first)))
