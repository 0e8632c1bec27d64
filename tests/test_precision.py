"""The float32 precision policy (densenet_fast.ops.precision): the GEMMs and Triton dots that stand
in for convolutions use TF32 exactly when cuDNN's float32 convolutions may, as the nn.Conv2d they
replace would.

CPU: how the flag is read (torch's per-backend precision settings with "none" inheriting), the
matmul flag set around a float32 CUDA operand's GEMMs and restored, and that the GEMM entry points
and every Triton launcher ask the policy.  GPU (skipped without one): a float32 1x1 conv of the
torch/cuda backends' GEMM and of the Triton kernel is IEEE-accurate when cuDNN is set to "ieee"
(|err| <= 1e-5 * max|ref|, K = 256 products) and shows TF32's rounding when cuDNN may use TF32
(the error exceeds that bound while staying within 2e-3 * max|ref|, TF32's 10-bit mantissa).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from densenet_fast.ops import conv1x1 as conv1x1_mod
from densenet_fast.ops.precision import conv_tf32_allowed, dot_precision, with_conv_precision

B = torch.backends


@pytest.fixture
def restore_precision():
    """Every precision setting this file touches, restored afterwards: cuDNN's through the new
    API, the matmul precision through torch.set_float32_matmul_precision (which keeps the legacy
    and new matmul flags consistent)."""
    levels = (B, B.cudnn, B.cudnn.conv, B.cudnn.rnn)
    saved = [lvl.fp32_precision for lvl in levels]
    matmul = torch.get_float32_matmul_precision()
    yield
    for lvl, value in zip(levels, saved):
        lvl.fp32_precision = value
    torch.set_float32_matmul_precision(matmul)  # also mends a mixed state a test left


@pytest.mark.parametrize("generic, cudnn, conv, expected", [
    ("none", "none", "tf32", True),    # torch's default
    ("none", "none", "ieee", False),
    ("tf32", "none", "ieee", False),   # the most specific setting wins
    ("none", "tf32", "none", True),    # "none" inherits from cudnn ...
    ("tf32", "none", "none", True),    # ... and from the generic setting
    ("ieee", "none", "none", False),
    ("none", "none", "none", False),
])
def test_conv_tf32_allowed_reads_the_conv_setting(restore_precision, generic, cudnn, conv, expected):
    B.fp32_precision, B.cudnn.fp32_precision, B.cudnn.conv.fp32_precision = generic, cudnn, conv
    assert conv_tf32_allowed() is expected
    assert dot_precision(torch.float32) == ("tf32" if expected else "ieee")
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "ieee"


def test_legacy_allow_tf32_is_followed(restore_precision):
    B.cudnn.allow_tf32 = False
    assert not conv_tf32_allowed()
    B.cudnn.allow_tf32 = True
    assert conv_tf32_allowed()


def _cuda_like(dtype):
    # with_conv_precision reads only the operand's dtype and device: no GPU needed to test the flag.
    return SimpleNamespace(dtype=dtype, device=torch.device("cuda"))


def _cublas_tf32() -> bool:
    """What cuBLAS's float32 GEMMs would do now: the C++ query behind the legacy getter, the one
    ATen's CUDA GEMMs make (it raises when torch's legacy and new matmul flags disagree)."""
    return torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("conv, matmul, inside", [("tf32", "highest", True), ("tf32", "high", True),
                                                 ("tf32", "medium", True), ("ieee", "high", False),
                                                 ("ieee", "medium", False), ("ieee", "highest", False)])
def test_matmul_flag_follows_conv_for_float32_cuda_operands(restore_precision, conv, matmul, inside):
    B.cudnn.conv.fp32_precision = conv
    torch.set_float32_matmul_precision(matmul)
    assert with_conv_precision(_cuda_like(torch.float32), _cublas_tf32) is inside
    assert torch.get_float32_matmul_precision() == matmul, "the matmul precision was not restored"
    assert _cublas_tf32() is (matmul != "highest")

    def boom():
        raise KeyError("inside")

    with pytest.raises(KeyError):
        with_conv_precision(_cuda_like(torch.float32), boom)
    assert torch.get_float32_matmul_precision() == matmul, "the matmul precision was not restored after an exception"


@pytest.mark.parametrize("operand", [torch.zeros(1), _cuda_like(torch.float16), _cuda_like(torch.bfloat16)],
                         ids=["cpu-float32", "cuda-float16", "cuda-bfloat16"])
def test_matmul_flag_untouched_for_other_operands(restore_precision, operand):
    B.cudnn.conv.fp32_precision = "tf32"
    torch.set_float32_matmul_precision("highest")
    assert with_conv_precision(operand, _cublas_tf32) is False


def test_mixed_matmul_flags_are_left_alone(restore_precision):
    """A user who set the new matmul flag directly has torch's legacy and new flags disagreeing
    (torch's own TF32 query raises then): nothing is changed, fn still runs."""
    torch.set_float32_matmul_precision("highest")
    B.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):
        torch.get_float32_matmul_precision()
    assert with_conv_precision(_cuda_like(torch.float32), lambda: B.cuda.matmul.fp32_precision) == "tf32"
    assert B.cuda.matmul.fp32_precision == "tf32"


def test_gemm_entry_points_ask_the_policy(monkeypatch):
    """conv1x1 and conv1x1_backward (the torch and cuda backends' 1x1 convs and the transition's
    GEMM) run through with_conv_precision with their activation as the operand, and still compute
    the conv (against F.conv2d and autograd)."""
    calls = []

    def spy(x, fn, *args):
        calls.append(x)
        return fn(*args)

    monkeypatch.setattr(conv1x1_mod, "with_conv_precision", spy)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 10, 3, 4, generator=g, dtype=torch.float64)
    w = torch.randn(6, 10, 1, 1, generator=g, dtype=torch.float64)
    out = conv1x1_mod.conv1x1(z, w)
    z.requires_grad_(True)
    w.requires_grad_(True)
    ref = F.conv2d(z, w)
    torch.testing.assert_close(out, ref.detach())
    d_out = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    d_z, d_w = conv1x1_mod.conv1x1_backward(d_out, z.detach(), w.detach())
    ref_dz, ref_dw = torch.autograd.grad(ref, (z, w), d_out)
    torch.testing.assert_close(d_z, ref_dz)
    torch.testing.assert_close(d_w, ref_dw)
    assert len(calls) == 2 and all(c.data_ptr() == z.data_ptr() for c in calls), "not asked with z"


class _Asked(Exception):
    pass


def _triton_launchers():
    from densenet_fast import triton_kernels
    if not triton_kernels.HAS_TRITON:
        pytest.skip(f"needs triton ({triton_kernels.IMPORT_ERROR})")
    from densenet_fast.triton_kernels import bn_relu_conv1x1, conv1x1_backward, conv3x3, transition
    # the launchers take CPU tensors only in the interpreter (the H200 run of this test passed CPU
    # tensors to the compiled kernels' launchers, which refused them)
    if not triton_kernels.INTERPRET and not torch.cuda.is_available():
        pytest.skip("compiled Triton kernels need a CUDA device (or TRITON_INTERPRET=1)")
    dev = "cpu" if triton_kernels.INTERPRET else "cuda"

    def rand(*shape):
        return torch.randn(*shape, device=dev)

    n, c, h, w, b = 2, 8, 4, 4, 16
    x, bt = rand(n, c, h, w), rand(n, b, h, w)
    vec, bvec = torch.ones(c, device=dev), torch.ones(b, device=dev)
    return [
        (bn_relu_conv1x1, lambda: bn_relu_conv1x1.bn_relu_conv1x1_triton(x, vec, vec, rand(b, c, 1, 1))),
        (conv1x1_backward, lambda: conv1x1_backward.bn_relu_conv1x1_backward_triton(
            rand(n, b, h, w), x, rand(b, c, 1, 1), vec, vec, vec, vec, True, torch.zeros_like(x))),
        (conv3x3, lambda: conv3x3.bn_relu_conv3x3_triton(bt, bvec, bvec, rand(4, b, 3, 3))),
        (conv3x3, lambda: conv3x3.bn_relu_conv3x3_backward_triton(
            rand(n, 4, h, w), bt, rand(4, b, 3, 3), bvec, bvec, bvec, bvec, True)),
        (transition, lambda: transition.bn_relu_pool_conv1x1_triton(x, vec, vec, rand(4, c, 1, 1))),
        (transition, lambda: transition.bn_relu_pool_conv1x1_backward_triton(
            rand(n, 4, h // 2, w // 2), x, rand(4, c, 1, 1), vec, vec, vec, vec, True)),
    ]


def test_every_triton_gemm_launcher_asks_the_policy(monkeypatch):
    """Each Triton launcher with a tl.dot takes its input_precision from dot_precision(x.dtype),
    before it launches anything (the spy raises, so no kernel runs)."""
    for i, (module, launch) in enumerate(_triton_launchers()):
        def asked(dtype):
            raise _Asked(dtype)

        monkeypatch.setattr(module, "dot_precision", asked)
        with pytest.raises(_Asked) as info:
            launch()
        assert info.value.args == (torch.float32,), f"launcher {i} of {module.__name__}"


# --------------------------------------------------------------------------------------------
# On a GPU: the precision actually used
# --------------------------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gemm_errors(run):
    """max |run(z, w) - exact| / max |exact| with cuDNN set to ieee, then to tf32 (K = 256; z >= 0,
    so that a BN-ReLU prologue with scale 1 and shift 0 leaves it unchanged)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(4, 256, 16, 16, device="cuda", generator=g).abs()
    w = torch.randn(64, 256, 1, 1, device="cuda", generator=g)
    exact = F.conv2d(z.double(), w.double())
    errors = []
    for setting in ("ieee", "tf32"):
        B.cudnn.allow_tf32 = setting == "tf32"  # the legacy setter keeps torch's cuDNN flags consistent
        got = run(z, w).double()
        errors.append(float((got - exact).abs().max() / exact.abs().max()))
    return errors


@needs_gpu
def test_gpu_aten_gemm_precision_follows_cudnn(restore_precision):
    torch.set_float32_matmul_precision("highest")
    ieee, tf32 = _gemm_errors(conv1x1_mod.conv1x1)
    assert ieee <= 1e-5, f"IEEE setting: relative error {ieee:.2e}"
    assert 1e-5 < tf32 <= 2e-3, f"TF32 setting: relative error {tf32:.2e} (TF32 not used, or worse than TF32)"
    assert torch.get_float32_matmul_precision() == "highest"


@needs_gpu
def test_gpu_triton_dot_precision_follows_cudnn(restore_precision):
    from densenet_fast import triton_kernels
    if not triton_kernels.HAS_TRITON:
        pytest.skip(f"needs triton ({triton_kernels.IMPORT_ERROR})")
    from densenet_fast.triton_kernels.bn_relu_conv1x1 import bn_relu_conv1x1_triton
    ones, zeros = torch.ones(256, device="cuda"), torch.zeros(256, device="cuda")

    ieee, tf32 = _gemm_errors(lambda z, w: bn_relu_conv1x1_triton(z, ones, zeros, w)[0])
    assert ieee <= 1e-5, f"IEEE setting: relative error {ieee:.2e}"
    assert 1e-5 < tf32 <= 2e-3, f"TF32 setting: relative error {tf32:.2e} (TF32 not used, or worse than TF32)"
