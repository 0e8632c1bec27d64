"""A whole DenseNet on backend="triton" against the naive reference (dense_block.md, "Invariants").

Without a GPU the Triton kernels run on CPU tensors in triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes are tiny; on a GPU the same tests run compiled (and
tests/test_gpu.py covers bf16 and larger shapes there).

Checked: logits, the input gradient, every parameter gradient, the running statistics and
num_batches_tracked after training steps, in train and eval mode, NCHW and channels_last, with the
bottleneck recomputed or saved, with dropout (the kernel writes the layer's channels, the block
masks them and takes their statistics again), float32 and float16 (the interpreter has no bf16).

Tolerances (tests/tolerances.py): float32 three-way, ||ours - exact|| <= 2 ||naive - exact|| +
1e-5 ||exact|| per tensor, exact = the naive model in float64 (the kernels reorder every reduction
and fuse BN into GEMM prologues, so bitwise equality with naive is not expected; being no less
accurate than naive is).  float16 (model.to(float16)): tolerances.assert_model_within_naive_error
(logits and running statistics per tensor, gradients as one normalised vector).  Dropout: the
block's masks come from its own seeded generator, not nn.Dropout's, so that case compares the
triton backend with the torch backend under the same seeds (float32, TOLERANCES[float32]).
"""

from __future__ import annotations

import copy

import pytest
import torch

from densenet_fast import reference
from builders import copy_weights, efficient_densenet, param_grads, projection_loss, randomize_bn_, seeded_input, \
    states
from helpers import skip_module_unless_triton_runs, triton_device
from tolerances import assert_close, assert_model_within_naive_error, assert_within_naive_error

skip_module_unless_triton_runs()

# Float32 in IEEE on a GPU (conftest.ieee_fp32): the three-way rule and the torch-backend comparison
# below hold IEEE rounding, not TF32's (tests/test_precision.py covers TF32 selection).
pytestmark = pytest.mark.usefixtures("ieee_fp32")

DEVICE = triton_device()
# growth 5 and 7 input channels: no channel count or offset is a multiple of 8 or 16; 9x7 images
# pool to 4x3 (odd sizes drop a row and a column); bn_size 3: a 15-wide bottleneck.
CFG = dict(growth_rate=5, block_config=(2, 2), num_init_features=7, bn_size=3, num_classes=4, small_inputs=True)
SHAPE = (3, 3, 9, 7)


def _models(channels_last: bool, save_bottleneck: bool = False, seed: int = 0, drop_rate: float = 0.0):
    torch.manual_seed(seed)
    naive = reference.DenseNet(CFG["growth_rate"], CFG["block_config"], CFG["num_init_features"], CFG["bn_size"],
                               drop_rate, CFG["num_classes"], small_inputs=True)
    randomize_bn_(naive, seed + 1)
    ours = efficient_densenet(**CFG, backend="triton", save_bottleneck=save_bottleneck, drop_rate=drop_rate)
    copy_weights(naive, ours)
    exact = copy.deepcopy(naive).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [m.to(DEVICE, memory_format=fmt) for m in (ours, naive, exact)]


def _run(model, x):
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    projection_loss(out.double(), 5).backward()
    return out.detach(), xi.grad, param_grads(model), states(model)


def _input(channels_last: bool, seed: int, dtype=torch.float32) -> torch.Tensor:
    return seeded_input(SHAPE, seed, dtype, channels_last, scale=1.5, offset=0.3).to(DEVICE)


@pytest.mark.parametrize("save_bottleneck", [False, True], ids=["recompute", "saved"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_densenet_float32(channels_last, save_bottleneck):
    ours, naive, exact = _models(channels_last, save_bottleneck)
    for step, mode in enumerate(("train", "train", "eval")):
        for m in (ours, naive, exact):
            m.train(mode == "train")
            m.zero_grad(set_to_none=True)
        x = _input(channels_last, 10 + step)
        fast, slow, ref = _run(ours, x), _run(naive, x), _run(exact, x.double())
        where = f"step {step} ({mode})"
        assert_within_naive_error(fast[0], slow[0], ref[0], torch.float32, f"{where}: logits")
        assert_within_naive_error(fast[1], slow[1], ref[1], torch.float32, f"{where}: input grad")
        for name in ref[2]:
            assert_within_naive_error(fast[2][name], slow[2][name], ref[2][name], torch.float32,
                                      f"{where}: grad {name}")
        for name in ref[3]:
            if name.endswith("num_batches_tracked"):
                assert int(fast[3][name]) == int(slow[3][name]), f"{where}: {name}"
            else:
                assert_within_naive_error(fast[3][name], slow[3][name], ref[3][name], torch.float32,
                                          f"{where}: {name}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_triton_densenet_float16(mode):
    ours, naive, exact = _models(channels_last=True, seed=3)
    for m in (ours, naive, exact):
        m.train(mode == "train")
    ours.half()
    naive.half()
    # 6 samples of 12x12: enough values per channel that one rounding-flipped ReLU does not dominate
    x = seeded_input((6, 3, 12, 12), 4, torch.float32, True).to(DEVICE)
    fast, slow, ref = _run(ours, x.half()), _run(naive, x.half()), _run(exact, x.half().double())
    assert fast[0].dtype == torch.float16
    assert_model_within_naive_error(fast, slow, ref, torch.float16)


def test_triton_dropout_matches_torch_backend():
    """With dropout the mask comes from the block's seeded generator (the same for every backend):
    the triton and torch backends must then agree (float32, per tensor, TOLERANCES[float32])."""
    torch.manual_seed(7)
    tri = efficient_densenet(**CFG, backend="triton", drop_rate=0.3).to(DEVICE)
    ref = efficient_densenet(**CFG, backend="torch", drop_rate=0.3).to(DEVICE)
    randomize_bn_(tri, 8)
    copy_weights(tri, ref)
    x = _input(False, 9)
    results = []
    for m in (tri, ref):
        torch.manual_seed(11)  # the block draws its dropout seeds from the default generator
        results.append(_run(m, x))
    (out_t, gx_t, g_t, s_t), (out_r, gx_r, g_r, s_r) = results
    assert_close(out_t, out_r, torch.float32, "logits")
    assert_close(gx_t, gx_r, torch.float32, "input grad")
    for name in g_r:
        assert_close(g_t[name], g_r[name], torch.float32, f"grad {name}")
    for name in s_r:
        if "running" in name:
            assert_close(s_t[name], s_r[name], torch.float32, name)


def test_triton_backend_runs_float64_on_the_torch_path():
    """Triton's dots have no float64: the backend runs those calls on the plain-PyTorch primitives
    (same results as backend torch, to float64 rounding)."""
    torch.manual_seed(12)
    tri = efficient_densenet(**CFG, backend="triton").to(DEVICE).double()
    ref = efficient_densenet(**CFG, backend="torch").to(DEVICE).double()
    copy_weights(tri, ref)
    x = _input(False, 13, torch.float64)
    a, b = _run(tri, x), _run(ref, x)
    assert_close(a[0], b[0], torch.float64, "logits")
    assert_close(a[1], b[1], torch.float64, "input grad")


@pytest.mark.parametrize("bn_size", [CFG["bn_size"], 0], ids=["bottleneck", "plain"])
def test_triton_densenet_compiles_fullgraph(bn_size):
    """torch.compile(fullgraph=True) traces the whole model on backend triton (the kernels enter
    the graph as densenet_fast::triton_* custom ops through their fake implementations) and the
    compiled step matches eager (float32, TOLERANCES[float32]).  aot_eager: the graph runs in
    eager ATen on the CPU interpreter; tests/test_gpu.py compiles with inductor on a GPU.
    bn_size=0: the 3x3 kernel reads the block buffer's prefix and writes another slice of it."""
    torch.manual_seed(14)
    eager = efficient_densenet(**{**CFG, "bn_size": bn_size}, backend="triton").to(DEVICE)
    compiled_twin = copy.deepcopy(eager)
    compiled = torch.compile(compiled_twin, fullgraph=True, backend="aot_eager")
    x = _input(True, 15)
    a = _run(eager, x)
    out = _run(compiled, x)[0]
    b = (out, None, param_grads(compiled_twin), states(compiled_twin))  # unprefixed names
    assert_close(b[0], a[0], torch.float32, "logits")
    for name in a[2]:
        assert_close(b[2][name], a[2][name], torch.float32, f"grad {name}")
    for name in a[3]:
        if "running" in name:
            assert_close(b[3][name], a[3][name], torch.float32, name)


def test_triton_block_computes_each_bn_vectors_in_one_op():
    """Where the extension has a channel_affine kernel for the device, the triton backend's eager
    step computes each BN's (invstd, scale, shift) with it (one launch) instead of four ATen ops
    (rsqrt, add, mul, addcmul), once per BN and step: the backward reuses the forward's vectors.
    Without the op the count is 0; were the vectors computed again in the backward, it would be
    higher."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from densenet_fast import _ext
    if DEVICE not in _ext.kernel_devices("channel_affine"):
        pytest.skip(f"the extension has no channel_affine kernel for {DEVICE} ({_ext.IMPORT_ERROR})")

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(16)
    model = efficient_densenet(**CFG, backend="triton").to(DEVICE)
    x = _input(False, 17)
    with Count() as count:
        model(x).sum().backward()
    layers = sum(CFG["block_config"])
    # norm1 and norm2 of every layer, the transition's norm; norm5 is an nn.BatchNorm2d
    bns = 2 * layers + len(CFG["block_config"]) - 1
    assert count.ops.get("channel_affine", 0) == bns, count.ops
