"""densenet_fast against torchvision (and densenet_fast.reference) with identical weights.

Invariant (../shared/design/dense_block.md, "Invariants"): same outputs, input gradient, parameter
gradients and running statistics as torchvision's DenseNet, in train and eval mode, in any memory
format.  Tolerances: tests/tolerances.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision.models.densenet as tvd

import densenet_fast
from densenet_fast import reference
from builders import (assert_same_keys, copy_weights, param_grads, projection_loss, randomize_bn_, seeded_input,
                      states, torchvision_densenet, train_steps, efficient_densenet)
from helpers import DispatchLog
from tolerances import assert_close, assert_within_naive_error

DTYPES = [torch.float64, torch.float32]
FORMATS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]

# Small configurations, each there for a reason:
#  cifar-k4:  CIFAR stem, growth 4 with bn_size 1 (bottleneck narrower than some prefixes),
#             17x23 (odd, so the 2x2 pools drop a row and a column).
#  imnet-k12: ImageNet stem (conv7x7/2, norm0, maxpool), three blocks (3, 2, 2), bn_size 4,
#             35x29 -> 9x8 -> 4x4 -> 2x2 after the stem and transitions.
#  cifar-k7:  growth 7, bn_size 3, 5 stem channels: no channel count is a multiple of 8.
CONFIGS = {
    "cifar-k4": dict(growth_rate=4, bn_size=1, block_config=(2, 3), num_init_features=6, small_inputs=True,
                     hw=(17, 23), batch=2),
    "imnet-k12": dict(growth_rate=12, bn_size=4, block_config=(3, 2, 2), num_init_features=16, small_inputs=False,
                      hw=(35, 29), batch=3),
    "cifar-k7": dict(growth_rate=7, bn_size=3, block_config=(2, 2), num_init_features=5, small_inputs=True,
                     hw=(9, 13), batch=4),
}

# (save_bottleneck, chunk_channels): chunk 5 splits every prefix unevenly (5 does not divide the
# channel counts), and the chunked 1x1-conv backward must give the unchunked gradients.
VARIANTS = [pytest.param(False, 0, id="recompute"), pytest.param(True, 0, id="saved"),
            pytest.param(False, 5, id="recompute-chunk5"), pytest.param(True, 5, id="saved-chunk5")]


def _twins(cfg, dtype, channels_last, save_bottleneck, chunk_channels, seed=0):
    """(torchvision, ours, exact): same weights; exact is torchvision in float64 (None when dtype
    is float64 already), the third result of the three-way float32 comparison."""
    torch.manual_seed(seed)
    tv = torchvision_densenet(cfg["growth_rate"], cfg["block_config"], cfg["num_init_features"], cfg["bn_size"],
                              num_classes=5, small_inputs=cfg["small_inputs"])
    randomize_bn_(tv, seed + 1)
    ours = efficient_densenet(growth_rate=cfg["growth_rate"], block_config=cfg["block_config"],
                              num_init_features=cfg["num_init_features"], bn_size=cfg["bn_size"], num_classes=5,
                              small_inputs=cfg["small_inputs"], save_bottleneck=save_bottleneck,
                              chunk_channels=chunk_channels)
    ours.load_state_dict(tv.state_dict(), strict=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    exact = None if dtype == torch.float64 else copy.deepcopy(tv).to(dtype=torch.float64, memory_format=fmt)
    tv = tv.to(dtype=dtype, memory_format=fmt)
    ours = ours.to(dtype=dtype, memory_format=fmt)
    return tv, ours, exact


def _check(ours, naive, exact, dtype, name):
    """float64: ours against torchvision directly.  float32: three-way (tolerances.py), because
    torchvision's own float32 result is up to 7e-5 of the max away from float64 after 3 steps."""
    if exact is None:
        assert_close(ours, naive, dtype, name)
    else:
        assert_within_naive_error(ours, naive, exact, dtype, name)


def _compare_step(row, exact_row, dtype, step):
    (out_t, gx_t, g_t), (out_o, gx_o, g_o) = row
    out_e, gx_e, g_e = exact_row[0] if exact_row is not None else (None, None, {})
    _check(out_o, out_t, out_e, dtype, f"step {step} output")
    _check(gx_o, gx_t, gx_e, dtype, f"step {step} input grad")
    assert_same_keys(g_o, g_t, f"step {step} parameter grads")
    for name in g_t:
        _check(g_o[name], g_t[name], g_e.get(name), dtype, f"step {step} grad {name}")


@pytest.mark.parametrize("save_bottleneck, chunk_channels", VARIANTS)
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_densenet_matches_torchvision(cfg_name, dtype, channels_last, save_bottleneck, chunk_channels):
    cfg = CONFIGS[cfg_name]
    tv, ours, exact = _twins(cfg, dtype, channels_last, save_bottleneck, chunk_channels)
    shape = (cfg["batch"], 3) + cfg["hw"]
    # Inputs with a non-zero mean and non-unit spread, different every step.
    xs = [seeded_input(shape, 10 + s, torch.float64, channels_last, scale=1.5, offset=0.3) for s in range(3)]
    history = train_steps([tv, ours], [x.to(dtype) for x in xs])
    exact_history = train_steps([exact], xs) if exact is not None else [None] * 3
    for step, (row, exact_row) in enumerate(zip(history, exact_history)):
        _compare_step(row, exact_row, dtype, step)
    # After 3 steps: every parameter and buffer (running_mean/var, num_batches_tracked).
    s_t, s_o = states(tv), states(ours)
    s_e = states(exact) if exact is not None else {}
    assert_same_keys(s_o, s_t, "state_dict")
    for name in s_t:
        if name.endswith("num_batches_tracked"):
            assert int(s_o[name]) == int(s_t[name]) == 3, f"{name}: ours {int(s_o[name])}, torchvision {int(s_t[name])}"
        else:
            _check(s_o[name], s_t[name], s_e.get(name), dtype, f"after 3 steps: {name}")

    # Eval mode with batch 1 (running statistics, no batch statistics needed).
    models = [m for m in (tv, ours, exact) if m is not None]
    for m in models:
        m.eval()
        m.zero_grad(set_to_none=True)
    before = states(ours)
    x = seeded_input((1, 3) + cfg["hw"], 99, torch.float64, channels_last, scale=1.5, offset=0.3)
    results = []
    for m in models:
        xi = x.to(next(m.parameters()).dtype).requires_grad_(True)
        out = m(xi)
        projection_loss(out, 7).backward()
        results.append((out.detach(), xi.grad, param_grads(m)))
    (out_t, gx_t, g_t), (out_o, gx_o, g_o) = results[:2]
    out_e, gx_e, g_e = results[2] if exact is not None else (None, None, {})
    _check(out_o, out_t, out_e, dtype, "eval output")
    _check(gx_o, gx_t, gx_e, dtype, "eval input grad")
    for name in g_t:
        _check(g_o[name], g_t[name], g_e.get(name), dtype, f"eval grad {name}")
    after = states(ours)
    for name in before:
        if "running" in name or "num_batches" in name:
            assert torch.equal(after[name], before[name]), f"eval mode moved {name}"


# --------------------------------------------------------------------------------------------
# Standalone modules
# --------------------------------------------------------------------------------------------


def _block_input(n, c0, h, w, dtype, channels_last, seed):
    """A non-contiguous channel slice of a wider tensor at an unaligned offset (3): what a block
    input looks like when it is a view into a larger buffer."""
    wide = seeded_input((n, c0 + 7, h, w), seed, dtype, channels_last, scale=2.0, offset=-0.5)
    return wide[:, 3:3 + c0]


@pytest.mark.parametrize("save_bottleneck, chunk_channels", [VARIANTS[0], VARIANTS[3]])
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("against", ["reference", "torchvision"])
def test_dense_block_matches(against, dtype, channels_last, save_bottleneck, chunk_channels):
    num_layers, c0, bn_size, k = 3, 12, 2, 5
    torch.manual_seed(3)
    ours = densenet_fast.DenseBlock(num_layers, c0, bn_size, k, backend="torch", save_bottleneck=save_bottleneck,
                                    chunk_channels=chunk_channels)
    if against == "reference":
        naive = reference.DenseBlock(num_layers, c0, bn_size, k, 0.0)
    else:
        naive = tvd._DenseBlock(num_layers, c0, bn_size, k, 0.0, memory_efficient=False)
    randomize_bn_(naive, 4)
    copy_weights(naive, ours)
    ours.to(dtype)
    naive.to(dtype)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        naive.train(mode == "train")
        x = _block_input(2, c0, 7, 9, dtype, channels_last, seed=5)
        xo = x.detach().clone().requires_grad_(True)
        xn = x.detach().clone().requires_grad_(True)
        out_o, out_n = ours(xo), naive(xn)
        assert out_o.shape == (2, c0 + num_layers * k, 7, 9)
        assert_close(out_o, out_n, dtype, f"{mode}: block output")
        projection_loss(out_o, 6).backward()
        projection_loss(out_n, 6).backward()
        assert_close(xo.grad, xn.grad, dtype, f"{mode}: block input grad")
        g_o, g_n = param_grads(ours), param_grads(naive)
        assert_same_keys(g_o, g_n, "block grads")
        for name in g_n:
            assert_close(g_o[name], g_n[name], dtype, f"{mode}: grad {name}")
        s_o, s_n = states(ours), states(naive)
        for name in s_n:
            assert_close(s_o[name].double(), s_n[name].double(), torch.float64 if "num_batches" in name else dtype,
                         f"{mode}: {name}")
        ours.zero_grad(set_to_none=True)
        naive.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("as_list", [pytest.param(False, id="tensor"), pytest.param(True, id="list")])
def test_dense_layer_matches_reference(as_list, dtype, mode):
    c_in, k, bn_size = 11, 6, 3
    torch.manual_seed(7)
    ours = densenet_fast.DenseLayer(c_in, k, bn_size, 0.0, backend="torch")
    naive = reference.DenseLayer(c_in, k, bn_size, 0.0)
    tv = tvd._DenseLayer(c_in, k, bn_size, 0.0, memory_efficient=False)
    randomize_bn_(naive, 8)
    copy_weights(naive, ours, tv)
    for m in (ours, naive, tv):
        m.to(dtype).train(mode == "train")
    # The list is torchvision's calling convention inside a block: channel counts 4 + 7.
    parts = [seeded_input((3, 4, 6, 5), 9, dtype), seeded_input((3, 7, 6, 5), 10, dtype, offset=1.0)]
    outs, grads = [], []
    for m in (ours, naive, tv):
        ins = [p.clone().requires_grad_(True) for p in parts]
        arg = ins if as_list else None
        if not as_list:
            whole = torch.cat(parts, 1).requires_grad_(True)
            ins, arg = [whole], whole
        out = m(arg)
        projection_loss(out, 11).backward()
        outs.append(out.detach())
        grads.append(([t.grad for t in ins], param_grads(m), states(m)))
    for i, name in ((1, "reference"), (2, "torchvision")):
        assert outs[0].shape == (3, k, 6, 5)
        assert_close(outs[0], outs[i], dtype, f"layer output vs {name}")
        for j, (ga, gb) in enumerate(zip(grads[0][0], grads[i][0])):
            assert_close(ga, gb, dtype, f"layer input {j} grad vs {name}")
        for pname in grads[i][1]:
            assert_close(grads[0][1][pname], grads[i][1][pname], dtype, f"layer grad {pname} vs {name}")
        for bname in grads[i][2]:
            assert_close(grads[0][2][bname].double(), grads[i][2][bname].double(), dtype, f"layer {bname} vs {name}")


def _assert_same_grads_and_states(ours, naive, names, dtype, mode):
    """Module by module: the same parameter gradients and buffers (running statistics)."""
    for o, n, what in zip(ours, naive, names):
        g_o, g_n = param_grads(o), param_grads(n)
        assert_same_keys(g_o, g_n, what)
        for name in g_n:
            assert_close(g_o[name], g_n[name], dtype, f"{mode}: {what} grad {name}")
        s_o, s_n = states(o), states(n)
        for name in s_n:
            assert_close(s_o[name].double(), s_n[name].double(), dtype, f"{mode}: {what} {name}")


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_stats", [pytest.param(False, id="own-stats"), pytest.param(True, id="block-stats")])
def test_transition_matches_reference(with_stats, dtype, channels_last):
    """Block + transition; the transition either computes its own statistics or reuses the block's
    cache (DenseBlock.forward_with_stats).  Gradients flow through both into the block input."""
    c0, k, layers, c_out = 6, 4, 2, 5
    torch.manual_seed(12)
    block = densenet_fast.DenseBlock(layers, c0, 2, k, backend="torch")
    trans = densenet_fast.Transition(c0 + layers * k, c_out, backend="torch")
    nblock = reference.DenseBlock(layers, c0, 2, k, 0.0)
    ntrans = reference.Transition(c0 + layers * k, c_out)
    randomize_bn_(nblock, 13)
    randomize_bn_(ntrans, 14)
    copy_weights(nblock, block)
    copy_weights(ntrans, trans)
    for m in (block, trans, nblock, ntrans):
        m.to(dtype)
    for mode in ("train", "eval"):
        for m in (block, trans, nblock, ntrans):
            m.train(mode == "train")
            m.zero_grad(set_to_none=True)
        # 11x13: odd, the 2x2 pool drops the last row and column.
        x = seeded_input((3, c0, 11, 13), 15, dtype, channels_last, scale=0.7, offset=2.0)
        xo = x.clone().requires_grad_(True)
        xn = x.clone().requires_grad_(True)
        if with_stats:
            fbuf, mean, var = block.forward_with_stats(xo)
            out_o = trans(fbuf, stats=(mean, var))
        else:
            out_o = trans(block(xo))
        out_n = ntrans(nblock(xn))
        assert out_o.shape == (3, c_out, 5, 6)
        assert_close(out_o, out_n, dtype, f"{mode}: transition output")
        projection_loss(out_o, 16).backward()
        projection_loss(out_n, 16).backward()
        assert_close(xo.grad, xn.grad, dtype, f"{mode}: input grad through block + transition")
        _assert_same_grads_and_states([trans, block], [ntrans, nblock], ["transition", "block"], dtype, mode)


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transition_writes_into_next_block_buffer(dtype, channels_last):
    """Block -> transition(out=next block's buffer prefix) -> block(buffer=...), the chain
    DenseNet.forward runs: the second block must not copy its input (its F is the very tensor the
    transition wrote into) and values, gradients and running statistics must equal the naive chain's,
    in train and eval mode."""
    c0, k, c_out = 6, 4, 5
    torch.manual_seed(30)
    ours = [densenet_fast.DenseBlock(2, c0, 2, k, backend="torch"),
            densenet_fast.Transition(c0 + 2 * k, c_out, backend="torch"),
            densenet_fast.DenseBlock(3, c_out, 2, k, backend="torch")]
    naive = [reference.DenseBlock(2, c0, 2, k, 0.0), reference.Transition(c0 + 2 * k, c_out),
             reference.DenseBlock(3, c_out, 2, k, 0.0)]
    for o, n, seed in zip(ours, naive, (31, 32, 33)):
        randomize_bn_(n, seed)
        copy_weights(n, o)
        o.to(dtype)
        n.to(dtype)
    b1, trans, b2 = ours
    for mode in ("train", "eval"):
        for m in ours + naive:
            m.train(mode == "train")
            m.zero_grad(set_to_none=True)
        x = seeded_input((3, c0, 11, 13), 34, dtype, channels_last, scale=0.7, offset=2.0)
        xo, xn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fbuf, mean, var = b1.forward_with_stats(xo)
        buf = b2.new_buffer(fbuf, 5, 6)
        t = trans(fbuf, stats=(mean, var), out=buf[:, :c_out])
        out_o, _, _ = b2.forward_with_stats(t, buffer=buf)
        assert out_o.data_ptr() == buf.data_ptr() == t.data_ptr(), f"{mode}: the second block copied its input"
        assert out_o.stride() == buf.stride()
        out_n = naive[2](naive[1](naive[0](xn)))
        assert_close(out_o, out_n, dtype, f"{mode}: output of block-transition-block")
        projection_loss(out_o, 35).backward()
        projection_loss(out_n, 35).backward()
        assert_close(xo.grad, xn.grad, dtype, f"{mode}: input grad through block-transition-block")
        _assert_same_grads_and_states(ours, naive, ["block1", "transition", "block2"], dtype, mode)


def test_densenet_transitions_write_into_block_buffers():
    """In DenseNet.forward every transition followed by a block writes into that block's buffer:
    transition i's output is the channel prefix of the next block's F (which the next transition
    receives as its input)."""
    torch.manual_seed(36)
    model = efficient_densenet(growth_rate=4, block_config=(2, 2, 2), num_init_features=6, bn_size=2,
                               num_classes=3, small_inputs=True)
    seen = {}
    model.features.transition1.register_forward_hook(lambda m, args, out: seen.__setitem__("t1", out))
    model.features.transition2.register_forward_pre_hook(lambda m, args: seen.__setitem__("f2", args[0]))
    with _copy_log() as copies:
        model(seeded_input((2, 3, 12, 12), 37)).sum().backward()
    assert seen["t1"].shape == (2, 7, 6, 6) and seen["f2"].shape == (2, 15, 6, 6)
    assert seen["t1"].data_ptr() == seen["f2"].data_ptr(), "block 2's buffer is not where transition 1 wrote"
    into_prefix = [shape for ptr, shape in copies.entries if ptr == seen["f2"].data_ptr() and shape == (2, 7, 6, 6)]
    assert not into_prefix, "block 2 copied its input into its buffer although transition 1 had written it there"


def _copy_log() -> DispatchLog:
    """(destination data_ptr, shape) of every aten copy_ run inside the context."""
    return DispatchLog(lambda func, args: (args[0].data_ptr(), tuple(args[0].shape))
                       if func is torch.ops.aten.copy_.default else None)


def test_transition_out_and_block_buffer_errors():
    torch.manual_seed(38)
    trans = densenet_fast.Transition(8, 4, backend="torch")
    block = densenet_fast.DenseBlock(2, 4, 2, 3, backend="torch")
    x = seeded_input((2, 8, 6, 6), 39)
    running = trans.norm.running_mean.clone()
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4, 3, 3\)"):
        trans(x, out=torch.empty(2, 5, 3, 3))
    with pytest.raises(TypeError, match="out must have the result's dtype"):
        trans(x, out=torch.empty(2, 4, 3, 3, dtype=torch.float64))
    assert torch.equal(trans.norm.running_mean, running), "a rejected out moved the running statistics"
    t = seeded_input((2, 4, 3, 3), 40)
    with pytest.raises(ValueError, match=r"buffer must have shape \(2, 10, 3, 3\)"):
        block.forward_with_stats(t, buffer=torch.empty(2, 9, 3, 3))
    with pytest.raises(TypeError, match="buffer must match input x's dtype"):
        block.forward_with_stats(t, buffer=torch.empty(2, 10, 3, 3, dtype=torch.float64))
    # A buffer whose prefix is not x: x is copied in, the result equals the unbuffered one.
    buf = torch.full((2, 10, 3, 3), float("nan"))
    torch.manual_seed(41)
    got = block.forward_with_stats(t, buffer=buf)[0]
    assert got.data_ptr() == buf.data_ptr()
    assert_close(got, block.forward_with_stats(t)[0], torch.float32, "block output with a given buffer")


def test_out_and_buffer_memory_errors():
    """Memory a transition's out or a block's buffer cannot be written through: an out whose elements
    share memory (expanded; torch's own check gives up on as_strided ones), out overlapping the
    transition's input, a buffer still holding an earlier call's F (its backward pending: the
    second call took the first's gradient silently), an input that overlaps the buffer elsewhere
    than its channel prefix. Each gave wrong values or gradients without an error. The running
    statistics do not move on a refused call; a channel-prefix input and a channel slice of a
    wider out still work."""
    torch.manual_seed(42)
    trans = densenet_fast.Transition(8, 4, backend="torch")
    block = densenet_fast.DenseBlock(2, 4, 2, 3, backend="torch")
    x = seeded_input((2, 8, 6, 6), 43)
    running = trans.norm.running_mean.clone()
    for out in (torch.empty(1, 4, 3, 3).expand(2, 4, 3, 3), torch.empty(200).as_strided((2, 4, 3, 3), (1, 1, 3, 1))):
        with pytest.raises(ValueError, match=r"out may have elements that share memory"):
            trans(x, out=out)
    wide = seeded_input((2, 12, 6, 6), 44)
    with pytest.raises(ValueError, match="out shares memory with the input x"):
        trans(wide[:, :8], out=wide[:, 8:12, :3, :3])
    assert torch.equal(trans.norm.running_mean, running), "a refused out moved the running statistics"
    into = torch.empty(2, 9, 3, 3)[:, 2:6]
    assert_close(trans(x, out=into), trans(x), torch.float32, "transition into a channel slice")

    t = seeded_input((2, 4, 3, 3), 45).requires_grad_(True)
    buf = torch.empty(2, 10, 3, 3)
    first = block.forward_with_stats(t, buffer=buf)[0]
    running = block.denselayer1.norm1.running_mean.clone()
    with pytest.raises(ValueError, match="buffer must not require grad .* F of an earlier call"):
        block.forward_with_stats(seeded_input((2, 4, 3, 3), 46), buffer=buf)
    shared = seeded_input((2, 10, 3, 3), 47)
    with pytest.raises(ValueError, match=r"input x shares memory with buffer but is not its channel prefix"):
        block.forward_with_stats(shared[:, 3:7], buffer=shared)
    assert torch.equal(block.denselayer1.norm1.running_mean, running), "a refused buffer moved the statistics"
    first.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()
    prefix = seeded_input((2, 10, 3, 3), 48)
    expected = block.forward_with_stats(prefix[:, :4].clone())[0]
    assert_close(block.forward_with_stats(prefix[:, :4], buffer=prefix)[0], expected, torch.float32,
                 "block whose input is its buffer's channel prefix")


def test_transition_standalone_on_plain_tensor():
    """A Transition used alone (no block before it, so no cache), on a plain NCHW tensor."""
    torch.manual_seed(17)
    ours = densenet_fast.Transition(9, 4, backend="torch").double()
    naive = reference.Transition(9, 4).double()
    randomize_bn_(naive, 18)
    copy_weights(naive, ours)
    x = seeded_input((2, 9, 8, 6), 19, torch.float64, offset=-1.0)
    xo, xn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_o, out_n = ours(xo), naive(xn)
    assert_close(out_o, out_n, torch.float64, "transition output")
    projection_loss(out_o, 20).backward()
    projection_loss(out_n, 20).backward()
    assert_close(xo.grad, xn.grad, torch.float64, "transition input grad")
    for name, g in param_grads(naive).items():
        assert_close(param_grads(ours)[name], g, torch.float64, f"transition grad {name}")
    assert_close(ours.norm.running_var, naive.norm.running_var, torch.float64, "transition running_var")
    assert int(ours.norm.num_batches_tracked) == 1


def _batch_norm_backward_log() -> DispatchLog:
    """(train, save_mean defined, save_invstd defined) of every aten.native_batch_norm_backward."""
    return DispatchLog(lambda func, args: (args[7], args[5] is not None, args[6] is not None)
                       if func is torch.ops.aten.native_batch_norm_backward.default else None)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_backward_gets_saved_statistics(mode):
    """CUDA's native_batch_norm_backward asserts that save_mean and save_invstd are defined (on its
    channels_last path, in eval too: an H200 run failed there); the CPU kernel does not check, so
    the arguments are checked here, and the eval gradients against the naive model."""
    torch.manual_seed(42)
    ours = efficient_densenet(growth_rate=4, block_config=(2, 2), num_init_features=6, bn_size=2, num_classes=3,
                              small_inputs=True, backend="torch").double()
    naive = reference.DenseNet(4, (2, 2), 6, 2, 0, 3, small_inputs=True).double()
    randomize_bn_(naive, 43)
    copy_weights(naive, ours)
    for m in (ours, naive):
        m.train(mode == "train").to(memory_format=torch.channels_last)
    x = seeded_input((2, 3, 10, 10), 44, torch.float64, channels_last=True)
    with _batch_norm_backward_log() as calls:
        projection_loss(ours(x), 45).backward()
    projection_loss(naive(x), 45).backward()
    assert calls.entries, "no native_batch_norm_backward ran"
    assert all(train == (mode == "train") for train, _, _ in calls.entries)
    assert all(mean and invstd for _, mean, invstd in calls.entries), f"save_mean/save_invstd missing: {calls.entries}"
    grads_o, grads_n = param_grads(ours), param_grads(naive)
    for name in grads_n:
        assert_close(grads_o[name], grads_n[name], torch.float64, f"{mode}: grad {name}")
