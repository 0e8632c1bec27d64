"""DenseNet models (torchvision-compatible ImageNet variants and CIFAR DenseNet-BC)."""

from .densenet import DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc",
           "get_model", "MODEL_NAMES"]

_BUILDERS = {
    "densenet121": densenet121,
    "densenet161": densenet161,
    "densenet169": densenet169,
    "densenet201": densenet201,
    "densenet264": densenet264,
    "densenet_bc": densenet_bc,
}

MODEL_NAMES = tuple(_BUILDERS) + ("densenet_bc_<depth>_<k>",)


def get_model(name: str, **kwargs) -> DenseNet:
    """A model by name: densenet121/161/169/201/264, densenet_bc, or densenet_bc_<depth>_<growth>
    (e.g. densenet_bc_100_12, densenet_bc_250_24)."""
    if name in _BUILDERS:
        return _BUILDERS[name](**kwargs)
    parts = name.split("_")
    if name.startswith("densenet_bc_") and len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():
        return densenet_bc(depth=int(parts[2]), growth_rate=int(parts[3]), **kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
