"""Swapped submodules: the fused modules refuse what they would silently ignore, DenseNet's stem and
head run other modules as modules, and convert() converts only what computes the dense math.

Every value comparison is float64 against the naive computation with the same modules, under
tolerances.py's float64 tolerance (1e-8)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models.densenet as tvd
from torch.nn.utils import parametrize

import densenet_fast
from densenet_fast import reference
from densenet_fast.models.fc_densenet import FCDenseNet
from builders import assert_same_step, randomize_bn_, seeded_input, states
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
                                 "TransitionUp: its conv has padding=(1, 1) (expected (0, 0))")]:
        model = copy.deepcopy(fc)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module.double())
        with pytest.raises(ValueError) as err:
            model(img)
        assert words in str(err.value), str(err.value)


FC_SWAPS = {
    "trans-down-avg-pool": lambda m: m.trans_down.__setitem__(
        0, nn.Sequential(*list(m.trans_down[0].children())[:-1], nn.AvgPool2d(2, 2))),
    "naive-down-block": lambda m: m.down.__setitem__(1, reference.DenseBlock(1, 10, 0, 4, 0.0)),
    "naive-bottleneck": lambda m: setattr(m, "bottleneck", reference.DenseBlock(1, 14, 0, 4, 0.0)),
    "naive-up-block": lambda m: m.up.__setitem__(0, reference.DenseBlock(1, 18, 0, 4, 0.0)),
    "classifier-3x3": lambda m: setattr(m, "classifier", nn.Conv2d(m.classifier.in_channels, 2, 3, padding=1)),
}


@pytest.mark.parametrize("swap", list(FC_SWAPS))
def test_fc_densenet_runs_replaced_modules_as_modules(swap):
    """An FCDenseNet whose block, transition down or classifier is replaced by a module of another
    class calls it plainly (a block with torch.cat of its input parts) and computes what the naive
    model with the same modules computes: a training step, then eval."""
    torch.manual_seed(43)
    ours = FCDenseNet(3, 2, (1, 1), 1, (1, 1), growth_rate=4, first_channels=6, drop_rate=0.0, backend="torch")
    FC_SWAPS[swap](ours)
    randomize_bn_(ours, 44).double()
    naive = FCDenseNet(3, 2, (1, 1), 1, (1, 1), growth_rate=4, first_channels=6, drop_rate=0.0,
                       memory_efficient=False).double()
    FC_SWAPS[swap](naive)
    naive.double().load_state_dict(ours.state_dict())
    assert_same_step(ours, naive, seeded_input((2, 3, 9, 8), 45, F64), 46, swap)
    ours.eval()
    naive.eval()
    x = seeded_input((2, 3, 9, 8), 47, F64)
    assert_close(ours(x), naive(x), F64, f"{swap}: eval output")


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
    "conv0-sequential": lambda f: setattr(f, "conv0", nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False),
                                                                    nn.Conv2d(8, 8, 3, 1, 1, bias=False))),
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


# --------------------------------------------------------------------------------------------
# convert()
# --------------------------------------------------------------------------------------------


def _tv(**kw) -> tvd.DenseNet:
    torch.manual_seed(21)
    model = tvd.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=5, **kw)
    return randomize_bn_(model, 22).double()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, tvd._DenseLayer)]


CONVERT_SWAPS = {
    # what is changed, and which modules (by path) must stay unconverted
    "relu1-silu": (lambda m: [setattr(l, "relu1", nn.SiLU()) for l in _layers(m)],
                   ["features.denseblock1", "features.denseblock2"]),
    "conv2-dilated": (lambda m: setattr(m.features.denseblock2.denselayer1, "conv2",
                                        _dilated(m.features.denseblock2.denselayer1.conv2)),
                      ["features.denseblock2"]),
    "norm1-subclass": (lambda m: setattr(m.features.denseblock1.denselayer2, "norm1", _ScaledBN(12)),
                       ["features.denseblock1"]),
    "transition-relu6": (lambda m: setattr(m.features.transition1, "relu", nn.ReLU6()), ["features.transition1"]),
    "transition-ceil": (lambda m: setattr(m.features.transition1, "pool", nn.AvgPool2d(2, 2, ceil_mode=True)),
                        ["features.transition1"]),
    "relu0-silu": (lambda m: setattr(m.features, "relu0", nn.SiLU()), []),
    "pool0-avg": (lambda m: setattr(m.features, "pool0", nn.AvgPool2d(3, 2, 1)), []),
    "conv0-5x5": (lambda m: setattr(m.features, "conv0", nn.Conv2d(3, 8, 5, 2, 2, bias=False)), []),
    "norm5-no-affine": (lambda m: setattr(m.features, "norm5", nn.BatchNorm2d(m.features.norm5.num_features,
                                                                              affine=False)), []),
}


@pytest.mark.parametrize("swap", list(CONVERT_SWAPS))
def test_convert_leaves_what_it_cannot_compute(swap):
    """A torchvision DenseNet with a module swapped: convert() still returns a DenseNet (stem and
    head modules of other kinds are kept and run as modules), converts every block and transition
    that computes the dense math, leaves the others with a warning naming each, and the result
    computes what the original computes (a training step, then eval)."""
    change, left = CONVERT_SWAPS[swap]
    tv = _tv()
    change(tv)
    tv.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = densenet_fast.convert(tv, backend="torch")
    messages = " ".join(str(w.message) for w in caught if "convert: left" in str(w.message))
    assert isinstance(ours, densenet_fast.DenseNet)
    for name in ("features.denseblock1", "features.denseblock2", "features.transition1"):
        kept = name in left
        assert isinstance(ours.get_submodule(name), (densenet_fast.DenseBlock, densenet_fast.Transition)) != kept, name
        assert (name + ":" in messages) == kept, (name, messages)
    if not left:
        assert not messages
    assert_same_step(ours, tv, seeded_input((2, 3, 33, 35), 23, F64), 24, f"converted {swap}")
    ours.eval()
    tv.eval()
    x = seeded_input((2, 3, 33, 35), 25, F64)
    assert_close(ours(x), tv(x), F64, f"converted {swap}: eval")


def test_convert_strict_raises_and_leaves_the_model_untouched():
    tv = _tv()
    tv.features.denseblock2.denselayer1.relu2 = nn.SiLU()
    holder = nn.Sequential(nn.Identity(), tv.features)  # blocks found below another module
    with pytest.raises(ValueError, match=r"strict=True.*block 1\.denseblock2: its 1\.denseblock2\."
                                         r"denselayer1\.relu2 is SiLU"):
        densenet_fast.convert(holder, backend="torch", strict=True, inplace=True)
    assert isinstance(holder[1].denseblock1, tvd._DenseBlock), "strict convert modified the inplace model"
    with pytest.raises(ValueError, match="found nothing it can convert"):
        densenet_fast.convert(tv.features.denseblock2, backend="torch")


class _BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, as far as convert() relies on it: batch norm, drop, act."""

    def __init__(self, num_features, act=nn.ReLU):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


# as timm names it (convert() recognises timm's class by its module and name)
_BatchNormAct2d.__module__, _BatchNormAct2d.__name__, _BatchNormAct2d.__qualname__ = \
    "timm.layers.norm_act", "BatchNormAct2d", "BatchNormAct2d"


def _timm_like(act=nn.ReLU):
    """A torchvision DenseNet whose norms carry the activation (timm's layout: no relu modules).
    norm5 stays (torchvision's forward applies an in-place ReLU after it; timm_test has timm's)."""
    tv = _tv()
    for parent in [tv.features] + _layers(tv) + [tv.features.transition1]:
        for name in ("norm0", "norm1", "norm2", "norm"):
            bn = parent._modules.get(name)
            if bn is not None:
                new = _BatchNormAct2d(bn.num_features, act)
                new.load_state_dict(bn.state_dict())
                setattr(parent, name, new.double())
        for name in ("relu0", "relu1", "relu2", "relu"):
            if name in parent._modules:
                setattr(parent, name, nn.Identity())
    return tv


def test_convert_norms_that_carry_their_relu():
    """Norms with the ReLU inside (timm's BatchNormAct2d) convert to BatchNorm2d + ReLU (the
    stem's norm0 gets a relu0, so the stem runs fused); with another activation nothing converts."""
    model = _timm_like()
    ours = densenet_fast.convert(model, backend="torch")
    assert list(ours.features._modules)[:4] == ["conv0", "norm0", "relu0", "pool0"]
    assert all(type(m) is not _BatchNormAct2d for m in ours.modules())
    assert_same_step(ours, model, seeded_input((2, 3, 33, 35), 26, F64), 27, "converted BN-act model")
    with pytest.raises(ValueError, match="act SiLU"):
        densenet_fast.convert(_timm_like(nn.SiLU), backend="torch")


class _ResidualBlock(nn.ModuleDict):
    """A dense block look-alike whose forward is not the dense one (it adds its input back)."""

    def __init__(self, residual):
        super().__init__({f"denselayer{i + 1}": tvd._DenseLayer(6 + 4 * i, 4, 2, 0.0) for i in range(2)})
        self.residual = residual

    def forward(self, x):
        feats = [x]
        for layer in self.values():
            feats.append(layer(feats) + (feats[-1][:, :4] if self.residual else 0))
        return torch.cat(feats, 1)


@pytest.mark.parametrize("residual", [False, True], ids=["dense", "residual"])
def test_convert_compares_unknown_classes_before_replacing(residual):
    """A block class convert() does not know is compared with its replacement on a random input:
    the dense one is converted, the residual one left with a warning."""
    holder = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), _ResidualBlock(residual))
    randomize_bn_(holder, 28).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = densenet_fast.convert(holder, backend="torch") if not residual else None
        if residual:
            with pytest.raises(ValueError, match="gives other values than the dense computation"):
                densenet_fast.convert(holder, backend="torch")
    if not residual:
        assert isinstance(ours[1], densenet_fast.DenseBlock)
        assert not [w for w in caught if "convert:" in str(w.message)]
        assert_same_step(ours, holder, seeded_input((2, 3, 7, 6), 29, F64), 30, "converted look-alike")


def test_convert_checks_fc_densenet_module_by_module():
    """A naive FCDenseNet is rebuilt from its config, so convert() first checks that each module is
    the one the config builds: a swapped activation or another dropout rate keeps the model (its
    unchanged blocks still convert inside it) and the values stay the original's."""
    torch.manual_seed(36)
    base = FCDenseNet(3, 2, (1, 1), 1, (1, 1), growth_rate=4, first_channels=6, drop_rate=0.0, memory_efficient=False)
    for where, module, words in [("down.0.denselayer1.relu1", nn.SiLU(), "relu1 is SiLU; expected ReLU"),
                                 ("trans_down.1.drop", nn.Dropout(0.5), "expected Dropout(p=0.0")]:
        model = randomize_bn_(copy.deepcopy(base), 37).double()
        parent, _, leaf = where.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module)
        with pytest.warns(UserWarning, match="the FCDenseNet") as caught:
            ours = densenet_fast.convert(model, backend="torch")
        assert words in " ".join(str(w.message) for w in caught)
        assert isinstance(ours, FCDenseNet) and not ours.memory_efficient
        assert isinstance(ours.up[0], densenet_fast.DenseBlock)
        model.eval()
        ours.eval()
        x = seeded_input((2, 3, 9, 8), 38, F64)
        assert_close(ours(x), model(x), F64, f"FCDenseNet with {where} swapped, eval")


def test_convert_rebuilds_efficient_models_for_the_backend():
    """An efficient DenseNet converted for another backend gets blocks and transitions of that
    backend (with their chunk setting and save_bottleneck), the same state and the same values."""
    torch.manual_seed(39)
    model = randomize_bn_(densenet_fast.densenet_bc(10, 4, backend="torch", chunk_channels=3), 40).double()
    for backend in ("cuda", "torch"):
        ours = densenet_fast.convert(model, backend=backend, save_bottleneck=True)
        fused = [m for m in ours.modules() if isinstance(m, (densenet_fast.DenseBlock, densenet_fast.Transition))]
        assert len(fused) == 5 and all(m.backend == backend for m in fused), backend
        blocks = [m for m in fused if isinstance(m, densenet_fast.DenseBlock)]
        assert all(b.chunk_channels == 3 and b.save_bottleneck for b in blocks)
        for name, t in states(model).items():
            assert torch.equal(states(ours)[name], t), name
    assert_same_step(ours, model, seeded_input((2, 3, 8, 8), 41, F64), 42, "efficient model converted again")


def _transition_seq(order, width=8):
    parts = {"norm": nn.BatchNorm2d(width), "relu": nn.ReLU(), "conv": nn.Conv2d(width, 4, 1, bias=False),
             "pool": nn.AvgPool2d(2, 2)}
    return nn.Sequential(__import__("collections").OrderedDict((n, parts[n]) for n in order))


@pytest.mark.parametrize("order", [("norm", "relu", "conv", "pool"), ("norm", "relu", "pool", "conv"),
                                   ("norm", "conv", "relu", "pool"), ("norm", "pool", "relu", "conv"),
                                   ("norm", "conv", "pool", "relu"), ("relu", "norm", "conv", "pool")],
                         ids=lambda o: "-".join(o))
def test_convert_checks_a_transition_s_order(order):
    """A Sequential transition converts only in an order that computes BN-ReLU-Conv-Pool (the conv
    and the pool commute, the ReLU does not); one that starts with its norm but puts the ReLU
    elsewhere is left with its reason; one that does not start with its norm is not a transition."""
    torch.manual_seed(52)
    holder = randomize_bn_(nn.Sequential(_transition_seq(order)), 53).double()
    if order[:2] == ("norm", "relu"):
        ours = densenet_fast.convert(holder, backend="torch")
        assert isinstance(ours[0], densenet_fast.Transition)
        assert_same_step(ours, holder, seeded_input((2, 8, 6, 6), 54, F64), 55, "-".join(order))
    elif order[0] == "norm":
        with pytest.raises(ValueError, match=f"runs {', '.join(order)} in that order"):
            densenet_fast.convert(holder, backend="torch")
    else:
        with pytest.raises(ValueError, match="found no dense block, transition or DenseNet"):
            densenet_fast.convert(holder, backend="torch")


class _SiLUBottleneckLayer(tvd._DenseLayer):
    """torchvision's layer with its forward, but a bn_function of its own (SiLU)."""

    def bn_function(self, inputs):
        return self.conv1(F.silu(self.norm1(torch.cat(inputs, 1))))


def _block_with_layers(make_layer):
    block = tvd._DenseBlock(2, 8, 2, 4, 0.0)
    for i, name in enumerate(list(block.keys())):
        old = block[name]
        new = make_layer(8 + 4 * i)
        new.load_state_dict(old.state_dict())
        block[name] = new
    return block


def test_convert_compares_subclasses_of_known_classes():
    """Known classes are trusted only as themselves: a torchvision layer subclass that overrides
    bn_function (which torchvision's forward calls) is compared numerically and left; a module
    whose forward was replaced on the instance is neither converted nor run by a fused block."""
    torch.manual_seed(56)
    holder = randomize_bn_(nn.Sequential(_block_with_layers(lambda c: _SiLUBottleneckLayer(c, 4, 2, 0.0))), 57)
    with pytest.raises(ValueError, match="gives other values than the dense computation"):
        densenet_fast.convert(holder.double(), backend="torch", strict=True)
    patched = randomize_bn_(nn.Sequential(tvd._DenseBlock(2, 8, 2, 4, 0.0)), 58).double()
    relu = patched[0].denselayer1.relu2
    relu.forward = lambda x: F.silu(x)
    with pytest.raises(ValueError, match="relu2 is ReLU with a forward replaced on the instance"):
        densenet_fast.convert(patched, backend="torch")
    block = densenet_fast.DenseBlock(2, 8, 2, 4, backend="torch")
    block.denselayer1.relu2.forward = lambda x: F.silu(x)
    with pytest.raises(ValueError, match="DenseBlock: its denselayer1.relu2 is ReLU with a forward replaced"):
        block(torch.randn(2, 8, 4, 4))


def _bottleneck_width(block, layer, width):
    old = block[layer]
    old.conv1 = nn.Conv2d(old.conv1.in_channels, width, 1, bias=False)
    old.norm2 = nn.BatchNorm2d(width)
    old.conv2 = nn.Conv2d(width, 4, 3, padding=1, bias=False)


@pytest.mark.parametrize("case", ["widths-differ", "width-not-multiple", "parametrized", "hook-on-norm1",
                                  "hook-on-transition-relu", "unknown-class-with-dropout"])
def test_convert_leaves_blocks_it_cannot_rebuild(case):
    """What a DenseBlock or Transition cannot hold is left, with its reason, instead of failing in
    load_state_dict or converting into something that computes otherwise: per-layer bottleneck
    widths, a reparametrised weight, hooks on submodules the fused module would not call, and an
    unknown class with dropout (its training-mode computation cannot be compared)."""
    torch.manual_seed(59)
    block, trans = tvd._DenseBlock(2, 8, 2, 4, 0.0), tvd._Transition(16, 8)
    if case == "widths-differ":
        _bottleneck_width(block, "denselayer2", 12)
        words = "has bottleneck widths [8, 12] for growth rate 4"
    elif case == "width-not-multiple":
        _bottleneck_width(block, "denselayer1", 6)
        _bottleneck_width(block, "denselayer2", 6)
        words = "has bottleneck widths [6] for growth rate 4"
    elif case == "parametrized":
        parametrize.register_parametrization(block.denselayer1.conv2, "weight", _Double())
        words = "denselayer1.conv2 has a reparametrised weight"
    elif case == "hook-on-norm1":
        block.denselayer2.norm1.register_forward_hook(lambda m, a, out: out * 2)
        words = "denselayer2.norm1 has hooks, which the memory-efficient module would not run"
    elif case == "hook-on-transition-relu":
        trans.relu.register_forward_hook(lambda m, a, out: out * 2)
        words = "1.relu has hooks"
    else:
        block = _ResidualBlock(False)
        for layer in block.values():
            layer.drop_rate = 0.2
        words = "a class convert() does not know, with dropout"
    if isinstance(block, _ResidualBlock):
        trans = tvd._Transition(14, 8)
    holder = randomize_bn_(nn.Sequential(block, trans), 60).double()
    with pytest.warns(UserWarning, match="convert: left as they are") as caught:
        ours = densenet_fast.convert(holder, backend="torch")
    assert words in " ".join(str(w.message) for w in caught), [str(w.message) for w in caught]
    holder.eval()
    ours.eval()
    x = seeded_input((2, 8 if case != "unknown-class-with-dropout" else 6, 6, 6), 61, F64)
    assert_close(ours(x), holder(x), F64, f"{case}: eval output")


def test_convert_does_not_mistake_a_head_for_a_transition():
    """A conv-BN-ReLU-pool head has a transition's child names but not its order: it is no
    transition, so nothing warns and strict=True converts the rest."""
    tv = _tv()
    model = nn.Sequential(tv.features, nn.Sequential(__import__("collections").OrderedDict([
        ("conv", nn.Conv2d(12, 6, 3, padding=1, bias=False)), ("norm", nn.BatchNorm2d(6)), ("relu", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1))]))).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = densenet_fast.convert(model, backend="torch", strict=True)
    assert isinstance(ours[0].denseblock1, densenet_fast.DenseBlock)
    assert isinstance(ours[1].conv, nn.Conv2d) and type(ours[1]) is nn.Sequential


def test_convert_keeps_each_tensor_s_dtype():
    """A bfloat16 model whose batch norms stay float32 keeps them so (each parameter and buffer in
    the dtype and on the device of the one it replaces)."""
    tv = _tv().to(torch.bfloat16)
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.float()
    ours = densenet_fast.convert(tv, backend="torch")
    want = {k: v.dtype for k, v in tv.state_dict().items()}
    assert {k: v.dtype for k, v in ours.state_dict().items()} == want
    assert {torch.bfloat16, torch.float32} <= set(want.values())


def test_convert_carries_hooks():
    """Forward hooks and pre-hooks on the model and on its blocks run on the converted modules."""
    tv = _tv()
    seen = []
    tv.features.denseblock2.register_forward_hook(lambda m, args, out: seen.append(("block2", out.detach())))
    tv.register_forward_pre_hook(lambda m, args: seen.append(("model", args[0].detach())))
    x = seeded_input((2, 3, 33, 35), 31, F64)
    tv(x)
    ours = densenet_fast.convert(tv, backend="torch")
    want, seen[:] = list(seen), []
    ours(x)
    assert [n for n, _ in seen] == [n for n, _ in want] == ["model", "block2"]
    for (name, got), (_, expected) in zip(seen, want):
        assert_close(got, expected, F64, f"hooked {name}")


def test_torch_sync_batchnorm_converter_is_refused_with_advice():
    """torch's SyncBatchNorm.convert_sync_batchnorm swaps the fused modules' norms, which they
    would not synchronise: the block names densenet_fast.convert_sync_batchnorm instead."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(densenet_fast.densenet_bc(10, 4, backend="torch"))
    with pytest.raises(ValueError, match="densenet_fast.convert_sync_batchnorm"):
        model(torch.randn(2, 3, 8, 8))


def test_convert_timm_densenets():
    """timm's DenseNet-121 (ReLU) and its deep-stem blur-pool variant convert exactly; with
    act_layer="silu" nothing converts."""
    timm = pytest.importorskip("timm", reason="timm is not installed (CI's main lane installs it)")
    for name in ("densenet121", "densenetblur121d"):
        torch.manual_seed(32)
        model = randomize_bn_(timm.create_model(name, pretrained=False, num_classes=7), 33).double()
        ours = densenet_fast.convert(model, backend="torch")
        assert isinstance(ours, densenet_fast.DenseNet), name
        n_blocks = sum(isinstance(m, densenet_fast.DenseBlock) for m in ours.modules())
        assert n_blocks == 4, name
        x = seeded_input((2, 3, 64, 64), 34, F64)
        assert_same_step(ours, model, x, 35, f"timm {name}")
        before = states(model)
        assert set(before) == set(states(ours))
    with pytest.raises(ValueError, match="act SiLU"):
        densenet_fast.convert(timm.create_model("densenet121", pretrained=False, act_layer="silu"), backend="torch")
