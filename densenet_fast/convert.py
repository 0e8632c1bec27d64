"""convert(): turn existing DenseNets, or any model built from dense blocks, into efficient ones.

Recognised by structure, and checked module by module (densenet_fast.structure), so torchvision's
and timm's DenseNet/_DenseBlock/_Transition, densenet_fast.reference's modules and look-alikes in
third-party segmentation nets convert:
  * a DenseNet (features Sequential with conv0 ... norm5, a Linear classifier after ReLU and a
    global average pool) becomes a densenet_fast.models.DenseNet (the fused forward that shares
    statistics across modules); stem modules of other shapes (timm's deep stem, blur pooling)
    are kept as they are and run as modules;
  * a densenet_fast FCDenseNet (memory_efficient=False, or another backend) becomes the efficient
    FCDenseNet of the same architecture;
  * anywhere else, a dense block (a ModuleDict of layers with norm1/conv1/norm2/conv2) becomes a
    densenet_fast.DenseBlock and a transition (norm, conv 1x1, 2x2 average pool) a
    densenet_fast.Transition.
A module that looks like one of these but computes something else (another activation, a dilated
or biased convolution, a BatchNorm subclass with its own forward, a class with its own forward
that gives other values) is left as it is, and a UserWarning names it and says why (strict=True:
a ValueError).  Classes other than torchvision's, timm's and densenet_fast.reference's are
compared with their replacement on a random input before they are replaced.
Weights, buffers (running statistics, num_batches_tracked), BatchNorm eps/momentum, the
train/eval mode, device, dtype and the modules' hooks are carried over.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .modules import DenseBlock, Transition, has_hooks
from .models.densenet import DenseNet
from .models.fc_densenet import FCDenseNet
from .structure import (Issue, dense_layer_issue, module_width, named_issue, norm_relu_issue, relu_issue,
                        transition_issue)

__all__ = ["convert"]

# The classes whose computation is known to be the textbook one (module, qualified name): their
# modules are converted on structure alone.  Only these exact classes (a subclass may override a
# method their forward calls, e.g. torchvision's bn_function or timm's forward_head), with their
# own forward (not one replaced on the instance); other classes are also compared numerically.
_KNOWN_CLASSES = {
    ("torchvision.models.densenet", "_DenseLayer"), ("torchvision.models.densenet", "_DenseBlock"),
    ("torchvision.models.densenet", "_Transition"), ("torchvision.models.densenet", "DenseNet"),
    ("timm.models.densenet", "DenseLayer"), ("timm.models.densenet", "DenseBlock"),
    ("timm.models.densenet", "DenseTransition"), ("timm.models.densenet", "DenseNet"),
    ("densenet_fast.reference", "DenseLayer"), ("densenet_fast.reference", "DenseBlock"),
    ("densenet_fast.reference", "Transition"), ("densenet_fast.reference", "DenseNet"),
    ("densenet_fast.models.densenet", "DenseNet"), ("torch.nn.modules.container", "Sequential"),
}
# A Sequential transition's children in an order that computes BN-ReLU-Conv1x1-AvgPool2x2 (the
# pool and the 1x1 conv commute; the ReLU may live in the norm, timm's BatchNormAct2d)
_TRANSITION_ORDERS = {("norm", "relu", "conv", "pool"), ("norm", "relu", "pool", "conv"), ("norm", "conv", "pool"),
                      ("norm", "pool", "conv")}
_LAYER_CHILDREN = {"norm1", "relu1", "conv1", "norm2", "relu2", "conv2"}
_TRANSITION_CHILDREN = {"norm", "relu", "conv", "pool"}


def _known_forward(m: nn.Module) -> bool:
    return (type(m).__module__, type(m).__qualname__) in _KNOWN_CLASSES and "forward" not in m.__dict__


def _bn_act_relu(m: Optional[nn.Module]) -> bool:
    """timm's BatchNormAct2d with a ReLU and no drop: batch norm then ReLU in one module."""
    return ((type(m).__module__, type(m).__qualname__) == ("timm.layers.norm_act", "BatchNormAct2d")
            and isinstance(m, nn.BatchNorm2d) and "forward" not in m.__dict__
            and relu_issue(getattr(m, "act", None)) is None
            and isinstance(getattr(m, "drop", nn.Identity()), nn.Identity))


def _norm_relu_issue(parent: nn.Module, norm: str, relu: str, channels: int) -> Issue:
    """parent.<norm> then parent.<relu>: an nn.BatchNorm2d and an nn.ReLU, or one of timm's
    BatchNormAct2d with a ReLU (and no <relu> module, or an identity)."""
    get = parent._modules.get
    m = get(norm)
    if type(m).__name__ != "BatchNormAct2d":
        return norm_relu_issue(parent, norm, relu, channels)
    if not _bn_act_relu(m):
        return norm, (f"is BatchNormAct2d with act {type(getattr(m, 'act', None)).__name__} and drop "
                      f"{type(getattr(m, 'drop', None)).__name__}; expected act ReLU and no drop")
    if not m.affine or m.num_features != channels:
        return norm, f"is BatchNormAct2d(affine={m.affine}, num_features={m.num_features}); expected affine, {channels}"
    extra = get(relu)
    if extra is None or isinstance(extra, nn.Identity):
        return None
    return named_issue(relu, relu_issue(extra))


def _source_layer_issue(layer: nn.Module, in_channels: int, growth_rate: Optional[int]) -> Issue:
    extra = sorted(set(layer._modules) - _LAYER_CHILDREN)
    if extra:
        return extra[0], "is a child that a dense layer does not have"
    return dense_layer_issue(layer, in_channels, growth_rate, norm_relu=_norm_relu_issue)


def _growth_rate(layer: nn.Module) -> int:
    conv = layer._modules.get("conv2", layer._modules.get("conv1"))
    return conv.out_channels if isinstance(conv, nn.Conv2d) else -1


def _block_issue(m: nn.Module) -> Issue:
    """Why the dense-block-like m cannot become a DenseBlock (None: it can)."""
    layers = list(m.named_children())
    issue = _inner_issue(m)
    if issue is not None:
        return issue
    kinds = {"conv2" in layer._modules for _, layer in layers}
    widths = {getattr(layer._modules.get("conv1"), "out_channels", -1) for _, layer in layers}
    k = _growth_rate(layers[0][1])
    if len(kinds) > 1:
        return "", "mixes layers with and without bottleneck; a DenseBlock's layers are all of one kind"
    if kinds == {True} and (len(widths) > 1 or min(widths) % k != 0):
        return "", (f"has bottleneck widths {sorted(widths)} for growth rate {k}; a DenseBlock's are bn_size * "
                    "growth_rate in every layer")
    c = module_width(layers[0][1]._modules.get("norm1"))
    for name, layer in layers:
        issue = _source_layer_issue(layer, c, k)
        if issue is not None:
            return f"{name}.{issue[0]}", issue[1]
        c += k
    rates = sorted({float(getattr(layer, "drop_rate", 0.0)) for _, layer in layers})
    if len(rates) > 1:
        return "drop_rate", f"differs between its layers ({rates}); a DenseBlock has one"
    for what in [m] + [layer for _, layer in layers]:
        if not _known_forward(what):
            if rates != [0.0]:
                return "", (f"is a {type(what).__name__}, a class convert() does not know, with dropout: its "
                            "training-mode computation cannot be compared with a DenseBlock's")
            problem = _compare(m, lambda: _new_block(m, "torch", False), (2, module_width(layers[0][1].norm1), 5, 4),
                               True)
            return None if problem is None else ("", problem)
    return None


def _looks_like_layer(m: nn.Module) -> bool:
    return "norm1" in m._modules and "conv1" in m._modules


def _looks_like_block(m: nn.Module) -> bool:
    children = list(m.children())
    return (isinstance(m, nn.ModuleDict) and not isinstance(m, DenseBlock) and len(children) > 0
            and all(_looks_like_layer(c) for c in children))


def _looks_like_transition(m: nn.Module) -> bool:
    """norm, conv and pool children (and relu), nothing else, and for a Sequential norm first:
    FC-DenseNet's transition down (with its dropout) or a conv-norm-relu-pool head are other
    things, not transitions that fail a check."""
    names = list(m._modules)
    return (not isinstance(m, Transition) and {"norm", "conv", "pool"} <= set(names) <= _TRANSITION_CHILDREN
            and (not isinstance(m, nn.Sequential) or names[0] == "norm"))


def _transition_issue(m: nn.Module) -> Issue:
    order = tuple(m._modules)
    if isinstance(m, nn.Sequential) and order not in _TRANSITION_ORDERS:
        return "", f"runs {', '.join(order)} in that order; a transition runs norm, relu, conv, pool"
    issue = _inner_issue(m)
    if issue is not None:
        return issue
    issue = transition_issue(m, norm_relu=_norm_relu_issue)
    if issue is None and not _known_forward(m):
        width = module_width(m._modules.get("norm"))
        problem = _compare(m, lambda: _new_transition(m, "torch"), (2, width, 6, 4), True)
        issue = None if problem is None else ("", problem)
    return issue


def _inner_issue(m: nn.Module) -> Issue:
    """What the fused module replacing m could not carry: hooks on its submodules (it computes
    them without calling them) or a reparametrised weight (parametrize, weight_norm,
    spectral_norm: other state-dict keys)."""
    for name, sub in m.named_modules():
        if not name:
            continue
        if parametrize.is_parametrized(sub) or any(isinstance(h, (WeightNorm, SpectralNorm))
                                                   for h in sub._forward_pre_hooks.values()):
            return name, ("has a reparametrised weight (parametrize, weight_norm or spectral_norm), which convert() "
                          "does not carry: convert first, then reparametrise the converted model")
        if has_hooks(sub):
            return name, "has hooks, which the memory-efficient module would not run (it does not call its submodules)"
    return None


def _drop_rate(block: nn.Module) -> float:
    return float(getattr(next(iter(block.children())), "drop_rate", 0.0))


def _compare(old: nn.Module, build: Callable[[], nn.Module], shape: Tuple[int, ...], train_too: bool
             ) -> Optional[str]:
    """None when `old` and the module `build` makes (given old's state) agree on a random float64
    input, in eval mode and (train_too: no dropout) in train mode, else what differs."""
    with torch.no_grad():
        a = copy.deepcopy(old).to(device="cpu", dtype=torch.float64)
        b = build().to(device="cpu", dtype=torch.float64)
        try:
            b.load_state_dict(a.state_dict())
        except RuntimeError as exc:
            detail = str(exc).splitlines()[-1].strip()
            return f"has parameters or buffers that the converted module does not: {detail}"
        gen = torch.Generator().manual_seed(0)
        for mode in ((False, True) if train_too else (False,)):
            a.train(mode)
            b.train(mode)
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            try:
                ya, yb = a(x), b(x)
            except Exception as exc:  # noqa: BLE001 -- any failure means: not the same function
                return f"could not be compared with its replacement ({type(exc).__name__}: {exc})"
            tol = 1e-9 * (1 + ya.abs().max().item())
            if ya.shape != yb.shape or not torch.allclose(ya, yb, rtol=1e-9, atol=tol):
                diff = (ya - yb).abs().max().item() if ya.shape == yb.shape else f"shape {tuple(ya.shape)}"
                return (f"gives other values than the dense computation it looks like ({'train' if mode else 'eval'} "
                        f"mode, largest difference {diff})")
    return None


def _block_config(block: nn.Module) -> dict:
    layers = list(block.children())
    first = layers[0]
    k = _growth_rate(first)
    bottleneck = "conv2" in first._modules
    return dict(num_layers=len(layers), num_input_features=first.norm1.num_features,
                bn_size=first.conv1.out_channels // k if bottleneck else 0, growth_rate=k,
                drop_rate=_drop_rate(block))


def _new_block(m: nn.Module, backend: str, save_bottleneck: bool) -> DenseBlock:
    return DenseBlock(**_block_config(m), backend=backend, save_bottleneck=save_bottleneck,
                      chunk_channels=getattr(m, "chunk_channels", 0))


def _new_transition(m: nn.Module, backend: str) -> Transition:
    return Transition(m.conv.in_channels, m.conv.out_channels, backend=backend)


class _Conversion:
    """One convert() call: the options, and the modules left as they are, with the reasons."""

    def __init__(self, backend: str, save_bottleneck: bool) -> None:
        self.backend, self.save_bottleneck = backend, save_bottleneck
        self.skipped: List[str] = []
        self.pending: List[Tuple[nn.Module, str, nn.Module]] = []  # (parent, name, replacement)

    def skip(self, path: str, what: str, issue: Tuple[str, str]) -> None:
        where = ".".join(p for p in (path, issue[0]) if p)
        self.skipped.append(f"{what} {path or '(the model itself)'}: its {where or 'self'} {issue[1]}")

    def module(self, m: nn.Module, path: str) -> Optional[nn.Module]:
        """The replacement of m, or None (m is left; skipped if it looked convertible)."""
        if isinstance(m, FCDenseNet):
            issue = _fc_densenet_issue(m)
            if issue is None:
                return self.build(path, "the FCDenseNet", m,
                                  lambda: FCDenseNet(**m.config, memory_efficient=True, backend=self.backend))
            self.skip(path, "the FCDenseNet", issue)
            return None
        if _looks_like_densenet(m):
            issue = _densenet_issue(m)
            if issue is None:
                issue, new = self.densenet(m, path)
                if new is not None:
                    return new
            if issue is not None:  # (None: build() has said why)
                self.skip(path, "the DenseNet", issue)
            return None
        if _looks_like_block(m):
            issue = _block_issue(m)
            if issue is None:
                return self.build(path, "the dense block", m, lambda: _new_block(m, self.backend, self.save_bottleneck))
            self.skip(path, "the dense block", issue)
        elif _looks_like_transition(m):
            issue = _transition_issue(m)
            if issue is None:
                return self.build(path, "the transition", m, lambda: _new_transition(m, self.backend))
            self.skip(path, "the transition", issue)
        return None

    def build(self, path: str, what: str, old: nn.Module, make: Callable[[], nn.Module]) -> Optional[nn.Module]:
        """_finish(make(), old), or None with old skipped when old's state does not load into it."""
        try:
            return _finish(make(), old)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            self.skip(path, what, ("", f"has state that does not load into the converted module ({detail})"))
            return None

    def children(self, parent: nn.Module, path: str) -> int:
        """Plans the replacement of parent's convertible descendants (self.pending); returns how many."""
        n = 0
        for name, child in list(parent.named_children()):
            sub = f"{path}.{name}" if path else name
            new = self.module(child, sub)
            if new is not None:
                self.pending.append((parent, name, new))
                n += 1
            else:
                n += self.children(child, sub)
        return n

    def densenet(self, model: nn.Module, path: str) -> Tuple[Issue, Optional[nn.Module]]:
        """(None, the converted model), (why not, None) when none of its blocks converts, or
        (None, None) when its state did not load (build() has recorded why)."""
        feats = model.features
        # a shell whose features and classifier are replaced below
        new = DenseNet(1, (1,), 1, 1, num_classes=1, memory_efficient=True, backend=self.backend, small_inputs=True,
                       in_channels=feats.conv0.in_channels)
        # features rebuilt in the source's order from the source's own modules: blocks and
        # transitions converted (any growth rate per block, any transition width), norm5 a plain
        # BatchNorm2d (the head applies the ReLU), a timm norm0 with its ReLU split into norm0 and
        # relu0 (torchvision's stem, which runs fused), anything else kept as it is.
        features, efficient = nn.Sequential(), 0
        for name, child in feats.named_children():
            sub = f"{path}.features.{name}" if path else f"features.{name}"
            if isinstance(child, DenseBlock):  # already efficient: rebuilt for this backend
                converted = self.build(sub, "the dense block", child,
                                       lambda c=child: _new_block(c, self.backend, self.save_bottleneck))
            elif isinstance(child, Transition):
                converted = self.build(sub, "the transition", child, lambda c=child: _new_transition(c, self.backend))
            else:
                converted = self.module(child, sub)
            efficient += converted is not None
            if converted is not None:
                features.add_module(name, converted)
            elif name in ("norm0", "norm5") and _bn_act_relu(child):
                features.add_module(name, _finish(nn.BatchNorm2d(child.num_features), child))
                if name == "norm0" and not isinstance(feats._modules.get("relu0"), nn.ReLU):
                    features.add_module("relu0", nn.ReLU(inplace=True))  # (its place, if an identity held it)
            elif name == "relu0" and "relu0" in features._modules:
                continue  # an identity after a norm0 with its ReLU, replaced above
            else:
                features.add_module(name, copy.deepcopy(child))
        new.features = features
        if not efficient:
            return ("features", "has no dense block or transition that converts"), None
        new.classifier = nn.Linear(model.classifier.in_features, model.classifier.out_features,
                                   bias=model.classifier.bias is not None)
        return None, self.build(path, "the DenseNet", model, lambda: new)


def _fc_densenet_issue(m: FCDenseNet) -> Issue:
    """An FCDenseNet is rebuilt from its config: every module must be the one the config builds
    (same class and settings; batch norms may differ in eps, momentum and running statistics,
    which are carried over)."""
    with torch.device("meta"):
        ref = FCDenseNet(**m.config, memory_efficient=m.memory_efficient, backend=m.backend)
    have = dict(m.named_modules())
    for name, r in ref.named_modules():
        o = have.pop(name, None)
        if type(o) is not type(r):
            return name, f"{'is missing' if o is None else 'is ' + type(o).__name__}; expected {type(r).__name__}"
        same = o.affine == r.affine if isinstance(r, nn.BatchNorm2d) else o.extra_repr() == r.extra_repr()
        if not same:
            return name, f"is {type(o).__name__}({o.extra_repr()}); expected {type(r).__name__}({r.extra_repr()})"
    if have:
        return next(iter(have)), "is a module that the FCDenseNet of its config does not have"
    # the fused modules (blocks, transitions), whose inner modules the efficient model does not call
    units = [("bottleneck", m.bottleneck)] + [(f"{part}.{i}", unit) for part in ("down", "trans_down", "trans_up", "up")
                                              for i, unit in enumerate(getattr(m, part))]
    for path, unit in units:
        issue = _inner_issue(unit)
        if issue is not None:
            return f"{path}.{issue[0]}", issue[1]
    return None


def _looks_like_densenet(m: nn.Module) -> bool:
    feats = getattr(m, "features", None)
    return (isinstance(feats, nn.Sequential) and isinstance(getattr(m, "classifier", None), nn.Linear)
            and isinstance(feats._modules.get("conv0"), nn.Conv2d)
            and any(_looks_like_block(c) or isinstance(c, DenseBlock) for c in feats.children()))


def _densenet_issue(m: nn.Module) -> Issue:
    """Whether the DenseNet-like m computes classifier(avg_pool(relu(features(x)))), flattened."""
    if not _known_forward(m):
        return "forward", f"is {type(m).__name__}'s own"
    pool = getattr(m, "global_pool", None)  # timm's head: global_pool, head_drop, classifier
    if pool is not None and getattr(pool, "pool_type", "avg") != "avg":
        return "global_pool", f"is {getattr(pool, 'pool_type', None)!r} pooling; expected 'avg'"
    drop = getattr(m, "head_drop", None)
    if drop is not None and not (isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)):
        return "head_drop", "is a dropout before the classifier, which densenet_fast.DenseNet does not have"
    norm5 = m.features._modules.get("norm5")
    if norm5 is not None and type(norm5).__name__ == "BatchNormAct2d" and not _bn_act_relu(norm5):
        return "features.norm5", _norm_relu_issue(m.features, "norm5", "", module_width(norm5))[1]
    return None


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _finish(new: nn.Module, old: nn.Module) -> nn.Module:
    """Copy weights, buffers, BN hyper-parameters, mode, device, dtype and hooks from old to new."""
    old_modules: Dict[str, nn.Module] = dict(old.named_modules())
    for name, m in new.named_modules():
        src = old_modules.get(name)
        if isinstance(m, nn.BatchNorm2d) and isinstance(src, nn.modules.batchnorm._BatchNorm):
            m.eps, m.momentum = src.eps, src.momentum
            if not src.track_running_stats:
                m.track_running_stats = False
                m.running_mean = m.running_var = m.num_batches_tracked = None
        if src is not None:
            m.train(src.training)
    # each parameter and buffer on the device and in the dtype of the one it replaces (a bf16 model
    # whose batch norms stay float32 keeps them so)
    state = old.state_dict()
    for mod_name, m in new.named_modules():
        for table in (m._parameters, m._buffers):
            for key, t in table.items():
                src = state.get(f"{mod_name}.{key}" if mod_name else key)
                if t is not None and src is not None and (t.dtype, t.device) != (src.dtype, src.device):
                    moved = t.detach().to(device=src.device, dtype=src.dtype)
                    table[key] = nn.Parameter(moved, t.requires_grad) if isinstance(t, nn.Parameter) else moved
    new.load_state_dict(state, strict=True)
    for name, m in new.named_modules():  # after loading: state-dict hooks are not carried
        src = old_modules.get(name)
        if src is not None and src is not m:
            for attr in _HOOK_DICTS:
                hooks = getattr(src, attr, None)
                if hooks:
                    getattr(m, attr).update(hooks)
            if src._backward_hooks:
                m._is_full_backward_hook = src._is_full_backward_hook
    return new


def convert(model: nn.Module, *, backend: str = "auto", save_bottleneck: bool = False, inplace: bool = False,
            strict: bool = False) -> nn.Module:
    """The memory-efficient equivalent of `model` (same weights, buffers, mode, device, dtype, hooks).

    model: a torchvision / timm / densenet_fast.reference DenseNet, or any nn.Module containing
    dense blocks and transitions.  inplace=False (default) leaves `model` untouched; inplace=True
    replaces the converted modules inside `model` (a DenseNet or FCDenseNet given itself is always
    rebuilt: a new object is returned).  A checkpointed source (torchvision's or timm's
    memory_efficient=True) moves its running statistics twice per training step; the converted
    model moves them once, as the same model without checkpointing does.
    Modules that look like dense blocks, transitions or DenseNets but compute something else
    (densenet_fast.structure says what) are left as they are, with a UserWarning naming each;
    strict=True raises a ValueError instead.  Raises ValueError when nothing in `model` converts.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module (a DenseNet, or a model containing dense blocks), "
                        f"got {type(model).__name__}")
    conv = _Conversion(backend, save_bottleneck)
    result = conv.module(model, "")
    if result is None:
        target = model if inplace else copy.deepcopy(model)
        count = conv.children(target, "")
        result = target if count else None
    if conv.skipped:
        message = ("; ".join(dict.fromkeys(conv.skipped)) + ". The memory-efficient modules compute BN-ReLU-Conv "
                   "dense layers and BN-ReLU-Conv1x1-AvgPool2x2 transitions only (densenet_fast.structure)")
        if result is None:
            raise ValueError(f"convert: found nothing it can convert in {type(model).__name__}. "
                             f"Not converted: {message}")
        if strict:
            raise ValueError(f"convert(strict=True): not converted: {message}")
        warnings.warn(f"convert: left as they are: {message}", UserWarning, stacklevel=2)
    if result is None:
        raise ValueError(f"convert: found no dense block, transition or DenseNet in {type(model).__name__}")
    for parent, name, new in conv.pending:  # only now: strict=True leaves an inplace model untouched
        setattr(parent, name, new)
    return result
