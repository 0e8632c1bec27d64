"""Model builders, torchvision compatibility of the state_dicts, get_model, memory_efficient=False,
and convert().  Tolerances: tolerances.py."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.models.densenet as tvd

import densenet_fast
from densenet_fast import reference
from densenet_fast.models import get_model
from builders import (as_torchvision_checkpoint, assert_same_step, copy_weights, efficient_densenet, param_grads,
                      projection_loss, randomize_bn_, seeded_input, states, torchvision_densenet)
from tolerances import assert_close

F64 = torch.float64


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _block_layer_counts(model: nn.Module):
    return [len(m) for n, m in model.features.named_children() if n.startswith("denseblock")]


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, growth, millions", [(100, 12, 0.8), (250, 24, 15.3), (190, 40, 25.6)])
def test_densenet_bc_param_counts(depth, growth, millions):
    """Huang et al. 2017, Table 2 (DenseNet-BC on CIFAR-10), parameters to the paper's 0.1M."""
    with torch.device("meta"):
        model = densenet_fast.densenet_bc(depth, growth)
    n = _num_params(model)
    assert round(n / 1e6, 1) == millions, f"DenseNet-BC (L={depth}, k={growth}): {n} parameters, paper {millions}M"
    assert _block_layer_counts(model) == [(depth - 4) // 6] * 3


@pytest.mark.parametrize("depth, growth, millions", [(40, 12, 1.0), (100, 12, 7.0), (100, 24, 27.2)])
def test_densenet_cifar_param_counts(depth, growth, millions):
    """Huang et al. 2017, Table 2 (DenseNet without bottleneck or compression on CIFAR-10),
    parameters to the paper's 0.1M; get_model's densenet_<depth>_<k> names build the same."""
    with torch.device("meta"):
        model = densenet_fast.densenet_cifar(depth, growth)
        named = get_model(f"densenet_{depth}_{growth}")
    n = _num_params(model)
    assert round(n / 1e6, 1) == millions, f"DenseNet (L={depth}, k={growth}): {n} parameters, paper {millions}M"
    assert _block_layer_counts(model) == [(depth - 4) // 3] * 3
    assert _num_params(named) == n
    assert not hasattr(model.features.denseblock1.denselayer1, "conv2")
    assert model.features.denseblock1.denselayer1.conv1.kernel_size == (3, 3)


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_state_dict_matches_torchvision(name):
    """Same keys (in the same order) and shapes as torchvision's model, and torchvision's
    state_dict loads strictly (the pretrained-weights path).  Built on the meta device: no
    memory, no initialisation cost."""
    with torch.device("meta"):
        ours = getattr(densenet_fast, name)()
        tv = getattr(torchvision.models, name)(weights=None)
    s_o, s_t = ours.state_dict(), tv.state_dict()
    assert list(s_o) == list(s_t)
    for key in s_t:
        assert s_o[key].shape == s_t[key].shape, f"{key}: {tuple(s_o[key].shape)} vs {tuple(s_t[key].shape)}"
    ours.load_state_dict(s_t, strict=True)
    assert _num_params(ours) == _num_params(tv)


def test_imagenet_stem_keeps_only_the_image(monkeypatch):
    """torchvision's stem (conv0, norm0, relu0, pool0) keeps neither conv0's output nor the max
    pool's input and int64 indices for backward: peak of a DenseNet-121 step (CPU allocator,
    batch 2, 224x224) measured 77.4 MiB with the stem as separate modules, 68.3 MiB with norm0,
    relu0 and pool0 as one Function (keeping conv0's output), 62.6 MiB with conv0 computed again
    in backward.  The values are checked by test_equivalence's imnet-k12 configuration and
    test_densenet121_loads_torchvision_weights_and_matches."""
    from densenet_fast.bench.memory import cpu_peak_bytes
    from densenet_fast.models import densenet as densenet_module

    torch.manual_seed(3)
    model = densenet_fast.densenet121(backend="torch")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))

    def step():
        model(x).sum().backward()

    step()
    peaks = {}
    for mode in ("stem", "norm-relu-pool", "modules"):
        if mode == "norm-relu-pool":
            monkeypatch.setattr(densenet_module, "fusable_stem_conv", lambda conv: False)
        if mode == "modules":
            monkeypatch.setattr(densenet_module, "_is_pool0", lambda pool: False)
        peaks[mode] = cpu_peak_bytes(step, setup=lambda: model.zero_grad(set_to_none=True))
    assert peaks["stem"] < peaks["norm-relu-pool"] < 0.95 * peaks["modules"], peaks


def test_densenet121_loads_torchvision_weights_and_matches():
    """The real thing for one architecture: torchvision's densenet121 weights (randomly
    initialised here; no download) give the same logits and input gradient."""
    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None)
    randomize_bn_(tv, 1)
    ours = densenet_fast.densenet121(backend="torch")
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.double().eval()
    ours.double().eval()
    # 32x32: the last block runs at 1x1, the smallest map the architecture allows.
    x = seeded_input((2, 3, 32, 32), 2, F64)
    xt, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_t, out_o = tv(xt), ours(xo)
    assert_close(out_o, out_t, F64, "densenet121 logits")
    projection_loss(out_t, 3).backward()
    projection_loss(out_o, 3).backward()
    assert_close(xo.grad, xt.grad, F64, "densenet121 input grad")


@pytest.mark.parametrize("name, weights", [
    ("densenet121", "DEFAULT"), ("densenet121", "IMAGENET1K_V1"), ("densenet121", "DenseNet121_Weights.IMAGENET1K_V1"),
    ("densenet121", "member"), ("densenet121", "counters"), ("densenet161", "DEFAULT"), ("densenet169", "DEFAULT"),
    ("densenet201", "DEFAULT")])
def test_builders_load_torchvision_weights(monkeypatch, name, weights):
    """densenet121(weights=...) does what torchvision's builder does, without a download here:
    the weights enum's get_state_dict serves a torchvision model's state_dict in the published
    checkpoints' legacy naming, and the built model must hold exactly those tensors."""
    enum = getattr(torchvision.models, name.replace("densenet", "DenseNet") + "_Weights")
    torch.manual_seed(40)
    tv = getattr(torchvision.models, name)()
    randomize_bn_(tv, 41)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.num_batches_tracked.fill_(7 if weights == "counters" else 0)
    served = []

    def get_state_dict(self, *args, **kwargs):
        served.append((self, args, kwargs))
        return as_torchvision_checkpoint(tv.state_dict(), counters=weights == "counters")
    monkeypatch.setattr(enum, "get_state_dict", get_state_dict)
    arg = {"member": enum.IMAGENET1K_V1, "counters": "DEFAULT"}.get(weights, weights)
    ours = getattr(densenet_fast, name)(weights=arg, progress=False, backend="torch")
    assert served == [(enum.IMAGENET1K_V1, (), {"progress": False, "check_hash": True})]
    assert isinstance(ours, densenet_fast.DenseNet) and ours.memory_efficient
    assert ours.classifier.out_features == 1000
    got = ours.state_dict()
    assert set(got) == set(tv.state_dict())
    for key, value in tv.state_dict().items():
        assert torch.equal(got[key], value), f"{name}(weights={weights}): {key} differs from the checkpoint"
    if name == "densenet121" and weights == "DEFAULT":
        tv.eval()
        ours.eval()
        x = seeded_input((2, 3, 32, 32), 42)
        assert_close(ours(x), tv(x), torch.float32, f"{name}(weights=...) logits")


def test_builder_weights_errors():
    """Bad weights arguments fail before any download, naming what was expected."""
    with pytest.raises(ValueError, match="num_classes=10"):
        densenet_fast.densenet121(weights="DEFAULT", num_classes=10)
    with pytest.raises(ValueError, match=r"DenseNet121_Weights member or one of \['DEFAULT', 'IMAGENET1K_V1'\]"):
        densenet_fast.densenet121(weights="IMAGENET1K_V9")
    with pytest.raises(TypeError, match="DenseNet121_Weights member or its name, got DenseNet169_Weights"):
        densenet_fast.densenet121(weights=torchvision.models.DenseNet169_Weights.DEFAULT)
    with pytest.raises(ValueError, match="no pretrained DenseNet-264"):
        densenet_fast.densenet264(weights="DEFAULT")
    with pytest.raises(ValueError, match="num_classes=10"):
        get_model("densenet169", weights="DEFAULT", num_classes=10)


def test_densenet264_config():
    """DenseNet-264 (Huang et al. Table 1): growth 32, blocks 6-12-64-48, 64 stem features."""
    with torch.device("meta"):
        model = densenet_fast.densenet264()
    assert _block_layer_counts(model) == [6, 12, 64, 48]
    assert model.features.conv0.out_channels == 64
    assert model.features.denseblock1.denselayer1.conv2.out_channels == 32
    assert model.features.denseblock1.denselayer1.conv1.out_channels == 4 * 32
    # 64 + 6*32 = 256 -> 128; 128 + 12*32 = 512 -> 256; 256 + 64*32 = 2304 -> 1152; + 48*32 = 2688.
    assert model.features.denseblock4.denselayer1.norm1.num_features == 1152
    assert model.classifier.in_features == 2688


@pytest.mark.parametrize("name, blocks, growth, stem", [
    pytest.param(*row, id=row[0]) for row in [
        ("densenet121", [6, 12, 24, 16], 32, 64),
        ("densenet161", [6, 12, 36, 24], 48, 96),
        ("densenet169", [6, 12, 32, 32], 32, 64),
        ("densenet201", [6, 12, 48, 32], 32, 64),
        ("densenet264", [6, 12, 64, 48], 32, 64),
        ("densenet_bc", [16, 16, 16], 12, 24),  # the default: DenseNet-BC-100, k=12
        ("densenet_bc_250_24", [41, 41, 41], 24, 48),
    ]])
def test_get_model(name, blocks, growth, stem):
    with torch.device("meta"):
        model = get_model(name)
    assert isinstance(model, densenet_fast.DenseNet)
    assert _block_layer_counts(model) == blocks
    assert model.features.denseblock1.denselayer1.conv2.out_channels == growth
    assert model.features.conv0.out_channels == stem


def test_get_model_kwargs_and_unknown_name():
    with torch.device("meta"):
        model = get_model("densenet_bc_100_12", num_classes=100)
        ref = densenet_fast.densenet_bc(100, 12, num_classes=100)
    assert model.classifier.out_features == 100
    assert _num_params(model) == _num_params(ref)
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        get_model("resnet50")


def test_memory_efficient_false_is_the_reference():
    """memory_efficient=False builds the naive reference modules and computes the same thing."""
    torch.manual_seed(4)
    kw = dict(growth_rate=5, block_config=(2, 3), num_init_features=6, bn_size=2, num_classes=4, small_inputs=True)
    naive = efficient_densenet(memory_efficient=False, **kw)
    fast = efficient_densenet(memory_efficient=True, **kw)
    blocks = [m for n, m in naive.features.named_children() if n.startswith("denseblock")]
    assert blocks and all(isinstance(b, reference.DenseBlock) for b in blocks)
    assert isinstance(naive.features.transition1, reference.Transition)
    assert all(isinstance(b, densenet_fast.DenseBlock) for n, b in fast.features.named_children()
               if n.startswith("denseblock"))
    randomize_bn_(naive, 5)
    copy_weights(naive, fast)
    naive.double()
    fast.double()
    for mode in ("train", "eval"):
        naive.train(mode == "train")
        fast.train(mode == "train")
        x = seeded_input((3, 3, 11, 9), 6, F64)
        xn, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_n, out_f = naive(xn), fast(xf)
        assert_close(out_f, out_n, F64, f"{mode}: logits")
        projection_loss(out_n, 7).backward()
        projection_loss(out_f, 7).backward()
        assert_close(xf.grad, xn.grad, F64, f"{mode}: input grad")
        g_n, g_f = param_grads(naive), param_grads(fast)
        for name in g_n:
            assert_close(g_f[name], g_n[name], F64, f"{mode}: grad {name}")
        s_n, s_f = states(naive), states(fast)
        for name in s_n:
            assert_close(s_f[name].double(), s_n[name].double(), F64, f"{mode}: {name}")
        naive.zero_grad(set_to_none=True)
        fast.zero_grad(set_to_none=True)


def test_compression_and_in_channels_match_reference():
    """compression 0.6 (transition widths floor(0.6 * m), not torchvision's m // 2) and one input
    channel, against the reference with the same arguments."""
    torch.manual_seed(22)
    kw = dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=4, bn_size=2, num_classes=3,
              small_inputs=True, compression=0.6, in_channels=1)
    naive = reference.DenseNet(**kw)
    randomize_bn_(naive, 23).double()
    ours = efficient_densenet(**kw).double()
    ours.load_state_dict(naive.state_dict(), strict=True)
    assert ours.features.transition2.conv.out_channels == 9  # floor(0.6 * 15)
    x = seeded_input((2, 1, 12, 12), 24, F64)
    s_c, s_o = _check_same_training_step(ours, naive, x, "compression 0.6")
    for name in s_o:
        assert_close(s_c[name].double(), s_o[name].double(), F64, f"compression 0.6: {name}")


def test_features_called_as_sequential():
    """model.features(x) still works as a plain Sequential and returns norm5's output, as
    torchvision's does (e.g. for feature extraction), with the same running statistics."""
    torch.manual_seed(25)
    tv = torchvision_densenet(5, (2, 2), 6, 2, num_classes=3, small_inputs=False)
    randomize_bn_(tv, 26).double()
    ours = efficient_densenet(growth_rate=5, block_config=(2, 2), num_init_features=6, bn_size=2, num_classes=3)
    ours.double().load_state_dict(tv.state_dict(), strict=True)
    x = seeded_input((2, 3, 27, 25), 27, F64)
    xt, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ft, fo = tv.features(xt), ours.features(xo)
    assert_close(fo, ft, F64, "features(x)")
    projection_loss(ft, 28).backward()
    projection_loss(fo, 28).backward()
    assert_close(xo.grad, xt.grad, F64, "features(x) input grad")
    s_t, s_o = states(tv), states(ours)
    for name in s_t:
        assert_close(s_o[name].double(), s_t[name].double(), F64, f"features(x): {name}")


# --------------------------------------------------------------------------------------------
# convert()
# --------------------------------------------------------------------------------------------


def _check_same_training_step(converted, original, x, what):
    """One forward + backward on both: logits, input gradient, parameter gradients, buffers."""
    xc, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_c, out_o = converted(xc), original(xo)
    assert_close(out_c, out_o, F64, f"{what}: output")
    projection_loss(out_c, 8).backward()
    projection_loss(out_o, 8).backward()
    assert_close(xc.grad, xo.grad, F64, f"{what}: input grad")
    g_c, g_o = param_grads(converted), param_grads(original)
    assert set(g_c) == set(g_o)
    for name in g_o:
        assert_close(g_c[name], g_o[name], F64, f"{what}: grad {name}")
    return states(converted), states(original)


@pytest.mark.parametrize("small_inputs", [False, True], ids=["imagenet-stem", "cifar-stem"])
def test_convert_torchvision_densenet(small_inputs):
    torch.manual_seed(9)
    tv = torchvision_densenet(6, (2, 2, 2), 8, 2, num_classes=5, small_inputs=small_inputs)
    randomize_bn_(tv, 10).double()
    before = states(tv)
    ours = densenet_fast.convert(tv, backend="torch")
    assert isinstance(ours, densenet_fast.DenseNet) and ours.memory_efficient
    assert next(ours.parameters()).dtype == F64
    for name, t in states(tv).items():
        assert torch.equal(t, before[name]), f"convert modified the original model's {name}"
    x = seeded_input((2, 3, 21, 19) if not small_inputs else (2, 3, 9, 11), 11, F64)
    s_c, s_o = _check_same_training_step(ours, tv, x, "converted torchvision DenseNet")
    for name in s_o:
        assert_close(s_c[name].double(), s_o[name].double(), F64, f"after a step: {name}")


def test_convert_checkpointed_reference_densenet():
    """reference.DenseNet(checkpoint=True) is torchvision's memory_efficient=True.  Outputs and
    gradients match it; the running statistics match the NON-checkpointed model, since
    checkpointing moves norm1's statistics a second time in backward (the known flaw kept in the
    reference on purpose) and the converted model must not copy that."""
    torch.manual_seed(12)
    ckpt = reference.DenseNet(4, (2, 3), 6, 2, 0, 3, checkpoint=True, small_inputs=True)
    randomize_bn_(ckpt, 13).double()
    plain = reference.DenseNet(4, (2, 3), 6, 2, 0, 3, small_inputs=True).double()
    copy_weights(ckpt, plain)
    ours = densenet_fast.convert(ckpt, backend="torch")
    assert isinstance(ours, densenet_fast.DenseNet)
    x = seeded_input((2, 3, 10, 9), 14, F64)
    s_c, _ = _check_same_training_step(ours, ckpt, x, "converted checkpointed DenseNet")
    plain(x)
    s_p = states(plain)
    for name in s_p:
        assert_close(s_c[name].double(), s_p[name].double(), F64, f"running stats vs non-checkpointed: {name}")


class _SegmentationNet(nn.Module):
    """A segmentation-style network (FC-DenseNet-like) with torchvision's dense blocks and a
    transition inside, none of them at a DenseNet's usual place."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.encoder = nn.Sequential(
            tvd._DenseBlock(2, 8, 2, 4, 0.0),
            tvd._Transition(16, 8),
        )
        self.bottleneck = nn.ModuleDict({"dense": tvd._DenseBlock(3, 8, 2, 4, 0.0)})
        self.head = nn.Conv2d(20, 2, 1)

    def forward(self, x):
        h = self.encoder(self.stem(x))
        h = self.head(self.bottleneck["dense"](h))
        return F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_convert_model_containing_blocks():
    torch.manual_seed(15)
    seg = _SegmentationNet()
    randomize_bn_(seg, 16).double()
    ours = densenet_fast.convert(seg, backend="torch")
    assert type(ours) is _SegmentationNet and ours is not seg
    assert isinstance(ours.encoder[0], densenet_fast.DenseBlock)
    assert isinstance(ours.encoder[1], densenet_fast.Transition)
    assert isinstance(ours.bottleneck["dense"], densenet_fast.DenseBlock)
    assert isinstance(seg.encoder[0], tvd._DenseBlock), "convert(inplace=False) modified the original"
    x = seeded_input((2, 3, 12, 10), 17, F64)
    s_c, s_o = _check_same_training_step(ours, seg, x, "converted segmentation net")
    for name in s_o:
        assert_close(s_c[name].double(), s_o[name].double(), F64, f"after a step: {name}")


class _SkipEncoder(torchvision.models.DenseNet):
    """An encoder the way segmentation libraries build one on torchvision's DenseNet: no
    classifier, the features run stage by stage, and each transition is walked child by child so
    that the skip connection is taken after its ReLU (before the conv and the pooling)."""

    def __init__(self):
        super().__init__(4, (2, 2, 2), 6, 2, 0.0, 3, memory_efficient=False)
        del self.classifier

    def forward(self, x):
        f = self.features
        h = f.pool0(f.relu0(f.norm0(f.conv0(x))))
        skips = []
        for i in (1, 2):
            h = getattr(f, f"denseblock{i}")(h)
            for child in getattr(f, f"transition{i}"):
                h = child(h)
                if isinstance(child, nn.ReLU):
                    skips.append(h)
        h = f.norm5(f.denseblock3(h))
        return torch.cat([s.mean((2, 3)) for s in skips] + [h.mean((2, 3))], 1)


def test_convert_encoder_that_walks_transitions():
    """A converted transition is an nn.Sequential of norm, relu, conv, pool like torchvision's, so
    an encoder that iterates over it gets the same skip features (and gradients, and running
    statistics) as the torchvision original."""
    torch.manual_seed(31)
    enc = _SkipEncoder()
    randomize_bn_(enc, 32).double()
    ours = densenet_fast.convert(enc, backend="torch")
    assert isinstance(ours.features.transition1, densenet_fast.Transition)
    assert [n for n, _ in ours.features.transition1.named_children()] == ["norm", "relu", "conv", "pool"]
    assert isinstance(ours.features.denseblock2, densenet_fast.DenseBlock)
    x = seeded_input((2, 3, 33, 30), 33, F64)
    s_c, s_o = _check_same_training_step(ours, enc, x, "converted skip encoder")
    for name in s_o:
        assert_close(s_c[name].double(), s_o[name].double(), F64, f"after a step: {name}")


def test_convert_copies_mode_momentum_eps():
    torch.manual_seed(18)
    tv = torchvision_densenet(4, (2, 2), 6, 2, num_classes=3, small_inputs=True)
    randomize_bn_(tv, 19).double()
    bns = [m for m in tv.modules() if isinstance(m, nn.BatchNorm2d)]
    for i, bn in enumerate(bns):
        bn.momentum = [0.2, None, 0.05][i % 3]
        bn.eps = [1e-3, 1e-5, 0.1][i % 3]
    tv.eval()
    ours = densenet_fast.convert(tv, backend="torch")
    assert not ours.training and not any(m.training for m in ours.modules())
    ours_bns = dict((n, m) for n, m in ours.named_modules() if isinstance(m, nn.BatchNorm2d))
    for name, bn in ((n, m) for n, m in tv.named_modules() if isinstance(m, nn.BatchNorm2d)):
        assert ours_bns[name].momentum == bn.momentum, name
        assert ours_bns[name].eps == bn.eps, name
    x = seeded_input((1, 3, 9, 9), 20, F64)
    assert_close(ours(x), tv(x), F64, "eval output with custom eps")
    # Train mode with the custom momenta (None = cumulative average) and eps.
    ours.train()
    tv.train()
    x = seeded_input((3, 3, 9, 9), 21, F64)
    s_c, s_o = _check_same_training_step(ours, tv, x, "custom momentum/eps, train")
    for name in s_o:
        assert_close(s_c[name].double(), s_o[name].double(), F64, f"custom momentum: {name}")


def test_convert_densenet_with_compression():
    """A DenseNet whose transitions compress by 0.6 (floor(0.6 * m) channels): the converted
    model must rebuild every transition width, not only the first."""
    torch.manual_seed(29)
    naive = reference.DenseNet(4, (2, 2, 2), 4, 2, 0, 3, small_inputs=True, compression=0.6)
    randomize_bn_(naive, 30).double()
    # widths: block1 4 -> 12, transition1 -> floor(7.2) = 7; block2 7 -> 15, transition2 -> floor(9.0) = 9
    assert naive.features.transition2.conv.out_channels == 9
    ours = densenet_fast.convert(naive, backend="torch")
    x = seeded_input((2, 3, 12, 12), 31, F64)
    _check_same_training_step(ours, naive, x, "converted compression-0.6 DenseNet")


def test_convert_bn_without_running_stats():
    """BatchNorm2d(track_running_stats=False) normalises with batch statistics in eval mode too
    and has no running buffers; convert must carry that over (not fail loading the buffers)."""
    torch.manual_seed(33)
    tv = torchvision_densenet(4, (2, 2), 6, 2, num_classes=3, small_inputs=True)
    randomize_bn_(tv, 34).double()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    tv.eval()
    ours = densenet_fast.convert(tv, backend="torch")
    x = seeded_input((3, 3, 9, 9), 35, F64)
    _check_same_training_step(ours, tv, x, "no running stats, eval (batch statistics)")


def test_convert_keeps_drop_rate():
    torch.manual_seed(32)
    tv = torchvision.models.DenseNet(4, (2, 2), 6, 2, drop_rate=0.25, num_classes=3)
    ours = densenet_fast.convert(tv, backend="torch")
    rates = {float(m.drop_rate) for m in ours.modules() if hasattr(m, "drop_rate")}
    assert rates == {0.25}


def test_convert_without_dense_block_raises():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ValueError, match="no dense block"):
        densenet_fast.convert(model)


@pytest.mark.parametrize("arch", ["densenet", "fc_densenet"])
def test_models_call_blocks_and_transitions_as_modules(arch):
    """The efficient models call every dense block and transition through nn.Module.__call__, so
    forward hooks on them (and FSDP's, tests/test_train.py) run, once per forward, and see the
    block's whole buffer F as its output."""
    from densenet_fast.models.fc_densenet import TransitionDown, TransitionUp

    torch.manual_seed(36)
    if arch == "densenet":
        model = densenet_fast.DenseNet(4, (2, 3), 8, 2, num_classes=3)
        x = seeded_input((2, 3, 32, 32), 37)
    else:
        model = densenet_fast.FCDenseNet(num_classes=3, down_blocks=(2, 2), bottleneck_layers=2, up_blocks=(2, 2),
                                         growth_rate=4, first_channels=6, drop_rate=0.0)
        x = seeded_input((2, 3, 16, 16), 37)
    kinds = (densenet_fast.DenseBlock, densenet_fast.Transition, TransitionDown, TransitionUp)
    seen, expected = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            expected[name] = module
            module.register_forward_hook(lambda m, args, out, name=name: seen.setdefault(name, []).append(out.shape))
    model(x).sum().backward()
    assert sorted(seen) == sorted(expected) and all(len(v) == 1 for v in seen.values()), seen
    for name, module in expected.items():
        if isinstance(module, densenet_fast.DenseBlock):
            assert seen[name][0][1] == module.num_output_features, (name, seen[name])


def _pruned_pair(reparametrize):
    torch.manual_seed(38)
    ours = densenet_fast.DenseNet(4, (2, 2), 8, 2, num_classes=3).double()  # torchvision's stem: conv0 is fused
    randomize_bn_(ours, 39)
    naive = densenet_fast.DenseNet(4, (2, 2), 8, 2, num_classes=3, memory_efficient=False).double()
    naive.load_state_dict(ours.state_dict())
    for model in (ours, naive):
        torch.manual_seed(43)  # spectral_norm draws its power-iteration vectors
        for name in ("features.conv0", "features.denseblock1.denselayer2.conv1",
                     "features.denseblock2.denselayer1.conv2", "features.transition1.conv"):
            reparametrize(model.get_submodule(name))
    return ours, naive


@pytest.mark.parametrize("method", ["prune", "weight_norm", "spectral_norm"])
def test_weight_recomputing_pre_hooks_run(method):
    """torch.nn.utils' prune, weight_norm and spectral_norm recompute a weight in a forward
    pre-hook; the fused forward runs those hooks itself (before, the second step failed with
    'backward through the graph a second time'): three SGD steps equal the naive model's, float64,
    with no warning."""
    import warnings

    from torch.nn.utils import prune, spectral_norm, weight_norm

    how = {"prune": lambda m: prune.l1_unstructured(m, "weight", amount=0.4), "weight_norm": weight_norm,
           "spectral_norm": spectral_norm}[method]
    ours, naive = _pruned_pair(how)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, naive)]
    x = seeded_input((2, 3, 32, 32), 40, F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "hooks do not run" warning for these
        for step in range(3):
            outs = []
            for model, opt in zip((ours, naive), opts):
                opt.zero_grad()
                out = model(x)
                projection_loss(out, step).backward()
                opt.step()
                outs.append(out.detach())
            assert_close(outs[0], outs[1], F64, f"{method}: output at step {step}")
    for name, p in naive.named_parameters():
        assert_close(dict(ours.named_parameters())[name], p, F64, f"{method}: {name} after 3 steps")


@pytest.mark.parametrize("where", ["conv0", "norm0", "relu0", "pool0", "norm5", "fc:classifier"])
def test_hooks_on_stem_and_head_modules_run(where):
    """DenseNet fuses conv0-norm0-relu0-pool0 and norm5 (and FCDenseNet its classifier) only when
    they have no hooks: a forward hook that changes a stem or head module's output runs, and the
    model computes what the naive model with the same hook computes (a training step, float64)."""
    torch.manual_seed(48)
    kind, _, name = where.rpartition(":")
    if kind == "fc":
        kw = dict(num_classes=3, down_blocks=(2,), bottleneck_layers=1, up_blocks=(2,), growth_rate=4,
                  first_channels=6, drop_rate=0.0)
        ours, naive = densenet_fast.FCDenseNet(**kw), densenet_fast.FCDenseNet(**kw, memory_efficient=False)
        x = seeded_input((2, 3, 8, 8), 49, F64)
    else:
        ours = densenet_fast.DenseNet(4, (2, 2), 8, 2, num_classes=3)
        naive = densenet_fast.DenseNet(4, (2, 2), 8, 2, num_classes=3, memory_efficient=False)
        name = f"features.{name}"
        x = seeded_input((2, 3, 32, 32), 49, F64)
    randomize_bn_(ours, 50).double()
    naive.double().load_state_dict(ours.state_dict())
    calls = []
    for model in (ours, naive):
        model.get_submodule(name).register_forward_hook(lambda m, args, out: calls.append(1) or out * 1.5 + 0.1)
    assert_same_step(ours, naive, x, 51, f"hook on {where}")
    assert len(calls) == 2


@pytest.mark.parametrize("where, owner, relative", [
    ("features.denseblock1.denselayer1.conv1", "DenseBlock", "denselayer1.conv1"),
    ("features.transition1.norm", "Transition", "norm"),
    ("features", "DenseNet", "features"),
    ("fc:trans_up.0.conv", "TransitionUp", "conv"),
    ("fc:trans_down.0.pool", "TransitionDown", "pool"),
    ("layer:norm1", "DenseLayer", "norm1"),
])
def test_hooks_that_cannot_run_are_reported(where, owner, relative):  # (stem and head: the next test)
    """A forward hook on a module that the fused forward computes without calling it is reported
    by a warning naming that module (not silently skipped); without such hooks nothing warns."""
    import warnings

    torch.manual_seed(41)
    kind, _, name = where.rpartition(":")
    if kind == "fc":
        model = densenet_fast.FCDenseNet(num_classes=3, down_blocks=(2,), bottleneck_layers=1, up_blocks=(2,),
                                         growth_rate=4, first_channels=6, drop_rate=0.0)
        x = seeded_input((2, 3, 8, 8), 42)
    elif kind == "layer":
        model = densenet_fast.DenseLayer(6, growth_rate=4, bn_size=2)
        x = seeded_input((2, 6, 5, 5), 42)
    else:
        model = densenet_fast.DenseNet(4, (2, 2), 8, 2, num_classes=3)
        x = seeded_input((2, 3, 32, 32), 42)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # no hooks: no warning
    calls = []
    model.get_submodule(name).register_forward_hook(lambda m, args, out: calls.append(1))
    message = rf"^{owner}: the hooks registered on its {re.escape(relative)} \(\w+\) do not run"
    with pytest.warns(UserWarning, match=message):
        model(x).sum().backward()
    assert not calls
