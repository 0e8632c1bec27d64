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

import pytest
import torch

import densenet_fast
from densenet_fast import _ext, reference
from builders import param_grads, randomize_bn_, seeded_input
from helpers import DispatchLog
from tolerances import assert_model_within_naive_error, assert_within_naive_error

if not _ext.HAS_C or not hasattr(torch.ops.densenet_fast, "bn_relu_out"):
    pytest.skip(f"the extension with the fused BN ops is not built ({_ext.IMPORT_ERROR})", allow_module_level=True)

from densenet_fast.ops.cuda_block import CudaBlockKernels  # noqa: E402
from densenet_fast.ops.dense_block import run_dense_block  # noqa: E402


def _run_ours(block, x, chunk, r):
    xi = x.clone().requires_grad_(True)
    f, _, _ = run_dense_block(xi, list(block.values()), CudaBlockKernels(), chunk_channels=chunk)
    (f.double() * r).sum().backward()
    return f.detach(), xi.grad, param_grads(block)


def _run_naive(block, x, r):
    xi = x.clone().requires_grad_(True)
    out = block(xi)
    (out.double() * r).sum().backward()
    return out.detach(), xi.grad, param_grads(block)


# chunk 4 splits the 7 + 5l channel prefixes unevenly: the scratch chunk is reused with a short
# last chunk, and G[:, a:e] is accumulated chunk by chunk.
@pytest.mark.parametrize("chunk", [0, 4], ids=["one-chunk", "chunk4"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_cuda_block_kernels_match_naive(mode, channels_last, chunk):
    torch.manual_seed(0)
    ours = densenet_fast.DenseBlock(3, 7, 3, 5, backend="torch")
    randomize_bn_(ours, 1)
    naive = reference.DenseBlock(3, 7, 3, 5, 0.0)
    naive.load_state_dict(ours.state_dict())
    exact = copy.deepcopy(naive).double()
    for m in (ours, naive, exact):
        m.train(mode == "train")
    x = seeded_input((2, 7, 9, 7), 2, torch.float32, channels_last, scale=1.5, offset=0.4)
    r = torch.randn(2, 22, 9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fast = _run_ours(ours, x, chunk, r)
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
    rsqrt of their own (each such recompute was five tiny launches per BN on the GPU)."""
    torch.manual_seed(6)
    block = densenet_fast.DenseBlock(3, 6, 2, 4, backend="torch")
    x = seeded_input((2, 6, 5, 5), 7).requires_grad_(True)
    with DispatchLog(lambda func, args: func.overloadpacket.__name__) as fwd:
        f, _, _ = run_dense_block(x, list(block.values()), CudaBlockKernels())
    with DispatchLog(lambda func, args: func.overloadpacket.__name__) as bwd:
        f.sum().backward()
    assert fwd.entries.count("rsqrt") == 2 * 3, fwd.entries.count("rsqrt")  # norm1 and norm2 of 3 layers
    assert bwd.entries.count("rsqrt") == 0, bwd.entries
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())
