"""Microbenchmarks of each op, ours against the plain-PyTorch reference (pytest-benchmark).

    pip install pytest-benchmark
    python -m pytest benchmarks/test_ops_bench.py --benchmark-group-by=group --benchmark-columns=median,iqr,ops

Not part of CI (pytest's testpaths is tests/).  Shapes are DenseNet-BC-100's first block: a
216-channel buffer at 32x32, the last layer reading its 204-channel prefix (a channel slice, as
in the model).  On a GPU the batch is 64 and each call ends with a synchronize, so the timings
are of finished work; on the CPU the batch is 16.  The model-level benchmarks (memory, time,
CSV) are `densenet-fast bench`; these only time single ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

from densenet_fast import reference  # noqa: E402
from densenet_fast.modules import DenseBlock, Transition  # noqa: E402
from densenet_fast.ops.bn_relu import NormStats, bn_relu, bn_relu_backward  # noqa: E402
from densenet_fast.ops.channel_stats import channel_stats  # noqa: E402
from densenet_fast.ops.conv1x1 import conv1x1  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 64 if DEVICE == "cuda" else 16
C_BUF, C_PREFIX, BOTTLENECK, SIZE = 216, 204, 48, 32
LAYOUTS = ["nchw", "channels_last"]


def synced(fn):
    """fn followed by a device synchronize, so that GPU timings cover the kernels."""
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def block_buffer(layout: str) -> torch.Tensor:
    """The block buffer F (N, 216, 32, 32); ops read its 204-channel prefix in place."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, C_BUF, SIZE, SIZE, generator=gen).to(DEVICE).contiguous(memory_format=fmt)


def bn_params(c: int):
    gen = torch.Generator().manual_seed(1)
    weight = (0.5 + torch.rand(c, generator=gen)).to(DEVICE)
    bias = torch.randn(c, generator=gen).to(DEVICE)
    return weight, bias


def normalised_prefix(layout: str):
    """(x, weight, bias, stats): the 204-channel prefix, BN parameters and its batch statistics."""
    x = block_buffer(layout)[:, :C_PREFIX]
    weight, bias = bn_params(C_PREFIX)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return x, weight, bias, NormStats(mean, var, True)


def per_case(*providers: str):
    """Parametrize a benchmark over the layouts and the given providers."""
    def wrap(fn):
        return pytest.mark.parametrize("layout", LAYOUTS)(pytest.mark.parametrize("provider", providers)(fn))
    return wrap


def run(benchmark, group: str, layout: str, fn) -> None:
    benchmark.group = f"{group} {layout}"
    benchmark(synced(fn))


@per_case("naive", "ours")
def test_channel_stats(benchmark, provider, layout):
    x = block_buffer(layout)[:, :C_PREFIX]
    fn = (lambda: torch.var_mean(x, dim=(0, 2, 3), correction=0)) if provider == "naive" else \
        (lambda: channel_stats(x))
    run(benchmark, "channel_stats", layout, fn)


@per_case("naive", "ours")
def test_bn_relu(benchmark, provider, layout):
    x, weight, bias, stats = normalised_prefix(layout)
    fn = (lambda: reference.bn_relu_ref(x, stats.mean, stats.var, weight, bias, 1e-5)) if provider == "naive" \
        else (lambda: bn_relu(x, stats, weight, bias, 1e-5))
    run(benchmark, "bn_relu forward", layout, fn)


@per_case("naive", "ours")
def test_bn_relu_backward(benchmark, provider, layout):
    x, weight, bias, stats = normalised_prefix(layout)
    grad = torch.randn_like(x)
    if provider == "naive":
        # What autograd runs for the naive layer: relu backward, then batch-norm backward.
        xr = x.detach().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()

        def fn():
            z = F.relu(F.batch_norm(xr, None, None, w, b, True))
            return torch.autograd.grad(z, (xr, w, b), grad)
    else:
        z = bn_relu(x, stats, weight, bias, 1e-5)

        def fn():
            return bn_relu_backward(grad, x, z, stats, weight, 1e-5)
    run(benchmark, "bn_relu backward", layout, fn)


@per_case("naive", "ours")
def test_conv1x1(benchmark, provider, layout):
    z = block_buffer(layout)[:, :C_PREFIX]
    weight = torch.randn(BOTTLENECK, C_PREFIX, 1, 1, device=DEVICE)
    fn = (lambda: F.conv2d(z, weight)) if provider == "naive" else (lambda: conv1x1(z, weight))
    run(benchmark, "conv1x1", layout, fn)


def _train_step(module, x):
    def fn():
        module.zero_grad(set_to_none=True)
        xr = x.detach().requires_grad_()
        out = module(xr)
        out.backward(torch.ones_like(out))
    return fn


@per_case("naive", "ours")
def test_transition_forward_backward(benchmark, provider, layout):
    module = reference.Transition(C_BUF, C_BUF // 2) if provider == "naive" else Transition(C_BUF, C_BUF // 2)
    run(benchmark, "transition fwd+bwd", layout, _train_step(module.to(DEVICE), block_buffer(layout)))


@per_case("naive", "checkpoint", "ours")
def test_dense_block_forward_backward(benchmark, provider, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = block_buffer(layout)[:, :24].contiguous(memory_format=fmt)
    if provider == "ours":
        module = DenseBlock(16, 24, 4, 12)
    else:
        module = reference.DenseBlock(16, 24, 4, 12, 0.0, checkpoint=provider == "checkpoint")
    run(benchmark, "dense block fwd+bwd (16 layers, k=12)", layout, _train_step(module.to(DEVICE), x))
