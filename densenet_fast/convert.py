"""convert(): turn existing DenseNets, or any model built from dense blocks, into efficient ones.

Recognised by structure, not by class, so torchvision's DenseNet/_DenseBlock/_Transition,
densenet_fast.reference's modules and look-alikes in third-party segmentation nets all convert:
  * a DenseNet (features Sequential with conv0 ... norm5, a Linear classifier) becomes a
    densenet_fast.models.DenseNet (the fused forward that shares statistics across modules);
  * a densenet_fast FCDenseNet (memory_efficient=False, or another backend) becomes the efficient
    FCDenseNet of the same architecture;
  * anywhere else, a dense block (a ModuleDict of layers with norm1/conv1/norm2/conv2) becomes a
    densenet_fast.DenseBlock and a transition (norm, conv 1x1, 2x2 average pool) a
    densenet_fast.Transition.
Weights, buffers (running statistics, num_batches_tracked), BatchNorm eps/momentum, the
train/eval mode, device and dtype are carried over.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from .modules import DenseBlock, Transition
from .models.densenet import DenseNet
from .models.fc_densenet import FCDenseNet
from .reference import has_bottleneck

__all__ = ["convert"]


def _is_dense_layer(m: nn.Module) -> bool:
    """norm1/conv1/norm2/conv2 (bottleneck), or norm1 and a 3x3 conv1 alone (bn_size=0)."""
    if all(isinstance(getattr(m, n, None), nn.BatchNorm2d) for n in ("norm1", "norm2")) and \
            all(isinstance(getattr(m, n, None), nn.Conv2d) for n in ("conv1", "conv2")):
        return True
    conv1 = getattr(m, "conv1", None)
    return (isinstance(getattr(m, "norm1", None), nn.BatchNorm2d) and isinstance(conv1, nn.Conv2d)
            and conv1.kernel_size == (3, 3) and conv1.padding == (1, 1) and conv1.stride == (1, 1)
            and conv1.bias is None and not hasattr(m, "norm2") and not hasattr(m, "conv2"))


def _is_dense_block(m: nn.Module) -> bool:
    children = list(m.children())
    return (isinstance(m, nn.ModuleDict) and not isinstance(m, DenseBlock) and len(children) > 0
            and all(_is_dense_layer(c) for c in children))


def _is_transition(m: nn.Module) -> bool:
    if isinstance(m, Transition):
        return False
    norm, conv, pool = (getattr(m, n, None) for n in ("norm", "conv", "pool"))
    return (isinstance(norm, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d) and isinstance(pool, nn.AvgPool2d)
            and conv.kernel_size == (1, 1) and conv.bias is None and pool.kernel_size in (2, (2, 2))
            and pool.stride in (2, (2, 2)) and set(n for n, _ in m.named_children()) <= {"norm", "relu", "conv", "pool"})


def _is_densenet(m: nn.Module) -> bool:
    feats = getattr(m, "features", None)
    return (isinstance(feats, nn.Sequential) and isinstance(getattr(m, "classifier", None), nn.Linear)
            and hasattr(feats, "conv0") and hasattr(feats, "norm5")
            and any(_is_dense_block(c) or isinstance(c, DenseBlock) for c in feats.children()))


def _finish(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy weights, buffers, BN hyper-parameters, mode, device and dtype from old to new."""
    old_modules = dict(old.named_modules())
    for name, m in new.named_modules():
        src = old_modules.get(name)
        if isinstance(m, nn.BatchNorm2d) and isinstance(src, nn.modules.batchnorm._BatchNorm):
            m.eps, m.momentum = src.eps, src.momentum
            if not src.track_running_stats:
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        if src is not None:
            m.train(src.training)
    ref = next(old.parameters(), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    return new


def _block_config(block: nn.Module) -> dict:
    layers = list(block.children())
    first = layers[0]
    k = first.conv2.out_channels if has_bottleneck(first) else first.conv1.out_channels
    return dict(num_layers=len(layers), num_input_features=first.norm1.num_features,
                bn_size=first.conv1.out_channels // k if has_bottleneck(first) else 0, growth_rate=k,
                drop_rate=float(getattr(first, "drop_rate", 0.0)))


def _convert_densenet(model: nn.Module, **opts: Any) -> DenseNet:
    feats = model.features
    blocks = [c for c in feats.children() if _is_dense_block(c) or isinstance(c, DenseBlock)]
    first = _block_config(blocks[0])
    conv0 = feats.conv0
    new = DenseNet(growth_rate=first["growth_rate"], block_config=[len(list(b.children())) for b in blocks],
                   num_init_features=conv0.out_channels, bn_size=first["bn_size"], drop_rate=first["drop_rate"],
                   num_classes=model.classifier.out_features, memory_efficient=True,
                   small_inputs=not hasattr(feats, "pool0"), in_channels=conv0.in_channels, **opts)
    # Rebuild every block and transition from the source's own widths, so any growth rate per
    # block and any transition width (any compression, any rounding) converts exactly.
    for name, child in feats.named_children():
        if _is_dense_block(child) or isinstance(child, DenseBlock):
            setattr(new.features, name, DenseBlock(**_block_config(child), **opts))
        elif _is_transition(child) or isinstance(child, Transition):
            setattr(new.features, name, Transition(child.conv.in_channels, child.conv.out_channels,
                                                   backend=opts.get("backend", "auto")))
    new.features.norm5 = nn.BatchNorm2d(feats.norm5.num_features)
    new.classifier = nn.Linear(model.classifier.in_features, model.classifier.out_features,
                               bias=model.classifier.bias is not None)
    return _finish(new, model)


def convert(model: nn.Module, *, backend: str = "auto", save_bottleneck: bool = False, inplace: bool = False
            ) -> nn.Module:
    """The memory-efficient equivalent of `model` (same weights, buffers, mode, device, dtype).

    model: a torchvision / densenet_fast.reference DenseNet, or any nn.Module containing dense
    blocks and transitions.  inplace=False (default) leaves `model` untouched.
    Raises ValueError when nothing in `model` is a dense block.
    """
    if _is_densenet(model):
        return _convert_densenet(model, backend=backend, save_bottleneck=save_bottleneck)
    if isinstance(model, FCDenseNet):
        return _convert_fc_densenet(model, backend)
    if _is_dense_block(model) or _is_transition(model):
        return _convert_module(model, backend, save_bottleneck)
    target = model if inplace else copy.deepcopy(model)
    if _replace_children(target, backend, save_bottleneck) == 0:
        raise ValueError(f"convert: found no dense block, transition or DenseNet in {type(model).__name__}")
    return target


def _convert_fc_densenet(model: FCDenseNet, backend: str) -> FCDenseNet:
    """Its layers have no bottleneck, so save_bottleneck does not apply."""
    return _finish(FCDenseNet(**model.config, memory_efficient=True, backend=backend), model)


def _convert_module(m: nn.Module, backend: str, save_bottleneck: bool) -> nn.Module:
    if _is_dense_block(m):
        return _finish(DenseBlock(**_block_config(m), backend=backend, save_bottleneck=save_bottleneck), m)
    return _finish(Transition(m.conv.in_channels, m.conv.out_channels, backend=backend), m)


def _replace_children(parent: nn.Module, backend: str, save_bottleneck: bool) -> int:
    n = 0
    for name, child in list(parent.named_children()):
        if _is_densenet(child):
            setattr(parent, name, _convert_densenet(child, backend=backend, save_bottleneck=save_bottleneck))
            n += 1
        elif isinstance(child, FCDenseNet):
            setattr(parent, name, _convert_fc_densenet(child, backend))
            n += 1
        elif _is_dense_block(child) or _is_transition(child):
            setattr(parent, name, _convert_module(child, backend, save_bottleneck))
            n += 1
        else:
            n += _replace_children(child, backend, save_bottleneck)
    return n

