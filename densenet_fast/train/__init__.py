"""`densenet-fast train`: train a densenet_fast model on CIFAR-10/100, an image folder, sklearn's
digits (the offline default) or synthetic data, in one process or several (torchrun + DDP).

    python -m densenet_fast.train                                  # digits, >= 95% in ~1 min on a CPU
    python -m densenet_fast.train --dataset cifar10 --data-dir ~/data --device cuda --amp bf16
    torchrun --nproc-per-node 4 -m densenet_fast.train --dataset cifar10 --data-dir ~/data --sync-bn
    python -m densenet_fast.train --dataset cifar10 --data-dir ~/data --resume runs/train/checkpoints

SGD with Nesterov momentum 0.9 and weight decay 1e-4; the learning rate is divided by 10 at 50% and
75% of the epochs (Huang et al. 2017; --milestones).  --batch-size is per process and per optimizer
step, so the global batch is batch_size * world_size.  After every epoch rank 0 prints one line,
rewrites OUTPUT_DIR/metrics.csv and curves.png, and saves CHECKPOINT_DIR/last.pt; --resume continues
exactly (bit-identical on the CPU with the same number of processes) because the checkpoint holds
every state and every random choice of the data is a function of (seed, epoch, rank).  The last
line on stdout is "final test accuracy: X", X a fraction (0.9733 = 97.33%) with 4 decimals.

Library use: `parser.set_defaults(func=run)` after `add_train_arguments(parser)` wires the command;
`train(args)` returns the metrics and the model and raises TrainError for a bad request.
"""

from .options import DATASET_DEFAULTS, DESCRIPTION, TrainError, add_train_arguments, build_parser, parse_args
from .trainer import main, run, train

__all__ = ["train", "run", "main", "add_train_arguments", "build_parser", "parse_args", "TrainError",
           "DATASET_DEFAULTS", "DESCRIPTION"]
