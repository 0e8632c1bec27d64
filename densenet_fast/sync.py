"""Synchronized batch norm for the efficient modules (torch.nn.SyncBatchNorm's semantics).

With a process group set, every batch statistic the efficient block computes (x0's channels, each
bottleneck, each layer's new channels, the transition's and the stem's input) is merged across
the group from per-rank (count, mean, M2) -- Chan's parallel formula, stable -- and the BN backward
sums sum(dy) and sum(dy * (x - mean)) are all-reduced before the input gradient is formed.
Running statistics use the global count for the unbiased variance.  Parameter gradients stay
local: DistributedDataParallel averages them, exactly as with torch.nn.SyncBatchNorm.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from .models.densenet import DenseNet
from .models.fc_densenet import TransitionDown
from .modules import DenseBlock, DenseLayer, Transition

__all__ = ["convert_sync_batchnorm"]

_FUSED = (DenseBlock, DenseLayer, Transition, TransitionDown, DenseNet)


def convert_sync_batchnorm(model: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Make `model`'s batch norms synchronize across `process_group` (default: the whole world).

    The efficient modules (DenseNet, DenseBlock, DenseLayer, Transition, FC-DenseNet's
    TransitionDown) are switched in place;
    any other BatchNorm layer is converted with torch.nn.SyncBatchNorm.convert_sync_batchnorm
    (which needs CUDA tensors at run time).  Returns the model, like torch's converter.
    Requires an initialised torch.distributed.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("convert_sync_batchnorm: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    group = process_group if process_group is not None else dist.group.WORLD
    if isinstance(model, _FUSED):
        _set_group(model, group)
        if not (isinstance(model, DenseNet) and not model.memory_efficient):
            return model
    for name, child in list(model.named_children()):
        if isinstance(child, _FUSED):
            _set_group(child, group)
            if isinstance(child, DenseNet) and not child.memory_efficient:
                setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child, process_group))
        else:
            convert_sync_batchnorm(child, process_group)
    return model


def _set_group(module: nn.Module, group: Any) -> None:
    for m in module.modules():
        if isinstance(m, _FUSED):
            m.process_group = group
