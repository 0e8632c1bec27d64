"""Backend selection: which kernel set runs the memory-efficient block.

  torch  plain PyTorch (ATen's fused batch_norm / conv kernels fed the cached statistics); runs
         anywhere, CPU included.
  cuda   the compiled extension densenet_fast._C (csrc/): its statistics kernel replaces the ATen
         reduction; needs the extension built with CUDA and CUDA tensors.
  auto   cuda when the extension is built and the input is on a GPU, else torch.

Every backend computes the same thing (../shared/design/dense_block.md); they differ in fusion.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

from . import _ext
from .ops.dense_block import BlockKernels

BACKENDS: Tuple[str, ...] = ("auto", "torch", "cuda")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        hint = ""
        if name == "triton":
            hint = " (the Triton kernels are not part of this release yet)"
        raise ValueError(f"densenet_fast: unknown backend {name!r}{hint}; expected one of {', '.join(BACKENDS)}")
    return name


def available_backends(device: torch.device | str = "cpu") -> Tuple[str, ...]:
    """The concrete backends that can run on `device` in this installation."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cuda" and _ext.has_cuda_kernels():
        out.insert(0, "cuda")
    return tuple(out)


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for a requested name and the input's device (raises with a reason)."""
    check_backend_name(name)
    if name == "auto":
        return available_backends(device)[0]
    if name == "cuda":
        _ext.require_extension("backend='cuda'")
        if not _ext.has_cuda_kernels():
            raise RuntimeError("densenet_fast: backend='cuda' needs the extension built with CUDA kernels; "
                               f"rebuild with {_ext.BUILD_COMMAND}")
        if device.type != "cuda":
            raise ValueError(f"densenet_fast: backend='cuda' needs CUDA tensors, got input on {device}; "
                             "use backend='torch' or 'auto' on the CPU")
    return name


def kernels_for(name: str, device: torch.device, group: Any = None) -> BlockKernels:
    """The BlockKernels of the backend that `name` resolves to on `device`.

    group: the torch.distributed process group of synchronized batch norm, or None.
    """
    concrete = resolve_backend(name, device)
    if concrete == "cuda":
        from .ops.channel_stats import channel_stats
        return BlockKernels(name="cuda", stats=channel_stats, group=group)
    return BlockKernels(name="torch", group=group)
