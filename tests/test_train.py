"""`densenet-fast train` (densenet_fast/train/): exact resume, DistributedDataParallel over 2 CPU
processes (gloo) against the naive model and, with synchronized BN, against one process on the
whole batch; the digits demo's accuracy and time; one-line errors for bad requests.

The distributed tests run in float64, so a real difference (a missing all-reduce, a wrong count in
the merged statistics) is O(1) while summation order costs ~1e-14: tolerances.TOLERANCES[float64].
"""

from __future__ import annotations

import argparse
import copy
import os
import pickle
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import densenet_fast
from densenet_fast import reference
from densenet_fast.train import TrainError, parse_args, train
from densenet_fast.train import distributed
from densenet_fast.train.engine import Prepared, make_optimizer, prepare_model, train_epoch
from builders import as_torchvision_checkpoint, randomize_bn_
from tolerances import assert_close

REPO = Path(__file__).resolve().parents[1]
FINAL_LINE = re.compile(r"final test accuracy: (\d\.\d{4})")


def write_fake_cifar(root: Path, per_batch: int = 8, seed: int = 0) -> Path:
    """CIFAR-10's python-pickle layout (root/cifar-10-batches-py/data_batch_1..5, test_batch) with
    `per_batch` random images per file: the loader's format, the search of the parent folder."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = torch.randint(0, 256, (per_batch, 3 * 32 * 32), generator=gen, dtype=torch.uint8).numpy()
        labels = torch.randint(0, 10, (per_batch,), generator=gen).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                         b"filenames": [b"x.png"] * per_batch}, f)
    return folder


# ------------------------------------------------------------------------------------------------
# Exact resume
# ------------------------------------------------------------------------------------------------


def test_resume_is_bit_identical(tmp_path):
    """2 epochs straight == 1 epoch, stop, resume for the second: every parameter, buffer,
    optimizer state and metric bit for bit.  Exercised on purpose: random crops and flips
    (augmentation generator), dropout (the global RNG), gradient accumulation, and a learning-rate
    milestone at the epoch boundary (scheduler state)."""
    write_fake_cifar(tmp_path / "data")
    common = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "densenet_bc_10_4",
              "--epochs", "2", "--batch-size", "8", "--accum-steps", "2", "--drop-rate", "0.2", "--seed", "3",
              "--device", "cpu", "--no-progress", "--no-plot"]
    straight = train(parse_args(common + ["--output-dir", str(tmp_path / "straight")]))
    first = train(parse_args(common + ["--output-dir", str(tmp_path / "resumed"), "--stop-after", "1"]))
    assert len(first["history"]) == 1
    resumed = train(parse_args(common + ["--output-dir", str(tmp_path / "resumed"), "--resume",
                                         str(tmp_path / "resumed" / "checkpoints")]))

    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    opt_a = torch.load(straight["checkpoint"], weights_only=False)["optimizer"]["state"]
    opt_b = torch.load(resumed["checkpoint"], weights_only=False)["optimizer"]["state"]
    for i in opt_a:
        assert torch.equal(opt_a[i]["momentum_buffer"], opt_b[i]["momentum_buffer"]), f"momentum {i} differs"
    timing = {"images_per_s", "peak_memory_mb", "epoch_s"}
    for row_a, row_b in zip(straight["history"], resumed["history"], strict=True):
        assert {k: v for k, v in row_a.items() if k not in timing} == {k: v for k, v in row_b.items()
                                                                        if k not in timing}
    lines = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                                   "images_per_s", "peak_memory_mb", "epoch_s"]
    assert [line.split(",")[:2] for line in lines[1:]] == [["1", "0.1"], ["2", "0.01"]]


def test_resume_refuses_other_options(tmp_path):
    """Resuming with a different trajectory (here --lr) would not continue the interrupted run."""
    common = ["--dataset", "synthetic", "--model", "densenet_bc_10_4", "--image-size", "8", "--train-samples",
              "16", "--test-samples", "8", "--batch-size", "8", "--device", "cpu", "--no-progress", "--no-plot",
              "--output-dir", str(tmp_path)]
    train(parse_args(common + ["--stop-after", "1"]))
    with pytest.raises(TrainError, match=r"--lr 0\.1 -> 0\.05"):
        train(parse_args(common + ["--lr", "0.05", "--resume", str(tmp_path / "checkpoints" / "last.pt")]))


def test_options_smoke(tmp_path):
    """bf16 autocast, channels_last, accumulation with a short last group (5 micro-batches in
    groups of 2), the naive model: one epoch runs and writes its files."""
    out = train(parse_args(["--dataset", "synthetic", "--model", "densenet_bc_10_4", "--naive", "--image-size", "8",
                            "--train-samples", "20", "--test-samples", "8", "--batch-size", "8", "--accum-steps", "2",
                            "--amp", "bf16", "--channels-last", "--epochs", "1", "--device", "cpu", "--no-progress",
                            "--output-dir", str(tmp_path)]))
    assert 0 <= out["final_test_acc"] <= 1 and len(out["history"]) == 1
    assert (tmp_path / "metrics.csv").is_file() and (tmp_path / "curves.png").is_file()
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


def test_train_restores_process_settings(tmp_path):
    """train() called from Python sets threads, deterministic algorithms and cuDNN benchmarking
    for its run, and puts back the caller's afterwards (the shapes dataset's default of 2 threads,
    left set, changed the float32 results of a later equivalence test in the same process)."""
    def settings():
        return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)

    before = settings()
    for extra in (["--deterministic", "--threads", "2"], ["--dataset", "shapes", "--model", "fc_densenet_2_1_4"]):
        train(parse_args(["--dataset", "synthetic", "--model", "densenet_bc_10_4", "--image-size", "8",
                          "--train-samples", "8", "--test-samples", "4", "--batch-size", "4", "--epochs", "1",
                          "--device", "cpu", "--no-progress", "--no-plot", "--output-dir", str(tmp_path)] + extra))
        assert settings() == before, f"train({' '.join(extra)}) left {settings()}, was {before}"


# ------------------------------------------------------------------------------------------------
# Two processes (gloo)
# ------------------------------------------------------------------------------------------------

# DenseNet-BC depth 16, growth 4: two layers per block, so the block buffer, its statistics cache
# and the transitions all take part; 8x8 inputs keep it fast.
BC = dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=5)
GLOBAL_BATCH, STEPS = 8, 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen, dtype=torch.float64),
             torch.randint(0, BC["num_classes"], (GLOBAL_BATCH,), generator=gen)) for _ in range(STEPS)]


def _shard(batches, rank, world):
    half = GLOBAL_BATCH // world
    return [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]) for x, y in batches]


def _efficient_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = densenet_fast.densenet_bc(depth=16, growth_rate=4, num_classes=BC["num_classes"], backend="torch")
    return randomize_bn_(model, seed=1).double()


def _fit(prepared: Prepared, batches) -> None:
    opt = make_optimizer(prepared.raw, argparse.Namespace(lr=0.1, momentum=0.9, weight_decay=1e-4))
    train_epoch(prepared, batches, opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))


def _assert_same_state(actual: torch.nn.Module, expected: torch.nn.Module, what: str) -> None:
    a, e = actual.state_dict(), expected.state_dict()
    assert a.keys() == e.keys()
    for name in a:
        if a[name].is_floating_point():
            assert_close(a[name], e[name], torch.float64, f"{what}: {name}")
        else:
            assert torch.equal(a[name], e[name]), f"{what}: {name}"


def _ddp_worker(rank: int, world: int, port: int, case: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env, device = distributed.setup("cpu")  # the path train() takes under torchrun
    try:
        assert env.distributed and env.owns_group and env.rank == rank
        batches = _global_batches()
        ours = _efficient_model()
        if case == "fsdp":
            _fsdp_case(ours, batches, rank, world, device, env)
            return
        if case == "naive":
            # Unsynchronized BN: each process normalises its own half, DDP averages the gradients;
            # the naive model under DDP must follow the same trajectory.
            naive = reference.DenseNet(BC["growth_rate"], BC["block_config"], BC["num_init_features"],
                                       num_classes=BC["num_classes"], small_inputs=True).double()
            naive.load_state_dict(ours.state_dict())
            for model in (ours, naive):
                _fit(prepare_model(model, device, env), _shard(batches, rank, world))
            _assert_same_state(ours, naive, f"rank {rank}, ours vs naive under DDP")
        else:
            # Synchronized BN: 2 processes with half the batch each == 1 process with the whole batch.
            whole = copy.deepcopy(ours)
            _fit(prepare_model(ours, device, env, sync_bn=True), _shard(batches, rank, world))
            _fit(Prepared(whole, whole, None), batches)
            _assert_same_state(ours, whole, f"rank {rank}, sync-BN on 2 processes vs 1 process")
        # DDP keeps the replicas identical (exactly: same reduced gradients, same updates).
        params = distributed.all_gather_objects([p.detach() for p in ours.parameters()], env)
        assert all(torch.equal(p, q) for p, q in zip(params[0], params[1], strict=True))
    finally:
        distributed.teardown(env)


def _fsdp_case(ours, batches, rank, world, device, env) -> None:
    """FSDP2 (fully_shard on every dense block, then on the model) against the naive model under
    DDP: the same semantics (each process normalises its own half, gradients averaged), so the same
    parameters, and on rank 0 the same running statistics and counters.  The blocks are called as modules, so their FSDP
    hooks (which gather their parameters) and a user's forward hook run."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    naive = reference.DenseNet(BC["growth_rate"], BC["block_config"], BC["num_init_features"],
                               num_classes=BC["num_classes"], small_inputs=True).double()
    naive.load_state_dict(ours.state_dict())
    _fit(prepare_model(naive, device, env), _shard(batches, rank, world))
    calls = []
    blocks = [m for m in ours.modules() if isinstance(m, densenet_fast.DenseBlock)]
    for block in blocks:
        block.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
        fully_shard(block)
    fully_shard(ours)
    _fit(Prepared(ours, ours, None), _shard(batches, rank, world))
    assert len(calls) == len(blocks) * STEPS, calls
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in ours.state_dict().items()}
    assert full.keys() == naive.state_dict().keys()
    for name, want in naive.state_dict().items():
        if rank != 0 and name not in dict(naive.named_parameters()):
            continue  # DDP broadcasts rank 0's buffers before each forward, FSDP does not: rank 0's agree
        if want.is_floating_point():
            assert_close(full[name], want, torch.float64, f"rank {rank}, FSDP2 vs naive under DDP: {name}")
        else:
            assert torch.equal(full[name], want), f"rank {rank}: {name}"


def _spawn(case: str) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), case), nprocs=2, join=True)


class _EagerGraphedStep:
    """densenet_fast.GraphedStep's interface run eagerly on the CPU: warm-up steps that move the
    running statistics (as the real capture's do), then one eager step per call."""

    def __init__(self, model, loss_fn, x, y, autocast_dtype=None, warmup=3):
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x.clone(), y.clone()
        for _ in range(warmup):
            self._step()
        for p in model.parameters():
            p.grad = None

    def _step(self):
        for p in self.model.parameters():
            p.grad = None
        out = self.model(self.x)
        loss = self.loss_fn(out.float(), self.y)
        loss.backward()
        self.output = out.detach()
        return loss.detach()

    def __call__(self, x, y):
        self.x.copy_(x)
        self.y.copy_(y)
        return self._step()


def test_graphed_train_epoch_matches_eager(monkeypatch):
    """train_epoch with a GraphedTrainStep (--cuda-graph), the graph replaced by an eager stand-in so
    that it runs on the CPU: full batches go through the step object, the short last batch runs
    eagerly, the capture's warm-up leaves no trace in the running statistics, and the result equals
    plain train_epoch's (float64)."""
    from densenet_fast import graphs
    from densenet_fast.train.engine import GraphedTrainStep

    monkeypatch.setattr(graphs, "GraphedStep", _EagerGraphedStep)
    gen = torch.Generator().manual_seed(8)
    batches = [(torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64),
                torch.randint(0, BC["num_classes"], (n,), generator=gen)) for n in (6, 6, 6, 4)]
    plain, stepped = _efficient_model(), _efficient_model()
    _fit(Prepared(plain, plain, None), batches)
    graphed = GraphedTrainStep(stepped)
    opt = make_optimizer(stepped, argparse.Namespace(lr=0.1, momentum=0.9, weight_decay=1e-4))
    totals = train_epoch(Prepared(stepped, stepped, None), batches, opt, torch.amp.GradScaler("cpu", enabled=False),
                         torch.device("cpu"), graphed=graphed)
    assert graphed.replays == 3 and totals.reduce(distributed.DistEnv())["images"] == 22
    _assert_same_state(stepped, plain, "graphed train_epoch")


def test_ddp_matches_naive_model():
    _spawn("naive")


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 14),
                    reason="torch < 2.14's fully_shard refuses nn.ModuleDict subclasses (DenseBlock, as torchvision's "
                           "_DenseBlock)")
def test_fsdp2_per_block_matches_naive_ddp():
    _spawn("fsdp")


@pytest.mark.skipif(not hasattr(densenet_fast, "convert_sync_batchnorm"), reason="convert_sync_batchnorm not available")
def test_sync_bn_two_processes_match_one():
    _spawn("sync")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _command():
    """`densenet-fast train` as `python -m densenet_fast train` once cli.py has the subcommand, else
    the package's own entry point (the same options and code)."""
    from densenet_fast import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return [sys.executable, "-m"] + (["densenet_fast", "train"] if "train" in sub.choices else ["densenet_fast.train"])


def _run(args, cwd, timeout=600):
    return subprocess.run(_command() + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_digits_default_reaches_95_percent(tmp_path):
    """The offline demo with its defaults: >= 95% test accuracy within 5 minutes on a CPU (measured:
    ~25 s on a shared 2-core machine)."""
    t0 = time.perf_counter()
    proc = _run(["--dataset", "digits", "--device", "cpu"], cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = FINAL_LINE.fullmatch(last)
    assert match, f"last line {last!r}"
    assert float(match.group(1)) >= 0.95, proc.stdout
    assert seconds < 300, f"took {seconds:.0f} s"
    rows = (tmp_path / "runs" / "train" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + densenet_fast.train.DATASET_DEFAULTS["digits"].epochs
    assert (tmp_path / "runs" / "train" / "curves.png").is_file()


def _bad_cifar(root: Path) -> Path:
    """Every expected file present, none of them a pickle."""
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(b"\x89PNG not a pickle")
    return root


@pytest.mark.parametrize("case", ["missing-path", "empty-dir", "wrong-format", "unknown-model", "unknown-dataset",
                                  "cuda-graph-on-cpu", "cuda-graph-clash"])
def test_bad_request_is_one_line(tmp_path, case):
    """Exit status 2, one line on stderr naming the problem, no traceback, nothing on stdout."""
    args, expect = {
        "missing-path": (["--dataset", "cifar10", "--data-dir", str(tmp_path / "nope")], "no such directory"),
        "empty-dir": (["--dataset", "cifar100", "--data-dir", str(tmp_path)], "no CIFAR-100 python batches"),
        "wrong-format": (["--dataset", "cifar10", "--data-dir", str(_bad_cifar(tmp_path / "bad"))],
                         "not a CIFAR-10 python batch"),
        "unknown-model": (["--model", "densenet_bc_11_12"], "--model densenet_bc_11_12"),
        "unknown-dataset": (["--dataset", "mnist"], "invalid choice"),
        "cuda-graph-on-cpu": (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs one process on a GPU"),
        "cuda-graph-clash": (["--cuda-graph", "--accum-steps", "2", "--batch-size", "8"],
                             "--cuda-graph cannot be combined with --accum-steps > 1"),
    }[case]
    proc = _run(args + ["--output-dir", str(tmp_path / "out")], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("densenet-fast") and "error" in lines[0] and expect in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("layout, expect", [
    ("no-val", "no val/ folder"),
    ("labels", "'labels' must be"),
])
def test_bad_data_in_process(tmp_path, layout, expect):
    """More malformed inputs, through train() (TrainError) to keep subprocesses few."""
    if layout == "no-val":
        (tmp_path / "train" / "cat").mkdir(parents=True)
        argv = ["--dataset", "imagefolder", "--data-dir", str(tmp_path)]
    else:
        folder = write_fake_cifar(tmp_path)
        with open(folder / "test_batch", "wb") as f:
            pickle.dump({b"data": torch.zeros(2, 3072, dtype=torch.uint8).numpy(), b"labels": [3, 10]}, f)
        argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path)]
    with pytest.raises(TrainError, match=re.escape(expect)):
        train(parse_args(argv + ["--device", "cpu", "--output-dir", str(tmp_path / "out")]))


@pytest.mark.parametrize("dataset, model, expect", [
    ("cifar10", "fc_densenet56", "--model fc_densenet56 is a segmentation model"),
    ("shapes", "densenet_bc_10_4", "--model densenet_bc_10_4 is a classifier; --dataset shapes has per-pixel"),
])
def test_model_must_fit_the_labels(tmp_path, dataset, model, expect):
    """A segmentation model on one label per image, or a classifier on per-pixel labels: refused
    before any work instead of failing inside the loss."""
    argv = ["--dataset", dataset, "--model", model]
    if dataset == "cifar10":
        write_fake_cifar(tmp_path)
        argv += ["--data-dir", str(tmp_path)]
    with pytest.raises(TrainError, match=re.escape(expect)):
        train(parse_args(argv + ["--device", "cpu", "--output-dir", str(tmp_path / "out")]))


# ------------------------------------------------------------------------------------------------
# Segmentation: shapes, CamVid, per-pixel metrics
# ------------------------------------------------------------------------------------------------

MIOU_LINE = re.compile(r"final test mIoU: (\d\.\d{4})")


@pytest.mark.slow
def test_shapes_default_learns(tmp_path):
    """The offline segmentation demo with its defaults (a small FC-DenseNet, 20 epochs): the test
    mean IoU well above what predicting background everywhere gets (0.77 of the pixels are
    background: mIoU 0.19).  Measured: 0.6293 in ~80 s on a shared 2-core machine."""
    proc = _run(["--dataset", "shapes", "--device", "cpu"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    *_, miou_line, acc_line = proc.stdout.strip().splitlines()
    assert FINAL_LINE.fullmatch(acc_line) and MIOU_LINE.fullmatch(miou_line), proc.stdout
    assert float(MIOU_LINE.fullmatch(miou_line).group(1)) >= 0.5, proc.stdout
    rows = (tmp_path / "runs" / "train" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[-2:] == ["train_miou", "test_miou"]
    assert len(rows) == 1 + densenet_fast.train.DATASET_DEFAULTS["shapes"].epochs


def test_segmentation_resume_is_bit_identical(tmp_path):
    """The resume of test_resume_is_bit_identical on per-pixel labels (flips drawn for image and
    label map, dropout, a milestone at the epoch boundary): weights, buffers and every metric,
    mean IoU included, bit for bit."""
    common = ["--dataset", "shapes", "--model", "fc_densenet_2_1_4", "--image-size", "12", "--train-samples", "24",
              "--test-samples", "8", "--epochs", "2", "--batch-size", "8", "--drop-rate", "0.2", "--seed", "4",
              "--device", "cpu", "--no-progress", "--no-plot"]
    straight = train(parse_args(common + ["--output-dir", str(tmp_path / "straight")]))
    train(parse_args(common + ["--output-dir", str(tmp_path / "resumed"), "--stop-after", "1"]))
    resumed = train(parse_args(common + ["--output-dir", str(tmp_path / "resumed"), "--resume",
                                         str(tmp_path / "resumed" / "checkpoints")]))
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    timing = {"images_per_s", "peak_memory_mb", "epoch_s"}
    for row_a, row_b in zip(straight["history"], resumed["history"], strict=True):
        assert "test_miou" in row_a and {k: v for k, v in row_a.items() if k not in timing} == \
            {k: v for k, v in row_b.items() if k not in timing}


def test_divergence_stops_with_one_line(tmp_path):
    """A learning rate that blows the loss up to NaN ends the run with a TrainError naming the
    epoch and --lr, instead of training on NaNs and reporting an accuracy."""
    argv = ["--dataset", "synthetic", "--model", "densenet_bc_10_4", "--image-size", "8", "--train-samples", "16",
            "--test-samples", "8", "--batch-size", "8", "--lr", "1e30", "--device", "cpu", "--no-progress",
            "--no-plot", "--output-dir", str(tmp_path)]
    with pytest.raises(TrainError, match=r"training diverged: the mean train loss of epoch 1 is (nan|inf); lower --lr "
                                         r"\(was 1e\+30\)"):
        train(parse_args(argv))
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_miou_and_pixel_accuracy_match_a_count():
    """Totals against a direct count: labelled pixels only (label -100 skipped), IoU per class
    |label & prediction| / |label | prediction|, the mean over classes that occur or are predicted."""
    from densenet_fast.train.distributed import DistEnv
    from densenet_fast.train.engine import Totals

    gen = torch.Generator().manual_seed(5)
    c, env = 5, DistEnv(rank=0, world_size=1, local_rank=0)
    totals = Totals(torch.device("cpu"), c)
    labels, preds = [], []
    for _ in range(3):
        logits = torch.randn(2, c, 4, 6, generator=gen)
        y = torch.randint(0, c - 1, (2, 4, 6), generator=gen)  # class 4 never a label ...
        y[torch.rand(2, 4, 6, generator=gen) < 0.2] = -100
        totals.add(logits, y, torch.tensor(1.0))
        labels.append(y.flatten())
        preds.append(logits.argmax(1).flatten())
    y, p = torch.cat(labels), torch.cat(preds)
    keep = y >= 0
    y, p = y[keep], p[keep]
    ious = []
    for k in range(c):
        union = ((y == k) | (p == k)).sum().item()
        if union:
            ious.append(((y == k) & (p == k)).sum().item() / union)
    got = totals.reduce(env)
    assert got["images"] == 6 and got["loss"] == pytest.approx(1.0)
    assert got["acc"] == pytest.approx((y == p).double().mean().item(), abs=1e-12)
    assert got["miou"] == pytest.approx(sum(ious) / len(ious), abs=1e-12)


def test_segmentation_metrics_sum_across_processes(monkeypatch):
    """Under DDP each process counts its share of the test set and Totals.reduce all-reduces ONE
    tensor (loss, counts and confusion matrix): two halves summed give the metrics of the whole."""
    from densenet_fast.train import engine
    from densenet_fast.train.distributed import DistEnv

    gen = torch.Generator().manual_seed(8)
    logits, y = torch.randn(6, 4, 5, 5, generator=gen), torch.randint(-1, 4, (6, 5, 5), generator=gen)
    y[y < 0] = -100
    whole, halves = engine.Totals(torch.device("cpu"), 4), [engine.Totals(torch.device("cpu"), 4) for _ in range(2)]
    whole.add(logits, y, torch.tensor(0.5))
    for i, part in enumerate(halves):
        part.add(logits[3 * i:3 * i + 3], y[3 * i:3 * i + 3], torch.tensor(0.5))
    monkeypatch.setattr(engine, "all_reduce", lambda t, env, op="sum": halves[0].sums + halves[1].sums)
    got = halves[0].reduce(DistEnv(rank=0, world_size=2))
    monkeypatch.undo()
    want = whole.reduce(DistEnv())
    assert got.keys() == want.keys() == {"loss", "acc", "images", "miou"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_crop_and_flip_move_the_labels_with_the_pixels():
    """Per-pixel labels get the image's crop and flip; padding is unlabelled (-100)."""
    from densenet_fast.train.data import TensorSplit

    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 7, (16, 9, 11), generator=gen)
    images = labels[:, None].float().expand(16, 3, 9, 11) / 10  # every channel encodes the label
    for kwargs in (dict(pad=3, flip=True), dict(crop=6, flip=True)):
        split = TensorSplit(images, labels, (0.0,) * 3, (1.0,) * 3, **kwargs)
        (x, y), = split.batches(list(range(16)), 16, torch.device("cpu"), torch.Generator().manual_seed(1), False)
        side = kwargs.get("crop")
        assert x.shape == ((16, 3, side, side) if side else (16, 3, 9, 11)) and y.shape == x[:, 0].shape
        labelled = y >= 0
        assert torch.equal((x[:, 0] * 10).round().long()[labelled], y[labelled]), kwargs
        assert torch.equal(y[~labelled], torch.full_like(y[~labelled], -100)) and bool((x[:, 0][~labelled] == 0).all())
        if side is None:
            assert 0 < (~labelled).sum() and not torch.equal(y, labels), "no padding or no crop drawn"
        moved = [not torch.equal(y[i], labels[i, :side, :side]) for i in range(16)]
        assert any(moved)


def write_fake_camvid(root: Path, sizes=(("train", 3), ("test", 2)), hw=(40, 48), seed=0) -> Path:
    """The SegNet tutorial's CamVid layout with random images and label maps (void 11 included)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    for split, count in sizes:
        (root / split).mkdir(parents=True)
        (root / (split + "annot")).mkdir()
        for i in range(count):
            image = torch.randint(0, 256, (*hw, 3), generator=gen, dtype=torch.uint8).numpy()
            label = torch.randint(0, 12, hw, generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(image).save(root / split / f"f{i:03d}.png")
            Image.fromarray(label).save(root / (split + "annot") / f"f{i:03d}.png")
    return root


def test_camvid_folder_trains_and_ignores_void(tmp_path):
    """A CamVid folder: images and label maps read back exactly, void (11) as -100, training crops
    of --image-size, full-size test images; an epoch of a small FC-DenseNet runs on it."""
    import numpy as np
    from PIL import Image

    from densenet_fast.train.data import load_data
    from densenet_fast.train.options import resolve

    root = write_fake_camvid(tmp_path / "CamVid")
    args = resolve(parse_args(["--dataset", "camvid", "--data-dir", str(root), "--image-size", "32",
                               "--model", "fc_densenet_2_1_4", "--epochs", "1", "--batch-size", "2", "--device", "cpu",
                               "--no-progress", "--no-plot", "--output-dir", str(tmp_path / "out")]))
    data = load_data(args)
    assert data.segmentation and data.num_classes == 11 and args.drop_rate == 0.2
    want = torch.from_numpy(np.asarray(Image.open(root / "testannot" / "f001.png")).astype(np.int64))
    got = data.test.labels[1]
    assert torch.equal(got[want != 11], want[want != 11]) and bool((got[want == 11] == -100).all())
    assert bool((want == 11).any())
    image = torch.from_numpy(np.array(Image.open(root / "train" / "f002.png"))).permute(2, 0, 1)
    assert torch.equal(data.train.images[2], image)
    out = train(args)
    assert len(out["history"]) == 1 and 0 <= out["final_test_miou"] <= 1


@pytest.mark.parametrize("breakage, expect", [
    ("no-annot", "no testannot/ folder"),
    ("missing-label", "test/f001.png has no label map testannot/f001.png"),
    ("label-range", "has label 12, expected 0..10 and 11 (void)"),
    ("label-size", "expected one channel of the image's size"),
    ("crop-too-big", "--image-size 64: the training crops must fit the 48x40 images"),
    ("too-small-for-the-model", "--image-size 2: fc_densenet_2_1_4 pools 2 times, so its inputs must be at least "
                                "4x4"),
])
def test_camvid_errors(tmp_path, breakage, expect):
    from PIL import Image

    root = write_fake_camvid(tmp_path / "CamVid")
    size = {"crop-too-big": "64", "too-small-for-the-model": "2"}.get(breakage, "32")
    if breakage == "no-annot":
        for f in (root / "testannot").iterdir():
            f.unlink()
        (root / "testannot").rmdir()
    elif breakage == "missing-label":
        (root / "testannot" / "f001.png").unlink()
    elif breakage == "label-range":
        Image.fromarray(torch.full((40, 48), 12, dtype=torch.uint8).numpy()).save(root / "trainannot" / "f000.png")
    elif breakage == "label-size":
        Image.fromarray(torch.zeros(40, 47, dtype=torch.uint8).numpy()).save(root / "trainannot" / "f000.png")
    argv = ["--dataset", "camvid", "--data-dir", str(root), "--image-size", size, "--model", "fc_densenet_2_1_4",
            "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(TrainError, match=re.escape(expect)):
        train(parse_args(argv))


# ------------------------------------------------------------------------------------------------
# --weights (fine-tuning from torchvision's pretrained weights)
# ------------------------------------------------------------------------------------------------


def test_weights_start_from_torchvision_checkpoint(monkeypatch):
    """--weights loads torchvision's checkpoint (served here by the weights enum, no download)
    into the memory-efficient model and replaces the 1000-way classifier by a zero-bias one for
    the dataset's classes; the rest of the model holds exactly the checkpoint's tensors."""
    import torchvision
    from densenet_fast.train.engine import build_model
    from densenet_fast.train.options import resolve

    tv = torchvision.models.densenet121()
    randomize_bn_(tv, 51)
    monkeypatch.setattr(torchvision.models.DenseNet121_Weights, "get_state_dict",
                        lambda self, *a, **k: as_torchvision_checkpoint(tv.state_dict()))
    args = resolve(parse_args(["--dataset", "synthetic", "--model", "densenet121", "--weights", "DEFAULT",
                               "--device", "cpu"]))
    model = build_model(args, 3, 10)
    assert isinstance(model, densenet_fast.DenseNet) and model.memory_efficient
    assert model.classifier.out_features == 10 and torch.count_nonzero(model.classifier.bias) == 0
    got = model.state_dict()
    for key, value in tv.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(got[key], value), key
    same = build_model(resolve(parse_args(["--dataset", "synthetic", "--model", "densenet121", "--weights",
                                           "DEFAULT", "--num-classes", "1000"])), 3, 1000)
    assert torch.equal(same.classifier.weight, tv.classifier.weight), "1000 classes: the checkpoint's classifier"


@pytest.mark.parametrize("argv, in_channels, expect", [
    (["--model", "densenet121", "--weights", "IMAGENET1K_V9"], 3, "--weights IMAGENET1K_V9: densenet121: weights "
                                                                   "must be None, a DenseNet121_Weights member"),
    (["--model", "densenet_bc_40_12", "--weights", "DEFAULT"], 3, "not --model densenet_bc_40_12"),
    (["--model", "densenet169", "--weights", "DEFAULT"], 1, "take 3-channel images, the dataset's have 1"),
], ids=["unknown-name", "no-torchvision-weights", "one-channel"])
def test_weights_errors(argv, in_channels, expect):
    """Bad --weights requests fail on the meta check, before any download or work."""
    from densenet_fast.train.engine import build_model
    from densenet_fast.train.options import resolve

    args = resolve(parse_args(["--dataset", "synthetic"] + argv))
    with pytest.raises(TrainError, match=re.escape(expect)):
        build_model(args, in_channels, 10, device=torch.device("meta"))


def test_weights_are_a_trajectory_option(monkeypatch, tmp_path):
    """A run fine-tuned from --weights records them: --resume without them is refused, naming the
    option (the resumed run would not be the interrupted one)."""
    import torchvision

    tv = torchvision.models.densenet121()
    monkeypatch.setattr(torchvision.models.DenseNet121_Weights, "get_state_dict",
                        lambda self, *a, **k: as_torchvision_checkpoint(tv.state_dict()))
    common = ["--dataset", "synthetic", "--model", "densenet121", "--train-samples", "8", "--test-samples", "4",
              "--batch-size", "4", "--device", "cpu", "--no-progress", "--no-plot",
              "--output-dir", str(tmp_path / "out")]
    result = train(parse_args(common + ["--weights", "DEFAULT", "--epochs", "1"]))
    assert result["model"].classifier.out_features == 10
    with pytest.raises(TrainError, match=re.escape("--weights 'DEFAULT' -> None")):
        train(parse_args(common + ["--epochs", "2", "--resume", str(result["checkpoint"])]))
