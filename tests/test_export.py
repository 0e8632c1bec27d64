"""torch.export, torch.jit.trace and torch.fx of the memory-efficient modules record the plain
graph (torch.cat, BatchNorm, ReLU, conv per layer: ATen ops only, nothing of this package;
torchvision's FX node names) with the eager model's outputs, gradients and running statistics;
torchvision's feature extractor with the blocks as leaf modules stays memory-efficient;
torch.jit.script is refused with an error that says what to use instead; torch.compile does not
record; torch.func transforms (vmap, grad) run the plain graph.  Comparisons in float64: tolerances.TOLERANCES[float64].
"""

from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import densenet_fast
from densenet_fast.models.fc_densenet import TransitionDown, TransitionUp
from builders import assert_same_step, randomize_bn_, seeded_input, states, step_grads, torchvision_densenet
from tolerances import assert_close

F64 = torch.float64


class _ListBlock(nn.Module):
    """A DenseBlock called with a list input (a decoder's upsampled map and skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = densenet_fast.DenseBlock(3, 7, bn_size=2, growth_rate=3)

    def forward(self, a, b):
        return self.block([a, b])


class _LoneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = densenet_fast.DenseLayer(7, growth_rate=3, bn_size=2)

    def forward(self, a, b):
        return self.layer([a, b])


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "cifar-bc":  # CIFAR stem, bottleneck layers, transitions, norm5
        model = densenet_fast.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
                                       num_classes=5, small_inputs=True)
    elif name == "imagenet-stem":  # torchvision's conv0/norm0/relu0/pool0 stem
        model = densenet_fast.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                       num_classes=5)
    elif name == "plain-layers":  # bn_size=0: BN-ReLU-Conv3x3 layers
        model = densenet_fast.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=0,
                                       num_classes=5, small_inputs=True)
    elif name == "fc-densenet":  # transitions down and up, skip connections, per-pixel logits
        model = densenet_fast.FCDenseNet(num_classes=3, down_blocks=(2, 2), bottleneck_layers=2, up_blocks=(2, 2),
                                         growth_rate=4, first_channels=6, drop_rate=0.0)
    elif name in ("list-block", "lone-layer"):
        model = _ListBlock() if name == "list-block" else _LoneLayer()
    else:
        raise AssertionError(name)
    return randomize_bn_(model.to(F64), seed=1)


def _inputs(name: str, seed: int):
    if name in ("list-block", "lone-layer"):
        return seeded_input((2, 4, 5, 6), seed, F64), seeded_input((2, 3, 5, 6), seed + 1, F64)
    # odd sizes: the FC-DenseNet crops its upsampled maps, the stems pool with remainders
    return (seeded_input((2, 3, 21, 19) if name == "fc-densenet" else (2, 3, 17, 15), seed, F64),)


MODELS = ["cifar-bc", "imagenet-stem", "plain-layers", "fc-densenet", "list-block", "lone-layer"]


def _graph_targets(ep) -> set:
    return {n.target for n in ep.graph.nodes if n.op == "call_function"}


def _assert_aten_only(ep, what: str) -> None:
    foreign = sorted(str(t) for t in _graph_targets(ep)
                     if t is not operator.getitem and not str(t).startswith("aten."))
    assert not foreign, f"{what}: the exported graph calls non-ATen ops {foreign}"


@pytest.mark.parametrize("name", MODELS)
def test_export_eval_matches_eager(name):
    """An exported inference model: the eager model's output on another input, ATen ops only,
    and the graph concatenates (it is the plain formulation, not ours)."""
    model = _model(name).eval()
    ep = torch.export.export(model, _inputs(name, 0))
    _assert_aten_only(ep, name)
    assert torch.ops.aten.cat.default in _graph_targets(ep)
    x = _inputs(name, 5)
    got = ep.module()(*x)  # with autograd on, as a user would call it (parameters require grad)
    assert_close(got, model(*x), F64, f"{name}: exported output")


@pytest.mark.parametrize("name", ["cifar-bc", "imagenet-stem", "fc-densenet"])
def test_export_train_step_matches_eager(name):
    """An exported training-mode model (training IR): output, input and parameter gradients of
    one step and the running statistics it moves (once, as nn.BatchNorm2d) equal the eager
    memory-efficient model's."""
    model = _model(name).train()
    eager, exported_src = copy.deepcopy(model), copy.deepcopy(model)
    (x,) = _inputs(name, 2)
    ep = torch.export.export(exported_src, (x,))
    _assert_aten_only(ep, name)
    assert_same_step(ep.module(), eager, x, seed=3, what=name)  # running statistics and counters included


def test_export_dynamic_batch_and_size():
    """One exported program serves other batch sizes and image sizes (even ones: torch 2.11's
    avg_pool2d guards on the parity of its input size, torchvision's DenseNet's too)."""
    model = _model("cifar-bc").eval()
    dim = torch.export.Dim
    batch, h, w = dim("batch"), 2 * dim("h2", min=2, max=128), 2 * dim("w2", min=2, max=128)
    example = seeded_input((2, 3, 16, 14), 0, F64)
    ep = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch, 2: h, 3: w}})
    x = seeded_input((3, 3, 12, 22), 7, F64)
    assert_close(ep.module()(x), model(x), F64, "exported output, batch 3, 12x22")


@pytest.mark.parametrize("name", ["cifar-bc", "imagenet-stem", "fc-densenet"])
def test_jit_trace_matches_eager(name, recwarn):
    """torch.jit.trace records the plain graph (no Python autograd Function, no op of this
    package), with the eager model's output on an input of another batch and image size (the
    FC-DenseNet's crops follow the traced sizes), and without TracerWarnings."""
    model = _model(name).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, _inputs(name, 0))
        x = (seeded_input((1, 3, 13, 11), 4, F64),)
        assert_close(traced(*x), model(*x), F64, f"{name}: traced output")
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    foreign = sorted(k for k in kinds if k == "prim::PythonOp" or k.startswith("densenet_fast"))
    assert not foreign, f"{name}: the trace holds {foreign}"
    assert "aten::cat" in kinds
    tracer_warnings = [str(w.message) for w in recwarn if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer_warnings, tracer_warnings


@pytest.mark.parametrize("name", ["cifar-bc", "imagenet-stem", "plain-layers", "fc-densenet"])
def test_torch_func_per_sample_gradients(name):
    """torch.func.vmap(grad(...)) (per-sample gradients) runs the plain graph (the autograd
    Functions have no functorch rules) and gives, sample by sample, the gradients of an ordinary
    backward of that sample alone (eval mode: batch norm with running statistics)."""
    model = _model(name).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = _inputs(name, 5)[0]

    def loss(p, sample):
        return torch.func.functional_call(model, {**p, **buffers}, (sample[None],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        model(x[i:i + 1]).square().sum().backward()
        for k, p in model.named_parameters():
            assert_close(per_sample[k][i], p.grad, F64, f"{name}: sample {i} grad {k}")


def test_recording_sync_batchnorm_in_training_mode_warns():
    """Synchronized batch norm (a process_group, as convert_sync_batchnorm sets it) is not in the
    recorded plain graph: recording a training-mode model warns (non-strict torch.export, torch
    2.14's default, and jit.trace), an eval-mode one does not."""
    model = densenet_fast.densenet_bc(depth=16, growth_rate=4)
    for m in model.modules():
        if hasattr(m, "process_group"):
            m.process_group = object()  # a stand-in: the recording path never uses it
    x = torch.randn(2, 3, 8, 8)
    for train, record in [(True, lambda: torch.export.export(model, (x,), strict=False)),
                          (True, lambda: torch.jit.trace(model, (x,), check_trace=False)),
                          (False, lambda: torch.export.export(model, (x,), strict=False))]:
        model.train(train)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record()
        sync = [str(w.message) for w in caught if "synchronized batch norm" in str(w.message)]
        assert bool(sync) == train, (train, sync)
        if train:
            assert any(s.startswith("DenseNet: ") for s in sync), sync


@pytest.mark.parametrize("make", [
    lambda: densenet_fast.densenet_bc(depth=16, growth_rate=4),
    lambda: densenet_fast.densenet_bc(depth=16, growth_rate=4, memory_efficient=False),
    lambda: densenet_fast.DenseBlock(2, 4, bn_size=2, growth_rate=2),
    lambda: densenet_fast.DenseLayer(4, growth_rate=2, bn_size=2),
    lambda: densenet_fast.Transition(4, 2),
    lambda: TransitionDown(4),
    lambda: TransitionUp(4),
    lambda: densenet_fast.fc_densenet56(),
], ids=["densenet", "densenet-naive", "block", "layer", "transition", "transition-down", "transition-up",
        "fc-densenet"])
def test_jit_script_is_refused_with_advice(make):
    with pytest.raises(TypeError, match=r"cannot be compiled by torch\.jit\.script.*torch\.export\.export or "
                                        r"torch\.jit\.trace"):
        torch.jit.script(make())


def test_eager_and_compile_do_not_record():
    """recording_graph() is False in eager mode and under torch.compile (which must compile our
    ops: torch 2.11's dynamo answers torch.compiler.is_exporting() with True there), True under
    torch.export (strict or not), jit.trace and fx.symbolic_trace; and a compiled model's graph
    has no torch.cat (it is the memory-efficient path, not the recorded plain one)."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(densenet_fast.modules.recording_graph())
            return x + 1

    x = torch.zeros(2)
    Probe()(x)
    torch.compile(Probe(), backend="eager", fullgraph=True)(x)
    assert seen == [False, False], seen
    torch.export.export(Probe(), (x,))
    torch.export.export(Probe(), (x,), strict=True)
    torch.jit.trace(Probe(), x, check_trace=False)
    torch.fx.symbolic_trace(Probe())
    assert len(seen) > 2 and all(seen[2:]), seen

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _model("cifar-bc").train()
    torch.compile(model, backend=capture, fullgraph=True)(*_inputs("cifar-bc", 0))
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert targets and not any("cat" in t for t in targets), sorted(targets)


def test_exported_program_runs_without_the_package(tmp_path):
    """torch.export.save of an exported model loads and runs in a fresh interpreter that never
    imports densenet_fast, with the eager model's output."""
    import subprocess
    import sys

    model = _model("imagenet-stem").eval()
    x = _inputs("imagenet-stem", 6)[0]
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch\n"
        f"ep = torch.export.load({str(tmp_path / 'model.pt2')!r})\n"
        f"y = ep.module()(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y.detach(), {str(tmp_path / 'y.pt')!r})\n"
        "assert not any(m.startswith('densenet_fast') for m in sys.modules), 'densenet_fast was imported'\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        assert_close(torch.load(tmp_path / "y.pt"), model(x), F64, "output of the reloaded program")


# --------------------------------------------------------------------------------------------
# torch.fx: torchvision's feature extraction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fx_node_names_are_torchvision_s(train):
    """torch.fx sees torchvision's DenseNet-121 graph, node for node, so that
    create_feature_extractor's return_nodes name the same places."""
    from torchvision.models.feature_extraction import get_graph_node_names

    with torch.device("meta"):
        ours, tv = densenet_fast.densenet121(), torchvision.models.densenet121()
    ours.train(train), tv.train(train)
    assert get_graph_node_names(ours) == get_graph_node_names(tv)


def _tv_twin(model: nn.Module) -> nn.Module:
    tv = torchvision_densenet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5,
                              small_inputs=False).to(F64)
    tv.load_state_dict(model.state_dict())
    return tv


@pytest.mark.parametrize("leaf", [False, True], ids=["traced-through", "blocks-as-leaves"])
def test_feature_extractor_matches_torchvision(leaf):
    """create_feature_extractor on our model against the same on torchvision's, float64, one
    training step: the features, the input gradient, every parameter gradient and the running
    statistics.  With DenseBlock and Transition as leaf modules the extractor calls them, and they
    run memory-efficient (no torch.cat in the step but the test's own)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = densenet_fast.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
                                   num_classes=5).to(F64)
    randomize_bn_(model, seed=2)
    tv = _tv_twin(model)
    nodes = {"features.denseblock1": "block1", "features.transition1.conv": "trans1_conv",
             "features.denseblock2": "block2"}
    kwargs = {"tracer_kwargs": {"leaf_modules": [densenet_fast.DenseBlock, densenet_fast.Transition]}} if leaf else {}
    if leaf:
        nodes = {"features.denseblock1": "block1", "features.denseblock2": "block2"}
    ours_fe = create_feature_extractor(model, return_nodes=nodes, **kwargs)
    tv_fe = create_feature_extractor(tv, return_nodes=nodes)

    def joined(fe):
        def run(x):
            out = fe(x)
            return torch.cat([out[k].flatten(1) for k in sorted(out)], 1)
        return run

    x = seeded_input((2, 3, 20, 18), 8, F64)
    with torch.profiler.profile() as prof:
        got = step_grads(ours_fe, x, seed=9, forward=joined(ours_fe))
    want = step_grads(tv_fe, x, seed=9, forward=joined(tv_fe))
    assert_close(got[0], want[0], F64, "features")
    assert_close(got[1], want[1], F64, "input grad")
    assert set(got[2]) == set(want[2]) and got[2]
    for key in want[2]:
        assert_close(got[2][key], want[2][key], F64, f"grad {key}")
    s_got, s_want = states(ours_fe), states(tv_fe)
    for key in s_want:
        assert_close(s_got[key].double(), s_want[key].double(), F64, key)
    cats = sum(e.count for e in prof.key_averages() if e.key == "aten::cat")
    assert (cats == 1) if leaf else (cats > 1), f"aten::cat ran {cats} times (one is the test's own join)"


def test_fx_symbolic_trace_fc_densenet():
    """torch.fx.symbolic_trace of an FC-DenseNet (crops that follow the traced sizes) gives the
    eager model's output, also at another image size."""
    model = _model("fc-densenet").eval()
    traced = torch.fx.symbolic_trace(model)
    for seed, shape in ((0, (2, 3, 21, 19)), (1, (1, 3, 13, 16))):
        x = seeded_input(shape, seed, F64)
        with torch.no_grad():
            assert_close(traced(x), model(x), F64, f"traced output {shape}")


def test_feature_extractor_with_leaf_blocks_saves_memory():
    """The extracted backbone with DenseBlock and Transition as leaves keeps the blocks'
    memory saving: its training step's measured CPU peak is under 0.4x the traced-through one's
    (DenseNet-BC-40, batch 32, 32x32: 78.9 vs 270.7 MiB when written; DenseNet-121 batch 4 at
    224x224 measured 109.8 vs 508.3 MiB, torchvision's extractor 508.3)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    from densenet_fast.bench.memory import cpu_peak_bytes

    nodes = {"features.denseblock2": "c4", "features.norm5": "c5"}
    x = seeded_input((32, 3, 32, 32), 10)
    peaks = {}
    for leaf in (False, True):
        torch.manual_seed(0)
        leaves = [densenet_fast.DenseBlock, densenet_fast.Transition] if leaf else []
        fe = create_feature_extractor(densenet_fast.densenet_bc(depth=40, growth_rate=12), nodes,
                                      tracer_kwargs={"leaf_modules": leaves})

        def step():
            out = fe(x)
            sum(v.pow(2).mean() for v in out.values()).backward()

        step()
        peaks[leaf] = cpu_peak_bytes(step)
    assert peaks[True] < 0.4 * peaks[False], {k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}
