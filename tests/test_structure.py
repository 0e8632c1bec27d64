"""Swapped submodules: the fused modules refuse what they would silently ignore, and DenseNet's stem
and head run other modules as modules.

Every value comparison is float64 against the naive computation with the same modules, under
tolerances.py's float64 tolerance (1e-8)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import densenet_fast
from densenet_fast import reference
from densenet_fast.models.fc_densenet import FCDenseNet
from builders import assert_same_step, randomize_bn_, seeded_input
from tolerances import assert_close

F64 = torch.float64


class _ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward."""

    def forward(self, x):
        return super().forward(x) * 2


class _Double(nn.Module):  # a weight parametrisation (keeps Conv2d's forward)
    def forward(self, w):
        return 2 * w


def _dilated(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=2, dilation=2, bias=False)


# (what is swapped, how, the words the error must contain)
LAYER_SWAPS = [
    ("relu1", lambda l: nn.SiLU(), "relu1 is SiLU; expected nn.ReLU"),
    ("relu2", lambda l: nn.LeakyReLU(0.1), "relu2 is LeakyReLU; expected nn.ReLU"),
    ("norm1", lambda l: _ScaledBN(l.norm1.num_features), "norm1 is _ScaledBN; expected nn.BatchNorm2d"),
    ("norm2", lambda l: nn.GroupNorm(2, l.norm2.num_features), "norm2 is GroupNorm; expected nn.BatchNorm2d"),
    ("norm1", lambda l: nn.BatchNorm2d(l.norm1.num_features, affine=False), "affine=False; expected affine=True"),
    ("norm2", lambda l: nn.SyncBatchNorm(l.norm2.num_features), "densenet_fast.convert_sync_batchnorm"),
    ("conv2", lambda l: _dilated(l.conv2), "dilation=(2, 2) (expected (1, 1))"),
    ("conv2", lambda l: nn.Conv2d(l.conv2.in_channels, l.conv2.out_channels, 3, padding=1), "conv2 has a bias"),
    ("conv1", lambda l: nn.Conv2d(l.conv1.in_channels, l.conv1.out_channels, 1, groups=2, bias=False),
     "groups=2 (expected 1)"),
]


@pytest.mark.parametrize("child, make, words", LAYER_SWAPS, ids=[f"{c}-{w[:12]}" for c, _, w in LAYER_SWAPS])
def test_fused_block_refuses_swapped_layer_module(child, make, words):
    """A DenseBlock (and a lone DenseLayer) whose layer has another module than the dense math
    raises a ValueError naming that module, in train and eval mode, instead of ignoring it; the
    unmodified block gives the naive block's values (the check does not refuse good blocks)."""
    block = densenet_fast.DenseBlock(3, 8, 2, 4, backend="torch").double()
    naive = reference.DenseBlock(3, 8, 2, 4, 0.0).double()
    naive.load_state_dict(block.state_dict())
    x = seeded_input((2, 8, 5, 6), 1, F64)
    assert_same_step(block, naive, x, 2, "unmodified block")
    layer = block.denselayer2
    setattr(layer, child, make(layer).double())
    for mode in (True, False):
        block.train(mode)
        with pytest.raises(ValueError, match="DenseBlock: its denselayer2") as err:
            block(x)
        assert words in str(err.value)
        with pytest.raises(ValueError, match="DenseLayer: its ") as err:
            layer(seeded_input((2, 12, 5, 6), 3, F64))
        assert words in str(err.value)


def test_plain_layer_and_transitions_refuse_swapped_modules():
    plain = densenet_fast.DenseBlock(2, 6, 0, 4, backend="torch").double()
    plain.denselayer1.conv1 = nn.Conv2d(6, 4, 5, padding=2, bias=False).double()
    with pytest.raises(ValueError, match=r"denselayer1.conv1 has kernel_size=\(5, 5\) \(expected \(3, 3\)\)"):
        plain(seeded_input((2, 6, 4, 4), 4, F64))
    x = seeded_input((2, 8, 6, 6), 5, F64)
    for name, module, words in [("relu", nn.SiLU(), "relu is SiLU"), ("pool", nn.AvgPool2d(2, 2, ceil_mode=True),
                                                                      "ceil_mode=True"),
                                ("pool", nn.MaxPool2d(2, 2), "pool is MaxPool2d"),
                                ("norm", nn.BatchNorm2d(8, affine=False), "affine=False")]:
        t = densenet_fast.Transition(8, 4, backend="torch").double()
        setattr(t, name, module.double())
        with pytest.raises(ValueError, match="Transition: its " + name) as err:
            t(x)
        assert words in str(err.value)
    fc = FCDenseNet(3, 2, (1, 1), 1, (1, 1), growth_rate=4, first_channels=6, backend="torch").double()
    img = seeded_input((2, 3, 8, 8), 6, F64)
    for path, module, words in [("trans_down.0.relu", nn.ReLU6(), "TransitionDown: its relu is ReLU6"),
                                ("trans_down.1.pool", nn.AvgPool2d(2, 2), "TransitionDown: its pool is AvgPool2d"),
                                ("trans_up.0.conv", nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, bias=False),
                                 "TransitionUp: its conv has padding=(1, 1) (expected (0, 0))"),
                                ("classifier", nn.Conv2d(fc.classifier.in_channels, 2, 3, padding=1),
                                 "FCDenseNet: its classifier has kernel_size=(3, 3)")]:
        model = copy.deepcopy(fc)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module.double())
        with pytest.raises(ValueError) as err:
            model(img)
        assert words in str(err.value), str(err.value)


def test_subclasses_that_keep_torch_forward_are_accepted():
    """A parametrised conv weight (torch.nn.utils.parametrize makes a Conv2d subclass) and a
    non-inplace ReLU: the same math, so the block runs them and matches the naive block."""
    block = densenet_fast.DenseBlock(2, 6, 2, 4, backend="torch").double()
    naive = reference.DenseBlock(2, 6, 2, 4, 0.0).double()
    for b in (block, naive):
        parametrize.register_parametrization(b.denselayer1.conv2, "weight", _Double())
        b.denselayer2.relu1 = nn.ReLU(inplace=False)
    naive.load_state_dict(block.state_dict())
    assert_same_step(block, naive, seeded_input((2, 6, 5, 5), 7, F64), 8, "parametrised conv2")


STEM_HEAD_SWAPS = {
    "relu0-silu": lambda f: setattr(f, "relu0", nn.SiLU()),
    "relu0-leaky": lambda f: setattr(f, "relu0", nn.LeakyReLU(0.2)),
    "norm0-groupnorm": lambda f: setattr(f, "norm0", nn.GroupNorm(2, 8)),
    "norm0-subclass": lambda f: setattr(f, "norm0", _ScaledBN(8)),
    "pool0-avg": lambda f: setattr(f, "pool0", nn.AvgPool2d(3, 2, 1)),
    "norm5-groupnorm": lambda f: setattr(f, "norm5", nn.GroupNorm(2, f.norm5.num_features)),
    "norm5-subclass": lambda f: setattr(f, "norm5", _ScaledBN(f.norm5.num_features)),
    "norm5-identity": lambda f: setattr(f, "norm5", nn.Identity()),
    "module-after-norm5": lambda f: f.add_module("extra", nn.Conv2d(f.norm5.num_features, f.norm5.num_features, 1)),
    "module-between": lambda f: f.add_module("denseblock1", nn.Sequential(f.denseblock1, nn.Tanh())),
}


@pytest.mark.parametrize("swap", list(STEM_HEAD_SWAPS))
def test_densenet_runs_other_stem_and_head_modules_as_modules(swap):
    """DenseNet fuses norm0-relu0(-pool0) and norm5-ReLU-pool only when they are the plain
    modules; other modules run as modules, with torchvision's head after features (ReLU, global
    average pool).  Compared with the naive model holding the same modules: a training step
    (output, input and parameter gradients, running statistics), then eval."""
    torch.manual_seed(11)
    ours = densenet_fast.DenseNet(4, (2, 2), 8, 2, num_classes=5, backend="torch")
    STEM_HEAD_SWAPS[swap](ours.features)
    randomize_bn_(ours, 12).double()
    naive = densenet_fast.DenseNet(4, (2, 2), 8, 2, num_classes=5, memory_efficient=False).double()
    for name, child in ours.features.named_children():  # the same modules, the naive blocks
        if isinstance(child, (densenet_fast.DenseBlock, densenet_fast.Transition)):
            getattr(naive.features, name).load_state_dict(child.state_dict())
        elif isinstance(child, nn.Sequential) and isinstance(child[0], densenet_fast.DenseBlock):
            plain = copy.deepcopy(child)
            plain[0] = copy.deepcopy(naive.features.denseblock1)
            plain[0].load_state_dict(child[0].state_dict())
            setattr(naive.features, name, plain)
        else:
            setattr(naive.features, name, copy.deepcopy(child))
    naive.classifier.load_state_dict(ours.classifier.state_dict())
    assert_same_step(ours, naive, seeded_input((2, 3, 32, 30), 13, F64), 14, swap)
    ours.eval()
    naive.eval()
    x = seeded_input((2, 3, 32, 30), 15, F64)
    assert_close(ours(x), naive(x), F64, f"{swap}: eval output")
