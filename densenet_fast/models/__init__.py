"""DenseNet models (torchvision-compatible ImageNet variants and CIFAR DenseNet-BC)."""

from .densenet import (DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc,
                       densenet_cifar)

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc",
           "densenet_cifar", "get_model", "MODEL_NAMES"]

_BUILDERS = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet264": densenet264,
    "densenet_bc": densenet_bc,
    "densenet_cifar": densenet_cifar,
}

MODEL_NAMES = tuple(_BUILDERS) + ("densenet_bc_<depth>_<k>", "densenet_<depth>_<k>")


def get_model(name: str, **kwargs) -> DenseNet:
    """A model by name: densenet121/161/169/201/264, densenet_bc, densenet_cifar,
    densenet_bc_<depth>_<growth> (e.g. densenet_bc_100_12, densenet_bc_250_24) or, without
    bottlenecks and compression, densenet_<depth>_<growth> (e.g. densenet_40_12)."""
    if name in _BUILDERS:
        return _BUILDERS[name](**kwargs)
    parts = name.split("_")
    if name.startswith("densenet_bc_") and len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
        return densenet_bc(depth=int(parts[2]), growth_rate=int(parts[3]), **kwargs)
    if name.startswith("densenet_") and len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return densenet_cifar(depth=int(parts[1]), growth_rate=int(parts[2]), **kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
