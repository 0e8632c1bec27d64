"""Whole models on a GPU, every backend that runs there, against the naive reference.

The same invariants as tests/test_equivalence.py and tests/test_block.py (outputs, the input
gradient, every parameter gradient and the running statistics match the naive model with the same
weights), on CUDA tensors, for each backend available on the GPU (torch, cuda, triton), in NCHW and
channels_last, float32 and bf16/fp16 autocast.  Skipped without a GPU.

Tolerances (tests/tolerances.py): three-way comparisons against the naive model run in float64 on
the same GPU.  float32: ||ours - exact|| <= 2 ||naive - exact|| + 1e-5 ||exact||, per tensor, in
IEEE float32 (conftest.ieee_fp32: cuDNN's convolutions, and with them our GEMMs and Triton dots,
densenet_fast.ops.precision, without TF32).  Under torch's default both models would round their
convolutions to TF32, and a rule that compares two independent TF32 errors per tensor would fail
by chance; tests/test_precision.py checks on the GPU that TF32 is used exactly when allowed.
bf16/fp16 autocast: the rule of test_block.test_densenet_under_autocast (logits and running
statistics per tensor, gradients as one normalised vector).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from densenet_fast import FCDenseNet, reference
from densenet_fast.backends import resolve_backend
from builders import copy_weights, param_grads, projection_loss, randomize_bn_, seeded_input, states, \
    efficient_densenet
from tolerances import assert_model_within_naive_error, assert_within_naive_error

# DENSENET_FAST_GPU_TESTS_ON=cpu runs this file's logic on the CPU (debugging the tests themselves
# without a GPU; autocast then runs on the CPU too).
DEVICE = "cuda" if torch.cuda.is_available() else os.environ.get("DENSENET_FAST_GPU_TESTS_ON", "")
pytestmark = [pytest.mark.skipif(DEVICE == "", reason="needs a CUDA GPU"), pytest.mark.usefixtures("ieee_fp32")]

ALL_BACKENDS = ("torch", "cuda", "triton")
FORMATS = [pytest.param(False, id="nchw"), pytest.param(True, id="channels_last")]
# growth 12 and 20 input channels: every layer's new channels start at an offset that is not a
# multiple of 8 (unaligned slices); 13x11 images: odd sizes, pooled to 6x5.
CFG = dict(growth_rate=12, block_config=(3, 2), num_init_features=20, bn_size=4, num_classes=7, small_inputs=True)
SHAPE = (6, 3, 13, 11)


def _backend_or_skip(backend: str, dtype: torch.dtype = torch.float32) -> None:
    try:
        resolve_backend(backend, torch.device(DEVICE))
    except (ValueError, RuntimeError) as exc:
        pytest.skip(f"backend {backend!r} does not run on {DEVICE} in this installation: {exc}")
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("triton's interpreter has no bfloat16")


def _models(backend: str, channels_last: bool, save_bottleneck: bool = False, seed: int = 0, **overrides):
    cfg = {**CFG, **overrides}
    torch.manual_seed(seed)
    naive = reference.DenseNet(cfg["growth_rate"], cfg["block_config"], cfg["num_init_features"], cfg["bn_size"], 0,
                               cfg["num_classes"], small_inputs=cfg["small_inputs"])
    randomize_bn_(naive, seed + 1)
    ours = efficient_densenet(**cfg, backend=backend, save_bottleneck=save_bottleneck)
    copy_weights(naive, ours)
    exact = copy.deepcopy(naive).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [m.to(DEVICE, memory_format=fmt) for m in (ours, naive, exact)]


def _run(model, x, autocast_dtype=None):
    xi = x.clone().requires_grad_(True)
    with torch.autocast(DEVICE, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = model(xi)
    projection_loss(out.double(), 37).backward()
    return out.detach(), xi.grad, param_grads(model), states(model)


def _input(channels_last: bool, seed: int) -> torch.Tensor:
    return seeded_input(SHAPE, seed, torch.float32, channels_last, scale=1.5, offset=0.3).to(DEVICE)


@pytest.mark.parametrize("save_bottleneck", [False, True], ids=["recompute", "saved"])
@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float32_train_and_eval(backend, channels_last, save_bottleneck):
    _backend_or_skip(backend)
    _check_float32_train_and_eval(*_models(backend, channels_last, save_bottleneck), channels_last)


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_plain_layers_float32(backend, channels_last):
    """Layers without bottleneck (bn_size=0: BN-ReLU-Conv3x3), which each backend runs with its own
    BN-ReLU-Conv3x3 on the block's channel prefix (triton: the fused kernel; cuda: its BN-ReLU
    kernels and cuDNN)."""
    _backend_or_skip(backend)
    _check_float32_train_and_eval(*_models(backend, channels_last, seed=7, bn_size=0), channels_last)


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_imagenet_stem_float32(backend, channels_last):
    """torchvision's stem (conv0 7x7/2, norm0, relu0, pool0 3x3/2) as the one Function that keeps
    only the image and computes conv0 again in backward, the max pool's argmax taken again from
    the rebuilt BN-ReLU (ops.transition.stem_conv_bn_relu_pool)."""
    _backend_or_skip(backend)
    _check_float32_train_and_eval(*_models(backend, channels_last, seed=9, small_inputs=False), channels_last)


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_imagenet_stem_autocast(backend, dtype, channels_last):
    _backend_or_skip(backend, dtype)
    ours, naive, exact = _models(backend, channels_last, seed=10, small_inputs=False)
    x = seeded_input((8, 3, 24, 20), 44, torch.float32, channels_last).to(DEVICE)
    fast, slow, ref = _run(ours, x, dtype), _run(naive, x, dtype), _run(exact, x.double())
    assert_model_within_naive_error(fast, slow, ref, dtype)


def _check_float32_train_and_eval(ours, naive, exact, channels_last: bool) -> None:
    """A float32 step in train then eval mode: logits, input and parameter gradients, buffers."""
    for mode in ("train", "eval"):
        for m in (ours, naive, exact):
            m.train(mode == "train")
            m.zero_grad(set_to_none=True)
        x = _input(channels_last, 11 if mode == "train" else 12)
        fast, slow, ref = _run(ours, x), _run(naive, x), _run(exact, x.double())
        assert_within_naive_error(fast[0], slow[0], ref[0], torch.float32, f"{mode}: logits")
        assert_within_naive_error(fast[1], slow[1], ref[1], torch.float32, f"{mode}: input grad")
        for name in ref[2]:
            assert_within_naive_error(fast[2][name], slow[2][name], ref[2][name], torch.float32,
                                      f"{mode}: grad {name}")
        for name in ref[3]:
            if name.endswith("num_batches_tracked"):
                assert int(fast[3][name]) == int(slow[3][name]), name
            else:
                assert_within_naive_error(fast[3][name], slow[3][name], ref[3][name], torch.float32,
                                          f"{mode}: {name}")


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autocast(backend, dtype, channels_last):
    _backend_or_skip(backend, dtype)
    ours, naive, exact = _models(backend, channels_last, seed=5)
    x = seeded_input((16, 3, 16, 16), 43, torch.float32, channels_last).to(DEVICE)
    fast, slow, ref = _run(ours, x, dtype), _run(naive, x, dtype), _run(exact, x.double())
    assert_model_within_naive_error(fast, slow, ref, dtype)


# FC-DenseNet: two levels, growth 12 from 20 channels (unaligned channel offsets), no dropout.
FC_CFG = dict(in_channels=3, num_classes=5, down_blocks=(2, 1), bottleneck_layers=2, up_blocks=(1, 2),
              growth_rate=12, first_channels=20, drop_rate=0.0)


def _fc_models(backend: str, channels_last: bool, seed: int):
    torch.manual_seed(seed)
    naive = randomize_bn_(FCDenseNet(**FC_CFG, memory_efficient=False), seed + 1)
    ours = FCDenseNet(**FC_CFG, backend=backend)
    copy_weights(naive, ours)
    exact = copy.deepcopy(naive).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [m.to(DEVICE, memory_format=fmt) for m in (ours, naive, exact)]


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fc_densenet_float32(backend, channels_last):
    """FC-DenseNet (plain layers, the decoder's concatenation into the block buffers, the lean
    transition down, odd 13x11 images cropped by the decoder) against the naive model."""
    _backend_or_skip(backend)
    _check_float32_train_and_eval(*_fc_models(backend, channels_last, 50), channels_last)


@pytest.mark.parametrize("channels_last", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fc_densenet_autocast(backend, dtype, channels_last):
    _backend_or_skip(backend, dtype)
    ours, naive, exact = _fc_models(backend, channels_last, 52)
    x = seeded_input((4, 3, 16, 12), 53, torch.float32, channels_last).to(DEVICE)
    fast, slow, ref = _run(ours, x, dtype), _run(naive, x, dtype), _run(exact, x.double())
    assert_model_within_naive_error(fast, slow, ref, dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_large_mean_input_statistics(backend):
    """Channels whose mean is 1000x their spread: the statistics cache must keep the variance
    (a plain E[x^2] - E[x]^2 in fp32 would lose it completely)."""
    _backend_or_skip(backend)
    import densenet_fast

    torch.manual_seed(3)
    block = densenet_fast.DenseBlock(2, 8, 2, 4, backend=backend).to(DEVICE)
    naive = reference.DenseBlock(2, 8, 2, 4, 0.0).to(DEVICE)
    copy_weights(block, naive)
    exact = copy.deepcopy(naive).double()
    x = (1000.0 + torch.randn(4, 8, 9, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)).to(DEVICE)
    fast, slow, ref = block(x.float()), naive(x.float()), exact(x)
    assert_within_naive_error(fast, slow, ref, torch.float32, "block output")
    for name, buf in naive.state_dict().items():
        if "running_var" in name:
            assert_within_naive_error(block.state_dict()[name], buf, exact.state_dict()[name], torch.float32, name)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_train_cuda_graph_matches_eager(tmp_path, monkeypatch, backend):
    """`densenet-fast train --cuda-graph` follows the eager run: 72 images in batches of 16 are four
    replays of the captured step and one eager step (the short last batch); the epoch's loss and
    every parameter and buffer afterwards agree with the eager run's (float32; the tolerance covers
    cuDNN's TF32 convolutions, which both runs use)."""
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    _backend_or_skip(backend)
    from densenet_fast.train import parse_args, train
    from densenet_fast.train import engine

    replays = []
    original = engine.GraphedTrainStep.__call__

    def counted(self, x, y):
        out = original(self, x, y)
        replays.append(out is not None)
        return out

    monkeypatch.setattr(engine.GraphedTrainStep, "__call__", counted)
    common = ["--dataset", "synthetic", "--model", "densenet_bc_16_4", "--epochs", "1", "--batch-size", "16",
              "--train-samples", "72", "--test-samples", "16", "--image-size", "16", "--backend", backend,
              "--device", "cuda", "--seed", "3", "--no-progress", "--no-plot"]
    eager = train(parse_args(common + ["--output-dir", str(tmp_path / "eager")]))
    graphed = train(parse_args(common + ["--cuda-graph", "--output-dir", str(tmp_path / "graphed")]))
    assert replays == [True] * 4 + [False], replays
    torch.testing.assert_close(graphed["history"][0]["train_loss"], eager["history"][0]["train_loss"],
                               rtol=1e-3, atol=0)
    se, sg = eager["model"].state_dict(), graphed["model"].state_dict()
    for name, value in se.items():
        if value.is_floating_point():
            torch.testing.assert_close(sg[name], value, rtol=1e-3, atol=1e-4 * max(value.abs().max().item(), 1e-3),
                                       msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(sg[name], value), name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_graphed_step_matches_eager(backend):
    """Two replays of a captured training step give the gradients and running statistics of two
    eager steps on the same inputs (after the same warm-up steps on both models)."""
    if DEVICE != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    _backend_or_skip(backend)
    import torch.nn.functional as F
    from densenet_fast.graphs import GraphedStep

    eager, graphed_model, _ = _models(backend, channels_last=True, seed=9)
    xs = [_input(True, 20 + i) for i in range(5)]
    y = torch.randint(0, CFG["num_classes"], (SHAPE[0],), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    # graphed_model is the naive twin here: replace it with a second copy of ours
    graphed_model = copy.deepcopy(eager)
    step = GraphedStep(graphed_model, F.cross_entropy, xs[0], y, warmup=3)
    for _ in range(3):  # the warm-up steps GraphedStep ran (all on xs[0])
        eager.zero_grad(set_to_none=True)
        F.cross_entropy(eager(xs[0]).float(), y).backward()
    for x in xs[3:]:
        eager.zero_grad(set_to_none=True)
        loss_e = F.cross_entropy(eager(x).float(), y)
        loss_e.backward()
        loss_g = step(x, y)
        torch.testing.assert_close(loss_g, loss_e.detach(), rtol=1e-5, atol=1e-6)
        ge, gg = param_grads(eager), param_grads(graphed_model)
        for name in ge:
            torch.testing.assert_close(gg[name], ge[name], rtol=1e-4, atol=1e-5 * ge[name].abs().max().item(),
                                       msg=lambda m: f"grad {name}: {m}")
    se, sg = states(eager), states(graphed_model)
    for name in se:
        torch.testing.assert_close(sg[name], se[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) with inductor on the GPU: logits and gradients as eager."""
    if DEVICE != "cuda":
        pytest.skip("inductor on the GPU")
    _backend_or_skip(backend)
    ours, _, _ = _models(backend, channels_last=True, seed=21)
    twin = copy.deepcopy(ours)
    compiled = torch.compile(twin, fullgraph=True)
    x = _input(True, 22)
    a = _run(ours, x)
    out = _run(compiled, x)[0]
    grads = param_grads(twin)  # the compiled wrapper prefixes its names
    torch.testing.assert_close(out, a[0], rtol=1e-4, atol=1e-5 * a[0].abs().max().item())
    for name in a[2]:
        torch.testing.assert_close(grads[name], a[2][name], rtol=1e-3, atol=1e-4 * a[2][name].abs().max().item(),
                                   msg=lambda m: f"grad {name}: {m}")
