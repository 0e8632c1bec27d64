"""FC-DenseNet ("The One Hundred Layers Tiramisu", Jegou et al. 2017): dense blocks in a U-Net.

A downsampling path of dense blocks and transitions down, a bottleneck dense block, and an
upsampling path where each transition up (a 3x3/2 transposed convolution) upsamples only the new
channels of the block below it, is concatenated with the skip connection of its resolution and
fed to a dense block.  The layers are BN-ReLU-Conv3x3 without bottleneck (bn_size=0) with dropout.

memory_efficient=True (default) runs the dense blocks on densenet_fast's shared buffers: the skip
connection of each resolution is the down block's buffer itself, each transition down reads that
block's batch statistics and never stores relu(bn(.)), and the decoder's concatenation of the
upsampled map and the skip is written straight into the up block's buffer.  memory_efficient=False
is the naive model (torch.cat per layer), checkpoint=True on top of it recomputes each layer in
backward (torch.utils.checkpoint), the baselines of the benchmarks; all variants share one
state_dict layout.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .. import reference
from ..backends import check_backend_name, kernels_for
from ..modules import (BlockStats, DenseBlock, check_input, check_pool_input, fused_module_hooks, has_hooks,
                       recording, recording_graph, refuse_script, shapes_traced)
from ..ops.dense_block import GradHandoff
from ..ops.pool import dropout_max_pool2d
from ..ops.suffix_conv import suffix_conv
from ..ops.transition import bn_relu_pool_conv
from ..structure import conv_issue, max_pool_issue, named_issue, raise_structure_error, transition_issue

__all__ = ["FCDenseNet", "TransitionDown", "TransitionUp", "fc_densenet56", "fc_densenet67", "fc_densenet103"]


def _transition_down_modules(channels: int, drop_rate: float) -> "OrderedDict[str, nn.Module]":
    return OrderedDict([
        ("norm", nn.BatchNorm2d(channels)),
        ("relu", nn.ReLU(inplace=True)),
        ("conv", nn.Conv2d(channels, channels, kernel_size=1, bias=False)),
        ("drop", nn.Dropout(drop_rate)),
        ("pool", nn.MaxPool2d(kernel_size=2, stride=2)),
    ])


class TransitionDown(nn.Sequential):
    """FC-DenseNet's transition down: BN-ReLU-Conv1x1-Dropout-MaxPool2x2, channels kept.

    (N, C, H, W) -> (N, C, H // 2, W // 2).  forward(x, stats=None): `stats` is the preceding
    block's (mean, var) cache (DenseBlock.forward_with_stats), else the batch statistics are
    computed here.  Neither relu(bn(x)) nor the conv's output is stored: backward keeps the
    block's buffer (alive anyway), the dropout seed and one byte per output (ops.pool).  Called as
    a plain nn.Sequential (the naive FCDenseNet does) it is the textbook computation.
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, channels: int, drop_rate: float = 0.2, *, backend: str = "auto") -> None:
        super().__init__(_transition_down_modules(channels, drop_rate))
        self.backend = check_backend_name(backend)
        self.process_group = None  # set by densenet_fast.convert_sync_batchnorm

    def forward(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        if recording(self, "TransitionDown"):  # torch.export / jit.trace / fx: the plain modules in order
            return super().forward(x)
        raise_structure_error("TransitionDown", transition_issue(self, pool_issue=max_pool_issue, dropout=True,
                                                                 keep_width=True),
                              "BN-ReLU-Conv1x1-Dropout-MaxPool2x2")
        check_input(x, "TransitionDown", self.conv.in_channels, self.conv.weight, self.training)
        check_pool_input(x, "TransitionDown")
        fused_module_hooks(self.children(), self, "TransitionDown")
        h = bn_relu_pool_conv(x, self.norm, self.conv.weight, pool="none", cache=stats,
                              kernels=kernels_for(self.backend, x.device, self.process_group))
        return dropout_max_pool2d(h, self.drop.p, self.training)  # keeps 1 byte per output for backward


class TransitionUp(nn.Module):
    """FC-DenseNet's transition up: a 3x3 transposed convolution of stride 2, channels kept.

    forward(x, size): x (N, C, h, w) -> (N, C, *size), the (N, C, 2h + 1, 2w + 1) result cropped
    around its centre to the skip connection's size (2h or 2h + 1 per side after a floor-mode
    pooling), as the authors' code crops.  forward(fbuf, size, start=C0, handoff=h) upsamples
    fbuf[:, C0:], the new channels of a dense block's buffer; with the GradHandoff that block was
    given, the block adopts this backward's gradient of fbuf instead of copying it.
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, kernel_size=3, stride=2, bias=False)

    def forward(self, x: Tensor, size: Sequence[int], start: int = 0, handoff: Optional[GradHandoff] = None
                ) -> Tensor:
        if shapes_traced():  # sizes are traced values: the crop follows them, unchecked
            y = self.conv(x[:, start:])
            top, left = (y.shape[2] - size[0]) // 2, (y.shape[3] - size[1]) // 2
            return y[:, :, top:top + size[0], left:left + size[1]]
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"TransitionUp: x must be a 4-D tensor (N, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if not 0 <= start < x.shape[1] or x.shape[1] - start != self.conv.in_channels:
            raise ValueError(f"TransitionUp: x[:, {start}:] must have {self.conv.in_channels} channels, "
                             f"got x of shape {tuple(x.shape)}")
        if recording_graph():  # torch.export: the plain transposed conv of the suffix
            y = self.conv(x[:, start:])
        else:
            raise_structure_error("TransitionUp", named_issue("conv", conv_issue(
                self.conv, 3, self.conv.in_channels, bias=True, stride=2, transposed=True)),
                                  "a 3x3 transposed convolution of stride 2 without padding")
            fused_module_hooks([self.conv], self, "TransitionUp")
            y = suffix_conv(x, start, self.conv.weight, self.conv.bias, handoff, transposed=True,
                            stride=self.conv.stride)
        h, w = int(size[0]), int(size[1])
        if not (2 * x.shape[2] <= h <= y.shape[2] and 2 * x.shape[3] <= w <= y.shape[3]):
            raise ValueError(f"TransitionUp: size must be between twice the input's ({2 * x.shape[2]}, "
                             f"{2 * x.shape[3]}) and ({y.shape[2]}, {y.shape[3]}), got ({h}, {w})")
        top, left = (y.shape[2] - h) // 2, (y.shape[3] - w) // 2
        return y[:, :, top:top + h, left:left + w]


def _widths(first: int, growth: int, down: Sequence[int], mid: int, up: Sequence[int]
            ) -> Tuple[List[int], List[int], List[int], int]:
    """(down blocks' input channels, skip channels, up blocks' input channels, output channels)."""
    c, down_in, skips = first, [], []
    for n in down:
        down_in.append(c)
        c += n * growth
        skips.append(c)
    up_in, new = [], mid * growth  # the bottleneck's new channels are upsampled
    for i, n in enumerate(up):
        up_in.append(new + skips[-1 - i])
        new = n * growth
    return down_in, skips, up_in, up_in[-1] + new


class FCDenseNet(nn.Module):
    """FC-DenseNet for semantic segmentation.  x: (N, in_channels, H, W) -> logits (N, num_classes, H, W).

    down_blocks / up_blocks: layers per dense block of the two paths (as many of each: one
    transition down and one up per level); bottleneck_layers: layers of the middle block;
    growth_rate: channels each layer adds; first_channels: the first 3x3 convolution's.  H and W
    must be at least 2**len(down_blocks); odd sizes are fine (the upsampled maps are cropped).
    memory_efficient, backend, chunk_channels: as DenseNet's; checkpoint (naive model only):
    recompute every layer in backward.  Convolutions followed by batch norm have no bias (a bias
    there is absorbed by the normalisation), as in torchvision's DenseNet; the first convolution
    and the classifier have one.
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, in_channels: int = 3, num_classes: int = 11, down_blocks: Sequence[int] = (5, 5, 5, 5, 5),
                 bottleneck_layers: int = 5, up_blocks: Sequence[int] = (5, 5, 5, 5, 5), growth_rate: int = 16,
                 first_channels: int = 48, drop_rate: float = 0.2, memory_efficient: bool = True,
                 backend: str = "auto", *, checkpoint: bool = False, chunk_channels: int = 0) -> None:
        super().__init__()
        down_blocks, up_blocks = tuple(int(n) for n in down_blocks), tuple(int(n) for n in up_blocks)
        if not down_blocks or len(up_blocks) != len(down_blocks):
            raise ValueError(f"FCDenseNet: down_blocks and up_blocks must be non-empty and of equal length (one "
                             f"transition up per transition down), got {down_blocks} and {up_blocks}")
        if min(down_blocks + up_blocks + (int(bottleneck_layers),)) < 1:
            raise ValueError(f"FCDenseNet: every block needs at least one layer, got down_blocks={down_blocks}, "
                             f"bottleneck_layers={bottleneck_layers}, up_blocks={up_blocks}")
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("growth_rate", growth_rate), ("first_channels", first_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FCDenseNet: {name} must be a positive int, got {value!r}")
        if not 0.0 <= float(drop_rate) < 1.0:
            raise ValueError(f"FCDenseNet: drop_rate must be in [0, 1), got {drop_rate}")
        if checkpoint and memory_efficient:
            raise ValueError("FCDenseNet: checkpoint=True is the naive model's checkpointing baseline; it needs "
                             "memory_efficient=False (the efficient model stores no BN-ReLU output to drop)")
        self.memory_efficient = memory_efficient
        self.backend = check_backend_name(backend)
        # The architecture, for densenet_fast.convert (which rebuilds a naive model as an efficient one).
        self.config = dict(in_channels=in_channels, num_classes=num_classes, down_blocks=down_blocks,
                           bottleneck_layers=int(bottleneck_layers), up_blocks=up_blocks, growth_rate=growth_rate,
                           first_channels=first_channels, drop_rate=float(drop_rate))
        down_in, skips, up_in, out_channels = _widths(first_channels, growth_rate, down_blocks,
                                                      int(bottleneck_layers), up_blocks)

        def block(num_layers: int, c_in: int) -> nn.Module:
            if memory_efficient:
                return DenseBlock(num_layers, c_in, 0, growth_rate, drop_rate, backend=backend,
                                  chunk_channels=chunk_channels)
            return reference.DenseBlock(num_layers, c_in, 0, growth_rate, drop_rate, checkpoint=checkpoint)

        self.stem = nn.Conv2d(in_channels, first_channels, kernel_size=3, padding=1, bias=True)
        self.down = nn.ModuleList(block(n, c) for n, c in zip(down_blocks, down_in))
        self.trans_down = nn.ModuleList(
            TransitionDown(c, drop_rate, backend=backend) if memory_efficient
            else nn.Sequential(_transition_down_modules(c, drop_rate)) for c in skips)
        self.bottleneck = block(int(bottleneck_layers), skips[-1])
        ups = [int(bottleneck_layers)] + list(up_blocks[:-1])  # layers whose new channels each level upsamples
        self.trans_up = nn.ModuleList(TransitionUp(n * growth_rate) for n in ups)
        self.up = nn.ModuleList(block(n, c) for n, c in zip(up_blocks, up_in))
        self.classifier = nn.Conv2d(out_channels, num_classes, kernel_size=1, bias=True)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")  # the authors' HeUniform
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_input(self, x: Tensor) -> None:
        check_input(x, "FCDenseNet", self.stem.in_channels, self.stem.weight, False)
        levels = self.num_levels
        side = 2 ** levels
        if x.shape[2] < side or x.shape[3] < side:
            raise ValueError(f"FCDenseNet: input x must be at least {side}x{side} ({levels} poolings by 2), "
                             f"got {x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)})")
        if self.training and x.shape[0] * (x.shape[2] >> levels) * (x.shape[3] >> levels) == 1:
            raise ValueError(f"FCDenseNet: training needs more than one value per channel in the bottleneck block "
                             f"(N * H/{side} * W/{side} > 1, batch statistics), got input x of shape {tuple(x.shape)}; "
                             "use a larger batch or image")

    @property
    def num_levels(self) -> int:
        return len(self.down)

    def forward(self, x: Tensor) -> Tensor:
        if not shapes_traced():  # (under jit.trace / fx the shapes are traced values)
            self._check_input(x)
        h = self.stem(x)
        skips = []
        naive = not self.memory_efficient or recording_graph()  # torch.export / jit.trace / fx: the naive graph
        for blk, td in zip(self.down, self.trans_down):
            # Blocks are called as modules: hooks on them (FSDP's too) run.  A block or transition
            # replaced by a module of another class is called plainly.
            if not naive and isinstance(blk, DenseBlock):
                stats = BlockStats()
                fbuf = blk(h, stats_out=stats)
                cache: Optional[Tuple[Tensor, Tensor]] = (stats.mean, stats.var)
            else:
                fbuf, cache = blk(h), None
            h = td(fbuf, stats=cache) if not naive and isinstance(td, TransitionDown) else td(fbuf)
            skips.append(fbuf)
        if naive:
            fbuf = self.bottleneck(h)
            new = fbuf[:, _block_input_channels(self.bottleneck):]
            for tu, blk, skip in zip(self.trans_up, self.up, reversed(skips)):
                fbuf = blk(torch.cat([tu(new, skip.shape[2:]), skip], 1))
                new = fbuf[:, _block_input_channels(blk):]
            return self.classifier(fbuf)
        # Every block of the upsampling path (and the bottleneck block) has one consumer, the
        # transition up or the classifier: its backward hands the block the gradient of F
        # (GradHandoff, no copy).  A down block's F has two (its transition down and the skip).
        handoff = GradHandoff() if isinstance(self.bottleneck, DenseBlock) else None
        fbuf = self.bottleneck(h, handoff=handoff) if handoff is not None else self.bottleneck(h)
        below = self.bottleneck
        for tu, blk, skip in zip(self.trans_up, self.up, reversed(skips)):
            start = _block_input_channels(below)
            if isinstance(tu, TransitionUp):
                upsampled = tu(fbuf, skip.shape[2:], start=start, handoff=handoff)
            else:
                upsampled = tu(fbuf[:, start:], skip.shape[2:])
            if isinstance(blk, DenseBlock):  # writes the two parts straight into its buffer
                handoff = GradHandoff()
                fbuf = blk([upsampled, skip], handoff=handoff)
            else:
                handoff, fbuf = None, blk(torch.cat([upsampled, skip], 1))
            below = blk
        if has_hooks(self.classifier) or conv_issue(self.classifier, 1, fbuf.shape[1], bias=True) is not None:
            return self.classifier(fbuf)  # another classifier, or one with hooks: called as it is
        return suffix_conv(fbuf, 0, self.classifier.weight, self.classifier.bias, handoff)


def _block_input_channels(blk: nn.Module) -> int:
    """C0 of a dense block of either kind: its first layer's norm1 width."""
    return next(iter(blk.children())).norm1.num_features


def _fc_densenet(down: Sequence[int], mid: int, up: Sequence[int], growth: int, kwargs: Any) -> FCDenseNet:
    for key in ("down_blocks", "bottleneck_layers", "up_blocks", "growth_rate"):
        if key in kwargs:
            raise TypeError(f"the named FC-DenseNets fix {key}; build FCDenseNet(...) for another architecture")
    return FCDenseNet(down_blocks=down, bottleneck_layers=mid, up_blocks=up, growth_rate=growth, **kwargs)


def fc_densenet56(**kwargs: Any) -> FCDenseNet:
    """FC-DenseNet56: 4 layers per block, growth 12 (Jegou et al. Table 2 and section 4)."""
    return _fc_densenet((4,) * 5, 4, (4,) * 5, 12, kwargs)


def fc_densenet67(**kwargs: Any) -> FCDenseNet:
    """FC-DenseNet67: 5 layers per block, growth 16."""
    return _fc_densenet((5,) * 5, 5, (5,) * 5, 16, kwargs)


def fc_densenet103(**kwargs: Any) -> FCDenseNet:
    """FC-DenseNet103: blocks of 4, 5, 7, 10, 12 layers down, 15 in the bottleneck, 12, 10, 7, 5, 4
    up, growth 16 (Jegou et al. Table 2)."""
    return _fc_densenet((4, 5, 7, 10, 12), 15, (12, 10, 7, 5, 4), 16, kwargs)

