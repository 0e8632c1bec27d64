"""Input checks shared by the modules and the functional ops: clear errors that name the tensor
and what was expected, for what would otherwise fail deep inside a kernel, or silently."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.fx import _symbolic_trace

from .amp import autocast_dtype

__all__ = ["check_input", "check_pool_input", "shapes_traced"]


def shapes_traced() -> bool:
    """Whether shapes are traced values (torch.jit.trace, torch.fx.symbolic_trace), which input
    checks must not test: each test would be a TracerWarning, or an FX TraceError."""
    return torch.jit.is_tracing() or _symbolic_trace.is_fx_symbolic_tracing()


def check_input(x: Tensor, where: str, channels: int, param: Tensor, training: bool, name: str = "x") -> None:
    """Clear errors for what would otherwise fail deep inside a kernel, or silently.

    x: (N, C, H, W), called `name` in the messages.  `param` is any parameter of the module
    (device and dtype reference).
    Under torch.jit.trace and torch.fx.symbolic_trace nothing is checked (shapes_traced): the
    recorded plain graph's ops check their inputs when it runs.
    """
    if shapes_traced():
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: input {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{where}: input {name} must have 4 dims (N, C, H, W), got {x.dim()} dims with shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: input {name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"{where}: input {name} must have {channels} channels, got {x.shape[1]} "
                         f"(shape {tuple(x.shape)})")
    if x.device != param.device:
        raise ValueError(f"{where}: input {name} is on {x.device} but the module's parameters are on "
                         f"{param.device}; move one of them (model.to(x.device))")
    if x.dtype != param.dtype and autocast_dtype(x.device.type) is None:
        raise TypeError(f"{where}: input {name} has dtype {x.dtype} but the module's parameters are "
                        f"{param.dtype}; convert the model (model.to(dtype)) or run under torch.autocast")
    if x.numel() == 0:
        raise ValueError(f"{where}: input {name} is empty (shape {tuple(x.shape)})")
    if training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"{where}: expected more than 1 value per channel when training (batch statistics "
                         f"need N*H*W > 1), got input {name} of shape {tuple(x.shape)}")


def check_pool_input(x: Tensor, where: str, name: str = "x") -> None:
    """A 2x2/2 pool (a transition's) of a feature map under 2x2 would be empty: nn.AvgPool2d's
    and nn.MaxPool2d's own error names neither the module nor the cause."""
    if not shapes_traced() and (x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"{where}: input {name} must be at least 2x2 for the 2x2 pooling, got "
                         f"{x.shape[2]}x{x.shape[3]} (shape {tuple(x.shape)}); in a DenseNet, the image is too small "
                         "for its number of transitions")
