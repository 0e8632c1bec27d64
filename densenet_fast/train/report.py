"""What `densenet-fast train` shows and writes (rank 0 only): a progress bar on stderr (rich, else
tqdm, else none), one line per epoch on stdout, metrics.csv and curves.png."""

from __future__ import annotations

import csv
import os
import resource
import sys
from typing import List, Optional

import torch

CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "peak_memory_mb",
               "epoch_s")
SEGMENTATION_COLUMNS = ("train_miou", "test_miou")  # after CSV_COLUMNS on a segmentation dataset


class Progress:
    """A per-epoch progress bar on stderr, so that stdout holds only the epoch lines and the final
    result: rich if installed, else tqdm, else none; none either when stderr is not a terminal (a
    log file would collect the bar's redraws)."""

    def __init__(self, enabled: bool) -> None:
        self.kind = "none"
        if enabled and sys.stderr.isatty():
            for kind in ("rich", "tqdm"):
                try:
                    __import__(kind)
                except ImportError:
                    continue
                self.kind = kind
                break
        self._bar = None
        self._task = None

    def start(self, description: str, total: int) -> None:
        if self.kind == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                     transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)
        elif self.kind == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(self) -> None:
        if self.kind == "rich" and self._bar is not None:
            self._bar.advance(self._task)
        elif self.kind == "tqdm" and self._bar is not None:
            self._bar.update(1)

    def stop(self) -> None:
        if self._bar is not None:
            if self.kind == "rich":
                self._bar.stop()
            else:
                self._bar.close()
        self._bar = None


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: torch.cuda.max_memory_allocated since the last reset (per epoch); CPU: the process's
    peak resident set size so far (ru_maxrss, KiB on Linux), which never decreases."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2 ** 20  # macOS reports bytes


def epoch_line(row: dict, epochs: int) -> str:
    miou = "test_miou" in row
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}" + (f" mIoU {row['train_miou']:.4f}" if miou else "")
            + f"  test loss {row['test_loss']:.4f} acc {row['test_acc']:.4f}"
            + (f" mIoU {row['test_miou']:.4f}" if miou else "")
            + f"  {row['images_per_s']:.0f} img/s  peak {row['peak_memory_mb']:.0f} MiB  {row['epoch_s']:.1f} s")


def write_csv(history: List[dict], path: str) -> None:
    """The whole history (rewritten every epoch, so a resumed run's file has every epoch); on a
    segmentation dataset with the mean IoU columns too."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    columns = CSV_COLUMNS + (SEGMENTATION_COLUMNS if history and "test_miou" in history[0] else ())
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in columns})


def plot_curves(history: List[dict], path: str, title: str) -> Optional[str]:
    """Loss and accuracy (and mean IoU, on a segmentation dataset) against epochs (train and test)
    -> PNG; a note instead if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "curves.png skipped: matplotlib is not installed (pip install matplotlib)"
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, marker=".", label=split)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in history], style, marker=".", label=split)
        if f"{split}_miou" in history[0]:
            ax_acc.plot(epochs, [r[f"{split}_miou"] for r in history], style, marker="x", label=f"{split} mIoU")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy" + (" (pixels), mIoU" if "test_miou" in history[0] else ""),
               ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
