"""Model preparation and the training / evaluation loops of `densenet-fast train`.

The loops take any sized iterable of (x, y) batches already on the device, so the tests drive them
with hand-made batches (float64, split across processes) exactly as train() drives them with the
dataset's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import densenet_fast

from ..models import is_segmentation_model
from ..models.densenet import PRETRAINED_MODELS, torchvision_weights
from .distributed import DistEnv, all_reduce
from .options import SEGMENTATION_DATASETS, TrainError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(args, in_channels: int, num_classes: int, device: Optional[torch.device] = None) -> nn.Module:
    """The model named by args.model; TrainError for an unknown name or impossible configuration.
    Build it on torch.device("meta") to check the name (and args.weights) without allocating or
    downloading anything.

    args.weights (torchvision's pretrained weights): loaded into the model, whose classifier is
    then replaced by a new nn.Linear (torchvision's initialisation: zero bias) when num_classes
    differs from the weights' categories.

    The segmentation datasets (per-pixel labels) take the FC-DenseNets, the others classifiers."""
    segmentation = is_segmentation_model(args.model)
    if segmentation != (args.dataset in SEGMENTATION_DATASETS):
        if segmentation:
            raise TrainError(f"--model {args.model} is a segmentation model (per-pixel logits); --dataset "
                             f"{args.dataset} has one label per image: use a DenseNet classifier, or a segmentation "
                             f"dataset ({', '.join(SEGMENTATION_DATASETS)})")
        raise TrainError(f"--model {args.model} is a classifier; --dataset {args.dataset} has per-pixel labels: use "
                         "fc_densenet56/67/103 or fc_densenet_<levels>_<layers>_<k>")
    weights = getattr(args, "weights", None)
    kwargs = dict(memory_efficient=not args.naive, backend=args.backend, drop_rate=args.drop_rate)
    if segmentation:
        if args.save_bottleneck:
            raise TrainError(f"--save-bottleneck: {args.model}'s layers have no bottleneck")
    else:
        kwargs["save_bottleneck"] = args.save_bottleneck
    if weights is not None:
        if args.model not in PRETRAINED_MODELS:
            raise TrainError(f"--weights: torchvision has pretrained weights for {', '.join(PRETRAINED_MODELS)}, "
                             f"not --model {args.model}")
        if in_channels != 3:
            raise TrainError(f"--weights: torchvision's weights take 3-channel images, the dataset's have "
                             f"{in_channels}")
        try:
            torchvision_weights(args.model, weights)
        except (ValueError, TypeError, ImportError) as exc:
            raise TrainError(f"--weights {weights}: {' '.join(str(exc).split())}") from None
        if device is None or device.type != "meta":
            return _pretrained(args.model, weights, num_classes, device, kwargs)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return densenet_fast.models.get_model(args.model, num_classes=num_classes, in_channels=in_channels,
                                                  **kwargs)
    except (ValueError, TypeError) as exc:
        raise TrainError(f"--model {args.model}: {' '.join(str(exc).split())}") from None


def _pretrained(name: str, weights: str, num_classes: int, device: Optional[torch.device], kwargs: dict
                ) -> nn.Module:
    try:
        model = densenet_fast.models.get_model(name, weights=weights, **kwargs)
    except OSError as exc:  # the download (urllib's errors are OSErrors)
        raise TrainError(f"--weights {weights}: could not get torchvision's weights: {exc}") from None
    if model.classifier.out_features != num_classes:
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
        nn.init.constant_(model.classifier.bias, 0)
    return model.to(device) if device is not None else model


@dataclass
class Prepared:
    """model: what the training loop calls (DDP and/or torch.compile around `raw`);
    raw: the bare module (state_dict, evaluation); ddp: the DDP wrapper, if any (no_sync)."""

    model: nn.Module
    raw: nn.Module
    ddp: Optional[DistributedDataParallel]


def apply_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """densenet_fast.convert_sync_batchnorm: the efficient blocks, transitions and head reduce their
    statistics across the group, and any plain BatchNorm left becomes torch.nn.SyncBatchNorm, which
    runs on GPUs only (hence the CPU check)."""
    convert = getattr(densenet_fast, "convert_sync_batchnorm", None)
    if convert is None:
        raise TrainError("--sync-bn needs densenet_fast.convert_sync_batchnorm, which this installation lacks")
    model = convert(model)
    plain = [name for name, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    if plain and device.type != "cuda":
        raise TrainError(f"--sync-bn on the CPU: {len(plain)} plain BatchNorm layers (e.g. {plain[0]}) would need "
                         f"torch.nn.SyncBatchNorm, which runs on GPUs only; use the memory-efficient model or CUDA")
    return model


def prepare_model(model: nn.Module, device: torch.device, env: DistEnv, *, sync_bn: bool = False,
                  channels_last: bool = False, compile: bool = False) -> Prepared:
    """Move `model` to the device (and memory format), synchronize its batch norm, wrap it in DDP
    when there are several processes, and compile it.  DDP broadcasts rank 0's weights."""
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    if sync_bn and env.distributed:
        model = apply_sync_batchnorm(model, device)
    ddp = None
    wrapped: nn.Module = model
    if env.distributed:
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped = ddp
    if compile:
        wrapped = torch.compile(wrapped)
    return Prepared(wrapped, model, ddp)


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum and weight decay on every parameter (Huang et al. 2017)."""
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0,
                           weight_decay=args.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, args) -> torch.optim.lr_scheduler.MultiStepLR:
    """lr / 10 at each milestone (fractions of the epochs), stepped once per epoch."""
    milestones = sorted({max(1, round(m * args.epochs)) for m in args.milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class Totals:
    """Running sums of one pass (loss * images, correct, labels counted, images) kept on the device:
    no host sync per step.  With num_classes (segmentation: labels (N, H, W), a negative label
    unlabelled) also the confusion matrix of the labelled pixels, for the mean IoU."""

    def __init__(self, device: torch.device, num_classes: Optional[int] = None) -> None:
        self.num_classes = num_classes
        self.sums = torch.zeros(4 + (num_classes or 0) ** 2, dtype=torch.float64, device=device)

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        n = y.shape[0]
        pred = logits.argmax(1)
        labelled = y >= 0
        correct = ((pred == y) & labelled).sum()
        head = torch.stack([loss.detach().double() * n, correct.double(), labelled.sum().double(),
                            torch.tensor(float(n), dtype=torch.float64, device=y.device)])
        if self.num_classes is None:
            self.sums += head
            return
        c = self.num_classes
        cells = torch.bincount((y[labelled] * c + pred[labelled]).flatten(), minlength=c * c)  # row: label
        self.sums += torch.cat([head, cells.double()])

    def reduce(self, env: DistEnv) -> dict:
        """{"loss": mean loss per image, "acc": the fraction of labels (images, or labelled pixels)
        predicted right, "images": count} over all processes; with num_classes also "miou": the
        mean over classes of |label & prediction| / |label | prediction| (classes that neither
        occur nor are predicted left out)."""
        sums = all_reduce(self.sums.clone(), env)
        loss_sum, correct, counted, images = sums[:4].tolist()
        out = {"loss": loss_sum / max(images, 1), "acc": correct / max(counted, 1), "images": int(images)}
        if self.num_classes is not None:
            confusion = sums[4:].view(self.num_classes, self.num_classes)
            hits = confusion.diagonal()
            union = confusion.sum(0) + confusion.sum(1) - hits
            present = union > 0
            out["miou"] = (hits[present] / union[present]).mean().item() if bool(present.any()) else 0.0
        return out


class GraphedTrainStep:
    """--cuda-graph: the training step as one CUDA graph (densenet_fast.GraphedStep), captured at the
    first batch and replayed for every batch of its shape.

    Capturing runs a few eager warm-up steps; the model's buffers (running statistics, batch
    counters) are put back afterwards, so the captured run follows the eager one step for step.
    Calling returns (logits, loss) of the replay, or None for a batch of another shape (the caller
    runs that one eagerly)."""

    def __init__(self, model: nn.Module, amp: str = "none") -> None:
        self.model, self.amp = model, amp
        self.step = None
        self.replays = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if self.step is None:
            from ..graphs import GraphedStep

            saved = [b.detach().clone() for b in self.model.buffers()]
            self.step = GraphedStep(self.model, F.cross_entropy, x, y, autocast_dtype=AMP_DTYPES[self.amp])
            with torch.no_grad():
                for b, old in zip(self.model.buffers(), saved):
                    b.copy_(old)
        elif x.shape != self.step.x.shape or y.shape != self.step.y.shape:
            return None
        loss = self.step(x, y)
        self.replays += 1
        return self.step.output, loss


def train_epoch(prepared: Prepared, batches: Iterable, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, device: torch.device, amp: str = "none", accum_steps: int = 1,
                on_step: Optional[Callable[[int], None]] = None,
                graphed: Optional[GraphedTrainStep] = None, num_classes: Optional[int] = None) -> Totals:
    """One pass over `batches` (sized), one optimizer step per `accum_steps` micro-batches.

    Each micro-batch's mean loss is divided by the number of micro-batches in its group (the last
    group of an epoch may be short), so a group's gradient is the mean of its micro-batches'; DDP
    all-reduces only on a group's last micro-batch (no_sync before).  graphed: replay each batch
    of the captured shape through it (accum_steps 1, no loss scaling; options.resolve checks).
    num_classes: segmentation (per-pixel labels): Totals keeps the confusion matrix.  The loss is
    F.cross_entropy's, whose default ignore_index (-100, data.IGNORE_INDEX) skips unlabelled pixels.
    """
    prepared.model.train()
    totals = Totals(device, num_classes)
    n = len(batches)  # type: ignore[arg-type]
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        replayed = graphed(x, y) if graphed is not None else None
        if replayed is not None:
            logits, loss = replayed
            optimizer.step()
            # the next replay re-points p.grad at the captured gradients; an eager step must not
            # accumulate into them
            optimizer.zero_grad(set_to_none=True)
            totals.add(logits, y, loss)
            if on_step is not None:
                on_step(i)
            continue
        group_start = i - i % accum_steps
        group_size = min(accum_steps, n - group_start)
        last = i == group_start + group_size - 1
        sync = contextlib.nullcontext() if last or prepared.ddp is None else prepared.ddp.no_sync()
        with sync:
            with autocast(device, amp):
                logits = prepared.model(x)
                loss = F.cross_entropy(logits.float(), y)
            scaler.scale(loss / group_size).backward()
        if last:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        totals.add(logits.detach(), y, loss.detach())
        if on_step is not None:
            on_step(i)
    return totals


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, device: torch.device, amp: str = "none",
             num_classes: Optional[int] = None) -> Totals:
    """Loss and accuracy sums of `model` in eval mode (running statistics) over `batches`
    (num_classes: segmentation, as train_epoch's)."""
    model.eval()
    totals = Totals(device, num_classes)
    for x, y in batches:
        with autocast(device, amp):
            logits = model(x)
        totals.add(logits, y, F.cross_entropy(logits.float(), y))
    return totals
