"""FC-DenseNet (Jegou et al. 2017) and the dense block's list input (a decoder's upsampled map and
skip connection written straight into the block buffer).

The efficient model is checked against the naive one (memory_efficient=False: torch.cat per
layer, textbook transitions) in float64 under tolerances.TOLERANCES[float64]: outputs, input and
parameter gradients and running statistics after a training step, in train and eval mode, NCHW
and channels_last, with odd image sizes (the decoder crops).  The architecture is checked against
the paper: layer counts in the model names and parameter counts of Table 2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import densenet_fast
from densenet_fast import FCDenseNet, fc_densenet56, fc_densenet67, fc_densenet103, reference
from densenet_fast.bench.memory import cpu_peak_bytes
from builders import (assert_compiled_matches_eager, assert_same_step, copy_weights, param_grads, projection_loss,
                      randomize_bn_, seeded_input, step_grads)
from helpers import DispatchLog
from tolerances import assert_close, assert_within_naive_error

F64 = torch.float64
SMALL = dict(in_channels=3, num_classes=5, down_blocks=(2, 1), bottleneck_layers=2, up_blocks=(1, 2),
             growth_rate=4, first_channels=6, drop_rate=0.0)


def _models(seed: int, **overrides):
    """(efficient, naive) small FC-DenseNets with the same random weights and BN statistics, float64."""
    chunk = overrides.pop("chunk_channels", 0)
    cfg = {**SMALL, **overrides}
    torch.manual_seed(seed)
    naive = randomize_bn_(FCDenseNet(**cfg, memory_efficient=False), seed + 1).double()
    ours = FCDenseNet(**cfg, backend="torch", chunk_channels=chunk).double()
    copy_weights(naive, ours)
    return ours, naive


@pytest.mark.parametrize("builder, layers", [(fc_densenet56, 56), (fc_densenet67, 67), (fc_densenet103, 103)])
def test_layer_count_is_the_name(builder, layers):
    """The name counts convolutions: the first, one per dense layer, one per transition down and
    up, the classifier (Jegou et al. section 3)."""
    with torch.device("meta"):
        model = builder()
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == layers


@pytest.mark.parametrize("builder, millions", [(fc_densenet67, 3.5), (fc_densenet103, 9.4)])
def test_parameter_count_matches_the_paper(builder, millions):
    """Table 2's counts come from the authors' Lasagne code, which lists a batch norm's mean and
    inverse std among its parameters and gives every convolution a bias.  Counted that way our
    FC-DenseNet67 and 103 have the paper's 3.5M and 9.4M parameters (to the 0.1M it prints).
    (FC-DenseNet56 counts 1.40M so, against a printed 1.5M that this architecture as described
    in the paper and the authors' code does not reach.)"""
    with torch.device("meta"):
        model = builder(num_classes=11)  # CamVid's, as in the paper
    learned = sum(p.numel() for p in model.parameters())
    bn_stats = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    biases = sum(m.out_channels for m in model.modules()
                 if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is None)
    assert round((learned + bn_stats + biases) / 1e6, 1) == millions


def test_generic_name_builds_the_architecture():
    """get_model("fc_densenet_<levels>_<layers>_<k>"): FC-DenseNet67 is fc_densenet_5_5_16 (same
    state_dict keys and shapes); such names are segmentation models, malformed ones are not."""
    from densenet_fast.models import get_model, is_segmentation_model

    with torch.device("meta"):
        generic, named = get_model("fc_densenet_5_5_16", num_classes=11), fc_densenet67(num_classes=11)
        small = get_model("fc_densenet_2_3_4", num_classes=3)
    assert {k: v.shape for k, v in generic.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}
    assert small.config["down_blocks"] == (3, 3) and small.config["up_blocks"] == (3, 3)
    assert small.config["bottleneck_layers"] == 3 and small.config["growth_rate"] == 4
    assert is_segmentation_model("fc_densenet_2_3_4") and is_segmentation_model("fc_densenet103")
    for name in ("fc_densenet_2_3", "fc_densenet_2_3_x", "densenet_bc_100_12"):
        assert not is_segmentation_model(name), name
    with pytest.raises(ValueError, match="unknown model 'fc_densenet_2_3'"):
        get_model("fc_densenet_2_3")


@pytest.mark.parametrize("chunk", [0, 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_naive_model(mode, channels_last, chunk):
    """chunk: input channels per chunk of the layers' backward (0: the default rule, one chunk
    at this size; 5 splits every prefix, odd widths included)."""
    ours, naive = _models(1, chunk_channels=chunk)
    for m in (ours, naive):
        m.train(mode == "train")
    x = seeded_input((2, 3, 13, 11), 2, F64, channels_last)  # 13x11 -> 6x5 -> 3x2: the decoder crops
    got = assert_same_step(ours, naive, x, 3, "FC-DenseNet")
    assert got.shape == (2, 5, 13, 11)


@pytest.mark.parametrize("nested", [False, True], ids=["model", "inside-a-module"])
def test_convert_naive_model(nested):
    """convert() rebuilds a naive FC-DenseNet (alone or inside another module) as the efficient
    one with the same weights, buffers, BN hyper-parameters and mode: the same step in float64."""
    torch.manual_seed(40)
    naive = randomize_bn_(FCDenseNet(**SMALL, memory_efficient=False), 41).double()
    naive.down[0].denselayer1.norm1.momentum = 0.3
    holder = nn.Sequential(naive) if nested else naive
    converted = densenet_fast.convert(holder, backend="torch")
    ours = converted[0] if nested else converted
    assert isinstance(ours, FCDenseNet) and ours.memory_efficient and ours.backend == "torch"
    assert ours.down[0].denselayer1.norm1.momentum == 0.3 and ours.stem.weight.dtype == F64
    assert isinstance(naive.down[0], reference.DenseBlock) and not naive.memory_efficient  # source untouched
    assert_same_step(ours, naive, seeded_input((2, 3, 10, 9), 42, F64), 43, "converted FC-DenseNet")


def test_autocast_bf16_within_naive_error():
    """Under CPU autocast (bfloat16) the efficient model's output and gradients are as close to a
    float64 reference as the naive model's under the same autocast (tolerances.assert_within_naive_error):
    the decoder's concatenation casts the float32 upsampled map into the bf16 block buffer."""
    torch.manual_seed(30)
    naive = randomize_bn_(FCDenseNet(**SMALL, memory_efficient=False), 31)
    ours = FCDenseNet(**SMALL, backend="torch")
    copy_weights(naive, ours)
    exact = copy.deepcopy(naive).double()
    x = seeded_input((2, 3, 12, 10), 32, torch.float32)
    results = []
    for model, inp, amp in ((ours, x, True), (naive, x, True), (exact, x.double(), False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            xi = inp.clone().requires_grad_(True)
            out = model(xi)
        projection_loss(out.double(), 33).backward()
        results.append((out.detach().double(), xi.grad, param_grads(model)))
    fast, slow, ref = results
    assert_within_naive_error(fast[0], slow[0], ref[0], torch.bfloat16, "bf16 output")
    assert_within_naive_error(fast[1], slow[1], ref[1], torch.bfloat16, "bf16 input grad")
    for name in ref[2]:
        assert_within_naive_error(fast[2][name], slow[2][name], ref[2][name], torch.bfloat16, f"bf16 grad {name}")


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) (inductor on the CPU) of the efficient model: the decoder's
    concatenation and the transition's pooling trace as their ATen forms; same output and
    gradients as eager."""
    ours, _ = _models(34)
    assert_compiled_matches_eager(ours.float(), seeded_input((2, 3, 8, 12), 35, torch.float32), 36)


def test_checkpointed_naive_model_matches_naive_model():
    """The checkpointing baseline (each layer recomputed in backward) computes the same outputs and
    gradients; its running statistics move twice, torchvision's known flaw, kept on purpose."""
    torch.manual_seed(4)
    naive = randomize_bn_(FCDenseNet(**SMALL, memory_efficient=False), 5).double()
    ckpt = FCDenseNet(**SMALL, memory_efficient=False, checkpoint=True).double()
    copy_weights(naive, ckpt)
    x = seeded_input((2, 3, 8, 9), 6, F64)
    got, want = step_grads(ckpt, x, 7), step_grads(naive, x, 7)
    assert_close(got[0], want[0], F64, "checkpointed output")
    assert_close(got[1], want[1], F64, "checkpointed input grad")
    for name in want[2]:
        assert_close(got[2][name], want[2][name], F64, f"checkpointed grad {name}")


def test_dropout_masks_differ_between_layers_and_vanish_in_eval():
    """drop_rate zeroes a share of each layer's new channels in training (about p of them) and
    nothing in eval mode, where the efficient model equals the naive one."""
    ours, naive = _models(8, drop_rate=0.5)
    x = seeded_input((2, 3, 16, 16), 9, F64)
    ours.eval()
    naive.eval()
    assert_close(ours(x), naive(x), F64, "eval output with dropout configured")
    ours.train()
    new = ours.down[0](ours.stem(x))[:, SMALL["first_channels"]:]
    zero = (new == 0).double().mean().item()
    assert 0.35 < zero < 0.65, f"dropout p=0.5 zeroed {zero:.2f} of the new channels"


def test_efficient_step_stores_less_than_naive():
    """Peak memory of a training step of FC-DenseNet56 (CPU allocator, 64x64, batch 2): the
    efficient model keeps no concatenation per layer, no BN-ReLU output, and of each transition
    down only one byte per pooled output; its backward rebuilds the prefix's BN-ReLU 32 channels
    at a time.  Measured 133.1 MiB naive, 35.2 MiB ours (3.8x less; the peak is in the first
    transition down's backward); the bound leaves room for allocator differences between torch
    versions."""
    x = seeded_input((2, 3, 64, 64), 10, torch.float32)
    peaks = {}
    for name, model in (("naive", fc_densenet56(memory_efficient=False)),
                        ("ours", fc_densenet56(backend="torch", chunk_channels=32))):
        def step(model=model):
            model(x).sum().backward()
        peaks[name] = cpu_peak_bytes(step)
    assert peaks["ours"] * 3.5 < peaks["naive"], peaks


def test_upsampling_path_adopts_its_consumers_gradient(monkeypatch):
    """The bottleneck block and every up block have one consumer (the next transition up, the
    classifier), whose backward hands the block its gradient of F (GradHandoff): each of the six
    blocks of FC-DenseNet56 adopts it instead of copying it.  Peak of a cross-entropy step
    (CPU allocator, batch 2, 64x64): 38.0 MiB with the handoff, 44.0 MiB without (the last up
    block's buffer is 6 MiB); test_matches_naive_model checks the values in float64."""
    import torch.nn.functional as F

    from densenet_fast.ops import dense_block as db

    torch.manual_seed(12)
    model = fc_densenet56(backend="torch")
    x, y = seeded_input((2, 3, 64, 64), 13, torch.float32), torch.randint(0, 11, (2, 64, 64))

    def step():
        F.cross_entropy(model(x), y).backward()

    adopted = []  # whether each block's backward adopted the offered gradient (not the tensor: no reference kept)
    take = db.GradHandoff.take

    def recording_take(self, g, f, dt):
        got = take(self, g, f, dt)
        adopted.append(got is not None)
        return got

    monkeypatch.setattr(db.GradHandoff, "take", recording_take)
    step()
    assert adopted == [True] * 6, f"blocks taking a handoff, bottleneck first: {adopted}"
    monkeypatch.setattr(db.GradHandoff, "take", take)
    peaks = {}
    for mode in ("handoff", "copy"):
        if mode == "copy":
            monkeypatch.setattr(db.GradHandoff, "offer", lambda self, grad_f, fbuf: None)
        peaks[mode] = cpu_peak_bytes(step, setup=lambda: model.zero_grad(set_to_none=True))
    assert peaks["handoff"] < 0.93 * peaks["copy"], peaks


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("transposed, start", [(False, 0), (False, 3), (True, 0), (True, 4)])
def test_suffix_conv_matches_the_modules(transposed, start, channels_last):
    """suffix_conv(F, start, ...) against nn.Conv2d / nn.ConvTranspose2d on F[:, start:] in
    float64: output, every gradient, and the gradient of F it offers (laid out as F, zeros before
    the suffix)."""
    from densenet_fast.ops.dense_block import GradHandoff
    from densenet_fast.ops.suffix_conv import suffix_conv

    torch.manual_seed(14)
    conv = (nn.ConvTranspose2d(5, 6, 3, stride=2) if transposed else nn.Conv2d(5, 6, 1)).double()
    fbuf = seeded_input((2, start + 5, 5, 7), 15, F64, channels_last).requires_grad_(True)
    want_y = conv(fbuf[:, start:])
    want = torch.autograd.grad(projection_loss(want_y, 16), [fbuf, conv.weight, conv.bias])
    handoff = GradHandoff()
    got_y = suffix_conv(fbuf, start, conv.weight, conv.bias, handoff, transposed=transposed, stride=conv.stride)
    got = torch.autograd.grad(projection_loss(got_y, 16), [fbuf, conv.weight, conv.bias])
    assert_close(got_y, want_y, F64, "output")
    for name, g, w in zip(("F", "weight", "bias"), got, want):
        assert_close(g, w, F64, f"gradient of {name}")
    assert handoff.tensor is not None and handoff.tensor.stride() == fbuf.stride(), "offered gradient's layout"
    assert_close(handoff.tensor, want[0], F64, "offered gradient of F")


def test_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="equal length"):
        FCDenseNet(down_blocks=(2, 2), up_blocks=(2,))
    with pytest.raises(ValueError, match="at least one layer"):
        FCDenseNet(down_blocks=(2, 0), up_blocks=(2, 2))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        FCDenseNet(num_classes=0)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\), got 1.0"):
        FCDenseNet(drop_rate=1.0)
    with pytest.raises(ValueError, match="needs memory_efficient=False"):
        FCDenseNet(checkpoint=True)
    with pytest.raises(TypeError, match="fix growth_rate"):
        fc_densenet103(growth_rate=12)
    model = FCDenseNet(**SMALL, backend="torch")
    with pytest.raises(ValueError, match=r"input x must be at least 4x4 \(2 poolings by 2\), got 3x8"):
        model(torch.randn(2, 3, 3, 8))
    with pytest.raises(ValueError, match=r"training needs more than one value per channel in the bottleneck"):
        model(torch.randn(1, 3, 7, 5))  # 7x5 -> 3x2 -> 1x1
    model.eval()
    assert model(torch.randn(1, 3, 7, 5)).shape == (1, 5, 7, 5)  # running statistics: any size that pools
    with pytest.raises(ValueError, match="input x must have 3 channels, got 1"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="TransitionUp: size must be between"):
        model.trans_up[0](torch.randn(1, 8, 3, 3), (8, 6))
    with pytest.raises(ValueError, match=r"TransitionUp: x\[:, 2:\] must have 8 channels, got x of shape \(1, 8, 3"):
        model.trans_up[0](torch.randn(1, 8, 3, 3), (6, 6), start=2)
    with pytest.raises(ValueError, match=r"TransitionUp: x must be a 4-D tensor \(N, C, H, W\), got \(8, 3, 3\)"):
        model.trans_up[0](torch.randn(8, 3, 3), (6, 6))


# ------------------------------------------------------------------------------------------
# DenseBlock with a list input
# ------------------------------------------------------------------------------------------

def _block_and_parts(seed: int, bn_size: int = 4):
    torch.manual_seed(seed)
    block = randomize_bn_(densenet_fast.DenseBlock(3, 7, bn_size, 4, backend="torch"), seed + 1).double()
    parts = [seeded_input((2, 3, 5, 6), seed + 2, F64), seeded_input((2, 4, 5, 6), seed + 3, F64)]
    return block, parts


@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck", "plain"])
def test_block_list_input_is_the_concatenation(bn_size):
    """block([a, b]) equals block(torch.cat([a, b], 1)) in output, both parts' gradients and the
    parameter gradients, and writes the parts into the buffer without a concatenation."""
    block, parts = _block_and_parts(11, bn_size)
    leaves = [p.clone().requires_grad_(True) for p in parts]
    with DispatchLog() as log:
        out = block(leaves)
    assert "aten::cat" not in log.entries
    projection_loss(out, 12).backward()
    got = (out.detach(), [p.grad for p in leaves], param_grads(block))
    block.zero_grad(set_to_none=True)
    leaves2 = [p.clone().requires_grad_(True) for p in parts]
    out2 = block(torch.cat(leaves2, 1))
    projection_loss(out2, 12).backward()
    assert_close(got[0], out2.detach(), F64, "list-input output")
    for i, p in enumerate(leaves2):
        assert_close(got[1][i], p.grad, F64, f"grad of part {i}")
    for name, g in param_grads(block).items():
        assert_close(got[2][name], g, F64, f"grad {name}")


@pytest.mark.parametrize("bn_size", [4, 0], ids=["bottleneck", "plain"])
def test_layer_list_input_without_cat(bn_size):
    """A lone DenseLayer on a list (torchvision's calling convention) writes the parts into its
    one-layer buffer: no concatenation, the naive layer's output and gradients of both parts."""
    torch.manual_seed(16)
    ours = randomize_bn_(densenet_fast.DenseLayer(7, 4, bn_size, backend="torch"), 17).double()
    naive = reference.DenseLayer(7, 4, bn_size, 0.0).double()
    copy_weights(ours, naive)
    parts = [seeded_input((2, 3, 5, 6), 18, F64), seeded_input((2, 4, 5, 6), 19, F64)]
    results = []
    for model, log in ((ours, DispatchLog()), (naive, None)):
        leaves = [p.clone().requires_grad_(True) for p in parts]
        if log is not None:
            with log:
                out = model(leaves)
            assert "aten::cat" not in log.entries
        else:
            out = model(leaves)
        projection_loss(out, 20).backward()
        results.append((out.detach(), [p.grad for p in leaves]))
    assert_close(results[0][0], results[1][0], F64, "layer output")
    for i in range(2):
        assert_close(results[0][1][i], results[1][1][i], F64, f"layer grad of part {i}")
    with pytest.raises(ValueError, match=r"DenseLayer: the channels of the input parts x must add up to 7"):
        ours([parts[0], parts[0]])


def test_block_list_input_fills_the_given_buffer():
    block, parts = _block_and_parts(13)
    block.eval()
    buffer = block.new_buffer(parts[0], 5, 6)
    fbuf, _, _ = block.forward_with_stats(parts, buffer=buffer)
    assert fbuf.data_ptr() == buffer.data_ptr()
    assert_close(fbuf[:, :7], torch.cat(parts, 1), F64, "buffer prefix")
    assert_close(fbuf, reference.dense_block_ref(block, torch.cat(parts, 1)), F64, "eval output")


def test_block_list_input_errors():
    block, parts = _block_and_parts(14)
    with pytest.raises(ValueError, match=r"channels of the input parts x must add up to 7, got 3 \+ 3 = 6"):
        block([parts[0], parts[1][:, :3]])
    with pytest.raises(ValueError, match=r"input x\[1\] has shape \(2, 4, 5, 5\).*agree in N, H and W"):
        block([parts[0], parts[1][..., :5]])
    with pytest.raises(TypeError, match=r"input x\[1\] must be a torch.Tensor, got int"):
        block([parts[0], 3])
    with pytest.raises(TypeError, match="non-empty list of tensors"):
        block([])
    with pytest.raises(ValueError, match=r"buffer must be a tensor of shape \(2, 19, 5, 6\)"):
        block.forward_with_stats(parts, buffer=torch.empty(2, 19, 5, 7, dtype=F64))
    with pytest.raises(TypeError, match=r"DenseBlock \(x\[0\]\): input x has dtype torch.float32"):
        block([parts[0].float(), parts[1]])


# ------------------------------------------------------------------------------------------
# dropout_max_pool2d (the transition down's dropout and pooling)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, training", [(0.0, True), (0.3, True), (0.3, False)], ids=["no-dropout", "dropout", "eval"])
@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 5, 7, 9)], ids=["even", "odd"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dropout_max_pool_matches_aten(p, training, shape, channels_last):
    """Output and input gradient equal ATen's max_pool2d of h times the same mask (drawn from the
    seed the function draws), float64; only a uint8 per output is saved for backward."""
    from densenet_fast.ops.dense_block import draw_seed, dropout_mask
    from densenet_fast.ops.pool import dropout_max_pool2d

    h = seeded_input(shape, 20, F64, channels_last).requires_grad_(True)
    saved = []
    torch.manual_seed(21)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = dropout_max_pool2d(h, p, training)
    projection_loss(y, 22).backward()
    got = (y.detach(), h.grad)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.uint8, tuple(y.shape))]
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert h.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    h2 = h.detach().clone().requires_grad_(True)
    torch.manual_seed(21)
    mask = dropout_mask(draw_seed(), h2, p) if training and p > 0 else torch.ones_like(h2)
    want = torch.nn.functional.max_pool2d(h2 * mask, 2, 2)
    projection_loss(want, 22).backward()
    assert_close(got[0], want.detach(), F64, "pooled output")
    assert_close(got[1], h2.grad, F64, "input grad")
    if training and p > 0:
        dropped = (mask == 0).double().mean().item()
        assert 0.0 < dropped < 0.7


def test_dropout_max_pool_rejects_bad_input():
    from densenet_fast.ops.pool import dropout_max_pool2d

    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        dropout_max_pool2d(torch.randn(1, 2, 4, 4), 1.0, True)
    with pytest.raises(ValueError, match=r"input h must be at least 2x2, got shape \(1, 2, 1, 4\)"):
        dropout_max_pool2d(torch.randn(1, 2, 1, 4), 0.2, True)


def test_convert_sync_batchnorm_reaches_every_batch_norm(tmp_path):
    """Under synchronized BN every statistic of an efficient FC-DenseNet comes from the package's
    own modules (blocks and transitions down get the process group, none is swapped for
    nn.SyncBatchNorm, which they would bypass); the naive model's batch norms become
    nn.SyncBatchNorm.  (The synchronized arithmetic itself: test_train's two-process tests.)"""
    import torch.distributed as dist

    from densenet_fast.models.fc_densenet import TransitionDown

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ours = densenet_fast.convert_sync_batchnorm(FCDenseNet(**SMALL, backend="torch"))
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in ours.modules())
        fused = [m for m in ours.modules() if isinstance(m, (densenet_fast.DenseBlock, TransitionDown))]
        assert len(fused) == 2 * 2 + 1 + 2 and all(m.process_group is not None for m in fused)
        naive = densenet_fast.convert_sync_batchnorm(FCDenseNet(**SMALL, memory_efficient=False))
        norms = [m for m in naive.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    finally:
        dist.destroy_process_group()
