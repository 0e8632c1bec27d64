"""Backend selection: which kernel set runs the memory-efficient block.

  torch  plain PyTorch (ATen's fused batch_norm / conv kernels fed the cached statistics); runs
         anywhere, CPU included.
  cuda   the compiled extension densenet_fast._C (csrc/): its kernels do the statistics and every
         batch-norm pass (scale-shift-ReLU into a reused scratch chunk, the ReLU-masked BN backward
         reductions, the BN backward accumulating into the gradient buffer), cuBLAS/cuDNN through
         ATen the GEMMs and the 3x3 conv, the block's layer loop in C++; needs the extension built
         with CUDA and CUDA tensors.
  triton fused Triton kernels (densenet_fast/triton_kernels/): BN-ReLU as the GEMM prologue, the
         statistics in the epilogues, the 3x3 conv as an implicit GEMM, two-pass backwards that
         never store a prefix-sized intermediate; needs triton and CUDA tensors (or CPU tensors
         under TRITON_INTERPRET=1, which the tests use).
  auto   torch, on every device, for now: it is the backend that has run end to end on a GPU (an
         H200). The fused backends pass the same equivalence tests (triton in the interpreter and,
         kernel by kernel, on an H200; cuda through its CPU kernels) but have not been measured or
         run as whole models on a GPU yet (benchmarks/NOTES-gpu.md); ask for them by name.

Every backend computes the same thing (../shared/design/dense_block.md); they differ in fusion.
"""

from __future__ import annotations

from typing import Any, Tuple

import torch

from . import _ext
from .ops.dense_block import BlockKernels

BACKENDS: Tuple[str, ...] = ("auto", "torch", "cuda", "triton")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"densenet_fast: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _triton_runs_on(device: torch.device) -> bool:
    from . import triton_kernels
    if not triton_kernels.HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_kernels.INTERPRET)


def available_backends(device: torch.device | str = "cpu") -> Tuple[str, ...]:
    """The concrete backends that can run on `device` in this installation."""
    device = torch.device(device)
    out = []
    if device.type == "cuda" and _triton_runs_on(device):
        out.append("triton")
    if device.type == "cuda" and _ext.has_cuda_kernels():
        out.append("cuda")
    out.append("torch")
    # backend="triton" also runs on CPU tensors under TRITON_INTERPRET=1 (the tests), but the
    # interpreter is far too slow to count as available there: it must be asked for by name.
    return tuple(out)


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for a requested name and the input's device (raises with a reason)."""
    check_backend_name(name)
    if name == "auto":
        return "torch"
    if name == "cuda":
        _ext.require_extension("backend='cuda'")
        if not _ext.has_cuda_kernels():
            raise RuntimeError("densenet_fast: backend='cuda' needs the extension built with CUDA kernels; "
                               f"rebuild with {_ext.BUILD_COMMAND}")
        if device.type != "cuda":
            raise ValueError(f"densenet_fast: backend='cuda' needs CUDA tensors, got input on {device}; "
                             "use backend='torch' or 'auto' on the CPU")
    if name == "triton" and not _triton_runs_on(device):
        from . import triton_kernels
        if not triton_kernels.HAS_TRITON:
            raise RuntimeError(f"densenet_fast: backend='triton' needs triton ({triton_kernels.IMPORT_ERROR}); "
                               "pip install triton, or use backend='torch'")
        raise ValueError(f"densenet_fast: backend='triton' needs CUDA tensors, got input on {device} "
                         "(CPU tensors run only under TRITON_INTERPRET=1, set before import); use backend='torch' "
                         "or 'auto' on the CPU")
    return name


def kernels_for(name: str, device: torch.device, group: Any = None) -> BlockKernels:
    """The BlockKernels of the backend that `name` resolves to on `device`.

    group: the torch.distributed process group of synchronized batch norm, or None.
    """
    concrete = resolve_backend(name, device)
    if concrete == "triton":
        from .triton_kernels.block_kernels import TritonBlockKernels
        return TritonBlockKernels(group=group)
    if concrete == "cuda":
        from .ops.cuda_block import CudaBlockKernels
        return CudaBlockKernels(group=group)
    return BlockKernels(name="torch", group=group)
