"""Autocast handling shared by the fused Functions.

The fused ops run in ONE compute dtype chosen at their entry (the autocast dtype when autocast is
on) with autocast switched off inside, so that nothing is cast twice and BN parameters and
statistics stay fp32.  Devices without autocast support (e.g. "meta", used by the memory
planner) simply run in the tensors' own dtype.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch


# Autocast exists on these device types in every supported torch.  Asking torch only for the
# others keeps torch.compile(fullgraph=True) working on torch 2.11, whose dynamo cannot trace
# torch.amp.is_autocast_available (a C++ builtin; seen failing on an H200, torch 2.11.0).
_ALWAYS_AUTOCAST = ("cpu", "cuda")


def _autocast_available(device_type: str) -> bool:
    return device_type in _ALWAYS_AUTOCAST or torch.amp.is_autocast_available(device_type)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in effect for `device_type`, or None when autocast is off or unsupported."""
    if _autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_disabled(device_type: str) -> ContextManager:
    """torch.autocast(device_type, enabled=False), or a no-op where autocast does not exist."""
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
