"""DenseNet models (torchvision-compatible ImageNet variants, CIFAR DenseNet-BC) and FC-DenseNets."""

from typing import Union

from .densenet import (DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc,
                       densenet_cifar)
from .fc_densenet import FCDenseNet, TransitionDown, TransitionUp, fc_densenet56, fc_densenet67, fc_densenet103

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc",
           "densenet_cifar", "FCDenseNet", "TransitionDown", "TransitionUp", "fc_densenet56", "fc_densenet67",
           "fc_densenet103", "get_model", "MODEL_NAMES", "SEGMENTATION_MODELS"]

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

MODEL_NAMES = tuple(_BUILDERS) + ("densenet_bc_<depth>_<k>", "densenet_<depth>_<k>")


def get_model(name: str, **kwargs) -> Union[DenseNet, FCDenseNet]:
    """A model by name: densenet121/161/169/201/264, densenet_bc, densenet_cifar,
    densenet_bc_<depth>_<growth> (e.g. densenet_bc_100_12, densenet_bc_250_24) or, without
    bottlenecks and compression, densenet_<depth>_<growth> (e.g. densenet_40_12); or one of the
    SEGMENTATION_MODELS, FC-DenseNet56/67/103 (fc_densenet56 ...)."""
    if name in _BUILDERS:
        return _BUILDERS[name](**kwargs)
    parts = name.split("_")
    if name.startswith("densenet_bc_") and len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
        return densenet_bc(depth=int(parts[2]), growth_rate=int(parts[3]), **kwargs)
    if name.startswith("densenet_") and len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return densenet_cifar(depth=int(parts[1]), growth_rate=int(parts[2]), **kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
