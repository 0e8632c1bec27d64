"""The options of `densenet-fast train`, their per-dataset defaults, and their validation.

Options whose sensible value depends on the dataset (model, epochs, batch size, learning rate,
schedule, image size) default to None on the command line and are filled in from
DATASET_DEFAULTS by `resolve`; an explicit value always wins.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .._paths import path_problem
from ..backends import BACKENDS

DESCRIPTION = ("Train a densenet_fast DenseNet (SGD, Nesterov momentum, lr / 10 at 50% and 75% of the epochs) "
               "on one process or under torchrun (DDP).  Writes OUTPUT_DIR/metrics.csv, curves.png and "
               "checkpoints/last.pt every epoch; the last line on stdout is 'final test accuracy: X', X a "
               "fraction with 4 decimals (0.9733 = 97.33%).")

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic", "shapes", "camvid")
SEGMENTATION_DATASETS = ("shapes", "camvid")  # per-pixel labels: FC-DenseNet models
AMP_MODES = ("none", "bf16", "fp16")


SHAPES_EPOCHS = 20


class TrainError(ValueError):
    """A bad request (missing or malformed data, unknown model, impossible option): the command
    prints its message as one line on stderr and exits with status 2."""


@dataclass(frozen=True)
class Defaults:
    model: str
    epochs: int
    batch_size: int
    lr: float
    milestones: Tuple[float, ...]  # fractions of --epochs at which the lr is divided by 10
    image_size: Optional[int]  # None: the dataset's native size
    threads: Optional[int] = None  # torch.set_num_threads; None: torch's default
    drop_rate: float = 0.0


DATASET_DEFAULTS = {
    # The offline demo, tuned to pass 95% test accuracy in well under a minute of CPU time: the 8x8
    # images are used as they are (in_channels=1; the two transitions pool 8 -> 4 -> 2) by a
    # 20k-parameter DenseNet-BC, on one thread: 8x8 convolutions are too small for intra-op
    # parallelism to pay, and on a shared 2-core machine a second thread made it 6x slower.
    "digits": Defaults("densenet_bc_16_8", 8, 32, 0.1, (0.5, 0.75), 8, threads=1),
    # Huang et al. 2017, section 4.2: batch 64, 300 epochs, lr 0.1 / 10 at 50% and 75%.
    "cifar10": Defaults("densenet_bc_100_12", 300, 64, 0.1, (0.5, 0.75), None),
    "cifar100": Defaults("densenet_bc_100_12", 300, 64, 0.1, (0.5, 0.75), None),
    # The paper's ImageNet recipe: batch 256, 90 epochs, lr 0.1 / 10 at epochs 30 and 60.
    "imagefolder": Defaults("densenet121", 90, 256, 0.1, (1 / 3, 2 / 3), 224),
    "synthetic": Defaults("densenet_bc_40_12", 2, 64, 0.1, (0.5, 0.75), 32),
    # The offline segmentation demo: a small FC-DenseNet (3 poolings, 2 layers per block, growth 8).
    "shapes": Defaults("fc_densenet_3_2_8", SHAPES_EPOCHS, 16, 0.1, (0.5, 0.75), 32, threads=2),
    # FC-DenseNet103 on CamVid: the paper's batch size, 224x224 training crops and dropout 0.2,
    # but this command's SGD (the paper used RMSprop at lr 1e-3); not tuned on the real data here.
    "camvid": Defaults("fc_densenet103", 300, 3, 0.01, (0.5, 0.75), 224, drop_rate=0.2),
}

# The options that determine the training trajectory: a checkpoint records them and --resume
# refuses a run that changes any of them (the resumed run would not be the interrupted one).
TRAJECTORY_OPTIONS = ("dataset", "model", "naive", "save_bottleneck", "drop_rate", "epochs", "batch_size", "lr",
                      "momentum", "weight_decay", "milestones", "seed", "accum_steps", "amp", "image_size",
                      "num_classes", "train_samples", "test_samples", "channels_last", "sync_bn", "weights")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `densenet-fast train` to `parser` (returns it)."""
    d = DATASET_DEFAULTS
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="digits", choices=DATASETS,
                      help="digits (default; sklearn's 8x8 digits, offline), cifar10, cifar100 (python pickle "
                           "batches), imagefolder (DATA_DIR/train and DATA_DIR/val), synthetic (random tensors); "
                           "segmentation (per-pixel labels, FC-DenseNet models): shapes (synthetic, offline), "
                           "camvid (the SegNet tutorial's CamVid folder)")
    data.add_argument("--data-dir", help="dataset location (cifar10/100: the folder with the batches or its parent; "
                                         "imagefolder: the folder with train/ and val/; camvid: the folder with "
                                         "train/, trainannot/, test/, testannot/)")
    data.add_argument("--image-size", type=int, help="input height = width: digits are upsampled to it (default 8, "
                                                     "native), imagefolder and camvid training images are cropped "
                                                     "to it (default 224; camvid tests at full size), synthetic and "
                                                     "shapes are made at it (default 32); CIFAR is 32")
    data.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes (default 10)")
    data.add_argument("--train-samples", type=int, help="train on a fixed random subset of N images (synthetic: the "
                                                        "number generated, default 512)")
    data.add_argument("--test-samples", type=int, help="test on a fixed random subset of N images (synthetic: the "
                                                       "number generated, default 128)")
    data.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding imagefolder images "
                                                             "(default 4); the in-memory datasets are batched in "
                                                             "the main process and augmented on the device")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="densenet121/161/169/201/264, densenet_bc, densenet_bc_<depth>_<k>, "
                                       "densenet_<depth>_<k> (no bottleneck, e.g. densenet_40_12); for the "
                                       "segmentation datasets fc_densenet56/67/103 or fc_densenet_<levels>_<layers>_"
                                       "<k> (default: "
                                       + ", ".join(f"{k} {v.model}" for k, v in d.items()) + ")")
    model.add_argument("--naive", action="store_true", help="the naive model (memory_efficient=False: torch.cat "
                                                            "per layer) instead of the memory-efficient one")
    model.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="kernels of the memory-efficient model (default auto)")
    model.add_argument("--save-bottleneck", action="store_true",
                       help="keep the bottleneck activations for a faster backward (more memory)")
    model.add_argument("--drop-rate", type=float, help="dropout after each dense layer (default 0; camvid 0.2, "
                                                       "the FC-DenseNet paper's)")
    model.add_argument("--weights", help="start from torchvision's pretrained weights (densenet121/161/169/201; "
                                         "e.g. DEFAULT or IMAGENET1K_V1, downloaded by torchvision): fine-tuning. "
                                         "The classifier is replaced by a new one when the dataset has another "
                                         "number of classes than the weights; the images must have 3 channels")

    opt = parser.add_argument_group("optimisation (SGD, Nesterov momentum; lr divided by 10 at the milestones)")
    opt.add_argument("--epochs", type=int, help="default: " + ", ".join(f"{k} {v.epochs}" for k, v in d.items()))
    opt.add_argument("--batch-size", type=int, help="images per optimizer step per process, split into "
                                                    "--accum-steps micro-batches (default: "
                                                    + ", ".join(f"{k} {v.batch_size}" for k, v in d.items()) + ")")
    opt.add_argument("--lr", type=float, help="initial learning rate (default 0.1)")
    opt.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum, >= 0 (default 0.9; 0: plain SGD)")
    opt.add_argument("--weight-decay", type=float, default=1e-4, help=">= 0 (default 1e-4)")
    opt.add_argument("--milestones", type=float, nargs="+", metavar="FRACTION",
                     help="fractions of --epochs at which the lr is divided by 10 (default 0.5 0.75; "
                          "imagefolder 1/3 2/3)")
    opt.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation: micro-batches per "
                                                                "optimizer step (default 1)")
    opt.add_argument("--seed", type=int, default=0, help="seeds the weights, the data order and the "
                                                         "augmentation (default 0)")

    run = parser.add_argument_group("execution")
    run.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible, else cpu")
    run.add_argument("--amp", default="none", choices=AMP_MODES,
                     help="autocast to bf16 or fp16 (fp16 with a GradScaler); default none")
    run.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--cuda-graph", action="store_true",
                     help="capture the training step (forward, loss, backward) in one CUDA graph at the first "
                          "batch and replay it for every batch of that size (densenet_fast.GraphedStep): no "
                          "launch overhead; a smaller last batch runs eagerly. One GPU process; not with "
                          "--compile, --accum-steps > 1, --amp fp16, --sync-bn or --drop-rate")
    run.add_argument("--sync-bn", action="store_true", help="synchronized batch norm across the processes "
                                                            "(densenet_fast.convert_sync_batchnorm)")
    run.add_argument("--threads", type=int, help="torch.set_num_threads per process (default: digits 1, else torch's)")
    run.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True) and "
                                                                  "no cudnn autotuning")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="runs/train", help="metrics.csv and curves.png go here "
                                                                "(default runs/train)")
    out.add_argument("--checkpoint-dir", help="where last.pt is written after every epoch (default: "
                                              "OUTPUT_DIR/checkpoints)")
    out.add_argument("--resume", metavar="PATH", help="continue exactly from a checkpoint file (or a folder "
                                                      "holding last.pt)")
    out.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs of this invocation (e.g. to "
                                                                 "fit a job time limit); continue with --resume")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    return parser


def build_parser(prog: str = "densenet-fast train") -> argparse.ArgumentParser:
    """A stand-alone parser (python -m densenet_fast.train) whose usage errors are TrainErrors."""

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise TrainError(message)

    parser = _Parser(prog=prog, description=DESCRIPTION)
    return add_train_arguments(parser)


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise TrainError(f"--{name.replace('_', '-')} must be positive, got {value}")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of `args` with the dataset defaults filled in, checked; raises TrainError."""
    args = copy.copy(args)
    defaults = DATASET_DEFAULTS[args.dataset]
    for name in ("model", "epochs", "batch_size", "lr", "milestones", "image_size", "threads", "drop_rate"):
        if getattr(args, name, None) is None:
            setattr(args, name, getattr(defaults, name))
    args.milestones = tuple(float(m) for m in args.milestones)
    _positive(args, "epochs", "batch_size", "lr", "accum_steps", "image_size", "num_classes", "train_samples",
              "test_samples", "stop_after", "threads")
    if not math.isfinite(args.lr):
        raise TrainError(f"--lr must be a finite positive number, got {args.lr}")
    for name in ("momentum", "weight_decay"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise TrainError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.workers < 0:
        raise TrainError(f"--workers must be >= 0, got {args.workers}")
    if not 0 <= args.drop_rate < 1:
        raise TrainError(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
    if any(not 0 < m < 1 for m in args.milestones):
        raise TrainError(f"--milestones are fractions of --epochs in (0, 1), got {list(args.milestones)}")
    if args.batch_size % args.accum_steps:
        raise TrainError(f"--batch-size {args.batch_size} must be a multiple of --accum-steps {args.accum_steps} "
                         f"(it is split into micro-batches of equal size)")
    if args.dataset in ("cifar10", "cifar100", "imagefolder", "camvid") and not args.data_dir:
        raise TrainError(f"--dataset {args.dataset} needs --data-dir")
    if args.dataset in ("cifar10", "cifar100") and args.image_size not in (None, 32):
        raise TrainError(f"--image-size: CIFAR images are 32x32, got {args.image_size}")
    if getattr(args, "cuda_graph", False):
        # each of these needs the host in the middle of a step, which a replayed graph skips
        clash = [name for name, on in (("--compile", args.compile), ("--accum-steps > 1", args.accum_steps > 1),
                                       ("--amp fp16", args.amp == "fp16"), ("--sync-bn", args.sync_bn),
                                       ("--drop-rate > 0", args.drop_rate > 0)) if on]
        if clash:
            raise TrainError(f"--cuda-graph cannot be combined with {', '.join(clash)} (a captured step replays "
                             "without the host: no compilation, gradient accumulation, loss scaling, cross-process "
                             "statistics or host-seeded dropout masks)")
    _check_dir_option("--output-dir", args.output_dir)
    if args.checkpoint_dir is None:
        args.checkpoint_dir = os.path.join(args.output_dir, "checkpoints")
        _check_dir_option("--checkpoint-dir (default OUTPUT_DIR/checkpoints)", args.checkpoint_dir)
    else:
        _check_dir_option("--checkpoint-dir", args.checkpoint_dir)
    return args


def _check_dir_option(flag: str, path: str) -> None:
    """TrainError unless `path` is a directory or can be made one (its nearest existing ancestor is a
    directory): checked before any work, as the files are only written after the first epoch."""
    problem = path_problem(path, directory=True)
    if problem is not None:
        raise TrainError(f"{flag} {path}: {problem}")


def trajectory_config(args: argparse.Namespace) -> dict:
    """The options a checkpoint records and --resume compares (TRAJECTORY_OPTIONS)."""
    return {name: getattr(args, name) for name in TRAJECTORY_OPTIONS}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a command line of `densenet-fast train` (for tests and scripts); TrainError on a bad one."""
    return build_parser().parse_args(argv)
