"""The one plain-PyTorch reference that tests and benchmarks import.

Two kinds of things live here:

* ``DenseLayer`` / ``DenseBlock`` / ``Transition`` / ``DenseNet``: the DenseNet of Huang et al.
  (2017) computed exactly as torchvision computes it (``torch.cat`` of every earlier feature map,
  then BatchNorm, ReLU, conv, per layer).  Module and parameter names match torchvision, so the
  state_dicts are interchangeable.  ``checkpoint=True`` is torchvision's ``memory_efficient=True``
  (the bottleneck recomputed through ``torch.utils.checkpoint``), the "checkpoint" provider of the
  benchmarks.
* ``<op>_ref`` functions: the math of every op that a kernel backend implements, written with the
  most obvious PyTorch calls.  Kernels are tested against these, never against each other.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Any, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor

__all__ = [
    "DenseLayer",
    "DenseBlock",
    "Transition",
    "DenseNet",
    "channel_stats_ref",
    "bn_relu_ref",
    "bn_relu_conv1x1_ref",
    "bn_relu_conv3x3_ref",
    "bn_backward_ref",
    "transition_ref",
    "dense_layer_ref",
    "dense_block_ref",
]


# --------------------------------------------------------------------------------------------
# Op references
# --------------------------------------------------------------------------------------------


def channel_stats_ref(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance, computed in float64.

    x: (N, C, H, W), any layout, any floating dtype (a channel slice of a block buffer is fine).
    Returns (mean, var), each (C,) float64.  The reference upcasts first so that inputs whose mean
    is far larger than their spread do not lose the variance to cancellation.
    """
    x64 = x.double()
    mean = x64.mean(dim=(0, 2, 3))
    var = (x64 - mean[None, :, None, None]).pow(2).mean(dim=(0, 2, 3))
    return mean, var


def bn_relu_ref(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """relu((x - mean) / sqrt(var + eps) * weight + bias).

    x: (N, C, H, W); mean, var, weight, bias: (C,).  Computed in the dtype of x.
    """
    shape = (1, -1, 1, 1)
    invstd = torch.rsqrt(var.to(x.dtype) + eps)
    y = (x - mean.to(x.dtype).view(shape)) * (invstd * weight.to(x.dtype)).view(shape) + bias.to(x.dtype).view(shape)
    return torch.relu(y)


def bn_relu_conv1x1_ref(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        conv_weight: Tensor) -> Tensor:
    """conv1x1(bn_relu(x)).  x: (N, C, H, W); conv_weight: (B, C, 1, 1).  Returns (N, B, H, W)."""
    return F.conv2d(bn_relu_ref(x, mean, var, weight, bias, eps), conv_weight.to(x.dtype))


def bn_relu_conv3x3_ref(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        conv_weight: Tensor) -> Tensor:
    """conv3x3(bn_relu(x), padding=1): zero padding applies AFTER BN-ReLU.

    x: (N, B, H, W); conv_weight: (k, B, 3, 3).  Returns (N, k, H, W).
    """
    return F.conv2d(bn_relu_ref(x, mean, var, weight, bias, eps), conv_weight.to(x.dtype), padding=1)


def bn_backward_ref(grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch-norm backward (Ioffe & Szegedy 2015, eq. in section 3), sums over N, H, W.

    grad_y, x: (N, C, H, W); mean, invstd, weight: (C,).
    Returns (grad_x, grad_weight, grad_bias):
      dbeta = sum(dy), dgamma = sum(dy * xhat),
      dx = gamma * invstd * (dy - dbeta / M - xhat * dgamma / M).
    """
    shape = (1, -1, 1, 1)
    m = x.numel() // x.shape[1]
    xhat = (x - mean.view(shape)) * invstd.view(shape)
    dbeta = grad_y.sum(dim=(0, 2, 3))
    dgamma = (grad_y * xhat).sum(dim=(0, 2, 3))
    dx = (weight * invstd).view(shape) * (grad_y - dbeta.view(shape) / m - xhat * dgamma.view(shape) / m)
    return dx, dgamma, dbeta


def transition_ref(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                   conv_weight: Tensor) -> Tensor:
    """avg_pool2x2(conv1x1(bn_relu(x))), in torchvision's order (conv, then pool).

    x: (N, C, H, W); conv_weight: (C_out, C, 1, 1).  Returns (N, C_out, H // 2, W // 2).
    """
    return F.avg_pool2d(bn_relu_conv1x1_ref(x, mean, var, weight, bias, eps, conv_weight), 2, 2)


def dense_layer_ref(layer: nn.Module, inputs: Sequence[Tensor], checkpoint: bool = False) -> Tensor:
    """One dense layer the naive way: its new channels from torch.cat(inputs, 1).

    layer: any dense layer module (this module's, torchvision's, densenet_fast's: norm1/relu1/
    conv1[/norm2/relu2/conv2] children and drop_rate); inputs: (N, C_i, H, W) tensors whose
    channels add up to the layer's input width.  Returns (N, k, H, W).  Running statistics move
    as nn.BatchNorm2d moves them; dropout follows layer.training.  checkpoint: torchvision's
    memory_efficient path, the concatenation and norm1-relu1-conv1 recomputed in backward (its
    known flaw kept on purpose, this being the baseline we compare against: the recomputation
    runs norm1 in training mode again, so norm1's running statistics move a second time).
    densenet_fast.DenseLayer runs this while torch.export, jit.trace or fx records
    (densenet_fast.modules.recording_graph); this module's DenseLayer always.
    """
    def bottleneck(*parts: Tensor) -> Tensor:  # torchvision's bn_function
        return layer.conv1(layer.relu1(layer.norm1(torch.cat(parts, 1))))

    h = cp.checkpoint(bottleneck, *inputs, use_reentrant=False) if checkpoint else bottleneck(*inputs)
    if has_bottleneck(layer):
        h = layer.conv2(layer.relu2(layer.norm2(h)))
    if layer.drop_rate > 0:
        h = F.dropout(h, p=layer.drop_rate, training=layer.training)
    return h


def dense_block_ref(block: nn.Module, x: Tensor) -> Tensor:
    """Run any dense block module's layers the naive way (torch.cat per layer).

    Works with this module's DenseBlock, torchvision's _DenseBlock and densenet_fast.DenseBlock,
    since all three name their layers denselayer1..L with norm1/conv1/norm2/conv2 children.
    Returns the concatenation (N, C0 + L*k, H, W).  Running statistics are updated as
    nn.BatchNorm2d would update them.
    """
    features = [x]
    for layer in block.children():
        features.append(dense_layer_ref(layer, features))
    return torch.cat(features, 1)


# --------------------------------------------------------------------------------------------
# Naive modules (torchvision's DenseNet, names and all)
# --------------------------------------------------------------------------------------------


def has_bottleneck(layer: nn.Module) -> bool:
    """Whether a dense layer is BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 (DenseNet-B, torchvision's) rather
    than the plain BN-ReLU-Conv3x3 of dense_layer_modules(bn_size=0)."""
    return "conv2" in layer._modules


def is_int(value: Any) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_drop_rate(drop_rate: Any) -> float:
    """drop_rate as a float in [0, 1] (nn.Dropout's range; 1 drops every new feature)."""
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, numbers.Real) or not 0 <= float(drop_rate) <= 1:
        raise ValueError(f"drop_rate must be a number in [0, 1], got {drop_rate!r}")
    return float(drop_rate)


def dense_layer_modules(num_input_features: int, growth_rate: int, bn_size: int) -> "OrderedDict[str, nn.Module]":
    """The submodules of a dense layer, named as torchvision names them (shared by the naive and
    the efficient DenseLayer, so their state_dicts are interchangeable).

    bn_size=0: no bottleneck, the original DenseNet's layer (Huang et al. 2017; also FC-DenseNet's):
    norm1, relu1 and conv1, a 3x3 conv from the whole input to the growth_rate new channels."""
    for name, value in (("num_input_features", num_input_features), ("growth_rate", growth_rate)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not is_int(bn_size) or bn_size < 0:
        raise ValueError(f"bn_size must be an int >= 0 (0: no bottleneck), got {bn_size!r}")
    if bn_size == 0:
        return OrderedDict([
            ("norm1", nn.BatchNorm2d(num_input_features)),
            ("relu1", nn.ReLU(inplace=True)),
            ("conv1", nn.Conv2d(num_input_features, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)),
        ])
    width = bn_size * growth_rate
    return OrderedDict([
        ("norm1", nn.BatchNorm2d(num_input_features)),
        ("relu1", nn.ReLU(inplace=True)),
        ("conv1", nn.Conv2d(num_input_features, width, kernel_size=1, stride=1, bias=False)),
        ("norm2", nn.BatchNorm2d(width)),
        ("relu2", nn.ReLU(inplace=True)),
        ("conv2", nn.Conv2d(width, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)),
    ])


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 on the concatenation of its inputs (torchvision's _DenseLayer);
    with bn_size=0, BN-ReLU-Conv3x3 (no bottleneck: norm1-relu1-conv1's result is the new channels).

    forward(x): x is a tensor (N, C_in, H, W) or a list of tensors whose channels add up to C_in.
    Returns the k = growth_rate new channels (N, k, H, W).
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 checkpoint: bool = False) -> None:
        super().__init__()
        for name, module in dense_layer_modules(num_input_features, growth_rate, bn_size).items():
            self.add_module(name, module)
        self.drop_rate = check_drop_rate(drop_rate)
        self.checkpoint = checkpoint

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:
        prev = [input] if isinstance(input, Tensor) else list(input)
        checkpoint = self.checkpoint and any(t.requires_grad for t in prev) and torch.is_grad_enabled()
        return dense_layer_ref(self, prev, checkpoint)


class DenseBlock(nn.ModuleDict):
    """L dense layers; returns torch.cat([x, new_1, ..., new_L], 1) of shape (N, C0 + L*k, H, W)."""

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, checkpoint: bool = False) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                               bn_size=bn_size, drop_rate=drop_rate, checkpoint=checkpoint)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features: Union[Tensor, List[Tensor]]) -> Tensor:
        """init_features: (N, C0, H, W), or tensors whose channels add up to C0 (densenet_fast.DenseBlock
        runs this, list input included, while torch.export, jit.trace or fx records)."""
        features = list(init_features) if isinstance(init_features, (list, tuple)) else [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 (torchvision's _Transition).  (N, C, H, W) -> (N, C_out, H/2, W/2)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


def make_stem(num_init_features: int, small_inputs: bool, in_channels: int = 3) -> "OrderedDict[str, nn.Module]":
    """The layers before the first dense block.

    ImageNet (torchvision): conv7x7/2 - BN - ReLU - maxpool3x3/2.
    CIFAR (DenseNet-BC, Huang et al. section 3): one conv3x3/1; the first dense layer's BN-ReLU
    follows directly, so the stem has no norm of its own.
    """
    for name, value in (("num_init_features", num_init_features), ("in_channels", in_channels)):
        if not is_int(value) or value < 1:
            raise ValueError(f"DenseNet: {name} must be an int >= 1, got {value!r}")
    if small_inputs:
        return OrderedDict([("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, stride=1,
                                                padding=1, bias=False))])
    return OrderedDict([
        ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(num_init_features)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ])


def transition_widths(num_init_features: int, growth_rate: int, block_config: Sequence[int],
                      compression: float) -> List[Tuple[int, int]]:
    """(block input channels, block output channels) per block, with the transitions' compression.

    torchvision uses num_features // 2; the DenseNet-BC paper uses floor(theta * m).  They agree
    for theta = 0.5, the only value torchvision knows.
    """
    widths = []
    c = num_init_features
    for i, num_layers in enumerate(block_config):
        out = c + num_layers * growth_rate
        widths.append((c, out))
        if i != len(block_config) - 1:
            c = int(out * compression) if compression != 0.5 else out // 2
            if c < 1:
                raise ValueError(f"DenseNet: compression {compression} leaves transition {i + 1} no output channels "
                                 f"(int({out} * {compression}) = 0); use a larger compression")
    return widths


def init_densenet_(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal convs, BN weight 1 / bias 0, Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 0)


class DenseNet(nn.Module):
    """The naive DenseNet (torchvision's, same arguments, same state_dict keys).

    Extra keyword-only arguments, all defaulting to torchvision's behaviour:
      checkpoint:   torchvision's memory_efficient=True (recompute the bottleneck in backward).
      small_inputs: the CIFAR stem (one 3x3 conv, no norm0/pool0) used by DenseNet-BC on 32x32.
      compression:  transition width factor theta (DenseNet-BC: 0.5).
      in_channels:  image channels (3).
    x: (N, in_channels, H, W) -> logits (N, num_classes).
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000, *, checkpoint: bool = False, small_inputs: bool = False,
                 compression: float = 0.5, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(make_stem(num_init_features, small_inputs, in_channels))
        widths = transition_widths(num_init_features, growth_rate, block_config, compression)
        for i, num_layers in enumerate(block_config):
            c_in, c_out = widths[i]
            self.features.add_module("denseblock%d" % (i + 1), DenseBlock(
                num_layers, c_in, bn_size, growth_rate, drop_rate, checkpoint=checkpoint))
            if i != len(block_config) - 1:
                self.features.add_module("transition%d" % (i + 1), Transition(c_out, widths[i + 1][0]))
        num_features = widths[-1][1]
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        init_densenet_(self)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# --------------------------------------------------------------------------------------------
# References of the fused batch-norm passes (densenet_fast.ops.fused_bn)
# --------------------------------------------------------------------------------------------

__all__ += ["fused_bn_relu_ref", "fused_bn_backward_reduce_ref", "fused_bn_backward_apply_ref", "channel_affine_ref",
            "channel_bn_backward_ref"]


def _per_channel64(v: Tensor) -> Tensor:
    return v.double().view(1, -1, 1, 1)


def fused_bn_relu_ref(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(x * scale + shift) in float64.

    x: (N, C, H, W), any dtype and layout; scale, shift: (C,).  Returns (N, C, H, W) float64.
    """
    return torch.relu(x.double() * _per_channel64(scale) + _per_channel64(shift))


def fused_bn_backward_reduce_ref(grad_z: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                                 mean: Tensor) -> Tuple[Tensor, Tensor]:
    """The reduction of a BN-ReLU backward with the ReLU mask recomputed from x, in float64.

    grad_z, x: (N, C, H, W); scale, shift, mean: (C,).  With dy = grad_z * [x * scale + shift > 0]
    returns (sum_dy, sum_dy_xmu), each (C,) float64: the sums over N, H, W of dy and of
    dy * (x - mean).
    """
    x64 = x.double()
    dy = torch.where(x64 * _per_channel64(scale) + _per_channel64(shift) > 0, grad_z.double(), 0.0)
    return dy.sum(dim=(0, 2, 3)), (dy * (x64 - _per_channel64(mean))).sum(dim=(0, 2, 3))


def fused_bn_backward_apply_ref(grad_z: Tensor, x: Tensor, scale: Tensor, shift: Tensor, mean: Tensor,
                                a: Tensor, b: Tensor, grad_x: Tensor, accumulate: bool) -> Tensor:
    """The elementwise pass of a BN-ReLU backward, in float64, out of place.

    grad_z, x, grad_x: (N, C, H, W); scale, shift, mean, a, b: (C,).  With
    dy = grad_z * [x * scale + shift > 0] and dx = scale * (dy - a - (x - mean) * b), returns the
    value grad_x should hold afterwards as (N, C, H, W) float64: grad_x + dx when accumulate, else
    dx.  (a = sum_dy / M, b = invstd**2 * sum_dy_xmu / M give training-mode BN; a = b = 0 eval.)
    """
    x64 = x.double()
    dy = torch.where(x64 * _per_channel64(scale) + _per_channel64(shift) > 0, grad_z.double(), 0.0)
    dx = _per_channel64(scale) * (dy - _per_channel64(a) - (x64 - _per_channel64(mean)) * _per_channel64(b))
    return grad_x.double() + dx if accumulate else dx


def channel_affine_ref(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    """(invstd, scale, shift) of a BN with statistics (mean, biased var), in float64:
    invstd = 1 / sqrt(var + eps), scale = weight * invstd, shift = bias - mean * scale."""
    invstd = 1.0 / torch.sqrt(var.double() + eps)
    scale = weight.double() * invstd
    return invstd, scale, bias.double() - mean.double() * scale


def channel_bn_backward_ref(sum_dy: Tensor, sum_dy_xmu: Tensor, invstd: Tensor, count: int, batch: bool
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """(a, b, d_gamma) in float64: the coefficients of fused_bn_backward_apply_ref for batch
    statistics (a = sum_dy / count, b = invstd**2 * sum_dy_xmu / count) or fixed ones (a = b = 0),
    and the weight gradient d_gamma = sum_dy_xmu * invstd."""
    dy, dyx, inv = sum_dy.double(), sum_dy_xmu.double(), invstd.double()
    a = dy / count if batch else torch.zeros_like(dy)
    b = inv * inv * dyx / count if batch else torch.zeros_like(dy)
    return a, b, dyx * inv
