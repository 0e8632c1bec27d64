"""Drop-in memory-efficient DenseNet modules: DenseLayer, DenseBlock, Transition.

Module and parameter names are torchvision's (denselayerN.norm1/conv1/norm2/conv2; transition
norm/conv), so state_dicts move freely between these, torchvision's and densenet_fast.reference's
modules.  The modules own parameters and buffers only; the math lives in densenet_fast.ops.
"""

from __future__ import annotations

import warnings
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .backends import check_backend_name, kernels_for
from . import reference
from .reference import check_drop_rate, dense_layer_modules, dense_layer_ref, is_int
from .ops.amp import autocast_dtype
from .ops.checks import check_input, check_pool_input, shapes_traced
from .ops.channel_stats import stats_dtype
from .ops.dense_block import (GradHandoff, check_chunk, concat_into, growth_rate_of, new_block_buffer,
                              run_checked_dense_block)
from .ops.transition import bn_relu_pool_conv
from .structure import (LAYER_MATH, TRANSITION_MATH, dense_block_issue, dense_layer_issue, raise_structure_error,
                        transition_issue)

__all__ = ["DenseLayer", "DenseBlock", "BlockStats", "Transition", "check_input", "fused_module_hooks",
           "has_hooks", "recording", "recording_graph", "refuse_script", "shapes_traced"]


def recording_graph() -> bool:
    """Whether torch.export, torch.jit.trace or torch.fx.symbolic_trace is recording the call, or
    a torch.func transform (vmap, grad, jacrev, ...) is running it: its autograd Functions have no
    functorch rules, so per-sample gradients and Jacobians take the plain graph too.

    The modules and models then run the textbook computation (torch.cat, BatchNorm, ReLU, conv,
    per layer: torchvision's graph) with their own submodules, so that the recorded program
    holds only ATen ops (nothing of this package: it runs wherever an exported torchvision
    DenseNet runs) and is differentiable by plain autograd, and an FX graph has torchvision's
    nodes (torchvision's create_feature_extractor finds the same names).  Values are the same up
    to rounding; what is given up is the memory saving.  An FX tracer that keeps DenseBlock and
    Transition as leaf modules calls them instead, memory-efficient.  torch.compile is not
    recording in this sense: it compiles the memory-efficient ops.
    """
    return _exporting() or shapes_traced() or torch._C._are_functorch_transforms_active()


def recording(module: nn.Module, where: str) -> bool:
    """recording_graph(), and a UserWarning when `module` is in training mode with synchronized
    batch norm (a process_group from convert_sync_batchnorm): the recorded plain graph's batch
    norms normalise with this process's batch statistics only."""
    if not recording_graph():
        return False
    if module.training and getattr(module, "process_group", None) is not None:
        warnings.warn(f"{where}: the recorded graph (torch.export, jit.trace, fx) of a training-mode module with "
                      "synchronized batch norm normalises with each process's own batch statistics: the "
                      "synchronisation across process_group is not recorded. Record it in eval mode, or train it "
                      "eagerly or under torch.compile", UserWarning, stacklevel=3)
    return True


def _exporting() -> bool:
    # torch 2.11's dynamo folds torch.compiler.is_exporting() to True in every torch.compile trace
    # (2.14's reads the flag); the flag itself reads False there and True under torch.export
    # (strict or not) in both
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def refuse_script(module: nn.Module) -> nn.Module:
    """__prepare_scriptable__ of densenet_fast's modules: torch.jit.script cannot compile them."""
    raise TypeError(f"densenet_fast.{type(module).__name__} cannot be compiled by torch.jit.script (its forward runs "
                    "autograd Functions and custom ops): record it with torch.export.export or torch.jit.trace "
                    "instead, which record the plain graph (torch.cat, BatchNorm, ReLU, conv: ATen ops only), "
                    "or train it under torch.compile")


def fused_module_hooks(modules: Iterable[nn.Module], owner: nn.Module, where: str, children: bool = False) -> None:
    """Account for the hooks of modules that a fused forward computes without calling them.

    modules: those modules (each with its direct children when `children`: a block's layers);
    owner: the module whose forward it is (for names).  Forward pre-hooks that only recompute a
    weight (torch.nn.utils' prune, weight_norm and spectral_norm) are run here, before the weights
    are read: skipped, they left a weight computed in an earlier step, whose graph backward had
    freed.  Any other forward or backward hook cannot run, and a UserWarning names its module (a
    hook that silently never runs would be a silently wrong result).  Nothing is checked under
    torch.compile.
    """
    if torch.compiler.is_compiling():
        return
    # Plain loops over _modules: Module.modules() builds names and a memo set, ~5x the cost (this
    # runs on every forward; ~60 us per DenseNet-121 step as written).
    for m in modules:
        if has_hooks(m):
            _run_weight_hooks_or_warn(m, owner, where)
        if children:
            for c in m._modules.values():
                if c is not None and has_hooks(c):
                    _run_weight_hooks_or_warn(c, owner, where)


def has_hooks(m: nn.Module) -> bool:
    """Whether m has forward or backward hooks of its own (global hooks aside)."""
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks)


def _run_weight_hooks_or_warn(m: nn.Module, owner: nn.Module, where: str) -> None:
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    others = False
    for hook in list(m._forward_pre_hooks.values()):
        if isinstance(hook, (BasePruningMethod, WeightNorm, SpectralNorm)):
            hook(m, None)  # sets m.<weight> from its parametrisation, as before a call of m
        else:
            others = True
    if others or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
        name = next((n for n, sub in owner.named_modules() if sub is m), type(m).__name__)
        warnings.warn(f"{where}: the hooks registered on its {name} ({type(m).__name__}) do not run: the "
                      "memory-efficient forward computes its math without calling it. Register them on a DenseBlock, "
                      "Transition or the model, use torch.nn.utils.parametrize for a weight's reparametrisation, or "
                      "build the model with memory_efficient=False", UserWarning, stacklevel=3)


def check_handoff(handoff: Optional[GradHandoff], where: str) -> None:
    """handoff is None or a GradHandoff (anything else failed only in backward)."""
    if handoff is not None and not isinstance(handoff, GradHandoff):
        raise TypeError(f"{where}: handoff must be a densenet_fast.ops.dense_block.GradHandoff or None, got "
                        f"{type(handoff).__name__}")


def concat_input(parts: Sequence[Tensor], where: str, channels: int, total: int, param: Tensor,
                 buffer: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """A list input of a block (or lone layer) written into its buffer: (buffer[:, :channels]
    holding torch.cat(parts, 1), buffer).  parts: (N, C_i, H, W) with sum(C_i) == channels;
    buffer: (N, total, H, W) or None for a new one (new_block_buffer, the autocast dtype under
    autocast).  The parts are checked first, each error naming x[i]."""
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or len(parts) == 0:
        raise TypeError(f"{where}: input x must be a tensor or a non-empty list of tensors, got "
                        f"{type(parts).__name__}")
    for i, part in enumerate(parts):
        if not isinstance(part, Tensor):
            raise TypeError(f"{where}: input x[{i}] must be a torch.Tensor, got {type(part).__name__}")
        check_input(part, f"{where} (x[{i}])", part.shape[1] if part.dim() == 4 else -1, param, False)
        if (part.shape[0], *part.shape[2:]) != (parts[0].shape[0], *parts[0].shape[2:]):
            raise ValueError(f"{where}: input x[{i}] has shape {tuple(part.shape)}, but x[0] has "
                             f"{tuple(parts[0].shape)}; the parts must agree in N, H and W")
    widths = [p.shape[1] for p in parts]
    if sum(widths) != channels:
        raise ValueError(f"{where}: the channels of the input parts x must add up to {channels}, got "
                         f"{' + '.join(map(str, widths))} = {sum(widths)}")
    n, _, h, w = parts[0].shape
    if buffer is None:
        buffer = new_block_buffer(parts[0], total, h, w, autocast_dtype(parts[0].device.type))
    elif not isinstance(buffer, Tensor) or tuple(buffer.shape) != (n, total, h, w) \
            or buffer.device != parts[0].device or buffer.requires_grad:
        got = (f"{tuple(buffer.shape)} on {buffer.device}, requires_grad={buffer.requires_grad}"
               if isinstance(buffer, Tensor) else type(buffer).__name__)
        raise ValueError(f"{where}: buffer must be a tensor of shape {(n, total, h, w)} on {parts[0].device} "
                         f"that does not require grad (new_buffer), got {got}")
    return concat_into(parts, buffer[:, :channels]), buffer


class DenseLayer(nn.Module):
    """One dense layer: new = conv3x3(relu(bn2(conv1x1(relu(bn1(x)))))) with dropout.

    Same constructor and names as torchvision's _DenseLayer; bn_size=0 makes a layer without
    bottleneck, new = conv3x3(relu(bn1(x))) (norm1, relu1 and a 3x3 conv1: the original DenseNet's
    layer, FC-DenseNet's).  forward(x): x is (N, C_in, H, W) or
    a list of tensors whose channels add up to C_in (torchvision's calling convention); returns
    the growth_rate new channels (N, k, H, W).  Used alone it runs as a one-layer block (its input
    is copied into the block buffer, a list's tensors one by one without a torch.cat); inside a
    DenseBlock the block drives it.
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0, *,
                 backend: str = "auto", save_bottleneck: bool = False) -> None:
        super().__init__()
        for name, module in dense_layer_modules(num_input_features, growth_rate, bn_size).items():
            self.add_module(name, module)
        self.drop_rate = check_drop_rate(drop_rate)
        self.backend = check_backend_name(backend)
        self.save_bottleneck = save_bottleneck
        self.process_group = None  # set by densenet_fast.convert_sync_batchnorm

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:
        x, buffer = input, None
        if recording(self, "DenseLayer"):
            return dense_layer_ref(self, x if isinstance(x, (list, tuple)) else [x])
        raise_structure_error("DenseLayer", dense_layer_issue(self), LAYER_MATH)
        c_in = self.conv1.in_channels
        fused_module_hooks(self.children(), self, "DenseLayer")
        if not isinstance(x, Tensor):  # written straight into the one-layer block's buffer (no torch.cat)
            x, buffer = concat_input(x, "DenseLayer", c_in, c_in + growth_rate_of([self]), self.conv1.weight, None)
        check_input(x, "DenseLayer", c_in, self.conv1.weight, self.training)
        fbuf, _, _ = run_checked_dense_block(x, [self], kernels_for(self.backend, x.device, self.process_group),
                                             save_bottleneck=self.save_bottleneck, compute_stats=self.training,
                                             buffer=buffer)
        return fbuf[:, c_in:]


class BlockStats:
    """Receives a DenseBlock call's statistics cache: block(x, stats_out=s) leaves the batch
    (mean, var) of F's channels (what forward_with_stats returns beside F) in s.mean and s.var.

    For callers that call the block as a module, so that its hooks run (FSDP's among them), and
    still hand its statistics to the transition after it.  A plain object, not a list: hooks that
    cast or copy the call's arguments (FSDP's mixed precision) rebuild containers, not this.
    """

    __slots__ = ("mean", "var")

    def __init__(self) -> None:
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None


class DenseBlock(nn.ModuleDict):
    """L dense layers sharing one concat buffer.  (N, C0, H, W) -> (N, C0 + L*k, H, W).

    Equivalent to torchvision's _DenseBlock (torch.cat of the input and every layer's output) in
    values, gradients and running statistics, with one buffer per call instead of L
    concatenations and BN-ReLU outputs never stored.

    backend: "auto" | "torch" | "cuda" (densenet_fast.backends).
    save_bottleneck: keep each layer's bottleneck (bn_size*k channels) for backward instead of
      recomputing its 1x1 conv (faster, more memory).  Default False: minimum memory.
    chunk_channels: input channels per chunk of the 1x1-conv backward (0 = whole prefix at once).
    """

    _version = 2

    __prepare_scriptable__ = refuse_script

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, *, backend: str = "auto", save_bottleneck: bool = False,
                 chunk_channels: int = 0) -> None:
        super().__init__()
        if not is_int(num_layers) or num_layers < 1:
            raise ValueError(f"DenseBlock: num_layers must be an int >= 1, got {num_layers!r}")
        check_chunk(chunk_channels, "DenseBlock", "chunk_channels")
        for i in range(num_layers):
            self.add_module("denselayer%d" % (i + 1), DenseLayer(
                num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate, backend=backend))
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.backend = check_backend_name(backend)
        self.save_bottleneck = save_bottleneck
        self.chunk_channels = int(chunk_channels)
        self.process_group = None  # set by densenet_fast.convert_sync_batchnorm

    @property
    def num_output_features(self) -> int:
        return self.num_input_features + len(self) * self.growth_rate

    def new_buffer(self, like: Tensor, height: int, width: int) -> Tensor:
        """An uninitialised block buffer (N, C0 + L*k, height, width) with like's batch size,
        device and memory format (like: (N, ., ., .)), in the autocast dtype under autocast, else
        like's dtype.

        Hand its channel prefix to whatever produces the block's input (Transition(out=...)) and
        the buffer to forward_with_stats(buffer=...): the block then skips copying its input.
        """
        return new_block_buffer(like, self.num_output_features, height, width, autocast_dtype(like.device.type))

    def forward_with_stats(self, x: Union[Tensor, Sequence[Tensor]], buffer: Optional[Tensor] = None,
                           handoff: Optional[GradHandoff] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(F, mean, var): the buffer plus the batch statistics of its channels (training mode;
        empty tensors in eval mode), for a following Transition or head to reuse.

        x: (N, C0, H, W), or a list of (N, C_i, H, W) tensors whose channels add up to C0 (a
        decoder's upsampled map and skip connection, say): they are written straight into the
        block buffer, as torch.cat(x, 1) would be, without that concatenation.
        buffer: optional new_buffer(x) to fill (F is then that tensor); when x is its channel
        prefix buffer[:, :C0], x is not copied.  A buffer serves one call.
        handoff: a GradHandoff also given to F's only consumer (Transition(handoff=...)), so that
        the backward adopts that consumer's gradient of F instead of copying it.
        """
        layers = list(self.values())
        if recording(self, "DenseBlock"):  # torch.cat per layer; no statistics cache (as in eval mode)
            fbuf = reference.DenseBlock.forward(self, x)  # type: ignore[arg-type]
            empty = torch.empty(0, dtype=stats_dtype(fbuf.dtype), device=fbuf.device)
            return fbuf, empty, empty
        raise_structure_error("DenseBlock", dense_block_issue(list(self._modules.items()), self.num_input_features,
                                                             self.growth_rate), LAYER_MATH)
        fused_module_hooks(self._modules.values(), self, "DenseBlock", children=True)
        check_handoff(handoff, "DenseBlock")
        if not isinstance(x, Tensor):
            x, buffer = concat_input(x, "DenseBlock", self.num_input_features, self.num_output_features,
                                     layers[0].conv1.weight, buffer)
        check_input(x, "DenseBlock", self.num_input_features, layers[0].conv1.weight, self.training)
        return run_checked_dense_block(x, layers, kernels_for(self.backend, x.device, self.process_group),
                                       save_bottleneck=self.save_bottleneck, chunk_channels=self.chunk_channels,
                                       compute_stats=self.training, buffer=buffer, handoff=handoff)

    def forward(self, x: Union[Tensor, Sequence[Tensor]], buffer: Optional[Tensor] = None,
                handoff: Optional[GradHandoff] = None, stats_out: Optional[BlockStats] = None) -> Tensor:
        """F = torch.cat([x, new_1, ..., new_L], 1).  buffer, handoff: as forward_with_stats's;
        stats_out: a BlockStats that receives the statistics cache (what DenseNet and FCDenseNet
        pass, calling their blocks as modules so that hooks on them run)."""
        if recording(self, "DenseBlock"):  # torchvision's _DenseBlock.forward: each layer called, then one torch.cat
            return reference.DenseBlock.forward(self, x)  # type: ignore[arg-type]
        if stats_out is not None and not isinstance(stats_out, BlockStats):
            raise TypeError(f"DenseBlock: stats_out must be a densenet_fast.modules.BlockStats, got "
                            f"{type(stats_out).__name__}")
        fbuf, mean, var = self.forward_with_stats(x, buffer, handoff)
        if stats_out is not None:
            stats_out.mean, stats_out.var = mean, var
        return fbuf


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 (torchvision's _Transition), computed as conv(pool(relu(bn(x)))).

    (N, C, H, W) -> (N, C_out, H // 2, W // 2).  forward(x, stats=None, out=None): `stats` is the
    preceding block's (mean, var) cache (DenseBlock.forward_with_stats); without it the batch
    statistics are computed here.  `out`: a (N, C_out, H // 2, W // 2) tensor to write the result
    into, typically next_block.new_buffer(...)[:, :C_out]; the result then shares its memory.
    `handoff`: the GradHandoff the block that produced x was given (x's only consumer being this).
    relu(bn(x)) is never stored.

    Like torchvision's _Transition it is an nn.Sequential of norm, relu, conv, pool: code that
    walks a transition's children (segmentation encoders take their skip connection after its
    ReLU that way) runs them one by one, with the plain modules' results.
    """

    __prepare_scriptable__ = refuse_script

    def __init__(self, num_input_features: int, num_output_features: int, *, backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("num_input_features", num_input_features), ("num_output_features", num_output_features)):
            if not is_int(value) or value < 1:
                raise ValueError(f"Transition: {name} must be an int >= 1, got {value!r}")
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                                          bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))
        self.backend = check_backend_name(backend)
        self.process_group = None  # set by densenet_fast.convert_sync_batchnorm

    def forward(self, x: Tensor, stats: Optional[Tuple[Tensor, Tensor]] = None, out: Optional[Tensor] = None,
                handoff: Optional[GradHandoff] = None) -> Tensor:
        if recording(self, "Transition"):  # torchvision's order: norm, relu, conv, pool
            y = super().forward(x)
            return y if out is None else out.copy_(y)
        raise_structure_error("Transition", transition_issue(self), TRANSITION_MATH)
        check_input(x, "Transition", self.conv.in_channels, self.conv.weight, self.training)
        check_handoff(handoff, "Transition")
        check_pool_input(x, "Transition")
        fused_module_hooks(self.children(), self, "Transition")
        return bn_relu_pool_conv(x, self.norm, self.conv.weight, pool="avg2", cache=stats, out=out, handoff=handoff,
                                 kernels=kernels_for(self.backend, x.device, self.process_group))
