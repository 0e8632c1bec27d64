"""float32 precision of the GEMMs that stand in for convolutions: the convolutions' own.

A dense layer's 1x1 conv is an nn.Conv2d in every backend (same state_dict), and a float32
nn.Conv2d on a GPU may use TF32 tensor cores exactly when cuDNN's convolutions may
(torch.backends.cudnn.conv.fp32_precision, or the older torch.backends.cudnn.allow_tf32: "tf32" by
torch's default).  Our backends compute that conv as a GEMM (cuBLAS through ATen, or a Triton
tl.dot), and cuBLAS follows another flag (torch.backends.cuda.matmul.fp32_precision, "ieee" by
default).  Left alone, a float32 model would run its 1x1 convs in TF32 on the naive path and in
full IEEE float32 (several times slower on Ampere and Hopper) on ours.  So:

- with_conv_precision(x, fn, *args): fn's float32 CUDA GEMMs (ATen's) use TF32 exactly when
  cuDNN's convolutions may.  It sets the process-wide matmul precision for the call and restores
  it (as torch.backends.cudnn.flags does): not for threads that run other float32 matmuls at the
  same time.  Traced by torch.compile it does nothing: compiled GEMMs follow the matmul flag.
- dot_precision(dtype): the input_precision of the Triton kernels' tl.dot, by the same rule.

Set torch.backends.cudnn.conv.fp32_precision = "ieee" (or allow_tf32 = False) for full float32
in both the naive model and ours.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

__all__ = ["conv_tf32_allowed", "dot_precision", "with_conv_precision"]

T = TypeVar("T")


# (backend, op) of the three levels conv_tf32_allowed reads, as torch.backends names them:
# cudnn.conv, cudnn, and the generic torch.backends.fp32_precision.  Read through torch's C getter
# (0.4 us) rather than the Python attributes (2.5 us each): the Triton launchers ask on every call.
_PRECISION_LEVELS = (("cuda", "conv"), ("cuda", "all"), ("generic", "all"))
_get_precision = getattr(torch._C, "_get_fp32_precision_getter", None)


def conv_tf32_allowed() -> bool:
    """Whether cuDNN's float32 convolutions may use TF32 now.

    torch >= 2.9 keeps a precision per (backend, op), "none" meaning "as the level above":
    cudnn.conv, then cudnn, then the generic torch.backends.fp32_precision.  (The legacy getter
    torch.backends.cudnn.allow_tf32 raises once the legacy and new setters have been mixed.)
    """
    if _get_precision is not None:
        for backend, op in _PRECISION_LEVELS:
            precision = _get_precision(backend, op)
            if precision != "none":
                return precision == "tf32"
        return False
    return bool(torch.backends.cudnn.allow_tf32)  # pragma: no cover - torch without per-op precisions


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for data of `dtype`: "tf32" for float32 when cuDNN's float32
    convolutions may use TF32, else "ieee" (ignored by tl.dot for fp16/bf16 operands)."""
    return "tf32" if dtype == torch.float32 and conv_tf32_allowed() else "ieee"


def with_conv_precision(x: Tensor, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) with float32 CUDA matmuls using TF32 exactly when cuDNN's convolutions may.

    x: a GEMM operand; nothing changes unless it is a float32 CUDA tensor, nor while
    torch.compile traces (a plain call, no context manager: the traced branch is the first).
    The matmul precision is set with torch.set_float32_matmul_precision ("high": TF32, "highest":
    IEEE), which keeps torch's legacy and new flags consistent (cuBLAS's TF32 query raises once
    they disagree, as a bare torch.backends.cuda.matmul.fp32_precision = "tf32" makes them), and
    restored afterwards.  "medium" already allows TF32 and is left as it is when TF32 is wanted.
    When the legacy and new flags already disagree (the user mixed the two APIs), nothing is set.
    """
    if torch.compiler.is_compiling() or x.dtype != torch.float32 or x.device.type != "cuda":
        return fn(*args)
    try:
        saved = torch.get_float32_matmul_precision()
    except RuntimeError:  # the legacy and new matmul flags disagree: leave them to their owner
        return fn(*args)
    want = "high" if conv_tf32_allowed() else "highest"
    if (saved != "highest") == (want == "high"):
        return fn(*args)
    torch.set_float32_matmul_precision(want)
    try:
        return fn(*args)
    finally:
        torch.set_float32_matmul_precision(saved)
