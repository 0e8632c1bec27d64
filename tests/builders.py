"""Builders shared by the test files: twin models with identical weights, seeded inputs, and the
loop that trains two models identically.  No reference math lives here (that is
densenet_fast.reference); this only wires models together.
"""

from __future__ import annotations

import copy
import re
from typing import Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision
from torch import Tensor

import densenet_fast


def randomize_bn_(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    torchvision initialises BN to weight 1, bias 0, mean 0, var 1; a kernel that ignored gamma or
    beta, or swapped mean and var, would pass against that, so tests start from random values.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model


def torchvision_densenet(growth_rate: int, block_config: Sequence[int], num_init_features: int, bn_size: int,
                         num_classes: int, small_inputs: bool) -> nn.Module:
    """torchvision's DenseNet; small_inputs swaps its ImageNet stem for the CIFAR one (one 3x3 conv,
    no norm0/relu0/pool0) so that the CIFAR configurations have a torchvision twin too."""
    tv = torchvision.models.DenseNet(growth_rate, tuple(block_config), num_init_features, bn_size, 0.0,
                                     num_classes, memory_efficient=False)
    if small_inputs:
        tv.features.conv0 = nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
        del tv.features.norm0
        del tv.features.relu0
        del tv.features.pool0
    return tv


def seeded_input(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 scale: float = 1.0, offset: float = 0.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = (offset + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def projection_loss(out: Tensor, seed: int) -> Tensor:
    """sum(out * R) with a fixed random R: every output element gets a distinct gradient (a plain
    sum would give BN-normalised outputs a zero gradient and hide errors)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    return (out * r).sum()


def param_grads(model: nn.Module) -> Dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def step_grads(model: nn.Module, x: Tensor, seed: int, forward=None) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """One forward (through `forward`, e.g. model's torch.compile wrapper, when given) and
    backward of projection_loss on a copy of x: (output, input grad, model's parameter grads)."""
    xi = x.clone().requires_grad_(True)
    out = (forward if forward is not None else model)(xi)
    projection_loss(out, seed).backward()
    return out.detach(), xi.grad, param_grads(model)


def assert_same_step(ours: nn.Module, naive: nn.Module, x: Tensor, seed: int, what: str,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """One training step on both (step_grads): outputs, input and parameter gradients, then the
    buffers (running statistics, counters), under tolerances.TOLERANCES[dtype].  Returns our output."""
    from tolerances import assert_close

    got, want = step_grads(ours, x, seed), step_grads(naive, x, seed)
    assert_close(got[0], want[0], dtype, f"{what}: output")
    assert_close(got[1], want[1], dtype, f"{what}: input grad")
    assert set(got[2]) == set(want[2]), f"{what}: parameters with gradients differ"
    for name in want[2]:
        assert_close(got[2][name], want[2][name], dtype, f"{what}: grad {name}")
    s_o, s_n = states(ours), states(naive)
    for name in s_n:
        assert_close(s_o[name].double(), s_n[name].double(), dtype, f"{what}: {name}")
    return got[0]


def assert_compiled_matches_eager(model: nn.Module, x: Tensor, seed: int) -> None:
    """torch.compile(fullgraph=True) (inductor) of a copy of model gives model's eager output,
    input and parameter gradients (step_grads) under tolerances.TOLERANCES[x.dtype]."""
    from tolerances import assert_close

    twin = copy.deepcopy(model)
    eager = step_grads(model, x, seed)
    compiled = step_grads(twin, x, seed, torch.compile(twin, fullgraph=True, backend="inductor"))
    assert_close(compiled[0], eager[0], x.dtype, "compiled output")
    assert_close(compiled[1], eager[1], x.dtype, "compiled input grad")
    for name in eager[2]:
        assert_close(compiled[2][name], eager[2][name], x.dtype, f"compiled grad {name}")


def states(model: nn.Module) -> Dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def copy_weights(src: nn.Module, *dsts: nn.Module) -> None:
    for d in dsts:
        d.load_state_dict(src.state_dict(), strict=True)


def train_steps(models: Sequence[nn.Module], inputs: Iterable[Tensor], lr: float = 0.05
                ) -> List[List[Tuple[Tensor, Tensor, Dict[str, Tensor]]]]:
    """Run the same forward + backward + SGD(momentum 0.9) step on every model for each input.

    Returns, per step, per model: (output, input gradient, parameter gradients).
    """
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in models]
    history = []
    for step, x in enumerate(inputs):
        row = []
        for m, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            xi = x.detach().clone().requires_grad_(True)
            out = m(xi)
            projection_loss(out, 1000 + step).backward()
            row.append((out.detach(), xi.grad.detach(), param_grads(m)))
            opt.step()
        history.append(row)
    return history


def assert_same_keys(a: Dict[str, Tensor], b: Dict[str, Tensor], what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: only in first {sorted(set(a) - set(b))}, " \
                             f"only in second {sorted(set(b) - set(a))}"


def efficient_densenet(**kwargs) -> densenet_fast.DenseNet:
    kwargs.setdefault("backend", "torch")
    return densenet_fast.DenseNet(**kwargs)


def seeded_buffer(shape: Sequence[int], layout: str, dtype: torch.dtype, seed: int, device: str,
                  loc: float = 0.0, spread: float = 1.0) -> Tensor:
    """A block-buffer-like tensor: loc + spread * N(0, 1), rounded to dtype, in layout "nchw" or
    "channels_last", on device (the kernel tests slice channel ranges out of it)."""
    g = torch.Generator().manual_seed(seed)
    buf = (torch.randn(shape, generator=g, dtype=torch.float64) * spread + loc).to(dtype)
    if layout == "channels_last":
        buf = buf.to(memory_format=torch.channels_last)
    return buf.to(device)


def as_torchvision_checkpoint(state: Dict[str, Tensor], counters: bool = False) -> Dict[str, Tensor]:
    """A state_dict in the format of torchvision's published DenseNet checkpoints: the dense
    layers store norm1/relu1/conv1/norm2/... as norm.1/relu.1/conv.1/norm.2/..., and no BN has
    num_batches_tracked (counters=True keeps them, renamed too)."""
    out = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v.clone() for k, v in state.items()
           if counters or not k.endswith("num_batches_tracked")}
    assert sum(".norm.1." in k for k in out) > 0, "the checkpoint naming was not applied"
    return out
