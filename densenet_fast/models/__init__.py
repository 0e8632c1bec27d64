"""DenseNet models (torchvision-compatible ImageNet variants, CIFAR DenseNet-BC) and FC-DenseNets."""

from typing import Optional, Tuple, Union

from .densenet import (DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc,
                       densenet_cifar)
from .fc_densenet import FCDenseNet, TransitionDown, TransitionUp, fc_densenet56, fc_densenet67, fc_densenet103

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc",
           "densenet_cifar", "FCDenseNet", "TransitionDown", "TransitionUp", "fc_densenet56", "fc_densenet67",
           "fc_densenet103", "get_model", "is_segmentation_model", "MODEL_NAMES", "SEGMENTATION_MODELS"]

_BUILDERS = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet264": densenet264,
    "densenet_bc": densenet_bc,
    "densenet_cifar": densenet_cifar,
    "fc_densenet56": fc_densenet56,
    "fc_densenet67": fc_densenet67,
    "fc_densenet103": fc_densenet103,
}

SEGMENTATION_MODELS = ("fc_densenet56", "fc_densenet67", "fc_densenet103")  # (N, classes, H, W) logits

MODEL_NAMES = tuple(_BUILDERS) + ("densenet_bc_<depth>_<k>", "densenet_<depth>_<k>",
                                  "fc_densenet_<levels>_<layers>_<k>")


def _numbers(name: str, prefix: str, count: int) -> Optional[Tuple[int, ...]]:
    """The `count` integers of name == prefix + "_".join(ints), else None."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split("_")
    if len(parts) != count or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


def is_segmentation_model(name: str) -> bool:
    """Whether get_model(name) is an FC-DenseNet: per-pixel logits (N, classes, H, W)."""
    return name in SEGMENTATION_MODELS or _numbers(name, "fc_densenet_", 3) is not None


def get_model(name: str, **kwargs) -> Union[DenseNet, FCDenseNet]:
    """A model by name: densenet121/161/169/201/264, densenet_bc, densenet_cifar,
    densenet_bc_<depth>_<growth> (e.g. densenet_bc_100_12, densenet_bc_250_24) or, without
    bottlenecks and compression, densenet_<depth>_<growth> (e.g. densenet_40_12); or one of the
    SEGMENTATION_MODELS, FC-DenseNet56/67/103 (fc_densenet56 ...), or fc_densenet_<levels>_<layers>_<growth>
    (e.g. fc_densenet_3_2_8: 3 poolings, 2 layers in every dense block, growth 8; FC-DenseNet67 is
    fc_densenet_5_5_16)."""
    if not isinstance(name, str):
        raise TypeError(f"get_model: name must be a model name (str), got {type(name).__name__}; known: "
                        f"{', '.join(MODEL_NAMES)}")
    if name in _BUILDERS:
        return _BUILDERS[name](**kwargs)
    fc = _numbers(name, "fc_densenet_", 3)
    if fc is not None:
        levels, layers, growth = fc
        return FCDenseNet(down_blocks=(layers,) * levels, bottleneck_layers=layers, up_blocks=(layers,) * levels,
                          growth_rate=growth, **kwargs)
    parts = name.split("_")
    if name.startswith("densenet_bc_") and len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
        return densenet_bc(depth=int(parts[2]), growth_rate=int(parts[3]), **kwargs)
    if name.startswith("densenet_") and len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return densenet_cifar(depth=int(parts[1]), growth_rate=int(parts[2]), **kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
