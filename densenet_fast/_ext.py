"""The guarded import of the compiled extension ``densenet_fast._C``.

Importing densenet_fast never fails because the extension is missing (a pure-Python install, a
CPU-only torch, a build without nvcc); the ops then fall back to plain PyTorch, and a feature
that needs the kernels calls :func:`require_extension`, whose error says how to build them.

  HAS_C             True when densenet_fast._C was imported (its ops are registered in torch.ops)
  IMPORT_ERROR      a one-line reason why it was not; None when HAS_C
  require_extension raise a RuntimeError with the build command unless HAS_C
  has_cuda_kernels  whether the ops have CUDA kernels (the extension was built with nvcc)
  kernel_devices    the device types ("cpu", "cuda") for which an op has a compiled kernel

DENSENET_FAST_NO_EXTENSION=1 (read at import) leaves the extension unloaded, as if it were not
built: the plain-PyTorch paths run (e.g. the torch 2.11 test lane, scripts/test_compat.sh, whose
checkout holds an extension built against another torch).
"""

from __future__ import annotations

import importlib
import os
from typing import FrozenSet, Optional

import torch

NAMESPACE = "densenet_fast"
BUILD_COMMAND = "CUDA_HOME=/usr/local/cuda DENSENET_FAST_FORCE_CUDA_BUILD=1 pip install --no-build-isolation -e ."

EXTENSION = f"{__package__}._C"

def _load_extension() -> Optional[str]:
    """Import the extension (which registers its ops as torch.ops.densenet_fast.*); None, or why not."""
    if os.environ.get("DENSENET_FAST_NO_EXTENSION", "0") == "1":
        return f"{EXTENSION} left unloaded: DENSENET_FAST_NO_EXTENSION=1"
    try:
        importlib.import_module(EXTENSION)
    except ModuleNotFoundError as exc:
        if exc.name != EXTENSION:
            raise
        return (f"no module {EXTENSION}: it was not built "
                "(DENSENET_FAST_SKIP_CUDA_BUILD=1, a CPU-only torch or no nvcc at install time)")
    except (ImportError, OSError) as exc:  # built, but does not load (ABI or library mismatch)
        return f"{EXTENSION} failed to load: {type(exc).__name__}: {exc}"
    return None


IMPORT_ERROR: Optional[str] = _load_extension()
HAS_C = IMPORT_ERROR is None

# torch.device.type -> dispatch key of the kernels the extension registers
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def require_extension(feature: str) -> None:
    """Raise a RuntimeError naming ``feature`` and the build command unless the extension loaded."""
    if HAS_C:
        return
    raise RuntimeError(
        f"{feature} needs the compiled extension densenet_fast._C, but densenet_fast was installed "
        f"without its compiled extension ({IMPORT_ERROR}). Build it with: {BUILD_COMMAND} "
        "(needs a CUDA build of torch and nvcc; run it from the repository root)."
    )


def _query_kernel_devices(op: str) -> FrozenSet[str]:
    if not HAS_C:
        return frozenset()
    name = f"{NAMESPACE}::{op}"
    return frozenset(device for device, key in _DISPATCH_KEYS.items()
                     if torch._C._dispatch_has_kernel_for_dispatch_key(name, key))


# The answers are fixed once the extension is loaded, so the ops the package asks about are asked
# here, at import: a forward under torch.compile then reads a dict instead of calling the
# dispatcher query, which Dynamo cannot trace (fullgraph=True failed on it: "torch.* op returned
# non-Tensor", H200, torch 2.11).
_KERNEL_DEVICES = {op: _query_kernel_devices(op) for op in
                   ("channel_stats", "channel_affine", "dense_block_forward", "dense_block_backward")}
_HAS_CUDA_KERNELS = torch.version.cuda is not None and "cuda" in _KERNEL_DEVICES["channel_stats"]


def kernel_devices(op: str) -> FrozenSet[str]:
    """Device types for which ``densenet_fast::<op>`` has a compiled kernel (empty without _C)."""
    devices = _KERNEL_DEVICES.get(op)
    if devices is None:
        devices = _KERNEL_DEVICES[op] = _query_kernel_devices(op)
    return devices


def has_cuda_kernels() -> bool:
    """True when the extension loaded, torch is a CUDA build and the ops have CUDA kernels."""
    return _HAS_CUDA_KERNELS
