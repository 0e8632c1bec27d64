"""The "cuda" backend's block logic (densenet_fast.ops.cuda_block.CudaBlockKernels) against the
naive reference, run on the CPU through the extension's CPU kernels of the same ops.

backend="cuda" itself needs CUDA tensors (tests/test_gpu.py runs it on a GPU); the ops it calls
(bn_relu_out, bn_relu_backward_reduce, bn_backward_apply, channel_stats) have CPU kernels with the
same semantics, so the chunking, the scratch reuse, the accumulation into the gradient buffer and
the BN-backward coefficients are tested here on every CI run.

Tolerances (tests/tolerances.py): float32 three-way (||ours - exact|| <= 2 ||naive - exact|| +
1e-5 ||exact||, exact = the naive block in float64); bfloat16 (block converted with .to): the same
rule with the bf16 floor, gradients as one normalised vector (rounding flips single ReLU masks).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

import densenet_fast
from densenet_fast import _ext, reference
from builders import param_grads, randomize_bn_, seeded_input
from helpers import DispatchLog
from tolerances import assert_close, assert_model_within_naive_error, assert_within_naive_error

if not _ext.HAS_C or not hasattr(torch.ops.densenet_fast, "bn_relu_out"):
    pytest.skip(f"the extension with the fused BN ops is not built ({_ext.IMPORT_ERROR})", allow_module_level=True)

from densenet_fast.ops.cuda_block import CudaBlockKernels  # noqa: E402
from densenet_fast.ops.dense_block import run_dense_block  # noqa: E402


def _run_ours(block, x, chunk, r, whole=True, save_bottleneck=False):
    xi = x.clone().requires_grad_(True)
    f, _, _ = run_dense_block(xi, list(block.values()), CudaBlockKernels(whole=whole), chunk_channels=chunk,
                              save_bottleneck=save_bottleneck)
    (f.double() * r).sum().backward()
    return f.detach(), xi.grad, param_grads(block)


def _run_naive(block, x, r):
    xi = x.clone().requires_grad_(True)
    out = block(xi)
    (out.double() * r).sum().backward()
    return out.detach(), xi.grad, param_grads(block)


# chunk 4 splits the 7 + 5l channel prefixes unevenly: the scratch chunk is reused with a short
# last chunk, and G[:, a:e] is accumulated chunk by chunk.  "whole": the layer loop in C++
# (dense_block_forward/backward); "per-layer": CudaBlockKernels' Python methods.
# "narrow": bottleneck 4 against prefixes of 12-20 channels, so with one chunk the backward keeps
# the recompute's relu(bn1(prefix)) for the 1x1 conv's backward (2 B <= cl); "wide" never does.
@pytest.mark.parametrize("cfg", [(3, 7, 3, 5), (3, 12, 1, 4)], ids=["wide", "narrow"])
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "per-layer"])
@pytest.mark.parametrize("chunk", [0, 4], ids=["one-chunk", "chunk4"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_block_kernels_match_naive(mode, channels_last, chunk, whole, cfg):
    layers, c0, bn_size, k = cfg
    torch.manual_seed(0)
    ours = densenet_fast.DenseBlock(layers, c0, bn_size, k, backend="torch")
    randomize_bn_(ours, 1)
    naive = reference.DenseBlock(layers, c0, bn_size, k, 0.0)
    naive.load_state_dict(ours.state_dict())
    exact = copy.deepcopy(naive).double()
    for m in (ours, naive, exact):
        m.train(mode == "train")
    x = seeded_input((2, c0, 9, 7), 2, torch.float32, channels_last, scale=1.5, offset=0.4)
    r = torch.randn(2, c0 + layers * k, 9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fast = _run_ours(ours, x, chunk, r, whole)
    slow = _run_naive(naive, x, r)
    ref = _run_naive(exact, x.double(), r)
    assert_within_naive_error(fast[0], slow[0], ref[0], torch.float32, "block output")
    assert_within_naive_error(fast[1], slow[1], ref[1], torch.float32, "input grad")
    for name in ref[2]:
        assert_within_naive_error(fast[2][name], slow[2][name], ref[2][name], torch.float32, f"grad {name}")
    so, sn, se = ours.state_dict(), naive.state_dict(), exact.state_dict()
    for name in se:
        if "running" in name:
            assert_within_naive_error(so[name], sn[name], se[name], torch.float32, name)
        elif name.endswith("num_batches_tracked"):
            assert int(so[name]) == int(sn[name]), name


def test_cuda_block_kernels_bfloat16():
    torch.manual_seed(4)
    ours = densenet_fast.DenseBlock(2, 10, 2, 6, backend="torch")
    randomize_bn_(ours, 5)
    naive = reference.DenseBlock(2, 10, 2, 6, 0.0)
    naive.load_state_dict(ours.state_dict())
    exact = copy.deepcopy(naive).double()
    ours.to(torch.bfloat16)
    naive.to(torch.bfloat16)
    x = seeded_input((8, 10, 16, 16), 6, torch.float32, True, offset=0.5)
    r = torch.randn(8, 22, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    fast = _run_ours(ours, x.bfloat16(), 0, r)
    slow = _run_naive(naive, x.bfloat16(), r)
    ref = _run_naive(exact, x.bfloat16().double(), r)
    assert fast[0].dtype == torch.bfloat16
    # output and running statistics per tensor, gradients as one normalised vector
    assert_model_within_naive_error(fast + (ours.state_dict(),), slow + (naive.state_dict(),),
                                    ref + (exact.state_dict(),), torch.bfloat16)


def _pool_net(pool, conv, c):
    """What bn_relu_pool_conv computes, as naive modules: the transition (BN-ReLU-conv-pool), the
    head (BN-ReLU-global pool) or the stem norm (BN-ReLU)."""
    layers = [torch.nn.BatchNorm2d(c), torch.nn.ReLU()]
    if conv:
        layers.append(torch.nn.Conv2d(c, 5, 1, bias=False))
    layers.append({"avg2": torch.nn.AvgPool2d(2, 2), "global": torch.nn.AdaptiveAvgPool2d(1),
                   "none": torch.nn.Identity()}[pool])
    return torch.nn.Sequential(*layers)


# The transition, head and stem norm on the extension's kernels (CudaBlockKernels.bn_relu_chunk and
# its backward inside ops.transition's Function).  chunk 4 splits the 11 channels unevenly; the
# head's gradient reaches the kernels as a stride-0 expanded tensor; 9x7 is odd, so the 2x2 pool
# drops a row and a column, whose gradient must be exactly zero.
@pytest.mark.parametrize("pool,conv", [("avg2", True), ("global", False), ("none", False)],
                         ids=["transition", "head", "stem-norm"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_kernels_transition_head_stem(mode, channels_last, pool, conv):
    from densenet_fast.ops.transition import bn_relu_pool_conv
    torch.manual_seed(8)
    c = 11
    naive = randomize_bn_(_pool_net(pool, conv, c), 9)
    exact = copy.deepcopy(naive).double()
    ours = copy.deepcopy(naive)
    for m in (ours, naive, exact):
        m.train(mode == "train")
    x = seeded_input((3, c, 9, 7), 10, torch.float32, channels_last, scale=1.5, offset=0.4)
    results = []
    for model, xin, fused in ((ours, x, True), (naive, x, False), (exact, x.double(), False)):
        xi = xin.clone().requires_grad_(True)
        if fused:
            out = bn_relu_pool_conv(xi, model[0], model[2].weight if conv else None, pool=pool,
                                    kernels=CudaBlockKernels(), chunk=4)
        else:
            out = model(xi)
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
        (out.double() * r).sum().backward()
        results.append((out.detach(), xi.grad, param_grads(model), model.state_dict()))
    (fo, fg, fp, fs), (no, ng, np_, ns), (eo, eg, ep, es) = results
    assert_within_naive_error(fo, no, eo, torch.float32, "output")
    assert_within_naive_error(fg, ng, eg, torch.float32, "input grad")
    assert set(fp) == set(ep)
    for name in ep:
        assert_within_naive_error(fp[name], np_[name], ep[name], torch.float32, f"grad {name}")
    for name in es:
        if "running" in name:
            assert_within_naive_error(fs[name], ns[name], es[name], torch.float32, name)
        elif name.endswith("num_batches_tracked"):
            assert int(fs[name]) == int(ns[name]), name


def test_backward_reuses_forward_affine():
    """Each BN's (mean, invstd, scale, shift) is computed once, in the forward, and kept on the
    layer's statistics: the backward's recompute of the bottleneck and both BN backwards launch no
    channel_affine of their own (each such recompute was five tiny launches per BN on the GPU).
    The per-layer path (whole=False), where each BN's vectors pass through Python."""
    torch.manual_seed(6)
    block = densenet_fast.DenseBlock(3, 6, 2, 4, backend="torch")
    x = seeded_input((2, 6, 5, 5), 7).requires_grad_(True)
    with DispatchLog(lambda func, args: func.overloadpacket.__name__) as fwd:
        f, _, _ = run_dense_block(x, list(block.values()), CudaBlockKernels(whole=False))
    with DispatchLog(lambda func, args: func.overloadpacket.__name__) as bwd:
        f.sum().backward()
    # norm1 and norm2 of 3 layers, one launch each
    assert fwd.entries.count("channel_affine") == 2 * 3, fwd.entries.count("channel_affine")
    assert "rsqrt" not in fwd.entries, fwd.entries
    assert bwd.entries.count("channel_affine") == 0 and "rsqrt" not in bwd.entries, bwd.entries
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


# ---- the C++ layer loop (csrc/dense_block.cpp) -------------------------------------------------
# It calls the per-layer path's kernels and ATen ops with the same operands, so the two must agree
# to rounding of the same operations (they are not required to be bit-identical: nothing forces
# the GEMMs to pick the same algorithm twice).  TOL_SAME: relative to each tensor's largest value.
TOL_SAME = 1e-6


def _block_results(block, x, r, whole, **kwargs):
    b = copy.deepcopy(block)
    out, gx, grads = _run_ours(b, x, kwargs.pop("chunk", 0), r, whole, **kwargs)
    return [out, gx] + [grads[n] for n in sorted(grads)] + [v.double() for v in b.state_dict().values()]


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        u, v = u.double().cpu(), v.double().cpu()
        scale = max(v.abs().max().item(), 1e-30)
        assert (u - v).abs().max().item() <= TOL_SAME * scale, f"tensor {i}: {(u - v).abs().max().item()} vs {scale}"


# Mixed norm modes: norm1 of layer 0 in eval (its running statistics, a fixed BN in backward)
# while norm2 trains, and the reverse in layer 1; save_bottleneck keeps Bt instead of recomputing.
# On a GPU (IEEE float32, so that both paths' GEMMs and convolutions round alike) the same check
# runs the CUDA kernels of the ops and the loop with CUDA tensors.
@pytest.mark.parametrize("bn_size, kept", [(1, 3), (3, 0)], ids=["narrow", "wide"])
def test_per_layer_backward_reuses_the_recomputed_prefix(bn_size, kept):
    """CudaBlockKernels' backward keeps the recompute's scale-shift-ReLU of the prefix for the 1x1
    conv's backward where 2 B <= cl (one chunk): B = 4 keeps it in all three layers (cl = 12, 16,
    20), B = 12 in none.  Counted as bn_relu_out launches in the backward: recompute, z2 and the
    chunk loop, 3 per layer without the reuse."""
    torch.manual_seed(7)
    block = randomize_bn_(densenet_fast.DenseBlock(3, 12, bn_size, 4, backend="torch"), 8)
    naive = reference.DenseBlock(3, 12, bn_size, 4, 0.0)
    naive.load_state_dict(block.state_dict())
    x = seeded_input((2, 12, 6, 5), 9, torch.float32)
    xi = x.clone().requires_grad_(True)
    f, _, _ = run_dense_block(xi, list(block.values()), CudaBlockKernels(whole=False))
    r = torch.randn(f.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    with DispatchLog() as log:
        (f.double() * r).sum().backward()
    launches = log.entries.count("densenet_fast::bn_relu_out")
    assert launches == 3 * 3 - kept, f"{launches} bn_relu_out launches in the backward"
    slow = _run_naive(naive, x, r)
    assert_close(xi.grad, slow[1], torch.float32, "input grad")
    for name, grad in param_grads(block).items():
        assert_close(grad, slow[2][name], torch.float32, f"grad {name}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()), reason="needs a GPU and the extension's CUDA kernels"))])
@pytest.mark.parametrize("save_bottleneck", [False, True], ids=["recompute", "save-bottleneck"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_whole_block_matches_per_layer(channels_last, save_bottleneck, device, ieee_fp32):
    torch.manual_seed(12)
    block = densenet_fast.DenseBlock(3, 6, 2, 5, backend="torch").to(device)
    randomize_bn_(block, 13)
    layers = list(block.values())
    layers[0].norm1.eval()
    layers[1].norm2.eval()
    x = seeded_input((2, 6, 7, 5), 14, torch.float32, channels_last, scale=1.5, offset=0.4).to(device)
    r = torch.randn(2, 21, 7, 5, generator=torch.Generator().manual_seed(15), dtype=torch.float64).to(device)
    whole = _block_results(block, x, r, True, chunk=4, save_bottleneck=save_bottleneck)
    per_layer = _block_results(block, x, r, False, chunk=4, save_bottleneck=save_bottleneck)
    _assert_same(whole, per_layer)


HAS_GPU_KERNELS = torch.cuda.is_available() and _ext.has_cuda_kernels()
GPU_REASON = "needs a GPU and the extension's CUDA kernels"


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not HAS_GPU_KERNELS, reason=GPU_REASON)),
    pytest.param("cuda", torch.float16, marks=pytest.mark.skipif(not HAS_GPU_KERNELS, reason=GPU_REASON)),
])
def test_whole_block_matches_per_layer_under_autocast(device, dtype):
    """Autocast: the block runs on half-precision data and conv weights, fp32 BN parameters and
    statistics, and a float32 gradient buffer (the apply pass reads half data and writes fp32)."""
    torch.manual_seed(20)
    block = densenet_fast.DenseBlock(2, 8, 2, 6, backend="torch").to(device)
    randomize_bn_(block, 21)
    x = seeded_input((4, 8, 6, 6), 22, torch.float32, True, offset=0.5).to(device)
    r = torch.randn(4, 20, 6, 6, generator=torch.Generator().manual_seed(23), dtype=torch.float64).to(device)
    with torch.autocast(device, dtype=dtype):
        whole = _block_results(block, x, r, True)
        per_layer = _block_results(block, x, r, False)
    assert whole[0].dtype == dtype
    _assert_same(whole, per_layer)


def test_whole_block_two_forwards_then_backwards():
    """The design's invariants on the C++ loop: two forwards before their backwards give each
    call the gradients it would get alone (no state shared between calls but parameters and
    buffers), and running statistics move once per training forward, also under no_grad."""
    torch.manual_seed(25)
    block = densenet_fast.DenseBlock(3, 6, 2, 4, backend="torch")
    randomize_bn_(block, 26)
    layers = list(block.values())
    xs = [seeded_input((2, 6, 5, 5), 27 + i).requires_grad_(True) for i in range(2)]
    rs = [torch.randn(2, 18, 5, 5, generator=torch.Generator().manual_seed(29 + i)) for i in range(2)]
    alone = []
    for x, r in zip(xs, rs):
        f, _, _ = run_dense_block(x, layers, CudaBlockKernels(whole=True))
        alone.append(torch.autograd.grad((f * r).sum(), [x] + list(block.parameters())))
    outs = [run_dense_block(x, layers, CudaBlockKernels(whole=True))[0] for x in xs]
    for out, x, r, expected in zip(reversed(outs), reversed(xs), reversed(rs), reversed(alone)):
        got = torch.autograd.grad((out * r).sum(), [x] + list(block.parameters()))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        run_dense_block(xs[0], layers, CudaBlockKernels(whole=True))
    naive = reference.DenseBlock(3, 6, 2, 4, 0.0)
    naive.load_state_dict(before)
    with torch.no_grad():
        naive(xs[0])
    for name, value in naive.state_dict().items():
        torch.testing.assert_close(block.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert int(block.state_dict()["denselayer1.norm1.num_batches_tracked"]) == \
        int(before["denselayer1.norm1.num_batches_tracked"]) + 1


def _op_log(fn):
    with DispatchLog(lambda func, args: func.name()) as log:
        fn()
    return log.entries


def test_whole_block_is_one_op_per_direction():
    """The forward issues one dense_block_forward and the backward one dense_block_backward; no
    BN pass, GEMM or per-channel vector op of a layer is issued from Python."""
    torch.manual_seed(16)
    block = densenet_fast.DenseBlock(4, 6, 2, 4, backend="torch")
    x = seeded_input((2, 6, 5, 5), 17).requires_grad_(True)
    out = []
    fwd = _op_log(lambda: out.append(run_dense_block(x, list(block.values()), CudaBlockKernels())[0]))
    bwd = _op_log(lambda: out[0].sum().backward())
    assert fwd.count("densenet_fast::dense_block_forward") == 1, fwd
    assert bwd.count("densenet_fast::dense_block_backward") == 1, bwd
    per_layer_ops = {"densenet_fast::bn_relu_out", "densenet_fast::channel_stats", "aten::mm", "aten::bmm",
                     "aten::convolution", "densenet_fast::channel_affine", "densenet_fast::bn_backward_apply"}
    assert not per_layer_ops & set(fwd + bwd), sorted(per_layer_ops & set(fwd + bwd))
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


def test_whole_block_leaves_dropout_to_the_per_layer_path():
    """Dropout's mask is drawn per layer from a Python-side seed: with drop_rate > 0 in training
    the per-layer path runs (and in eval, where dropout is off, the C++ loop)."""
    block = densenet_fast.DenseBlock(2, 6, 2, 4, drop_rate=0.2, backend="torch")
    x = seeded_input((2, 6, 5, 5), 18)
    train = _op_log(lambda: run_dense_block(x, list(block.values()), CudaBlockKernels()))
    assert "densenet_fast::dense_block_forward" not in train and "densenet_fast::bn_relu_out" in train
    block.eval()
    evaluation = _op_log(lambda: run_dense_block(x, list(block.values()), CudaBlockKernels()))
    assert evaluation.count("densenet_fast::dense_block_forward") == 1, evaluation


def test_whole_block_leaves_float64_and_sync_bn_to_the_per_layer_path():
    """float64 data (the kernels read fp32/fp16/bf16) and synchronized BN (its sums are
    all-reduced from Python) are not the C++ loop's."""
    from densenet_fast.ops.dense_block import BlockSpec
    block = densenet_fast.DenseBlock(2, 6, 2, 4, backend="torch").double()
    x = seeded_input((2, 6, 5, 5), 19).double()
    log = _op_log(lambda: run_dense_block(x, list(block.values()), CudaBlockKernels()))
    assert "densenet_fast::dense_block_forward" not in log, log
    spec = BlockSpec(list(block.values()), CudaBlockKernels(group=object()))
    assert not spec.kernels._whole(spec, torch.empty(2, 14, 5, 5))
    assert CudaBlockKernels()._whole(spec, torch.empty(2, 14, 5, 5))


def _op_args(layers=2, c0=6, k=4, bn=8, n=2, hw=5, channels_last=False):
    """Valid arguments of dense_block_forward for a block in training mode."""
    torch.manual_seed(19)
    c = c0 + layers * k
    fbuf = torch.randn(n, c, hw, hw)
    if channels_last:
        fbuf = fbuf.contiguous(memory_format=torch.channels_last)
    params = []
    for l in range(layers):
        cl = c0 + l * k
        params += [torch.rand(cl) + 0.5, torch.randn(cl), torch.randn(bn, cl, 1, 1), torch.rand(bn) + 0.5,
                   torch.randn(bn), torch.randn(k, bn, 3, 3)]
    return dict(fbuf=fbuf, mean=torch.empty(c), var=torch.empty(c), c0=c0, params=params, eps1=[1e-5] * layers,
                eps2=[1e-5] * layers, stats1=[None] * (2 * layers), stats2=[None] * (2 * layers),
                steps=[3] * layers, compute_stats=True, save_bottleneck=False)


def _forward(args):
    a = args
    return torch.ops.densenet_fast.dense_block_forward(a["fbuf"], a["mean"], a["var"], a["c0"], a["params"],
                                                       a["eps1"], a["eps2"], a["stats1"], a["stats2"], a["steps"],
                                                       a["compute_stats"], a["save_bottleneck"])


def test_whole_block_op_fills_the_statistics_cache():
    """mean/var come back as every channel's batch statistics (x0's and each layer's output)."""
    args = _op_args()
    saved, bt_stats, bottlenecks = _forward(args)
    var, mean = torch.var_mean(args["fbuf"].double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(args["mean"].double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(args["var"].double(), var, rtol=1e-5, atol=1e-6)
    assert len(saved) == 12 and len(bt_stats) == 4 and bottlenecks == []


# (mutation, exception type, words the message must contain)
BAD_FORWARD_INPUTS = [
    (lambda a: a.update(params=a["params"][:-1]), ValueError, "6 tensors per layer"),
    (lambda a: a.update(fbuf=a["fbuf"][:, :-1].contiguous()), ValueError, "fbuf must have c0 + L*k"),
    (lambda a: a.update(fbuf=a["fbuf"].double()), TypeError, "fbuf must be float32, float16 or bfloat16"),
    (lambda a: a.update(fbuf=a["fbuf"].transpose(2, 3)), ValueError, "fbuf must be contiguous (NCHW) or channels_last"),
    (lambda a: a["params"].__setitem__(8, torch.randn(8, 9, 1, 1)), ValueError, "conv1.weight of layer 1 must have shape"),
    (lambda a: a["params"].__setitem__(0, torch.rand(5)), ValueError, "norm1.weight of layer 0 must have shape"),
    (lambda a: a["params"].__setitem__(2, torch.randn(8, 6, 1, 1).half()), TypeError, "conv weights of layer 0"),
    (lambda a: a.update(steps=[3]), ValueError, "steps must have one entry per layer"),
    (lambda a: a.update(steps=[3, 0]), ValueError, "steps[1] must be positive"),
    (lambda a: a.update(eps1=[1e-5]), ValueError, "eps1 and eps2 must have one entry per layer"),
    (lambda a: a.update(stats1=[None] * 3), ValueError, "stats1 must have 2 entries per layer"),
    (lambda a: a.update(stats1=[torch.zeros(6), None, None, None]), ValueError, "both be None or both tensors"),
    (lambda a: a.update(stats2=[torch.zeros(7), torch.ones(7), None, None]), ValueError,
     "stats2 of layer 0 must have shape (8,)"),
    (lambda a: a.update(mean=torch.empty(14, dtype=torch.float64)), TypeError, "mean must be float32"),
    (lambda a: a.update(var=torch.empty(13)), ValueError, "var must have shape"),
    (lambda a: a.update(compute_stats=False), ValueError, "compute_stats must be true"),
    (lambda a: a.update(fbuf=a["fbuf"][:0]), ValueError, "fbuf must have at least one element per channel"),
    (lambda a: a.update(var=a["mean"]), ValueError, "mean and var must not share memory"),
    (lambda a: a.update(mean=a["fbuf"].view(-1)[:14]), ValueError, "mean and fbuf must not share memory"),
]


def _backward_args(channels_last=False):
    args = _op_args(channels_last=channels_last)
    saved, bt_stats, bottlenecks = _forward(args)
    n, c, h, w = args["fbuf"].shape
    mean1 = [args["mean"][:6], args["mean"][:10]]
    mean2 = [bt_stats[0], bt_stats[2]]
    gbuf = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last if channels_last else
                                              torch.contiguous_format)
    return dict(fbuf=args["fbuf"], gbuf=gbuf, c0=6, params=args["params"], saved=saved,
                mean1=mean1, mean2=mean2, batch1=[1, 1], batch2=[1, 1], bottlenecks=[], steps=[3, 3], count=n * h * w)


def _backward(a):
    return torch.ops.densenet_fast.dense_block_backward(*a.values())


BAD_BACKWARD_INPUTS = [
    (lambda a: a.update(gbuf=a["gbuf"][:, 1:]), ValueError, "gbuf must have the shape of fbuf"),
    (lambda a: a.update(gbuf=a["gbuf"].double()), TypeError, "gbuf must be float32 or the dtype of fbuf"),
    (lambda a: a.update(saved=a["saved"][:-1]), ValueError, "saved must have 6 entries per layer"),
    (lambda a: a["saved"].__setitem__(7, torch.ones(6)), ValueError, "saved[7] must have shape"),
    (lambda a: a.update(mean1=[a["mean1"][0], a["mean1"][0]]), ValueError, "mean1 of layer 1 must have shape"),
    (lambda a: a.update(batch2=[1]), ValueError, "batch2 must have 1 entries per layer"),
    (lambda a: a.update(bottlenecks=[torch.zeros(2, 8, 5, 5)]), ValueError, "bottlenecks must be empty or hold"),
    (lambda a: a.update(count=7), ValueError, "count must be N"),
    (lambda a: a.update(gbuf=a["fbuf"]), ValueError, "gbuf and fbuf must not share memory"),
]


BAD_INPUTS = [("forward", *case) for case in BAD_FORWARD_INPUTS] + [("backward", *case) for case in BAD_BACKWARD_INPUTS]


@pytest.mark.parametrize("op,mutate,exc,words", BAD_INPUTS, ids=[f"{op}-{w}" for op, _, _, w in BAD_INPUTS])
def test_whole_block_ops_reject_bad_input(op, mutate, exc, words):
    args = _op_args() if op == "forward" else _backward_args()
    mutate(args)
    with pytest.raises(exc, match=re.escape(words)):
        (_forward if op == "forward" else _backward)(args)


def test_whole_block_op_names_the_device():
    args = _op_args()
    with pytest.raises(RuntimeError, match="fbuf must be a CPU tensor, got meta"):
        torch.ops.densenet_fast.dense_block_forward.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *[
                a.to("meta") if isinstance(a, torch.Tensor) and name == "fbuf" else a for name, a in args.items()])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_whole_block_ops_pass_opcheck(channels_last):
    """Schemas (which arguments are mutated), fake kernels and the CPU kernels agree.

    Not "test_aot_dispatch_dynamic": the ops are never traced (under torch.compile the block runs
    the per-layer ops, CudaBlockKernels._whole), and torch's functionalization does not take a
    custom op that both mutates inputs and returns tensor lists."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    args = _op_args(channels_last=channels_last)
    args["save_bottleneck"] = True
    torch.library.opcheck(torch.ops.densenet_fast.dense_block_forward.default, tuple(args.values()), test_utils=utils)
    back = _backward_args(channels_last)
    torch.library.opcheck(torch.ops.densenet_fast.dense_block_backward.default, tuple(back.values()),
                          test_utils=utils)
    # conv2.weight in channels_last with NCHW data: its gradient follows the weight's layout
    back["params"] = [p.contiguous(memory_format=torch.channels_last) if i % 6 == 5 else p
                      for i, p in enumerate(back["params"])]
    torch.library.opcheck(torch.ops.densenet_fast.dense_block_backward.default, tuple(back.values()),
                          test_utils=utils)


@pytest.mark.parametrize("value,whole", [(None, True), ("1", True), ("0", False)])
def test_whole_block_environment_switch(monkeypatch, value, whole):
    """backend="cuda" builds CudaBlockKernels() without arguments: DENSENET_FAST_WHOLE_BLOCK=0
    selects the per-layer path (for side-by-side benchmarks), unset or anything else the C++ loop;
    an explicit argument wins over the variable."""
    from densenet_fast.ops.cuda_block import WHOLE_BLOCK_ENV
    if value is None:
        monkeypatch.delenv(WHOLE_BLOCK_ENV, raising=False)
    else:
        monkeypatch.setenv(WHOLE_BLOCK_ENV, value)
    block = densenet_fast.DenseBlock(2, 6, 2, 4, backend="torch")
    x = seeded_input((2, 6, 5, 5), 24)
    log = _op_log(lambda: run_dense_block(x, list(block.values()), CudaBlockKernels()))
    assert ("densenet_fast::dense_block_forward" in log) == whole, log
    assert CudaBlockKernels(whole=not whole).whole == (not whole)
