"""The memory-efficient dense block's contract beyond plain equivalence: exact gradients
(gradcheck), dropout, state between calls, running statistics, low precision and hard inputs.

References: densenet_fast.reference (naive modules) and torchvision.  Tolerances: tolerances.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torchvision.models.densenet as tvd
from torch.func import functional_call

import densenet_fast
from densenet_fast import reference
from builders import (copy_weights, efficient_densenet, param_grads, projection_loss, randomize_bn_, seeded_input,
                      states)
from helpers import DispatchLog
from tolerances import assert_close, assert_model_within_naive_error, assert_within_naive_error

F64 = torch.float64


def _tiny_block(drop_rate=0.0, save_bottleneck=False, chunk_channels=0, seed=0):
    """2 layers, 3 input channels, growth 2, bn_size 2: every Jacobian stays small."""
    torch.manual_seed(seed)
    block = densenet_fast.DenseBlock(2, 3, 2, 2, drop_rate, backend="torch", save_bottleneck=save_bottleneck,
                                     chunk_channels=chunk_channels)
    return randomize_bn_(block, seed + 1).double()


def _as_function(module, reseed=None):
    """f(x, *params) = sum_{h,w} module(x) * R with the parameters as explicit inputs (gradcheck).

    The fixed random projection R over H, W keeps every output element in play while cutting
    the number of outputs (one backward each in gradcheck) to N * C.
    reseed: call torch.manual_seed(reseed) before every forward, so that dropout draws the same
    mask in every one of gradcheck's calls.
    """
    names = [n for n, _ in module.named_parameters()]

    def f(x, *params):
        if reseed is not None:
            torch.manual_seed(reseed)
        out = functional_call(module, dict(zip(names, params)), (x,))
        if out.dim() == 2:
            return out
        r = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=out.dtype)
        return (out * r).sum(dim=(2, 3))

    return f, [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]


# --------------------------------------------------------------------------------------------
# gradcheck (float64): the hand-written backward is the derivative of the forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("save_bottleneck, chunk_channels", [(False, 0), (True, 2)], ids=["recompute", "saved-chunk2"])
def test_gradcheck_block(mode, save_bottleneck, chunk_channels):
    block = _tiny_block(save_bottleneck=save_bottleneck, chunk_channels=chunk_channels)
    block.train(mode == "train")
    f, params = _as_function(block)
    # 4x5: odd width, so the 3x3 conv's zero padding (after BN-ReLU) touches uneven borders.
    x = seeded_input((2, 3, 4, 5), 1, F64, offset=0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("save_bottleneck", [False, True], ids=["recompute", "saved"])
def test_gradcheck_block_with_dropout(save_bottleneck):
    """Reseeding before each forward makes dropout a fixed mask; gradcheck then passes only if
    backward multiplies by exactly the mask the forward drew (it is regenerated, not stored)."""
    block = _tiny_block(drop_rate=0.4, save_bottleneck=save_bottleneck)
    block.train()
    f, params = _as_function(block, reseed=0)
    x = seeded_input((2, 3, 4, 5), 2, F64).requires_grad_(True)
    torch.manual_seed(0)
    assert bool((block(x)[:, 3:] == 0).any()), "drop_rate=0.4 dropped nothing: the test would not test the mask"
    # fast_mode: one random direction per input instead of the full Jacobian (the full check of
    # the same block without dropout is test_gradcheck_block).
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradcheck_densenet(mode):
    """The whole model: stem, block, fused transition (pool before conv), block, fused head."""
    torch.manual_seed(3)
    model = efficient_densenet(growth_rate=2, block_config=(2, 1), num_init_features=3, bn_size=2, num_classes=3,
                               small_inputs=True)
    randomize_bn_(model, 4).double().train(mode == "train")
    f, params = _as_function(model)
    x = seeded_input((2, 3, 5, 6), 5, F64).requires_grad_(True)
    # fast_mode (random directions): the full Jacobian over every parameter costs ~1000 forwards.
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def test_dropout_statistics_and_mask_in_backward():
    """One layer with drop_rate p against the reference layer with drop_rate 0 (same weights):
    every new value is either 0 or reference / (1 - p), the dropped fraction is p within 5
    binomial standard deviations, and the input gradient equals the reference's gradient for the
    loss weighted by that same mask (backward applies the forward's mask)."""
    p = 0.3
    c0, k = 5, 8
    torch.manual_seed(6)
    ours = densenet_fast.DenseBlock(1, c0, 2, k, p, backend="torch").double()
    naive = reference.DenseLayer(c0, k, 2, 0.0).double()
    randomize_bn_(naive, 7)
    ours.denselayer1.load_state_dict(naive.state_dict(), strict=True)
    x = seeded_input((4, c0, 16, 16), 8, F64)
    xo, xn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(9)
    out = ours(xo)
    new = out[:, c0:]
    ref = naive(xn)
    kept = new != 0
    n = ref.numel()
    dropped = float((~kept).sum()) / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma, f"dropped fraction {dropped:.4f}, expected {p} +- {5 * sigma:.4f}"
    mask = kept.to(F64) / (1 - p)
    assert_close(new, ref * mask, F64, "survivors == reference / (1 - p)")
    assert_close(out[:, :c0], x, F64, "block output starts with its input")

    gen = torch.Generator().manual_seed(10)
    r = torch.randn(out.shape, generator=gen, dtype=F64)
    (out * r).sum().backward()
    (ref * mask * r[:, c0:]).sum().backward()
    # Our block's input gradient also has the identity path of F[:, :c0] = x.
    assert_close(xo.grad, xn.grad + r[:, :c0], F64, "input grad with the forward's dropout mask")
    for name, g in param_grads(naive).items():
        assert_close(ours.denselayer1.get_parameter(name).grad, g, F64, f"grad {name} with the mask")


def test_dropout_off_in_eval_and_fresh_masks_per_call():
    torch.manual_seed(11)
    ours = densenet_fast.DenseBlock(2, 4, 2, 6, 0.5, backend="torch").double()
    naive = reference.DenseBlock(2, 4, 2, 6, 0.5).double()
    randomize_bn_(naive, 12)
    copy_weights(naive, ours)
    x = seeded_input((2, 4, 6, 7), 13, F64)
    ours.eval()
    naive.eval()
    assert_close(ours(x), naive(x), F64, "eval mode: no dropout")
    ours.train()
    a, b = ours(x)[:, 4:], ours(x)[:, 4:]
    assert not torch.equal(a == 0, b == 0), "two training forwards drew the same dropout mask"


# --------------------------------------------------------------------------------------------
# State between calls, double backward
# --------------------------------------------------------------------------------------------


def _efficient_and_naive_net(seed, **kw):
    torch.manual_seed(seed)
    naive = reference.DenseNet(5, (2, 2), 6, 2, 0, 4, small_inputs=True).double()
    randomize_bn_(naive, seed + 1)
    ours = efficient_densenet(growth_rate=5, block_config=(2, 2), num_init_features=6, bn_size=2, num_classes=4,
                              small_inputs=True, **kw).double()
    copy_weights(naive, ours)
    return ours, naive


@pytest.mark.parametrize("save_bottleneck", [False, True], ids=["recompute", "saved"])
@pytest.mark.parametrize("kind", ["block", "densenet"])
def test_two_forwards_then_one_backward(kind, save_bottleneck):
    """Nothing is shared between calls but parameters and buffers: the second forward must not
    overwrite what the first one's backward needs (the buffer, the statistics, bottlenecks)."""
    if kind == "block":
        torch.manual_seed(14)
        ours = densenet_fast.DenseBlock(3, 4, 2, 3, backend="torch", save_bottleneck=save_bottleneck).double()
        naive = reference.DenseBlock(3, 4, 2, 3, 0.0).double()
        randomize_bn_(naive, 15)
        copy_weights(naive, ours)
        shape = (2, 4, 5, 6)
    else:
        ours, naive = _efficient_and_naive_net(14, save_bottleneck=save_bottleneck)
        shape = (2, 3, 9, 7)
    x1 = seeded_input(shape, 16, F64)
    x2 = seeded_input(shape, 17, F64, scale=3.0, offset=1.0)  # different statistics from x1
    grads = []
    for m in (ours, naive):
        a, b = x1.clone().requires_grad_(True), x2.clone().requires_grad_(True)
        out1 = m(a)
        out2 = m(b)
        (projection_loss(out1, 18) + projection_loss(out2, 19)).backward()
        grads.append((a.grad, b.grad, param_grads(m), states(m)))
    (ga_o, gb_o, gp_o, s_o), (ga_n, gb_n, gp_n, s_n) = grads
    assert_close(ga_o, ga_n, F64, "grad of the first input")
    assert_close(gb_o, gb_n, F64, "grad of the second input")
    for name in gp_n:
        assert_close(gp_o[name], gp_n[name], F64, f"grad {name}")
    for name in s_n:
        assert_close(s_o[name].double(), s_n[name].double(), F64, f"after two forwards: {name}")
        if name.endswith("num_batches_tracked"):
            assert int(s_o[name]) == 2


@pytest.mark.parametrize("kind", ["block", "densenet"])
def test_double_backward_raises(kind):
    if kind == "block":
        model = _tiny_block()
        x = seeded_input((2, 3, 4, 5), 20, F64).requires_grad_(True)
    else:
        model, _ = _efficient_and_naive_net(21)
        x = seeded_input((2, 3, 6, 6), 22, F64).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        (g,) = torch.autograd.grad(projection_loss(model(x), 23), x, create_graph=True)
        torch.autograd.grad(g.square().sum(), x)


@pytest.mark.parametrize("kind", ["block", "densenet"])
def test_backward_twice_with_retain_graph(kind):
    """loss.backward(retain_graph=True) then a second backward through the same graph (what
    gradcheck, torch.autograd.functional.jacobian and some training loops do) gives the same
    gradients twice, as it does for the naive model."""
    if kind == "block":
        ours = _tiny_block()
        naive = reference.DenseBlock(2, 3, 2, 2, 0.0).double()
        copy_weights(ours, naive)
        x = seeded_input((2, 3, 4, 5), 48, F64)
    else:
        ours, naive = _efficient_and_naive_net(49)
        x = seeded_input((2, 3, 6, 6), 50, F64)
    for m in (ours, naive):
        xi = x.clone().requires_grad_(True)
        loss = projection_loss(m(xi), 51)
        (g1,) = torch.autograd.grad(loss, xi, retain_graph=True)
        (g2,) = torch.autograd.grad(loss, xi)
        assert_close(g2, g1, F64, f"{type(m).__module__}: second backward through the retained graph")


# --------------------------------------------------------------------------------------------
# Running statistics
# --------------------------------------------------------------------------------------------


def _all_bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("kind", ["block", "densenet"])
def test_running_stats_move_once_under_no_grad(kind):
    if kind == "block":
        torch.manual_seed(24)
        ours = densenet_fast.DenseBlock(3, 4, 2, 3, backend="torch").double()
        naive = reference.DenseBlock(3, 4, 2, 3, 0.0).double()
        randomize_bn_(naive, 25)
        copy_weights(naive, ours)
        x = seeded_input((3, 4, 5, 6), 26, F64, offset=2.0)
    else:
        ours, naive = _efficient_and_naive_net(24)
        x = seeded_input((3, 3, 7, 9), 26, F64, offset=2.0)
    with torch.no_grad():
        out_o, out_n = ours(x), naive(x)
    assert_close(out_o, out_n, F64, "no_grad train-mode output")
    s_o, s_n = states(ours), states(naive)
    for name in s_n:
        assert_close(s_o[name].double(), s_n[name].double(), F64, f"no_grad: {name}")
    for bn in _all_bns(ours):
        assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("momentum", [None, 0.3], ids=["cumulative", "momentum0.3"])
def test_bn_momentum(momentum):
    """momentum=None is nn.BatchNorm2d's cumulative average (factor 1/num_batches_tracked)."""
    ours, naive = _efficient_and_naive_net(27)
    for bn in _all_bns(ours) + _all_bns(naive):
        bn.momentum = momentum
    for step in range(3):
        x = seeded_input((2, 3, 8, 7), 28 + step, F64, scale=1.0 + step, offset=step - 1.0)
        for m in (ours, naive):
            projection_loss(m(x.clone().requires_grad_(True)), 31).backward()
    s_o, s_n = states(ours), states(naive)
    for name in s_n:
        if "running" in name or "num_batches" in name:
            assert_close(s_o[name].double(), s_n[name].double(), F64, f"momentum={momentum}: {name}")


def test_eval_uses_running_stats():
    """Eval mode normalises with the running buffers: matches the reference, does not depend on
    the rest of the batch, and leaves the buffers alone."""
    ours, naive = _efficient_and_naive_net(32)
    ours.eval()
    naive.eval()
    before = states(ours)
    x = seeded_input((3, 3, 8, 8), 33, F64, offset=0.7)
    out = ours(x)
    assert_close(out, naive(x), F64, "eval output")
    assert_close(ours(x[1:2]), out[1:2], F64, "eval output of one sample alone vs inside the batch")
    after = states(ours)
    for name in before:
        assert torch.equal(after[name], before[name]), f"eval changed {name}"


def test_state_dict_round_trip_ours_reference_torchvision():
    torch.manual_seed(34)
    ours = densenet_fast.DenseBlock(3, 5, 3, 4, backend="torch")
    randomize_bn_(ours, 35)
    naive = reference.DenseBlock(3, 5, 3, 4, 0.0)
    tv = tvd._DenseBlock(3, 5, 3, 4, 0.0)
    naive.load_state_dict(ours.state_dict(), strict=True)
    tv.load_state_dict(naive.state_dict(), strict=True)
    back = densenet_fast.DenseBlock(3, 5, 3, 4, backend="torch")
    back.load_state_dict(tv.state_dict(), strict=True)
    s0, s1 = ours.state_dict(), back.state_dict()
    assert list(s0) == list(s1) == list(tv.state_dict())
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name
    x = seeded_input((2, 5, 6, 6), 36)
    for m in (ours, naive, tv, back):
        m.eval()
    ref = tv(x)
    for m, what in ((ours, "ours"), (naive, "reference"), (back, "round-tripped")):
        assert_close(m(x), ref, torch.float32, f"{what} vs torchvision")


# --------------------------------------------------------------------------------------------
# Low precision and hard inputs: three-way comparisons (tolerances.assert_within_naive_error)
# --------------------------------------------------------------------------------------------


def _run(model, x, autocast_dtype=None):
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(xi)
    projection_loss(out.float() if out.dtype != F64 else out, 37).backward()
    return out.detach(), xi.grad, param_grads(model), states(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_block_under_autocast(dtype):
    """ours-under-autocast vs naive-under-autocast, both against the float64 reference.

    The input is already representable in `dtype` (as a block input is inside an autocast net,
    where the stem conv or a transition produced it): the block keeps its buffer in the autocast
    dtype and rounds an fp32 input into it, while the naive block keeps x in fp32 for every
    norm1, so an fp32 input would measure that one rounding rather than the block's arithmetic.
    """
    torch.manual_seed(38)
    ours = densenet_fast.DenseBlock(3, 10, 2, 6, backend="torch")
    naive = reference.DenseBlock(3, 10, 2, 6, 0.0)
    randomize_bn_(naive, 39)
    copy_weights(naive, ours)
    exact = copy.deepcopy(naive).double()
    # N*H*W = 2048 values per channel: enough that one rounding-flipped ReLU does not dominate.
    x = seeded_input((8, 10, 16, 16), 40, offset=0.5).to(dtype).float()
    fast = _run(ours, x, dtype)
    slow = _run(naive, x, dtype)
    ref = _run(exact, x.double())
    assert fast[0].dtype == dtype, f"block output under autocast should be {dtype}, got {fast[0].dtype}"
    assert_within_naive_error(fast[0], slow[0], ref[0], dtype, "output")
    assert_within_naive_error(fast[1], slow[1], ref[1], dtype, "input grad")
    for name in ref[2]:
        assert fast[2][name].dtype == torch.float32, f"{name}.grad must reach the fp32 parameter"
        assert_within_naive_error(fast[2][name], slow[2][name], ref[2][name], dtype, f"grad {name}")
    for name in ref[3]:
        if "running" in name:
            assert_within_naive_error(fast[3][name], slow[3][name], ref[3][name], dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_densenet_under_autocast(dtype):
    """A whole model (stem, blocks, fused transition and head) under autocast.

    Outputs and running statistics are compared tensor by tensor.  The gradients are compared as
    one vector (the input gradient and every parameter gradient, each divided by the norm of its
    exact value): with 2 and 5 layers per block, ReLU masks flipped by rounding make single
    low-precision gradient tensors scatter by 2-10% of their norm, for the naive model as much as
    for ours, so only the aggregate is a stable measure of accuracy (measured over 8 seeds:
    ours/naive error ratio 0.3-0.6 for the aggregate, 0.2-5 for single tensors).
    """
    torch.manual_seed(41)
    naive = reference.DenseNet(6, (2, 2), 8, 2, 0, 5, small_inputs=True)
    randomize_bn_(naive, 42)
    ours = efficient_densenet(growth_rate=6, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5,
                              small_inputs=True)
    copy_weights(naive, ours)
    exact = copy.deepcopy(naive).double()
    x = seeded_input((8, 3, 16, 16), 43)
    fast = _run(ours, x, dtype)
    slow = _run(naive, x, dtype)
    ref = _run(exact, x.double())
    assert_model_within_naive_error(fast, slow, ref, dtype)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_densenet_in_low_precision(dtype, mode):
    """The whole model converted with model.to(dtype) (no autocast: parameters, buffers and data
    all in dtype), against the naive model converted the same way and the float64 reference.
    Gradients are compared as one normalised vector (see test_densenet_under_autocast)."""
    torch.manual_seed(52)
    naive = reference.DenseNet(6, (2, 2), 8, 2, 0, 5, small_inputs=True)
    randomize_bn_(naive, 53)
    ours = efficient_densenet(growth_rate=6, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5,
                              small_inputs=True)
    copy_weights(naive, ours)
    exact = copy.deepcopy(naive).double()
    for m in (ours, naive, exact):
        m.train(mode == "train")
    ours.to(dtype)
    naive.to(dtype)
    x = seeded_input((8, 3, 16, 16), 54)
    fast = _run(ours, x.to(dtype))
    slow = _run(naive, x.to(dtype))
    ref = _run(exact, x.to(dtype).double())
    assert fast[0].dtype == dtype
    assert_model_within_naive_error(fast, slow, ref, dtype)


class _BlockThenTransition(nn.Module):
    """block then transition; with_cache: the block's statistics cache reaches the transition."""

    def __init__(self, block, trans, with_cache):
        super().__init__()
        self.block, self.trans, self.with_cache = block, trans, with_cache

    def forward(self, x):
        if self.with_cache:
            fbuf, mean, var = self.block.forward_with_stats(x)
            return self.trans(fbuf, stats=(mean, var))
        return self.trans(self.block(x))


@pytest.mark.parametrize("kind", ["block", "block+transition"])
def test_large_mean_inputs(kind):
    """Inputs whose mean is 1000x their spread: the statistics cache must not lose the variance
    to cancellation (E[x^2] - E[x]^2 in float32 would be all rounding error here).  float32 ours
    and float32 naive against the float64 reference (three-way)."""
    torch.manual_seed(44)
    nblock = reference.DenseBlock(2, 6, 2, 4, 0.0)
    randomize_bn_(nblock, 45)
    block = densenet_fast.DenseBlock(2, 6, 2, 4, backend="torch")
    copy_weights(nblock, block)
    if kind == "block":
        ours, naive = block, nblock
    else:
        ntrans = reference.Transition(14, 5)
        randomize_bn_(ntrans, 46)
        trans = densenet_fast.Transition(14, 5, backend="torch")
        copy_weights(ntrans, trans)

        ours, naive = _BlockThenTransition(block, trans, True), _BlockThenTransition(nblock, ntrans, False)
    exact = copy.deepcopy(naive).double()
    x64 = seeded_input((4, 6, 9, 10), 47, F64, scale=1.0, offset=1000.0)
    fast = _run(ours, x64.float())
    slow = _run(naive, x64.float())
    ref = _run(exact, x64)
    # The block's output starts with its input (mean 1000): compare the new channels only, or the
    # copy would dominate the norms.
    new = slice(6, None) if kind == "block" else slice(None)
    assert_within_naive_error(fast[0][:, new], slow[0][:, new], ref[0][:, new], torch.float32, "output")
    assert_within_naive_error(fast[1], slow[1], ref[1], torch.float32, "input grad")
    for name in ref[2]:
        assert_within_naive_error(fast[2][name], slow[2][name], ref[2][name], torch.float32, f"grad {name}")
    for name in ref[3]:
        if "running" in name:
            assert_within_naive_error(fast[3][name], slow[3][name], ref[3][name], torch.float32, name)


# --------------------------------------------------------------------------------------------
# torch.compile with inductor (the training command's --compile)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_inductor_compiled_step_matches_eager(channels_last):
    """torch.compile(model, fullgraph=True) with inductor on the CPU: logits, every gradient and
    the running statistics as in eager mode.

    A stem conv, one dense layer and the fused head are the smallest model that showed the bug this
    guards: the 1x1 conv viewed its operand with as_strided, and inductor, free to give an
    intermediate another layout than the one traced (it made the block buffer channels_last), then
    read the wrong elements -- every gradient off by O(1), the forward exact."""
    torch.manual_seed(52)
    eager = efficient_densenet(growth_rate=3, block_config=(1,), num_init_features=4, bn_size=2, num_classes=5,
                               small_inputs=True)
    randomize_bn_(eager, 53)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    eager = eager.to(memory_format=fmt)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor")
    x = seeded_input((2, 3, 6, 6), 54, torch.float32, channels_last)
    outs, grads = [], []
    for model, m in ((eager, eager), (compiled, twin)):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        projection_loss(out, 55).backward()
        outs.append(out.detach())
        grads.append((xi.grad, param_grads(m), states(m)))
    assert_close(outs[1], outs[0], torch.float32, "compiled logits")
    assert_close(grads[1][0], grads[0][0], torch.float32, "compiled input grad")
    for name, g in grads[0][1].items():
        assert_close(grads[1][1][name], g, torch.float32, f"compiled grad {name}")
    for name, s in grads[0][2].items():
        assert_close(grads[1][2][name].double(), s.double(), torch.float32, f"compiled {name}")


def test_inductor_compiled_eval_matches_eager():
    """torch.compile(fullgraph=True) of a model in eval mode with an input that requires grad (a
    saliency map, an adversarial step): logits and gradients as eager. Dynamo refused it ("Placeholder
    node not found in env") while the block returned and saved one empty tensor as both its mean
    and var."""
    torch.manual_seed(61)
    eager = efficient_densenet(growth_rate=3, block_config=(2, 1), num_init_features=4, bn_size=2, num_classes=5,
                               small_inputs=True)
    randomize_bn_(eager, 62)
    eager.eval()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor")
    x = seeded_input((2, 3, 8, 8), 63, torch.float32, False)
    results = []
    for model, m in ((eager, eager), (compiled, twin)):
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        projection_loss(out, 64).backward()
        results.append((out.detach(), xi.grad, param_grads(m)))
    assert_close(results[1][0], results[0][0], torch.float32, "compiled eval logits")
    assert_close(results[1][1], results[0][1], torch.float32, "compiled eval input grad")
    for name, g in results[0][2].items():
        assert_close(results[1][2][name], g, torch.float32, f"compiled eval grad {name}")


# torch 2.11's Dynamo asserts tracing the block's autograd.Function with dynamic shapes
# (higher_order_ops.overwrite_tensor_vt_proxy), before any of our ops run; torch 2.14 traces it.
_OLD_DYNAMO = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)


@pytest.mark.xfail(_OLD_DYNAMO, strict=True, reason="torch < 2.14 (seen on 2.11): Dynamo asserts in "
                   "overwrite_tensor_vt_proxy tracing the block's autograd.Function with dynamic shapes")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_inductor_compiled_step_with_dynamic_shapes_matches_eager(train):
    """torch.compile(dynamic=True), as a recompile for a new batch size makes it: two batch sizes
    through one compiled model, logits and gradients as eager (TOLERANCES[float32]). The backward's
    1x1 conv reshaped its operand to a size inductor had broken ("shape '[s77, 7, 1]' is invalid")
    until it used flatten."""
    torch.manual_seed(81)
    eager = efficient_densenet(growth_rate=3, block_config=(2, 1), num_init_features=4, bn_size=2, num_classes=5,
                               small_inputs=True)
    randomize_bn_(eager, 82)
    eager.train(train)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True, backend="inductor", dynamic=True)
    for batch in (2, 3):
        x = seeded_input((batch, 3, 8, 8), 83 + batch, torch.float32, False)
        results = []
        for model, m in ((eager, eager), (compiled, twin)):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            out = model(xi)
            projection_loss(out, 84).backward()
            results.append((out.detach(), xi.grad, param_grads(m)))
        assert_close(results[1][0], results[0][0], torch.float32, f"batch {batch}: compiled logits")
        assert_close(results[1][1], results[0][1], torch.float32, f"batch {batch}: compiled input grad")
        for name, g in results[0][2].items():
            assert_close(results[1][2][name], g, torch.float32, f"batch {batch}: compiled grad {name}")


@pytest.mark.parametrize("save_bottleneck", [False, True], ids=["recompute", "saved"])
def test_compiled_dropout_backward_uses_the_forward_mask(save_bottleneck):
    """Dropout under torch.compile(fullgraph=True) (aot_eager, float64): the seeded generators of
    eager mode cannot be traced, so the compiled block draws from the default generator and keeps
    the mask. F and every gradient must then equal a plain float64 composition (cat, BN, ReLU,
    conv per layer) that applies the very mask the compiled forward used, read off F's zeros.
    Tolerance: TOLERANCES[float64]."""
    p, k, c0, layers = 0.5, 3, 4, 3
    torch.manual_seed(71)
    block = densenet_fast.DenseBlock(layers, c0, 2, k, drop_rate=p).double()
    for i, layer in enumerate(block.children()):
        for bn in (layer.norm1, layer.norm2):
            g = torch.Generator().manual_seed(72 + i)
            bn.weight.data = 0.5 + torch.rand(bn.weight.shape, generator=g, dtype=torch.float64)
            bn.bias.data = torch.randn(bn.bias.shape, generator=g, dtype=torch.float64) * 0.3
    block.save_bottleneck = save_bottleneck
    x = torch.randn(3, c0, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(73))
    weights = torch.randn(3, c0 + layers * k, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(74))

    xi = x.clone().requires_grad_(True)
    f = torch.compile(block, fullgraph=True, backend="aot_eager")(xi)
    (f * weights).sum().backward()
    grads = {name: prm.grad.clone() for name, prm in block.named_parameters()}

    masks = [(f[:, c0 + l * k:c0 + (l + 1) * k] != 0).detach() for l in range(layers)]
    kept = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0.3 < kept < 0.7, f"kept fraction {kept} for p = {p}"
    xr = x.clone().requires_grad_(True)
    feats = [xr]
    for layer, mask in zip(block.children(), masks):
        h = torch.cat(feats, 1)
        z = torch.relu(torch.nn.functional.batch_norm(h, None, None, layer.norm1.weight, layer.norm1.bias, True, 0.0,
                                                      layer.norm1.eps))
        bt = torch.nn.functional.conv2d(z, layer.conv1.weight)
        z2 = torch.relu(torch.nn.functional.batch_norm(bt, None, None, layer.norm2.weight, layer.norm2.bias, True,
                                                       0.0, layer.norm2.eps))
        feats.append(torch.nn.functional.conv2d(z2, layer.conv2.weight, padding=1) * mask / (1.0 - p))
    ref = torch.cat(feats, 1)
    block.zero_grad(set_to_none=True)
    (ref * weights).sum().backward()
    assert_close(f.detach(), ref.detach(), torch.float64, "compiled dropout F")
    assert_close(xi.grad, xr.grad, torch.float64, "compiled dropout input grad")
    for name, prm in block.named_parameters():
        assert_close(grads[name], prm.grad, torch.float64, f"compiled dropout grad {name}")


def test_bn_affine_memo():
    """bn_affine keeps its vectors per (eps, parameter storage and version) on the statistics: a
    second call returns the same tensors, a changed parameter or eps recomputes, and inference
    tensors (no version counter) are computed without the memo."""
    from densenet_fast.ops.bn_relu import NormStats, bn_affine

    mean, var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 4.0, 0.25])
    w, b = torch.tensor([1.5, 0.5, -2.0]), torch.tensor([0.1, 0.2, 0.3])
    stats = NormStats(mean, var, True)
    first = bn_affine(stats, w, b, 1e-5)
    assert all(a is c for a, c in zip(bn_affine(stats, w, b, 1e-5), first))
    invstd = (var + 1e-5).rsqrt()
    assert_close(first[2], w * invstd, torch.float32, "scale")
    assert_close(first[3], b - mean * w * invstd, torch.float32, "shift")
    w.mul_(2.0)  # in place: a new version
    assert_close(bn_affine(stats, w, b, 1e-5)[2], w * invstd, torch.float32, "scale after an in-place change")
    assert_close(bn_affine(stats, w, b, 1e-3)[1], (var + 1e-3).rsqrt(), torch.float32, "invstd for another eps")
    with torch.inference_mode():
        wi, bi = w.clone(), b.clone()
        got = bn_affine(NormStats(mean, var, False), wi, bi, 1e-5)
    assert_close(got[2], w * invstd, torch.float32, "scale of inference tensors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [False, True], ids=["running-stats", "batch-stats"])
def test_bn_backward_passes_statistics_in_the_accumulate_type(dtype, batch):
    """bn_backward hands native_batch_norm_backward its weight and statistics in float32 for 16-bit
    x, also when the statistics are a fp16/bf16 model's running buffers (eval): CUDA's
    channels_last kernel refuses 16-bit save_mean ("expected scalar type Float but found Half",
    H200, torch 2.11), which the CPU kernel accepts. The gradients match float64 formulas to the
    16-bit inputs' rounding (TOLERANCES of the dtype)."""
    from densenet_fast.ops.bn_relu import NormStats, bn_backward

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 2 + 0.5).to(dtype).to(memory_format=torch.channels_last)
    dy = torch.randn(4, 3, 5, 5, generator=g).to(dtype).to(memory_format=torch.channels_last)
    w = torch.tensor([1.5, -0.5, 2.0]).to(dtype)
    if batch:
        var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = torch.tensor([0.25, 0.5, -1.0]), torch.tensor([2.0, 4.5, 3.0])
    stats_dtype = torch.float32 if batch else dtype  # a model cast to 16 bits keeps 16-bit running buffers
    stats = NormStats(mean.to(stats_dtype), var.to(stats_dtype), batch)
    log = DispatchLog(lambda func, args: [a.dtype for a in args[2:7] if isinstance(a, torch.Tensor)]
                      if func.name() == "aten::native_batch_norm_backward" else None)
    with log:
        gx, gw, gb = bn_backward(dy, x, stats, w, 1e-5)
    assert log.entries and all(d == torch.float32 for d in log.entries[0]), log.entries

    xd, dyd, wd = x.double(), dy.double(), w.double().view(1, -1, 1, 1)
    md, vd = stats.mean.double().view(1, -1, 1, 1), stats.var.double().view(1, -1, 1, 1)
    invstd = (vd + 1e-5).rsqrt()
    xhat = (xd - md) * invstd
    ref_gw, ref_gb = (dyd * xhat).sum((0, 2, 3)), dyd.sum((0, 2, 3))
    ref_gx = wd * invstd * dyd
    if batch:
        n = x.numel() // x.shape[1]
        ref_gx = wd * invstd * (dyd - ref_gb.view(1, -1, 1, 1) / n - xhat * ref_gw.view(1, -1, 1, 1) / n)
    assert (gx.dtype, gw.dtype, gb.dtype) == (dtype, dtype, dtype)
    assert_close(gx, ref_gx, dtype, "grad x")
    assert_close(gw, ref_gw, dtype, "grad weight")
    assert_close(gb, ref_gb, dtype, "grad bias")


@pytest.mark.parametrize("bn_size, kept", [(1, 3), (4, 0)], ids=["narrow-bottleneck", "wide-bottleneck"])
def test_backward_reuses_the_recomputed_prefix(bn_size, kept):
    """With the bottleneck recomputed and the prefix in one chunk, the backward keeps
    relu(bn1(F[:, :cl])) from the recompute for the 1x1 conv's backward (one BN pass over the
    prefix fewer) exactly where that raises no transient peak, 4 * B <= 3 * cl: here every layer
    for B = 8 (cl = 24, 32, 40), none for B = 32.  Counted as batch-norm applications in the
    backward (3 per layer without the reuse); the gradients must match the naive block either way."""
    torch.manual_seed(3)
    block = randomize_bn_(densenet_fast.DenseBlock(3, 24, bn_size, 8, backend="torch"), 4).double()
    naive = reference.DenseBlock(3, 24, bn_size, 8, 0.0).double()
    copy_weights(block, naive)
    x = seeded_input((2, 24, 5, 6), 5, torch.float64)
    xo, xn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_o, out_n = block(xo), naive(xn)
    with DispatchLog() as log:
        projection_loss(out_o, 6).backward()
    projection_loss(out_n, 6).backward()
    passes = log.entries.count("aten::native_batch_norm")
    assert passes == 3 * 3 - kept, f"{passes} batch-norm passes in the backward"
    assert_close(xo.grad, xn.grad, torch.float64, "input grad")
    g_o, g_n = param_grads(block), param_grads(naive)
    for name in g_n:
        assert_close(g_o[name], g_n[name], torch.float64, f"grad {name}")


def test_auto_chunks_are_never_narrower_than_the_bottleneck(monkeypatch):
    """With the automatic chunking, every 1x1-conv chunk (forward, recompute and backward) is at
    least the bottleneck's width (bn_size * k) or the whole prefix: large images must not cut the
    prefix into chunks of a few channels, each of which re-reads the whole Bt.  CHUNK_ELEMENTS is
    made small here so that the element budget alone would give 16-channel chunks; the block's
    result must not depend on the chunking (against one unchunked call)."""
    from densenet_fast.ops import dense_block as db

    class Recording(db.BlockKernels):
        def __init__(self):
            super().__init__(name="torch")
            self.steps = []

        def bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats):
            self.steps.append(("bottleneck", cl, w1.shape[0], step))
            return super().bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step, want_stats)

        def recompute_bottleneck(self, fbuf, cl, stats1, g1, b1, eps, w1, step):
            self.steps.append(("recompute", cl, w1.shape[0], step))
            return super().recompute_bottleneck(fbuf, cl, stats1, g1, b1, eps, w1, step)

        def bottleneck_backward(self, d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1=None):
            self.steps.append(("backward", cl, w1.shape[0], step))
            return super().bottleneck_backward(d_bt, fbuf, cl, stats1, g1, b1, eps, w1, step, grad_acc, z1)

    torch.manual_seed(0)
    block = randomize_bn_(densenet_fast.DenseBlock(3, 24, 4, 8, backend="torch"), 1)  # bottleneck 32
    x = torch.randn(2, 24, 6, 6)
    results = []
    for budget in (2 * 6 * 6 * 2, db.CHUNK_ELEMENTS):  # 2 channels' worth, then the real budget
        monkeypatch.setattr(db, "CHUNK_ELEMENTS", budget)
        kernels = Recording()
        xi = x.clone().requires_grad_(True)
        fbuf, _, _ = db.run_dense_block(xi, list(block.values()), kernels)
        fbuf.backward(torch.randn(fbuf.shape, generator=torch.Generator().manual_seed(2)))
        results.append((fbuf.detach(), xi.grad))
        phases = [p for p, _, _, _ in kernels.steps]
        # 3 forwards (+ the recomputes that do not keep z1 go through bottleneck), 3 recomputes, 3 backwards
        assert phases.count("recompute") == 3 and phases.count("backward") == 3 and phases.count("bottleneck") >= 3
        for phase, cl, width, step in kernels.steps:
            assert step >= min(cl, width), f"{phase} of the {cl}-channel layer: {step}-channel chunks"
    assert_close(results[0][0], results[1][0], torch.float32, "block output, small budget")
    assert_close(results[0][1], results[1][1], torch.float32, "input gradient, small budget")


# ------------------------------------------------------------------------------------------------
# GradHandoff: the transition's gradient of F becomes the block's gradient buffer
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_densenet_backward_adopts_the_transitions_gradient(monkeypatch):
    """In a float32 DenseNet step each block's backward takes its transition's (or the head's)
    gradient of F as its gradient buffer instead of copying it into a new one.  Measured (CPU
    allocator) on DenseNet-BC-100 at batch 64: 182.5 MiB with the handoff, 220.0 without (a
    block-1 buffer is 54 MiB; since each block hands its input gradient on as a copy of C0
    channels instead of a view of G, DenseNet-BC-40's peak is no longer where the handoff acts);
    the results are unchanged (test_equivalence against torchvision)."""
    import torch.nn.functional as F

    from densenet_fast.bench.memory import cpu_peak_bytes
    from densenet_fast.ops.dense_block import GradHandoff

    torch.manual_seed(4)
    model = densenet_fast.densenet_bc(depth=100, growth_rate=12, backend="torch")
    x, y = seeded_input((64, 3, 32, 32), 5, torch.float32), torch.randint(0, 10, (64,))

    def step():
        F.cross_entropy(model(x), y).backward()

    step()
    peaks = {}
    for mode in ("handoff", "copy"):
        if mode == "copy":
            monkeypatch.setattr(GradHandoff, "offer", lambda self, grad_f, fbuf: None)
        peaks[mode] = cpu_peak_bytes(step, setup=lambda: model.zero_grad(set_to_none=True))
    assert peaks["handoff"] < 0.9 * peaks["copy"], peaks


def test_handoff_leaves_an_observed_gradient_alone():
    """A gradient the user keeps (retain_grad, or a hook, on the block's output) is not adopted:
    the block accumulates into its own buffer, and F.grad stays dLoss/dF."""
    from densenet_fast.ops.dense_block import GradHandoff

    torch.manual_seed(6)
    block = randomize_bn_(densenet_fast.DenseBlock(2, 5, 2, 3, backend="torch"), 7)
    trans = densenet_fast.Transition(11, 4, backend="torch")
    x = seeded_input((2, 5, 6, 6), 8, torch.float32).requires_grad_(True)
    fbuf, mean, var = block.forward_with_stats(x)
    want = torch.autograd.grad(projection_loss(trans(fbuf, stats=(mean, var)), 9), [fbuf, x])
    for observe in ("retain_grad", "hook"):
        handoff = GradHandoff()
        fbuf, mean, var = block.forward_with_stats(x, handoff=handoff)
        seen = []
        if observe == "retain_grad":
            fbuf.retain_grad()
        else:
            fbuf.register_hook(seen.append)
        projection_loss(trans(fbuf, stats=(mean, var), handoff=handoff), 9).backward()
        kept = fbuf.grad if observe == "retain_grad" else seen[0]
        assert_close(kept, want[0], torch.float32, f"dLoss/dF seen through {observe}")
        assert_close(x.grad, want[1], torch.float32, f"input grad ({observe})")
        x.grad = None


@pytest.mark.parametrize("backend", ["torch", "cuda-kernels", "triton"])
def test_every_backend_hands_its_transition_gradient_to_the_block(backend, monkeypatch):
    """Each backend's transition and head offer their gradient of F, and each block of a float32
    DenseNet takes it (the cuda backend's kernel set through the extension's CPU kernels, the
    triton backend's transition Function under the interpreter)."""
    from densenet_fast import _ext, triton_kernels
    from densenet_fast.ops import dense_block as db

    if backend == "cuda-kernels" and not _ext.HAS_C:
        pytest.skip(f"no extension ({_ext.IMPORT_ERROR})")
    if backend == "triton" and not (triton_kernels.HAS_TRITON and triton_kernels.INTERPRET):
        pytest.skip("the triton kernel set runs here under TRITON_INTERPRET=1 (tests/conftest.py)")
    taken = []
    take = db.GradHandoff.take
    monkeypatch.setattr(db.GradHandoff, "take", lambda self, g, f, dt: taken.append(take(self, g, f, dt)) or taken[-1])
    if backend == "cuda-kernels":
        from densenet_fast.ops.cuda_block import CudaBlockKernels
        monkeypatch.setattr(densenet_fast.models.densenet, "kernels_for", lambda *a: CudaBlockKernels())
        monkeypatch.setattr(densenet_fast.modules, "kernels_for", lambda *a: CudaBlockKernels())
    torch.manual_seed(10)
    model = efficient_densenet(growth_rate=4, block_config=(2, 2), num_init_features=6, bn_size=2, num_classes=3,
                               small_inputs=True, backend="torch" if backend == "cuda-kernels" else backend)
    projection_loss(model(seeded_input((2, 3, 8, 8), 11, torch.float32)), 12).backward()
    assert len(taken) == 2 and all(t is not None for t in taken), taken
