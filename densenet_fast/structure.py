"""What the fused forwards assume of the modules they read, checked.

A memory-efficient dense layer computes conv3x3(relu(bn2(conv1x1(relu(bn1(x)))))) from its
modules' parameters without calling the modules; a transition computes avg_pool2x2(conv1x1(
relu(bn(x)))) the same way.  A module swapped for another (an activation replaced by SiLU, a
dilated or biased convolution, a BatchNorm subclass with its own forward) would be silently
ignored.  These functions say what differs, so that the modules raise a clear error instead and
densenet_fast.convert leaves such modules unconverted.

Each *_issue function returns None when the module is what the fused math computes, else a short
description ("is SiLU; expected nn.ReLU").  Classes are accepted when they do not override the
forward of the expected torch class: torch.nn.utils.parametrize's parametrised Conv2d is one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch.nn as nn
from torch.nn.modules.utils import _pair

__all__ = ["bn_issue", "relu_issue", "conv_issue", "avg_pool_issue", "max_pool_issue", "class_issue",
           "norm_relu_issue", "dense_layer_issue", "dense_block_issue", "transition_issue", "module_width",
           "first_issue", "named_issue", "Issue", "raise_structure_error", "LAYER_MATH", "TRANSITION_MATH"]

LAYER_MATH = "BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 (BN-ReLU-Conv3x3 without bottleneck) on the concatenated input"
TRANSITION_MATH = "BN-ReLU-Conv1x1-AvgPool2x2"

_BN_FORWARD = nn.modules.batchnorm._BatchNorm.forward
Issue = Optional[Tuple[str, str]]  # (the submodule's name, what is wrong with it)


def module_width(m: Optional[nn.Module]) -> int:
    """A batch norm's num_features, -1 for anything else (so that bn_issue reports the type)."""
    return m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else -1


def _kind(m: Optional[nn.Module]) -> str:
    if m is None:
        return "is missing"
    return f"is {type(m).__name__}" + (" with a forward replaced on the instance" if "forward" in m.__dict__ else "")


def _plain(m: nn.Module, cls: type) -> bool:
    """m is a cls whose forward is cls's own (a subclass that only adds attributes counts; a
    forward replaced on the instance, as some wrappers do, does not)."""
    return isinstance(m, cls) and type(m).forward is cls.forward and "forward" not in m.__dict__


def bn_issue(m: Optional[nn.Module], channels: int) -> Optional[str]:
    """An affine nn.BatchNorm2d over `channels` channels (running statistics tracked or not)."""
    if isinstance(m, nn.SyncBatchNorm):
        return ("is torch.nn.SyncBatchNorm; expected nn.BatchNorm2d (densenet_fast.convert_sync_batchnorm makes the "
                "memory-efficient modules synchronise their batch statistics)")
    if m is None or not isinstance(m, nn.BatchNorm2d) or type(m).forward is not _BN_FORWARD \
            or "forward" in m.__dict__:
        return f"{_kind(m)}; expected nn.BatchNorm2d"
    if not m.affine:
        return "is a BatchNorm2d with affine=False; expected affine=True"
    if m.num_features != channels:
        return f"has num_features={m.num_features}; expected {channels} (its input's channels)"
    return None


def class_issue(m: Optional[nn.Module], cls: type) -> Optional[str]:
    """A cls with cls's own forward."""
    return None if m is not None and _plain(m, cls) else f"{_kind(m)}; expected nn.{cls.__name__}"


def relu_issue(m: Optional[nn.Module]) -> Optional[str]:
    return class_issue(m, nn.ReLU)


def conv_issue(m: Optional[nn.Module], kernel: int, in_channels: int, out_channels: Optional[int] = None, *,
               bias: bool = False, stride: int = 1, transposed: bool = False) -> Optional[str]:
    """An nn.Conv2d (nn.ConvTranspose2d when `transposed`) of kernel x kernel with the given
    stride, zero padding kernel // 2 (0 when transposed), no dilation, one group; bias allowed
    only when `bias`; in_channels (and out_channels when given) as stated."""
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    if m is None or not _plain(m, cls):
        return f"{_kind(m)}; expected nn.{cls.__name__}"
    pad = 0 if transposed else kernel // 2
    got = (_pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.groups, m.padding_mode)
    want = ((kernel, kernel), (stride, stride), (pad, pad), (1, 1), 1, "zeros")
    if transposed:
        got, want = got + (_pair(m.output_padding),), want + ((0, 0),)
    if got != want:
        names = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode", "output_padding")
        diff = ", ".join(f"{n}={g!r} (expected {w!r})" for n, g, w in zip(names, got, want) if g != w)
        return f"has {diff}"
    if m.bias is not None and not bias:
        return "has a bias; expected bias=False"
    if m.in_channels != in_channels:
        return f"has in_channels={m.in_channels}; expected {in_channels}"
    if out_channels is not None and m.out_channels != out_channels:
        return f"has out_channels={m.out_channels}; expected {out_channels}"
    return None


def first_issue(checks: Iterable[Tuple[str, Optional[str]]]) -> Issue:
    for name, problem in checks:
        if problem is not None:
            return name, problem
    return None


def named_issue(name: str, problem: Optional[str]) -> Issue:
    return None if problem is None else (name, problem)


def norm_relu_issue(parent: nn.Module, norm: str, relu: str, channels: int) -> Issue:
    """parent.<norm> then parent.<relu>: an affine nn.BatchNorm2d over `channels` and an nn.ReLU
    (densenet_fast.convert passes another checker that also accepts timm's BatchNormAct2d)."""
    get = parent._modules.get
    return first_issue([(norm, bn_issue(get(norm), channels)), (relu, relu_issue(get(relu)))])


NormReluCheck = Callable[[nn.Module, str, str, int], Issue]


def dense_layer_issue(layer: nn.Module, in_channels: Optional[int] = None, growth_rate: Optional[int] = None,
                      norm_relu: NormReluCheck = norm_relu_issue) -> Issue:
    """A dense layer: norm1, relu1, conv1 (1x1), norm2, relu2, conv2 (3x3), or, without
    bottleneck (no conv2), norm1, relu1 and a 3x3 conv1.  in_channels None: norm1's width."""
    if in_channels is None:
        in_channels = module_width(layer._modules.get("norm1"))
    if _layer_ok(layer._modules, in_channels, growth_rate):
        return None
    return _layer_details(layer, in_channels, growth_rate, norm_relu)


def _layer_details(layer: nn.Module, in_channels: int, growth_rate: Optional[int], norm_relu: NormReluCheck) -> Issue:
    """dense_layer_issue's full check, past the fast path: which module differs, and how."""
    get = layer._modules.get
    if "conv2" not in layer._modules:
        return (norm_relu(layer, "norm1", "relu1", in_channels)
                or named_issue("conv1", conv_issue(get("conv1"), 3, in_channels, growth_rate)))
    conv1 = get("conv1")
    width = conv1.out_channels if isinstance(conv1, nn.Conv2d) else -1
    return (norm_relu(layer, "norm1", "relu1", in_channels) or named_issue("conv1", conv_issue(conv1, 1, in_channels))
            or norm_relu(layer, "norm2", "relu2", width)
            or named_issue("conv2", conv_issue(get("conv2"), 3, width, growth_rate)))


def _bn_ok(m: nn.Module, channels: int) -> bool:
    return type(m) is nn.BatchNorm2d and "forward" not in m.__dict__ and m.affine and m.num_features == channels


def _relu_ok(m: nn.Module) -> bool:
    return type(m) is nn.ReLU and "forward" not in m.__dict__


def _conv_ok(m: nn.Module, kernel: int, in_channels: int, out_channels: Optional[int]) -> bool:
    pad = kernel // 2
    return (type(m) is nn.Conv2d and "forward" not in m.__dict__ and m.kernel_size == (kernel, kernel)
            and m.stride == (1, 1) and m.padding == (pad, pad) and m.dilation == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros"
            and m._parameters["bias"] is None and m.in_channels == in_channels
            and (out_channels is None or m.out_channels == out_channels))


def _layer_ok(mods: dict, in_channels: int, growth_rate: Optional[int]) -> bool:
    """The common case, decided in a fraction of the full check's time (it runs on every forward,
    for every layer): exactly torch's classes with the expected geometry.  False sends the layer
    to the full check, which also accepts subclasses that keep torch's forward."""
    norm1, conv1, conv2 = mods.get("norm1"), mods.get("conv1"), mods.get("conv2")
    if conv2 is None:
        return (_bn_ok(norm1, in_channels) and _relu_ok(mods.get("relu1"))
                and _conv_ok(conv1, 3, in_channels, growth_rate))
    if type(conv1) is not nn.Conv2d:
        return False
    width = conv1.out_channels
    return (_bn_ok(norm1, in_channels) and _relu_ok(mods.get("relu1")) and _conv_ok(conv1, 1, in_channels, None)
            and _bn_ok(mods.get("norm2"), width) and _relu_ok(mods.get("relu2"))
            and _conv_ok(conv2, 3, width, growth_rate))


def dense_block_issue(layers: Sequence[Tuple[str, nn.Module]], in_channels: int, growth_rate: int) -> Issue:
    """Every layer of a block, layer i reading in_channels + i * growth_rate channels."""
    c = in_channels
    for name, layer in layers:
        if not _layer_ok(layer._modules, c, growth_rate):  # (the fast path, as in dense_layer_issue)
            issue = _layer_details(layer, c, growth_rate, norm_relu_issue)
            if issue is not None:
                return f"{name}.{issue[0]}", issue[1]
        c += growth_rate
    return None


def transition_issue(t: nn.Module, norm_relu: NormReluCheck = norm_relu_issue,
                     pool_issue: Optional[Callable[[Optional[nn.Module]], Optional[str]]] = None, dropout: bool = False,
                     keep_width: bool = False) -> Issue:
    """norm, relu, a 1x1 conv and a 2x2/2 average pool (torchvision's _Transition); FC-DenseNet's
    transition down: pool_issue=max_pool_issue, dropout=True (an nn.Dropout after the conv),
    keep_width=True (the conv keeps the channel count)."""
    get = t._modules.get
    width = module_width(get("norm"))
    return (norm_relu(t, "norm", "relu", width)
            or named_issue("conv", conv_issue(get("conv"), 1, width, width if keep_width else None))
            or (named_issue("drop", class_issue(get("drop"), nn.Dropout)) if dropout else None)
            or named_issue("pool", (pool_issue or avg_pool_issue)(get("pool"))))


def avg_pool_issue(m: Optional[nn.Module]) -> Optional[str]:
    if m is None or not _plain(m, nn.AvgPool2d):
        return f"{_kind(m)}; expected nn.AvgPool2d(2, 2)"
    if (_pair(m.kernel_size), _pair(m.stride), _pair(m.padding), m.ceil_mode, m.divisor_override) != \
            ((2, 2), (2, 2), (0, 0), False, None):
        return (f"is AvgPool2d(kernel_size={m.kernel_size}, stride={m.stride}, padding={m.padding}, "
                f"ceil_mode={m.ceil_mode}, divisor_override={m.divisor_override}); expected nn.AvgPool2d(2, 2)")
    return None


def max_pool_issue(m: Optional[nn.Module]) -> Optional[str]:
    """nn.MaxPool2d(2, 2) (FC-DenseNet's transition down)."""
    if m is None or not _plain(m, nn.MaxPool2d):
        return f"{_kind(m)}; expected nn.MaxPool2d(2, 2)"
    if (_pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.ceil_mode,
            m.return_indices) != ((2, 2), (2, 2), (0, 0), (1, 1), False, False):
        return f"is {m!r}; expected nn.MaxPool2d(2, 2)"
    return None


def raise_structure_error(where: str, issue: Issue, computes: str) -> None:
    """A ValueError naming the submodule that the fused forward of `where` cannot run."""
    if issue is None:
        return
    name, problem = issue
    raise ValueError(f"{where}: its {name} {problem}. The memory-efficient {where} computes {computes} from its "
                     "modules' parameters without calling them, so another module there would be silently ignored. "
                     "Keep those modules, or build the model with memory_efficient=False (or from "
                     "densenet_fast.reference's modules) for other layers")
