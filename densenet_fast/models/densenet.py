"""DenseNet models: torchvision-compatible ImageNet DenseNets and the CIFAR DenseNet-BC.

state_dict keys are torchvision's, so `model.load_state_dict(torchvision_model.state_dict())`
loads torchvision's pretrained weights.  The forward pass of the efficient model walks
`features` itself so that each block's statistics cache reaches the transition after it and norm5
(no second reduction over the block buffer); calling `model.features(x)` as a plain Sequential
still works and returns norm5's output, as torchvision's does.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ..backends import check_backend_name, kernels_for
from ..modules import (BlockStats, DenseBlock, Transition, check_input, fused_module_hooks, has_hooks, recording,
                       refuse_script)
from ..ops.dense_block import GradHandoff
from ..ops.transition import bn_relu_pool_conv, fusable_stem_conv, stem_conv_bn_relu_pool
from ..structure import bn_issue, class_issue, module_width, relu_issue

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc",
           "densenet_cifar"]


class DenseNet(nn.Module):
    """DenseNet (Huang et al., 2017) with torchvision's arguments, defaults and parameter names.

    x: (N, in_channels, H, W) -> logits (N, num_classes).

    memory_efficient=True (default): the shared-buffer dense blocks and fused transitions of
      densenet_fast, run by `backend` ("auto" | "torch" | "cuda").
    memory_efficient=False: the naive reference layers (torch.cat per layer), exactly torchvision's
      computation; note that torchvision's own memory_efficient flag means checkpointing, which
      is densenet_fast.reference.DenseNet(checkpoint=True).
    Keyword-only extras: save_bottleneck (keep bottlenecks for a faster backward),
      chunk_channels, small_inputs (CIFAR stem: one 3x3 conv), compression (transition width
      factor), in_channels.
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0, num_classes: int = 1000,
                 memory_efficient: bool = True, backend: str = "auto", *, save_bottleneck: bool = False,
                 chunk_channels: int = 0, small_inputs: bool = False, compression: float = 0.5,
                 in_channels: int = 3) -> None:
        super().__init__()
        if not reference.is_int(growth_rate) or growth_rate < 1:
            raise ValueError(f"DenseNet: growth_rate must be an int >= 1, got {growth_rate!r}")
        if not 0 < compression <= 1:
            raise ValueError(f"DenseNet: compression must be in (0, 1], got {compression}")
        if not block_config or any(int(n) < 1 for n in block_config):
            raise ValueError(f"DenseNet: block_config must be a non-empty list of positive layer counts, got "
                             f"{tuple(block_config)}")
        self.memory_efficient = memory_efficient
        self.backend = check_backend_name(backend)
        self.in_channels = in_channels
        self.process_group = None  # set by densenet_fast.convert_sync_batchnorm
        self.features = nn.Sequential(reference.make_stem(num_init_features, small_inputs, in_channels))
        widths = reference.transition_widths(num_init_features, growth_rate, block_config, compression)
        for i, num_layers in enumerate(block_config):
            c_in, c_out = widths[i]
            if memory_efficient:
                block = DenseBlock(num_layers, c_in, bn_size, growth_rate, drop_rate, backend=backend,
                                   save_bottleneck=save_bottleneck, chunk_channels=chunk_channels)
            else:
                block = reference.DenseBlock(num_layers, c_in, bn_size, growth_rate, drop_rate)
            self.features.add_module("denseblock%d" % (i + 1), block)
            if i != len(block_config) - 1:
                c_next = widths[i + 1][0]
                trans = Transition(c_out, c_next, backend=backend) if memory_efficient else \
                    reference.Transition(c_out, c_next)
                self.features.add_module("transition%d" % (i + 1), trans)
        num_features = widths[-1][1]
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        reference.init_densenet_(self)

    def forward(self, x: Tensor) -> Tensor:
        if recording(self, "DenseNet"):  # torch.export, jit.trace, fx: torchvision's graph (modules.recording_graph)
            return reference.DenseNet.forward(self, x)  # type: ignore[arg-type]
        conv0 = self.features._modules.get("conv0")
        if isinstance(conv0, nn.Conv2d):  # (a stem of another kind checks its input itself)
            check_input(x, "DenseNet", conv0.in_channels, conv0.weight, False)
        if not self.memory_efficient:
            return reference.DenseNet.forward(self, x)  # type: ignore[arg-type]
        fused_module_hooks([self.features], self, "DenseNet")  # walked here, not called
        kernels = kernels_for(self.backend, x.device, self.process_group)
        h, cache = x, None
        pooled = buffer = handoff = None
        children = dict(self.features.named_children())
        names, modules = list(children), list(children.values())
        # torchvision's stem ends norm0, relu0, pool0 (3x3/2 max): relu0 (and such a pool0) run
        # fused with norm0 (or with conv0 too, below)
        # (only an affine nn.BatchNorm2d followed by an nn.ReLU, without hooks: other stems, and
        # modules with hooks, run module by module, so that the hooks run)
        n0 = names.index("norm0") if "norm0" in children else -1
        if n0 >= 0 and not (names[n0 + 1:n0 + 2] == ["relu0"] and _plain_bn(children["norm0"])
                            and relu_issue(children["relu0"]) is None and not has_hooks(children["relu0"])):
            n0 = -1
        max_pool = (n0 >= 0 and names[n0 + 1:n0 + 3] == ["relu0", "pool0"] and _is_pool0(children["pool0"])
                    and not has_hooks(children["pool0"]))
        skip = ({"relu0"} if n0 >= 0 else set()) | ({"pool0"} if max_pool else set())
        for i, (name, module) in enumerate(children.items()):
            if name in skip:
                continue
            if name == "conv0" and max_pool and i + 1 == n0 and fusable_stem_conv(module) and not has_hooks(module):
                # torchvision's stem (conv0, norm0, relu0, pool0) as one Function that keeps only
                # the image for backward and computes conv0 again there.
                norm0 = children["norm0"]
                h = stem_conv_bn_relu_pool(h, module, norm0, kernels=kernels, check=lambda y: check_input(
                    y, "DenseNet.norm0", norm0.num_features, norm0.weight, norm0.training))
                skip.add("norm0")
            elif name == "norm0" and n0 >= 0:
                # Stem BN + ReLU (+ torchvision's 3x3/2 max pool) as one pass that keeps only its
                # input for backward (and synchronized with the blocks under sync BN).
                check_input(h, "DenseNet.norm0", module.num_features, module.weight, module.training)
                h = bn_relu_pool_conv(h, module, None, pool="max3" if max_pool else "none", kernels=kernels)
            elif isinstance(module, DenseBlock):
                # The block's F goes to the transition or head after it alone: its backward hands
                # its gradient of F to the block's backward as G (GradHandoff, no copy).
                # Called as a module, so that hooks on it (FSDP's too) run.
                handoff, stats = GradHandoff(), BlockStats()
                h = module(h, buffer=buffer, handoff=handoff, stats_out=stats)
                cache, buffer = (stats.mean, stats.var), None
            elif isinstance(module, Transition):
                nxt = modules[i + 1] if i + 1 < len(modules) else None
                if isinstance(nxt, DenseBlock) and not torch.compiler.is_compiling():
                    # The transition writes straight into the next block's buffer (no copy there).
                    buffer = nxt.new_buffer(h, h.shape[2] // 2, h.shape[3] // 2)
                    h = module(h, stats=cache, out=buffer[:, :module.conv.out_channels], handoff=handoff)
                else:
                    h = module(h, stats=cache, handoff=handoff)
                cache = handoff = None
            elif name == "norm5" and i + 1 == len(modules) and _plain_bn(module):
                # norm5 + ReLU + global average pool fused, reading the last block's statistics
                # (an affine nn.BatchNorm2d without hooks, last in features; anything else runs as
                # a module).
                check_input(h, "DenseNet.norm5", module.num_features, module.weight, module.training)
                pooled = bn_relu_pool_conv(h, module, None, pool="global", cache=cache, kernels=kernels,
                                           handoff=handoff)
            else:  # any other module (a stem of another shape, a norm5 of another kind): called as it is
                h = module(h)
                cache = handoff = buffer = None
        if pooled is None:  # torchvision's head after features: ReLU, global average pool
            pooled = F.adaptive_avg_pool2d(F.relu(h), 1)
        return self.classifier(torch.flatten(pooled, 1))


def _plain_bn(module: nn.Module) -> bool:
    """An affine nn.BatchNorm2d (structure.bn_issue) without hooks: what the stem and head fuse."""
    return bn_issue(module, module_width(module)) is None and not has_hooks(module)


def _is_pool0(module: Optional[nn.Module]) -> bool:
    """Whether module is torchvision's stem pool, nn.MaxPool2d(3, stride=2, padding=1)."""
    if class_issue(module, nn.MaxPool2d) is not None or module.ceil_mode or module.return_indices:
        return False
    pair = nn.modules.utils._pair
    return (pair(module.kernel_size), pair(module.stride), pair(module.padding), pair(module.dilation)) == \
        ((3, 3), (2, 2), (1, 1), (1, 1))


# torchvision's checkpoints predate its current module names: a dense layer's "norm1" is stored
# as "norm.1" there (and so on for relu/conv 1 and 2); they have no num_batches_tracked entries,
# which BatchNorm's loading fills in.
_LEGACY_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


PRETRAINED_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201")  # torchvision publishes these


def torchvision_weights(builder: str, weights: Any) -> Any:
    """weights as a member of torchvision's enum for `builder` (e.g. DenseNet121_Weights): a
    member, its name ("IMAGENET1K_V1", "DEFAULT") or its full name ("DenseNet121_Weights.DEFAULT")."""
    if builder not in PRETRAINED_MODELS:
        raise ValueError(f"torchvision has pretrained weights for {', '.join(PRETRAINED_MODELS)}, not {builder}")
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ImportError(f"{builder}(weights=...): torchvision's pretrained weights need torchvision "
                          f"installed ({exc})") from exc
    enum = getattr(tvm, builder.replace("densenet", "DenseNet") + "_Weights")
    if isinstance(weights, str):
        name = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
        if name not in enum.__members__:
            raise ValueError(f"{builder}: weights must be None, a {enum.__name__} member or one of "
                             f"{sorted(enum.__members__)}, got {weights!r}")
        return enum[name]
    if not isinstance(weights, enum):
        raise TypeError(f"{builder}: weights must be None, a {enum.__name__} member or its name, got "
                        f"{type(weights).__name__} {weights!r}")
    return weights


def _densenet(builder: str, growth_rate: int, block_config: Sequence[int], num_init_features: int,
              weights: Any, progress: bool, kwargs: Dict[str, Any]) -> DenseNet:
    """torchvision's builder logic: with weights, num_classes defaults to (and must equal) the
    weights' category count, and the checkpoint is loaded after its legacy keys are renamed."""
    if weights is not None:
        weights = torchvision_weights(builder, weights)
        classes = len(weights.meta["categories"])
        if kwargs.setdefault("num_classes", classes) != classes:
            raise ValueError(f"{builder}: {weights} classify {classes} categories, got num_classes="
                             f"{kwargs['num_classes']} (leave it out, or load the weights and replace the "
                             "classifier)")
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        state = weights.get_state_dict(progress=progress, check_hash=True)
        renamed = {}
        for key, value in state.items():
            legacy = _LEGACY_LAYER_KEY.match(key)
            renamed[legacy.group(1) + legacy.group(2) if legacy else key] = value
        model.load_state_dict(renamed)
    return model


def densenet121(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (growth 32, blocks 6-12-24-16, 64 stem features), torchvision-compatible.

    weights: None, or torchvision's DenseNet121_Weights (a member or its name, e.g. "DEFAULT"):
    downloaded by torchvision (progress: show a progress bar) and loaded, as
    torchvision.models.densenet121(weights=...) does.
    """
    return _densenet("densenet121", 32, (6, 12, 24, 16), 64, weights, progress, kwargs)


def densenet161(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (growth 48, blocks 6-12-36-24, 96 stem features), torchvision-compatible;
    weights: torchvision's DenseNet161_Weights (see densenet121)."""
    return _densenet("densenet161", 48, (6, 12, 36, 24), 96, weights, progress, kwargs)


def densenet169(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (growth 32, blocks 6-12-32-32, 64 stem features), torchvision-compatible;
    weights: torchvision's DenseNet169_Weights (see densenet121)."""
    return _densenet("densenet169", 32, (6, 12, 32, 32), 64, weights, progress, kwargs)


def densenet201(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (growth 32, blocks 6-12-48-32, 64 stem features), torchvision-compatible;
    weights: torchvision's DenseNet201_Weights (see densenet121)."""
    return _densenet("densenet201", 32, (6, 12, 48, 32), 64, weights, progress, kwargs)


def densenet264(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-264 (growth 32, blocks 6-12-64-48, 64 stem features; Huang et al. Table 1).
    torchvision publishes no weights for it: weights must be None."""
    if weights is not None:
        raise ValueError(f"densenet264: torchvision has no pretrained DenseNet-264, weights must be None, "
                         f"got {weights!r}")
    return DenseNet(32, (6, 12, 64, 48), 64, **kwargs)


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, compression: float = 0.5,
                **kwargs: Any) -> DenseNet:
    """DenseNet-BC for 32x32 inputs (Huang et al. section 3, Table 2).

    A 3x3 stem conv with 2*growth_rate channels, then three dense blocks of (depth - 4) / 6
    bottleneck layers each, transitions compressing by `compression`.  depth=100, k=12 has 0.8M
    parameters; depth=250, k=24 15.3M; depth=190, k=40 25.6M.
    """
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"densenet_bc: depth must be 6*n + 4 with n >= 1 (e.g. 40, 100, 190, 250), got {depth}")
    n = (depth - 4) // 6
    kwargs.setdefault("num_init_features", 2 * growth_rate)
    return DenseNet(growth_rate, (n, n, n), num_classes=num_classes, compression=compression, small_inputs=True,
                    **kwargs)


def densenet_cifar(depth: int = 40, growth_rate: int = 12, num_classes: int = 10, **kwargs: Any) -> DenseNet:
    """The original DenseNet for 32x32 inputs, without bottlenecks or compression (Huang et al.
    section 3, Table 2: "DenseNet").

    A 3x3 stem conv with 16 channels, then three dense blocks of (depth - 4) / 3 BN-ReLU-Conv3x3
    layers (bn_size=0) each, transitions that keep the channel count.  depth=40, k=12 has 1.0M
    parameters; depth=100, k=12 7.0M; depth=100, k=24 27.2M.
    """
    if depth < 7 or (depth - 4) % 3 != 0:
        raise ValueError(f"densenet_cifar: depth must be 3*n + 4 with n >= 1 (e.g. 40, 100), got {depth}")
    n = (depth - 4) // 3
    kwargs.setdefault("num_init_features", 16)
    kwargs.setdefault("compression", 1.0)
    return DenseNet(growth_rate, (n, n, n), bn_size=0, num_classes=num_classes, small_inputs=True, **kwargs)
