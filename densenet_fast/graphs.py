"""A training step captured in a CUDA graph: forward, loss and backward replayed as one launch.

At the sizes DenseNets train at on a modern GPU (DenseNet-BC-100 at batch 64 on 32x32 images),
a step is a few thousand small kernels, and an eager step spends more time launching them from
Python than the GPU spends running them.  Capturing the step once and replaying it removes that
overhead for every backend (and for the naive model alike; the benchmark reports both).

    step = GraphedStep(model, loss_fn, x_example, y_example)   # warms up, then captures
    for x, y in loader:
        loss = step(x, y)        # copies x, y into the captured inputs, replays; p.grad is filled
        optimizer.step()         # outside the graph, as usual (do not set grads to None between steps:
                                 # GraphedStep re-points p.grad at the captured gradients each call)

Requirements (checked, with a clear error): CUDA model and inputs of a fixed shape; no dropout
in densenet_fast layers (their masks come from a seed drawn on the host, which a graph would
freeze); BatchNorm momentum not None (the cumulative average reads a counter on the host); no
synchronized batch norm.  The running statistics move on every replay, exactly as in eager mode.
Warm-up steps run before capture (kernel autotuning, cuDNN algorithm selection); they also move
the running statistics, as any training step does.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["GraphedStep", "check_graphable"]


def check_graphable(model: nn.Module) -> None:
    """Raise ValueError naming the first submodule a captured training step would get wrong."""
    from .modules import DenseLayer

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats \
                and m.momentum is None:
            raise ValueError(f"GraphedStep: {name or 'model'} has momentum=None (a cumulative average whose "
                             "factor is read on the host each step); set a momentum to capture the step")
        if getattr(m, "process_group", None) is not None:
            raise ValueError(f"GraphedStep: {name} uses synchronized batch norm, which communicates on the "
                             "host; run it eagerly")
        if isinstance(m, DenseLayer) and m.drop_rate > 0 and m.training:
            raise ValueError(f"GraphedStep: {name} has drop_rate={m.drop_rate}; its dropout mask is seeded on "
                             "the host, so a captured step would replay one mask forever")


class GraphedStep:
    """One training step of `model` (forward, `loss_fn(output, y)`, backward) as a CUDA graph.

    x_example: (N, ...) CUDA tensor with the shape (and memory format) every call will use;
    y_example: the matching targets.  autocast_dtype: run the forward under torch.autocast.
    warmup: eager steps on a side stream before capture.  Calling returns the loss tensor of the
    graph; `output` holds the model's output of the last replay (both overwritten by the next
    call: clone them to keep them).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x_example: Tensor,
                 y_example: Tensor, autocast_dtype: Optional[torch.dtype] = None, warmup: int = 3) -> None:
        if not isinstance(x_example, Tensor) or x_example.device.type != "cuda":
            raise ValueError("GraphedStep: x_example must be a CUDA tensor, got "
                             f"{getattr(x_example, 'device', type(x_example).__name__)}")
        if not isinstance(y_example, Tensor) or y_example.device != x_example.device:
            raise ValueError(f"GraphedStep: y_example must be a tensor on {x_example.device}")
        check_graphable(model)
        self.model, self.loss_fn, self.autocast_dtype = model, loss_fn, autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.x = x_example.detach().clone()
        self.y = y_example.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for p in self.params:
                    p.grad = None
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.output = self._step()
        self.grads = [p.grad for p in self.params]

    def _step(self) -> Tuple[Tensor, Tensor]:
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float16, enabled=self.autocast_dtype is not None):
            out = self.model(self.x)
        loss = self.loss_fn(out.float(), self.y)
        loss.backward()
        return loss.detach(), out.detach()

    def __call__(self, x: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Tensor:
        """Replay with new inputs (copied into the captured ones; None keeps the last)."""
        if x is not None:
            if x.shape != self.x.shape:
                raise ValueError(f"GraphedStep: x must have the captured shape {tuple(self.x.shape)}, "
                                 f"got {tuple(x.shape)}")
            self.x.copy_(x)
        if y is not None:
            if y.shape != self.y.shape:
                raise ValueError(f"GraphedStep: y must have the captured shape {tuple(self.y.shape)}, "
                                 f"got {tuple(y.shape)}")
            self.y.copy_(y)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.loss
