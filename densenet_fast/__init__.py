"""densenet_fast: memory-efficient DenseNets for PyTorch.

One shared concat buffer per dense block, BN-ReLU outputs never stored, per-channel batch
statistics computed once and reused, a shared gradient buffer; see README.md and
../shared/design/dense_block.md for the algorithm.
"""

from . import reference
from ._ext import HAS_C
# The compiled ops' fake (meta) implementations live in these modules (csrc/ops.cpp names them with
# set_python_module): imported with the package, so that torch.compile and the memory planner can
# trace every op even where nothing else imported them yet (a fullgraph compile of the cuda
# backend failed on channel_affine so, H200, torch 2.11).
from .ops import channel_stats as _channel_stats, cuda_block as _cuda_block, fused_bn as _fused_bn
from .backends import BACKENDS, available_backends
from .convert import convert
from .graphs import GraphedStep
from .models import (DenseNet, FCDenseNet, densenet121, densenet161, densenet169, densenet201, densenet264,
                     densenet_bc, densenet_cifar, fc_densenet56, fc_densenet67, fc_densenet103, get_model)
from .modules import DenseBlock, DenseLayer, Transition
from .sync import convert_sync_batchnorm

_FAKE_IMPL_MODULES = (_channel_stats, _cuda_block, _fused_bn)
__version__ = "0.1.0"

__all__ = [
    "DenseLayer", "DenseBlock", "Transition", "DenseNet",
    "densenet121", "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc", "densenet_cifar",
    "FCDenseNet", "fc_densenet56", "fc_densenet67", "fc_densenet103", "get_model",
    "convert", "convert_sync_batchnorm", "GraphedStep", "available_backends", "BACKENDS", "HAS_C", "reference", "__version__",
]
