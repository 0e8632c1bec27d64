"""Bad inputs fail early with an error that names what is wrong (not deep inside a kernel, and
never silently)."""

from __future__ import annotations

import pytest
import torch

import densenet_fast
from builders import efficient_densenet, seeded_input


def _small_net(**kw):
    torch.manual_seed(0)
    return efficient_densenet(growth_rate=4, block_config=(2, 2), num_init_features=6, bn_size=2, num_classes=3,
                              small_inputs=True, **kw)


def _modules():
    """(module, good input shape) for every public module."""
    torch.manual_seed(1)
    return {
        "DenseNet": (_small_net(), (2, 3, 8, 8)),
        "DenseBlock": (densenet_fast.DenseBlock(2, 5, 2, 3, backend="torch"), (2, 5, 6, 6)),
        "DenseLayer": (densenet_fast.DenseLayer(5, 3, 2, backend="torch"), (2, 5, 6, 6)),
        "Transition": (densenet_fast.Transition(5, 2, backend="torch"), (2, 5, 6, 6)),
    }


MODULES = ["DenseNet", "DenseBlock", "DenseLayer", "Transition"]


@pytest.mark.parametrize("name", MODULES)
def test_wrong_channel_count(name):
    module, shape = _modules()[name]
    bad = (shape[0], shape[1] + 1) + shape[2:]
    with pytest.raises(ValueError, match=rf"must have {shape[1]} channels, got {shape[1] + 1}"):
        module(torch.randn(bad))


@pytest.mark.parametrize("name", MODULES)
def test_3d_input(name):
    module, shape = _modules()[name]
    with pytest.raises(ValueError, match=r"must have 4 dims \(N, C, H, W\), got 3"):
        module(torch.randn(shape[1:]))


@pytest.mark.parametrize("name", MODULES)
def test_integer_input(name):
    module, shape = _modules()[name]
    with pytest.raises(TypeError, match="must be a floating-point tensor, got torch.int64"):
        module(torch.ones(shape, dtype=torch.int64))


@pytest.mark.parametrize("name", MODULES)
def test_input_on_another_device(name):
    """'meta' stands in for a GPU: the input's device differs from the parameters' (cpu)."""
    module, shape = _modules()[name]
    with pytest.raises(ValueError, match="input x is on meta but the module's parameters are on cpu"):
        module(torch.empty(shape, device="meta"))


@pytest.mark.parametrize("name", MODULES)
def test_float64_input_into_float32_model(name):
    module, shape = _modules()[name]
    with pytest.raises(TypeError, match="dtype torch.float64 but the module's parameters are torch.float32"):
        module(torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("name", MODULES)
def test_train_batch_of_one_1x1(name):
    """Training-mode batch statistics of one value per channel: nn.BatchNorm2d's error."""
    module, shape = _modules()[name]
    module.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, shape[1], 1, 1))
    module.eval()
    if name in ("DenseBlock", "DenseLayer"):  # no 2x2 pool, whose output would be empty (also in torchvision)
        assert torch.isfinite(module(torch.randn(1, shape[1], 1, 1))).all(), "eval mode accepts a 1x1 batch of 1"


@pytest.mark.parametrize("size", [(1, 1), (1, 6), (6, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_transition_input_under_2x2(size, training):
    """A 2x2 pool of a map under 2x2 is empty: the transition says so, naming x (torch's own pool
    error names neither), in both modes; a DenseNet whose image is too small for its transitions
    gets the same error from its transition."""
    transition, shape = _modules()["Transition"]
    transition.train(training)
    with pytest.raises(ValueError, match=rf"Transition: input x must be at least 2x2 .*got {size[0]}x{size[1]}"):
        transition(torch.randn(shape[:2] + size))
    assert transition(torch.randn(shape[:2] + (2, 3))).shape == (shape[0], 2, 1, 1)
    net = _small_net().train(training)  # one transition: 8x8 -> 4x4 -> 2x2 works, 2x2 -> 1x1 does not
    assert net(torch.randn(2, 3, 2, 2)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"Transition: input x must be at least 2x2 .*got 1x1.*too small"):
        net(torch.randn(2, 3, 1, 1))


def test_fc_transition_down_under_2x2():
    down = densenet_fast.models.TransitionDown(5, backend="torch")
    with pytest.raises(ValueError, match=r"TransitionDown: input x must be at least 2x2 .*got 1x4"):
        down(torch.randn(2, 5, 1, 4))
    assert down(torch.randn(2, 5, 2, 4)).shape == (2, 5, 1, 2)


CONSTRUCTOR_CASES = [  # (what, builder, message)
    ("growth_rate 0", lambda: densenet_fast.DenseBlock(2, 5, 2, 0), r"growth_rate must be an int >= 1, got 0"),
    ("growth_rate 0, model", lambda: densenet_fast.densenet_bc(40, 0), r"DenseNet: growth_rate must be an int >= 1"),
    ("growth_rate 0, naive", lambda: densenet_fast.DenseNet(growth_rate=0, memory_efficient=False),
     r"growth_rate must be an int >= 1, got 0"),
    ("growth_rate 2.5", lambda: densenet_fast.DenseLayer(5, 2.5, 2), r"growth_rate must be an int >= 1, got 2.5"),
    ("no input channels", lambda: densenet_fast.DenseLayer(0, 3, 2), r"num_input_features must be an int >= 1"),
    ("bn_size -1", lambda: densenet_fast.DenseLayer(5, 3, -1), r"bn_size must be an int >= 0"),
    ("drop_rate 1.5", lambda: densenet_fast.DenseBlock(2, 5, 2, 3, drop_rate=1.5), r"drop_rate must be a number in "
     r"\[0, 1\], got 1.5"),
    ("drop_rate -0.1", lambda: densenet_fast.densenet_bc(40, 12, drop_rate=-0.1), r"drop_rate .* got -0.1"),
    ("drop_rate nan", lambda: densenet_fast.DenseLayer(5, 3, 2, drop_rate=float("nan")), r"drop_rate .* got nan"),
    ("chunk_channels -3", lambda: densenet_fast.DenseBlock(2, 5, 2, 3, chunk_channels=-3),
     r"DenseBlock: chunk_channels must be an int >= 0 \(0: automatic\), got -3"),
    ("chunk_channels 2.7", lambda: _small_net(chunk_channels=2.7), r"chunk_channels must be an int >= 0 .* got 2.7"),
    ("num_init_features 0", lambda: densenet_fast.DenseNet(num_init_features=0),
     r"DenseNet: num_init_features must be an int >= 1, got 0"),
    ("compression too small", lambda: _small_net(compression=0.01),
     r"DenseNet: compression 0.01 leaves transition 1 no output channels"),
    ("transition width 0", lambda: densenet_fast.Transition(8, 0),
     r"Transition: num_output_features must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("what,build,message", CONSTRUCTOR_CASES, ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_arguments(what, build, message):
    """Arguments that would build a module failing deep inside its forward (a 0-channel tensor, a
    raw conv or reduction error) or, for a negative chunk_channels or drop_rate, running as if
    they were 0, are refused when the module is built, naming the argument."""
    with pytest.raises(ValueError, match=message):
        build()


def test_drop_rate_one_drops_everything():
    """drop_rate=1 (nn.Dropout(1.0)): every new feature is zero in training, as in the reference
    (the keep-mask's scale was 1 / 0: NaN outputs and gradients), and the input gradient is the
    reference's."""
    torch.manual_seed(3)
    block = densenet_fast.DenseBlock(2, 5, 2, 3, drop_rate=1.0, backend="torch").double()
    twin = densenet_fast.reference.DenseBlock(2, 5, 2, 3, 1.0).double()
    twin.load_state_dict(block.state_dict())
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = block(x), twin(xr)
    assert torch.equal(y[:, 5:], torch.zeros_like(y[:, 5:])), "new features must all be dropped"
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
    y.square().sum().backward()
    yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("where", ["DenseNet", "DenseBlock", "DenseLayer", "Transition"])
def test_unknown_backend(where):
    build = {
        "DenseNet": lambda b: _small_net(backend=b),
        "DenseBlock": lambda b: densenet_fast.DenseBlock(2, 5, 2, 3, backend=b),
        "DenseLayer": lambda b: densenet_fast.DenseLayer(5, 3, 2, backend=b),
        "Transition": lambda b: densenet_fast.Transition(5, 2, backend=b),
    }[where]
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; expected one of auto, torch, cuda, triton"):
        build("cudnn")


def test_cuda_backend_on_cpu_input():
    """backend='cuda' with CPU tensors: either the extension lacks CUDA kernels (RuntimeError with
    the build command) or it has them and the input is on the wrong device (ValueError); both
    messages name backend='cuda' and say what to do."""
    block = densenet_fast.DenseBlock(2, 5, 2, 3, backend="cuda")
    with pytest.raises((ValueError, RuntimeError), match=r"backend='cuda' needs (CUDA tensors|the compiled extension)") as info:
        block(torch.randn(2, 5, 4, 4))
    assert "backend='torch'" in str(info.value) or "pip install" in str(info.value)
    net = _small_net(backend="cuda")
    with pytest.raises((ValueError, RuntimeError), match=r"backend='cuda' needs"):
        net(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("depth", [99, 6, 0, 101])
def test_densenet_bc_bad_depth(depth):
    with pytest.raises(ValueError, match=rf"depth must be 6\*n \+ 4 .* got {depth}"):
        densenet_fast.densenet_bc(depth, 12)


@pytest.mark.parametrize("kw, match", [
    (dict(compression=0.0), r"compression must be in \(0, 1\]"),
    (dict(compression=1.5), r"compression must be in \(0, 1\]"),
    (dict(block_config=()), "block_config must be a non-empty list"),
    (dict(block_config=(2, 0)), "block_config must be a non-empty list of positive layer counts"),
])
def test_bad_densenet_arguments(kw, match):
    args = dict(growth_rate=4, block_config=(2, 2), num_init_features=6, bn_size=2, num_classes=3)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        densenet_fast.DenseNet(**args)


def test_dense_block_needs_a_layer():
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got 0"):
        densenet_fast.DenseBlock(0, 5, 2, 3)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_nan_input_gives_nan_output(mode):
    """NaN propagates (no exception, no hang): in train mode through the batch statistics to every
    output; in eval mode only to the sample that holds it.  The NaN pattern of the output and of
    the input gradient is the naive model's."""
    net = _small_net()
    naive = efficient_densenet(growth_rate=4, block_config=(2, 2), num_init_features=6, bn_size=2, num_classes=3,
                               small_inputs=True, memory_efficient=False)
    naive.load_state_dict(net.state_dict(), strict=True)
    x = seeded_input((3, 3, 8, 8), 2)
    x[1, 0, 3, 4] = float("nan")
    results = []
    for m in (net, naive):
        m.train(mode == "train")
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.sum().backward()
        results.append((out.detach(), xi.grad))
    (out, grad), (out_n, grad_n) = results
    if mode == "train":
        assert torch.isnan(out).all()
    else:
        assert torch.isnan(out[1]).all()
        assert torch.isfinite(out[[0, 2]]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(out_n))
    assert torch.equal(torch.isnan(grad), torch.isnan(grad_n)), "input-gradient NaN pattern differs from naive"


GRAPH_REFUSALS = [
    pytest.param(dict(drop_rate=0.2), "drop_rate=0.2", id="dropout"),
    pytest.param(dict(momentum=None), "momentum=None", id="cumulative-average"),
]


@pytest.mark.parametrize("change, message", GRAPH_REFUSALS)
def test_graphed_step_refuses_what_a_graph_would_freeze(change, message):
    """A captured step would replay one dropout mask forever, or read a host-side counter once:
    check_graphable names the offending module instead."""
    from densenet_fast.graphs import check_graphable

    net = efficient_densenet(growth_rate=4, block_config=(2,), num_init_features=6, bn_size=2, num_classes=3,
                             small_inputs=True, drop_rate=change.get("drop_rate", 0.0))
    if "momentum" in change:
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
    with pytest.raises(ValueError, match=message):
        check_graphable(net)


def test_graphed_step_needs_cuda_inputs():
    from densenet_fast.graphs import GraphedStep

    net = _small_net()
    with pytest.raises(ValueError, match="x_example must be a CUDA tensor"):
        GraphedStep(net, torch.nn.functional.cross_entropy, torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_triton_backend_on_cpu_input_without_interpreter():
    """Outside the interpreter (which the test suite switches on), backend='triton' on CPU tensors
    is a ValueError that says what to use instead (checked in a fresh process, where
    TRITON_INTERPRET is off before triton decorates anything)."""
    import os
    import subprocess
    import sys

    code = ("import torch, densenet_fast\n"
            "net = densenet_fast.DenseBlock(2, 5, 2, 3, backend='triton')\n"
            "try:\n"
            "    net(torch.randn(2, 5, 4, 4))\n"
            "except (ValueError, RuntimeError) as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith(("ValueError", "RuntimeError")), out
    assert "backend='triton' needs" in out and "backend='torch'" in out, out


def _functional_block():
    from densenet_fast.backends import kernels_for
    torch.manual_seed(4)
    block = densenet_fast.DenseBlock(2, 5, 2, 3, backend="torch")
    return list(block.values()), kernels_for("torch", torch.device("cpu"))


FUNCTIONAL_BLOCK_CASES = [  # (what, call(layers, kernels, x), error, message): run_dense_block's own checks
    ("3-D x", lambda layers, k, x: (x[0], layers, k), ValueError, r"run_dense_block: input x must have 4 dims"),
    ("channels", lambda layers, k, x: (x[:, :4], layers, k), ValueError,
     r"run_dense_block: input x must have 5 channels, got 4"),
    ("integer x", lambda layers, k, x: (x.long(), layers, k), TypeError, r"input x must be a floating-point tensor"),
    ("no layers", lambda layers, k, x: (x, [], k), ValueError, r"layers must be a non-empty sequence .* got an empty"),
    ("a block, not its layers", lambda layers, k, x: (x, densenet_fast.DenseBlock(2, 5, 2, 3), k), ValueError,
     r"layers must be a non-empty sequence of dense layers \(a block's: list\(block.values\(\)\)\), got DenseBlock"),
    ("layers out of order", lambda layers, k, x: (x, layers[::-1], k), ValueError,
     r"run_dense_block: its layers\[1\].norm1 has num_features=5; expected 11"),
    ("no kernels", lambda layers, k, x: (x, layers, None), TypeError, r"kernels must be a BlockKernels"),
]


@pytest.mark.parametrize("what,call,error,message", FUNCTIONAL_BLOCK_CASES, ids=[c[0] for c in FUNCTIONAL_BLOCK_CASES])
def test_run_dense_block_checks_its_arguments(what, call, error, message):
    """The functional entry checks what the modules check before it (each failed deep inside
    before: an unpacking error, a conv weight's shape, an IndexError, an AttributeError)."""
    from densenet_fast.ops.dense_block import run_dense_block
    layers, kernels = _functional_block()
    with pytest.raises(error, match=message):
        run_dense_block(*call(layers, kernels, torch.randn(2, 5, 4, 4)))
    with pytest.raises(ValueError, match=r"chunk_channels must be an int >= 0 .* got -1"):
        run_dense_block(torch.randn(2, 5, 4, 4), layers, kernels, chunk_channels=-1)
    assert run_dense_block(torch.randn(2, 5, 4, 4), layers, kernels)[0].shape == (2, 11, 4, 4)


FUNCTIONAL_POOL_CASES = [  # (what, keyword changes, error, message): bn_relu_pool_conv's own checks
    ("3-D fbuf", dict(fbuf=torch.randn(2, 8, 4)), ValueError, r"bn_relu_pool_conv: input fbuf must have 4 dims"),
    ("channels", dict(fbuf=torch.randn(2, 7, 4, 4)), ValueError, r"input fbuf must have 8 channels, got 7"),
    ("under 2x2", dict(fbuf=torch.randn(2, 8, 1, 3)), ValueError, r"input fbuf must be at least 2x2 .* got 1x3"),
    ("3x3 conv weight", dict(conv_weight=torch.randn(4, 8, 3, 3)), ValueError,
     r"conv_weight must be a 1x1 convolution's weight \(C_out, 8, 1, 1\), got \(4, 8, 3, 3\)"),
    ("norm without affine", dict(norm=torch.nn.BatchNorm2d(8, affine=False)), ValueError,
     r"norm must be an affine nn.BatchNorm2d"),
    ("no kernels", dict(kernels=None), TypeError, r"kernels must be a BlockKernels"),
    ("negative chunk", dict(chunk=-3), ValueError, r"chunk must be an int >= 0 .* got -3"),
]


@pytest.mark.parametrize("what,change,error,message", FUNCTIONAL_POOL_CASES, ids=[c[0] for c in FUNCTIONAL_POOL_CASES])
def test_bn_relu_pool_conv_checks_its_arguments(what, change, error, message):
    from densenet_fast.backends import kernels_for
    from densenet_fast.ops.transition import bn_relu_pool_conv
    torch.manual_seed(5)
    args = dict(fbuf=torch.randn(2, 8, 4, 4), norm=torch.nn.BatchNorm2d(8), conv_weight=torch.randn(4, 8, 1, 1),
                pool="avg2", kernels=kernels_for("torch", torch.device("cpu")), chunk=0)
    assert bn_relu_pool_conv(**args).shape == (2, 4, 2, 2)
    args.update(change)
    with pytest.raises(error, match=message):
        bn_relu_pool_conv(**args)


@pytest.mark.parametrize("stats,got", [
    ("bare", "got Tensor"), ("three", r"got \['\(5,\)"), ("wrong width", r"got \['\(4,\) torch.float32"),
    ("2-D", r"\['\(1, 5\)"), ("float64", "torch.float64 on cpu"), ("int64", "torch.int64 on cpu"),
])
def test_transition_stats_cache_is_checked(stats, got):
    """A malformed statistics cache gave a raw dtype or broadcast error (after the running
    statistics had moved), or was silently ignored (a bare tensor, a wrong-length tuple)."""
    transition, shape = _modules()["Transition"]
    x = torch.randn(shape)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    bad = {"bare": mean, "three": (mean, var, var), "wrong width": (mean[:4], var[:4]),
           "2-D": (mean[None], var[None]), "float64": (mean.double(), var.double()),
           "int64": (mean.long(), var.long())}[stats]
    running = transition.norm.running_mean.clone()
    with pytest.raises(ValueError, match=rf"stats \(the statistics cache\) must be a \(mean, var\) pair of \(5,\) "
                                         rf"torch.float32 tensors on cpu .* {got}"):
        transition(x, stats=bad)
    assert torch.equal(transition.norm.running_mean, running), "a refused cache moved the running statistics"
    torch.testing.assert_close(transition(x, stats=(mean, var)), transition(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda: densenet_fast.get_model(None), r"get_model: name must be a model name \(str\), got NoneType; known: "),
    (lambda: densenet_fast.get_model(3), r"get_model: name must be a model name \(str\), got int"),
    (lambda: densenet_fast.convert(None), r"convert: model must be an nn.Module .* got NoneType"),
    (lambda: densenet_fast.convert("densenet121"), r"convert: model must be an nn.Module .* got str"),
], ids=["get_model-None", "get_model-int", "convert-None", "convert-str"])
def test_entry_points_name_a_wrong_argument_type(call, message):
    """Each raised a bare AttributeError from inside (name.startswith, model.named_children)."""
    with pytest.raises(TypeError, match=message):
        call()


def test_block_and_transition_keyword_types():
    """stats_out and handoff of the wrong type: an AttributeError after the block ran (stats_out),
    or only in backward (handoff)."""
    block, shape = _modules()["DenseBlock"]
    transition, tshape = _modules()["Transition"]
    with pytest.raises(TypeError, match="DenseBlock: stats_out must be a densenet_fast.modules.BlockStats, got list"):
        block(torch.randn(shape), stats_out=[])
    with pytest.raises(TypeError, match="DenseBlock: handoff must be a densenet_fast.ops.dense_block.GradHandoff"):
        block(torch.randn(shape), handoff=3)
    with pytest.raises(TypeError, match="Transition: handoff must be a .*GradHandoff or None, got int"):
        transition(torch.randn(tshape), handoff=3)
