"""train(args): the whole `densenet-fast train` run, single-process or under torchrun."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from ..backends import resolve_backend
from . import checkpoint, distributed
from .data import augmentation_generator, load_data, test_indices, train_indices
from .engine import (GraphedTrainStep, build_model, evaluate, make_optimizer, make_scheduler, prepare_model,
                     train_epoch)
from .options import TrainError, build_parser, resolve, trajectory_config
from .report import Progress, epoch_line, peak_memory_mb, plot_curves, write_csv


def _log(env: distributed.DistEnv, text: str, err: bool = False) -> None:
    if env.is_main:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Train as `args` (from add_train_arguments) says; returns
    {"final_test_acc": fraction, "history": [per-epoch metric rows], "model": the trained module,
    "checkpoint": path of last.pt, "output_dir": path}, and on a segmentation dataset
    "final_test_miou" (mean IoU; final_test_acc is then the pixel accuracy).

    Raises TrainError for a bad request (run() turns it into one line and exit status 2).  The last
    line printed on stdout (rank 0) is "final test accuracy: X", X a fraction with 4 decimals; on a
    segmentation dataset the line before it is "final test mIoU: X".
    """
    args = resolve(args)
    build_model(args, 3, 2, device=torch.device("meta"))  # an unknown --model or --weights fails before any work
    with _process_settings():
        if args.threads:
            torch.set_num_threads(args.threads)
        env, device = distributed.setup(args.device)
        try:
            return _train(args, env, device)
        finally:
            distributed.teardown(env)


@contextlib.contextmanager
def _process_settings() -> Iterator[None]:
    """Restores what a run sets for the whole process (threads, deterministic algorithms, cuDNN
    benchmarking): train() called from Python must not change how the caller's code runs after."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.benchmark = saved[3]


class _Run:
    """The state of one training run: data, model, optimizer, schedule, history; `epoch` trains
    and evaluates one epoch, `record` reports and saves it (rank 0)."""

    def __init__(self, args: argparse.Namespace, env: distributed.DistEnv, device: torch.device) -> None:
        self.args, self.env, self.device = args, env, device
        if args.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not args.deterministic
        if not args.naive:
            try:
                resolve_backend(args.backend, device)
            except (RuntimeError, ValueError) as exc:
                raise TrainError(f"--backend {args.backend}: {' '.join(str(exc).split())}") from None
        if args.cuda_graph and (device.type != "cuda" or env.distributed):
            raise TrainError(f"--cuda-graph needs one process on a GPU, got {env.world_size} process(es) on "
                             f"{device.type}")
        self.data = load_data(args)
        resume_state = checkpoint.load(args.resume) if args.resume else None
        self.config = {**trajectory_config(args), "sync_bn": args.sync_bn and env.distributed}
        if resume_state is not None:
            checkpoint.check_config(resume_state, self.config, args.resume)

        checkpoint.seed_all(args.seed)  # identical initial weights everywhere (DDP also broadcasts rank 0's)
        model = build_model(args, self.data.in_channels, self.data.num_classes)
        side = 2 ** model.num_levels if self.data.segmentation else 1
        if self.data.image_size < side:
            raise TrainError(f"--image-size {self.data.image_size}: {args.model} pools {model.num_levels} times, so "
                             f"its inputs must be at least {side}x{side}")
        if args.sync_bn and not env.distributed:
            _log(env, "note: --sync-bn has no effect in a single process", err=True)
        self.prepared = prepare_model(model, device, env, sync_bn=args.sync_bn, channels_last=args.channels_last,
                                      compile=args.compile)
        self.graphed = GraphedTrainStep(self.prepared.raw, args.amp) if args.cuda_graph else None
        self.optimizer = make_optimizer(self.prepared.raw, args)
        self.scheduler = make_scheduler(self.optimizer, args)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        self.history: List[dict] = []
        self.start = 0
        if resume_state is not None:
            warning = checkpoint.restore(resume_state, model=self.prepared.raw, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler, rank=env.rank,
                                         world_size=env.world_size)
            if warning:
                _log(env, f"warning: {warning}", err=True)
            self.start, self.history = resume_state["epoch"], list(resume_state["history"])
        else:
            checkpoint.seed_all(args.seed + env.rank)  # dropout masks differ between processes
        self.checkpoint_path = os.path.join(args.checkpoint_dir, checkpoint.LAST)
        self.progress = Progress(enabled=env.is_main and not args.no_progress)
        # segmentation: the metrics keep a confusion matrix (mean IoU)
        self.num_classes = self.data.num_classes if self.data.segmentation else None

    def describe(self) -> str:
        args, env = self.args, self.env
        params = sum(p.numel() for p in self.prepared.raw.parameters())
        return (f"{args.model} ({'naive' if args.naive else 'memory-efficient'}, {params / 1e6:.3f}M parameters) on "
                f"{self.data.description}; {self.device}, {env.world_size} process{'es' if env.distributed else ''}, "
                f"amp {args.amp}" + (f"; resuming after epoch {self.start}" if self.start else ""))

    def epoch(self, epoch: int) -> dict:
        """Train epoch `epoch` (0-based), step the schedule, evaluate; the metrics row."""
        args, env, device = self.args, self.env, self.device
        lr = self.optimizer.param_groups[0]["lr"]
        indices = train_indices(len(self.data.train), epoch, args.seed, env.rank, env.world_size)
        batches = self.data.train.batches(indices, args.batch_size // args.accum_steps, device,
                                          augmentation_generator(args.seed, epoch, env.rank), args.channels_last,
                                          args.workers)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.progress.start(f"epoch {epoch + 1}/{args.epochs}", len(batches))
        t0 = time.perf_counter()
        try:
            totals = train_epoch(self.prepared, batches, self.optimizer, self.scaler, device, args.amp,
                                 args.accum_steps, on_step=lambda i: self.progress.advance(), graphed=self.graphed,
                                 num_classes=self.num_classes)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            self.progress.stop()
        seconds = time.perf_counter() - t0
        self.scheduler.step()
        train_metrics = totals.reduce(env)
        if not math.isfinite(train_metrics["loss"]):
            # Diverged: every later step would train on NaNs and report a meaningless accuracy.
            raise TrainError(f"training diverged: the mean train loss of epoch {epoch + 1} is {train_metrics['loss']}; "
                             f"lower --lr (was {lr:g})" + (" or use --amp bf16" if args.amp == "fp16" else ""))
        distributed.broadcast_buffers(self.prepared.raw, env)
        test_metrics = self.evaluate()
        peak = distributed.all_reduce(torch.tensor([peak_memory_mb(device)], device=device), env, "max").item()
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_metrics["loss"], "train_acc": train_metrics["acc"],
               "test_loss": test_metrics["loss"], "test_acc": test_metrics["acc"],
               "images_per_s": train_metrics["images"] / seconds, "peak_memory_mb": peak, "epoch_s": seconds}
        if self.num_classes is not None:
            row.update(train_miou=train_metrics["miou"], test_miou=test_metrics["miou"])
        return row

    def evaluate(self) -> dict:
        args, env = self.args, self.env
        batches = self.data.test.batches(test_indices(len(self.data.test), env.rank, env.world_size),
                                         2 * args.batch_size, self.device, None, args.channels_last, args.workers)
        return evaluate(self.prepared.raw, batches, self.device, args.amp, self.num_classes).reduce(self.env)

    def record(self, row: dict) -> None:
        """Append the row; rank 0 prints it and writes last.pt, metrics.csv and curves.png."""
        args = self.args
        self.history.append(row)
        rng = distributed.all_gather_objects(checkpoint.rng_state(), self.env)  # every process's, for the resume
        if not self.env.is_main:
            return
        print(epoch_line(row, args.epochs), flush=True)
        checkpoint.save(self.checkpoint_path, checkpoint.checkpoint_state(
            epoch=row["epoch"], model=self.prepared.raw, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, history=self.history, config=self.config, rng=rng))
        write_csv(self.history, os.path.join(args.output_dir, "metrics.csv"))
        if not args.no_plot:
            note = plot_curves(self.history, os.path.join(args.output_dir, "curves.png"),
                               f"{args.model} on {args.dataset}")
            if note:
                _log(self.env, note, err=True)


def _train(args: argparse.Namespace, env: distributed.DistEnv, device: torch.device) -> Dict[str, Any]:
    run = _Run(args, env, device)
    _log(env, run.describe())
    stop = args.epochs if args.stop_after is None else min(args.epochs, run.start + args.stop_after)
    for epoch in range(run.start, stop):
        run.record(run.epoch(epoch))
    last = run.history[-1] if run.history else {f"test_{k}": v for k, v in run.evaluate().items()}
    if stop < args.epochs:
        _log(env, f"stopped after epoch {stop} of {args.epochs}; continue with --resume {run.checkpoint_path}",
             err=True)
    result = {"final_test_acc": last["test_acc"], "history": run.history, "model": run.prepared.raw,
              "checkpoint": run.checkpoint_path, "output_dir": args.output_dir}
    if run.num_classes is not None:
        result["final_test_miou"] = last["test_miou"]
        _log(env, f"final test mIoU: {last['test_miou']:.4f}")
    _log(env, f"final test accuracy: {last['test_acc']:.4f}")
    return result


def _fail(exc: TrainError) -> int:
    print(f"densenet-fast train: error: {exc}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """The command: train(args), a TrainError printed as one line on stderr with exit status 2.
    Wire it as `parser.set_defaults(func=run)` next to add_train_arguments(parser)."""
    try:
        train(args)
    except TrainError as exc:
        return _fail(exc)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m densenet_fast.train [options]; returns the exit status."""
    try:
        return run(build_parser().parse_args(argv))
    except TrainError as exc:  # a usage error found by the parser
        return _fail(exc)
    except KeyboardInterrupt:
        print("densenet-fast train: interrupted", file=sys.stderr)
        return 130
