"""Dense layers without bottleneck (bn_size=0): BN-ReLU-Conv3x3 of the whole input, the original
DenseNet's layer (Huang et al. 2017, DenseNet without "B") and FC-DenseNet's.

The reference is checked against an explicit torch.cat loop over BatchNorm2d-ReLU-Conv3x3
modules; the efficient block, layer and model against the reference: float64 for the torch
backend (tolerances.TOLERANCES[float64]), float32 three-way (within 2x the naive model's own error
against a float64 twin) for the cuda backend's kernel set (the extension's CPU kernels here) and
the triton backend's (triton's interpreter on the CPU).  Each backend runs these layers with its
own BN-ReLU-Conv3x3 applied to the block's channel prefix, inside its own block loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import densenet_fast
from densenet_fast import _ext, reference, triton_kernels
from densenet_fast.ops.dense_block import run_dense_block
from builders import (assert_compiled_matches_eager, assert_same_step, copy_weights, param_grads, randomize_bn_,
                      seeded_input, step_grads)
from helpers import DispatchLog
from tolerances import assert_close, assert_within_naive_error

F64 = torch.float64
LAYERS, C0, K = 3, 6, 4


def test_reference_plain_block_is_cat_bn_relu_conv3x3():
    """reference.DenseBlock(bn_size=0): each layer is BatchNorm2d, ReLU and a bias-free 3x3 conv
    (padding 1) of the concatenation of everything before it."""
    torch.manual_seed(0)
    block = randomize_bn_(reference.DenseBlock(LAYERS, C0, 0, K, 0.0), 1).double()
    assert [n for n, _ in block.denselayer2.named_children()] == ["norm1", "relu1", "conv1"]
    explicit = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(C0 + i * K), nn.ReLU(),
                                           nn.Conv2d(C0 + i * K, K, 3, padding=1, bias=False))
                             for i in range(LAYERS)).double()
    for seq, layer in zip(explicit, block.values()):
        seq[0].load_state_dict(layer.norm1.state_dict())
        seq[2].load_state_dict(layer.conv1.state_dict())
    x = seeded_input((2, C0, 5, 7), 2, F64)
    features = [x]
    for seq in explicit:
        features.append(seq(torch.cat(features, 1)))
    assert_close(block(x), torch.cat(features, 1), F64, "reference plain block")


@pytest.mark.parametrize("bn_size", [-1, 1.5, True])
def test_bad_bn_size_raises(bn_size):
    with pytest.raises(ValueError, match="bn_size must be an int >= 0"):
        densenet_fast.DenseBlock(2, 4, bn_size, 3)


def _pair(seed: int, drop_rate: float = 0.0, chunk: int = 0):
    torch.manual_seed(seed)
    ours = randomize_bn_(densenet_fast.DenseBlock(LAYERS, C0, 0, K, drop_rate, backend="torch", chunk_channels=chunk),
                         seed + 1)
    naive = reference.DenseBlock(LAYERS, C0, 0, K, drop_rate)
    copy_weights(ours, naive)
    return ours, naive


@pytest.mark.parametrize("chunk", [0, 4], ids=["one-chunk", "chunks-of-4"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_plain_block_matches_reference(mode, channels_last, chunk):
    """chunk 4: the backward rebuilds relu(bn1(prefix)) and forms its gradients 4 input channels
    at a time (prefixes of 6, 10, 14 channels: a partial last chunk in each)."""
    ours, naive = (m.double() for m in _pair(3, chunk=chunk))
    for m in (ours, naive):
        m.train(mode == "train")
    x = seeded_input((2, C0, 5, 7), 4, F64, channels_last)
    got = assert_same_step(ours, naive, x, 5, "plain block")
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_plain_layer_alone_matches_reference():
    """DenseLayer(bn_size=0) on a list of inputs returns the k new channels."""
    torch.manual_seed(6)
    ours = randomize_bn_(densenet_fast.DenseLayer(C0 + K, K, 0, backend="torch"), 7).double()
    naive = reference.DenseLayer(C0 + K, K, 0, 0.0).double()
    copy_weights(ours, naive)
    parts = [seeded_input((2, C0, 4, 5), 8, F64), seeded_input((2, K, 4, 5), 9, F64)]
    assert_close(ours(parts), naive(parts), F64, "plain layer output")


def _kernel_sets():
    sets = []
    if _ext.HAS_C:
        from densenet_fast.ops.cuda_block import CudaBlockKernels
        sets += [pytest.param(lambda: CudaBlockKernels(whole=True), id="cuda-whole"),
                 pytest.param(lambda: CudaBlockKernels(whole=False), id="cuda-per-layer")]
    else:
        sets.append(pytest.param(None, id="cuda", marks=pytest.mark.skip(reason=f"no extension ({_ext.IMPORT_ERROR})")))
    if triton_kernels.HAS_TRITON and triton_kernels.INTERPRET:
        from densenet_fast.triton_kernels.block_kernels import TritonBlockKernels
        sets.append(pytest.param(TritonBlockKernels, id="triton"))
    else:
        sets.append(pytest.param(None, id="triton", marks=pytest.mark.skip(
            reason="the triton kernel set runs here under TRITON_INTERPRET=1 (tests/conftest.py)")))
    return sets


@pytest.mark.parametrize("chunk", [0, 4], ids=["one-chunk", "chunks-of-4"])
@pytest.mark.parametrize("make_kernels", _kernel_sets())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_plain_block_in_kernel_backends(make_kernels, channels_last, chunk):
    """The kernel backends run plain layers on their own BN-ReLU-Conv3x3 of the prefix (cuda: the
    extension's bn_relu_out and cuDNN, its chunked BN backward kernels; triton: the fused 3x3
    kernel reading the prefix in place, the plain-PyTorch chunked backward; the C++ loop
    declines such blocks): float32 results within the naive error."""
    ours, naive = _pair(10, chunk=chunk)
    exact = copy.deepcopy(naive).double()
    x = seeded_input((2, C0, 5, 7), 11, torch.float32, channels_last, scale=1.5, offset=0.4)
    r = torch.randn(2, C0 + LAYERS * K, 5, 7, generator=torch.Generator().manual_seed(12), dtype=F64)
    xi = x.clone().requires_grad_(True)
    with DispatchLog() as log:
        fbuf, _, _ = run_dense_block(xi, list(ours.values()), make_kernels(), chunk_channels=chunk)
    assert not [op for op in log.entries if "batch_norm" in op], "forward BN-ReLU left to ATen"
    (fbuf.double() * r).sum().backward()
    fast = (fbuf.detach(), xi.grad, param_grads(ours))
    results = []
    for model, inp in ((naive, x), (exact, x.double())):
        xn = inp.clone().requires_grad_(True)
        out = model(xn)
        (out.double() * r).sum().backward()
        results.append((out.detach(), xn.grad, param_grads(model)))
    slow, ref = results
    assert_within_naive_error(fast[0], slow[0], ref[0], torch.float32, "block output")
    assert_within_naive_error(fast[1], slow[1], ref[1], torch.float32, "input grad")
    for name in ref[2]:
        assert_within_naive_error(fast[2][name], slow[2][name], ref[2][name], torch.float32, f"grad {name}")


def test_plain_densenet_matches_reference():
    """A whole DenseNet without bottlenecks (the original DenseNet, here with compression 1): a
    training step, then the running statistics."""
    torch.manual_seed(13)
    naive = randomize_bn_(reference.DenseNet(4, (2, 3), 6, 0, 0.0, 3, small_inputs=True, compression=1.0), 14)
    ours = densenet_fast.DenseNet(4, (2, 3), 6, 0, 0.0, 3, backend="torch", small_inputs=True, compression=1.0)
    copy_weights(naive, ours)
    naive.double()
    ours.double()
    assert_same_step(ours, naive, seeded_input((2, 3, 9, 8), 15, F64), 16, "plain DenseNet")


def test_convert_plain_block():
    """convert() recognises a block of plain layers and keeps its weights and buffers."""
    torch.manual_seed(17)
    naive = randomize_bn_(reference.DenseBlock(LAYERS, C0, 0, K, 0.0), 18).double()
    ours = densenet_fast.convert(naive, backend="torch")
    assert isinstance(ours, densenet_fast.DenseBlock)
    assert ours.denselayer1.conv1.kernel_size == (3, 3) and not hasattr(ours.denselayer1, "conv2")
    x = seeded_input((2, C0, 6, 5), 19, F64)
    got, want = step_grads(ours, x, 20), step_grads(naive, x, 20)
    assert_close(got[0], want[0], F64, "converted plain block output")
    for name in want[2]:
        assert_close(got[2][name], want[2][name], F64, f"grad {name}")


def test_plain_block_compiles():
    """torch.compile (inductor on the CPU) of a plain block: same output and gradients as eager."""
    ours, _ = _pair(21)
    assert_compiled_matches_eager(ours, seeded_input((2, C0, 5, 6), 22, torch.float32), 23)
