"""Datasets of `densenet-fast train` and their per-epoch, per-process batches.

Every random choice in the data is a function of (seed, epoch, rank), never of a running state, so
an epoch's batches are the same whether or not the run was interrupted before it (exact resume):
  order:        torch's DistributedSampler(seed=seed).set_epoch(epoch): one permutation per epoch
                shared by all processes, each taking every world_size-th index (padded to equal
                length, so every process runs the same number of steps);
  augmentation: a torch.Generator seeded from (seed, epoch, rank) for the in-memory datasets, or
                the DataLoader's generator (which seeds its workers) for imagefolder.
The test set is split rank::world_size without padding, so reduced counts are exact.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler

from .options import TrainError

Batch = Tuple[Tensor, Tensor]

# The label of an unlabelled pixel (CamVid's "void", a crop's padding): F.cross_entropy's default
# ignore_index, so the loss skips it without being told, and the metrics skip it too.
IGNORE_INDEX = -100

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CifarLayout:
    title: str
    folder: str  # the folder the official archive unpacks to
    train: Tuple[str, ...]
    test: Tuple[str, ...]
    label_key: str
    num_classes: int


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                           ("test_batch",), "labels", 10),
    "cifar100": CifarLayout("CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels", 100),
}


class Batches:
    """An epoch's batches: iterable (several times) and sized."""

    def __init__(self, make_iter: Callable[[], Iterator[Batch]], length: int) -> None:
        self._make_iter = make_iter
        self._length = length

    def __iter__(self) -> Iterator[Batch]:
        return self._make_iter()

    def __len__(self) -> int:
        return self._length


class TensorSplit:
    """An in-memory split.  images: (N, C, H, W), uint8 in 0..255 or float in 0..1 (synthetic: any
    float); labels: (N,) int64, or (N, H, W) per-pixel labels (segmentation; IGNORE_INDEX where
    unlabelled).  Batches are normalised with (mean, std) per channel and, when a generator is
    given, augmented on the device: zero-pad by `pad` and crop back at a random offset, or crop
    `crop` x `crop` at a random offset, and a horizontal flip with probability 1/2 if `flip`.  A
    per-pixel label map is cropped and flipped with its image; padded pixels are unlabelled."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float], pad: int = 0,
                 flip: bool = False, crop: Optional[int] = None) -> None:
        self.images, self.labels = images, labels.long()
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.pad, self.flip, self.crop = pad, flip, crop

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, indices: List[int], batch_size: int, device: torch.device, generator: Optional[torch.Generator],
                channels_last: bool, workers: int = 0) -> Batches:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        mean, std = self.mean.to(device), self.std.to(device)

        def make_iter() -> Iterator[Batch]:
            for start in range(0, len(indices), batch_size):
                idx = torch.tensor(indices[start:start + batch_size])
                x = self.images[idx].to(device, non_blocking=True)
                y = self.labels[idx].to(device, non_blocking=True)
                x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
                if generator is not None:
                    x, y = self._augment(x, y, generator)
                x = ((x - mean) / std).contiguous(memory_format=fmt)
                yield x, y

        return Batches(make_iter, math.ceil(len(indices) / batch_size))


    def _augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        if y.dim() == 1:
            return random_crop_flip(x, self.pad, self.flip, generator, self.crop), y
        # The label map rides along as one more channel, shifted by one so that padding (zeros)
        # reads back as IGNORE_INDEX: every image gets the same crop and flip as its labels.
        both = torch.cat([x, (y.unsqueeze(1) - IGNORE_INDEX).to(x.dtype)], 1)
        both = random_crop_flip(both, self.pad, self.flip, generator, self.crop)
        return both[:, :-1], both[:, -1].round().long() + IGNORE_INDEX


def random_crop_flip(x: Tensor, pad: int, flip: bool, generator: torch.Generator, crop: Optional[int] = None
                     ) -> Tensor:
    """x: (N, C, H, W).  Per image: zero-pad by `pad`, crop H x W (or crop x crop) at a random offset
    (torchvision's RandomCrop(size, padding=pad)), then flip left-right with probability 1/2.  The
    random numbers come from `generator` (on the CPU, whatever x's device) so they do not depend on
    the device."""
    n, _, h, w = x.shape
    out_h, out_w = (h, w) if crop is None else (crop, crop)
    if pad or (out_h, out_w) != (h, w):
        span_h, span_w = h + 2 * pad - out_h + 1, w + 2 * pad - out_w + 1
        if span_h < 1 or span_w < 1:
            raise ValueError(f"random_crop_flip: cannot crop {out_h}x{out_w} from {h}x{w} images padded by {pad}")
        if span_h == span_w:
            offsets = torch.randint(0, span_h, (2, n), generator=generator)
        else:
            offsets = torch.stack([torch.randint(0, span_h, (n,), generator=generator),
                                   torch.randint(0, span_w, (n,), generator=generator)])
        rows = (offsets[0, :, None] + torch.arange(out_h)).to(x.device)
        cols = (offsets[1, :, None] + torch.arange(out_w)).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (N, H + 2p, W + 2p, C)
        images = torch.arange(n, device=x.device)[:, None, None]
        x = padded[images, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


class FolderSplit:
    """A split read from image files through a torch Dataset (imagefolder): a DataLoader with
    `workers` processes decodes and transforms the images, seeded by the generator."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, indices: List[int], batch_size: int, device: torch.device, generator: Optional[torch.Generator],
                channels_last: bool, workers: int = 0) -> Batches:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=batch_size, sampler=indices, num_workers=workers,
                                             generator=generator, pin_memory=device.type == "cuda")

        def make_iter() -> Iterator[Batch]:
            for x, y in loader:
                yield x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True)

        return Batches(make_iter, len(loader))


@dataclass
class Data:
    train: "TensorSplit | FolderSplit"
    test: "TensorSplit | FolderSplit"
    in_channels: int
    num_classes: int
    image_size: int
    description: str
    segmentation: bool = False  # per-pixel labels (N, H, W), IGNORE_INDEX where unlabelled


def train_indices(n: int, epoch: int, seed: int, rank: int, world_size: int) -> List[int]:
    """This process's share of epoch `epoch`'s permutation of range(n) (DistributedSampler's)."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_indices(n: int, rank: int, world_size: int) -> List[int]:
    return list(range(rank, n, world_size))


def augmentation_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    # hash() of a tuple of ints is deterministic (PYTHONHASHSEED only salts str and bytes).
    return torch.Generator().manual_seed(hash((seed, epoch, rank)) & (2 ** 63 - 1))


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _subset(n: int, limit: Optional[int]) -> Optional[Tensor]:
    """A fixed random subset of range(n) of size `limit` (None: all); fixed so that every run,
    whatever its --seed, sees the same images."""
    if limit is None or limit >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:limit].sort().values


def _limit(images: Tensor, labels: Tensor, limit: Optional[int]) -> Tuple[Tensor, Tensor]:
    keep = _subset(len(labels), limit)
    return (images, labels) if keep is None else (images[keep], labels[keep])


def _check_dir(data_dir: str) -> str:
    if not os.path.exists(data_dir):
        raise TrainError(f"--data-dir {data_dir}: no such directory")
    if not os.path.isdir(data_dir):
        raise TrainError(f"--data-dir {data_dir}: not a directory")
    return data_dir


def find_cifar(data_dir: str, layout: CifarLayout) -> str:
    """The folder holding the batches: data_dir itself or data_dir/<the archive's folder>."""
    _check_dir(data_dir)
    for root in (data_dir, os.path.join(data_dir, layout.folder)):
        if all(os.path.isfile(os.path.join(root, f)) for f in layout.train + layout.test):
            return root
    names = f"{layout.train[0][:-1]}1..{len(layout.train)}" if len(layout.train) > 1 else layout.train[0]
    raise TrainError(f"--data-dir {data_dir}: no {layout.title} python batches ({names} and {layout.test[0]}) in it "
                     f"or in {os.path.join(data_dir, layout.folder)}")


def read_cifar_batch(path: str, layout: CifarLayout) -> Tuple[Tensor, Tensor]:
    """One pickled batch -> images (N, 3, 32, 32) uint8, labels (N,) int64; TrainError if it is not one."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # any unpickling failure means "not the python batch format"
        raise TrainError(f"{path}: not a {layout.title} python batch ({_one_line(exc)})") from None
    if not isinstance(batch, dict):
        raise TrainError(f"{path}: not a {layout.title} python batch (a {type(batch).__name__}, expected a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or layout.label_key not in batch:
        raise TrainError(f"{path}: not a {layout.title} python batch (keys {sorted(batch)[:6]}, expected 'data' and "
                         f"{layout.label_key!r})")
    try:
        images = torch.as_tensor(batch["data"])
        labels = torch.as_tensor(batch[layout.label_key], dtype=torch.int64)
    except Exception as exc:
        raise TrainError(f"{path}: not a {layout.title} python batch ({_one_line(exc)})") from None
    if images.dtype != torch.uint8 or images.dim() != 2 or images.shape[1] != 3 * 32 * 32:
        raise TrainError(f"{path}: 'data' is {images.dtype} {tuple(images.shape)}, expected uint8 (N, 3072)")
    if labels.shape != (images.shape[0],) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max())
                                              < layout.num_classes):
        raise TrainError(f"{path}: {layout.label_key!r} must be {images.shape[0]} labels in 0..{layout.num_classes - 1}")
    return images.view(-1, 3, 32, 32), labels


def load_cifar(args, layout: CifarLayout) -> Data:
    root = find_cifar(args.data_dir, layout)
    splits = []
    for files, limit in ((layout.train, args.train_samples), (layout.test, args.test_samples)):
        parts = [read_cifar_batch(os.path.join(root, f), layout) for f in files]
        images, labels = _limit(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), limit)
        splits.append((images, labels))
    (xtr, ytr), (xte, yte) = splits
    return Data(TensorSplit(xtr, ytr, CIFAR_MEAN, CIFAR_STD, pad=4, flip=True),
                TensorSplit(xte, yte, CIFAR_MEAN, CIFAR_STD), 3, layout.num_classes, 32,
                f"{layout.title} from {root}: {len(ytr)} train / {len(yte)} test images, 32x32, random crop + flip")


def load_digits(args) -> Data:
    """sklearn's 8x8 digits (1797 images, 16 grey levels), split 75/25 stratified with a fixed seed."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise TrainError("--dataset digits needs scikit-learn (pip install scikit-learn)") from None
    digits = sk_load_digits()
    xtr, xte, ytr, yte = train_test_split(digits.images, digits.target, test_size=0.25, stratify=digits.target,
                                          random_state=0)
    size = args.image_size
    split = []
    for x, y, limit in ((xtr, ytr, args.train_samples), (xte, yte, args.test_samples)):
        images = torch.as_tensor(x, dtype=torch.float32).unsqueeze(1) / 16
        if size != 8:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        split.append(_limit(images, torch.as_tensor(y, dtype=torch.int64), limit))
    (xtr, ytr), (xte, yte) = split
    mean, std = float(xtr.mean()), float(xtr.std())
    return Data(TensorSplit(xtr, ytr, (mean,), (std,)), TensorSplit(xte, yte, (mean,), (std,)), 1, 10, size,
                f"digits (sklearn): {len(ytr)} train / {len(yte)} test images, {size}x{size} grey, no augmentation")


def load_synthetic(args) -> Data:
    """Random images whose class adds a fixed random pattern: learnable, so the loss must fall."""
    gen = torch.Generator().manual_seed(args.seed)
    size, k = args.image_size, args.num_classes
    patterns = torch.randn(k, 3, size, size, generator=gen)
    splits = []
    for n in (args.train_samples or 512, args.test_samples or 128):
        labels = torch.randint(0, k, (n,), generator=gen)
        splits.append((torch.randn(n, 3, size, size, generator=gen) + patterns[labels], labels))
    (xtr, ytr), (xte, yte) = splits
    mean, std = (0.0,) * 3, (1.0,) * 3
    return Data(TensorSplit(xtr, ytr, mean, std), TensorSplit(xte, yte, mean, std), 3, k, size,
                f"synthetic: {len(ytr)} train / {len(yte)} test images, {size}x{size}, {k} classes")


SHAPES_CLASSES = ("background", "square", "disc", "triangle")


def make_shapes(n: int, size: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """n images (n, 3, size, size) of 1-3 random squares, discs and upward triangles over a noisy
    background, each shape in a random colour (so only its form tells its class), and their label
    maps (n, size, size): 0 background, 1 square, 2 disc, 3 triangle (a later shape covers an
    earlier one).  A synthetic segmentation task that needs spatial context, not colour."""
    gen = generator
    ys = torch.arange(size, dtype=torch.float32).view(size, 1) + 0.5
    xs = torch.arange(size, dtype=torch.float32).view(1, size) + 0.5
    images = torch.rand(n, 3, 1, 1, generator=gen) + 0.15 * torch.randn(n, 3, size, size, generator=gen)
    labels = torch.zeros(n, size, size, dtype=torch.int64)
    counts = torch.randint(1, 4, (n,), generator=gen).tolist()
    for i, count in enumerate(counts):
        for _ in range(count):
            kind = int(torch.randint(1, len(SHAPES_CLASSES), (1,), generator=gen))
            r = float(torch.empty(1).uniform_(0.15 * size, 0.3 * size, generator=gen))
            cy, cx = torch.empty(2).uniform_(r, size - r, generator=gen).tolist()
            dy, dx = ys - cy, xs - cx
            if kind == 1:
                mask = (dy.abs() <= 0.85 * r) & (dx.abs() <= 0.85 * r)
            elif kind == 2:
                mask = dy ** 2 + dx ** 2 <= r ** 2
            else:
                mask = (dy <= 0.7 * r) & (dy >= -r) & (dx.abs() <= 0.6 * (dy + r))
            colour = torch.rand(3, 1, 1, generator=gen) + 0.15 * torch.randn(3, size, size, generator=gen)
            images[i] = torch.where(mask, colour, images[i])
            labels[i][mask] = kind
    return images, labels


def load_shapes(args) -> Data:
    """make_shapes images (fixed: the same for every --seed), flipped at random in training."""
    size = args.image_size
    splits = [make_shapes(n, size, torch.Generator().manual_seed(seed))
              for n, seed in ((args.train_samples or 512, 0), (args.test_samples or 128, 1))]
    (xtr, ytr), (xte, yte) = splits
    mean, std = xtr.mean((0, 2, 3)).tolist(), xtr.std((0, 2, 3)).tolist()
    return Data(TensorSplit(xtr, ytr, mean, std, flip=True), TensorSplit(xte, yte, mean, std), 3,
                len(SHAPES_CLASSES), size,
                f"shapes (synthetic segmentation): {len(ytr)} train / {len(yte)} test images, {size}x{size}, "
                f"{len(SHAPES_CLASSES)} classes ({', '.join(SHAPES_CLASSES)}), random flip", segmentation=True)


# CamVid as the SegNet tutorial distributes it (and the FC-DenseNet paper used it): 11 classes,
# label 11 is "void" (unlabelled, ignored).
CAMVID_CLASSES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian",
                  "bicyclist")
CAMVID_VOID = 11


def read_camvid_split(root: str, split: str, limit: Optional[int]) -> Tuple[Tensor, Tensor]:
    """root/<split>/*.png images and root/<split>annot/*.png label maps of the same names ->
    images (N, 3, H, W) uint8, labels (N, H, W) int64 with void as IGNORE_INDEX."""
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        raise TrainError("--dataset camvid needs numpy and Pillow (pip install numpy pillow)") from None
    image_dir, label_dir = os.path.join(root, split), os.path.join(root, split + "annot")
    for folder in (image_dir, label_dir):
        if not os.path.isdir(folder):
            raise TrainError(f"--data-dir {root}: no {os.path.basename(folder)}/ folder (camvid expects the SegNet "
                             f"tutorial's layout: train/, trainannot/, test/, testannot/ of .png files)")
    names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(".png"))
    if not names:
        raise TrainError(f"--data-dir {root}: no .png images in {image_dir}")
    keep = _subset(len(names), limit)
    if keep is not None:
        names = [names[i] for i in keep.tolist()]
    images, labels = [], []
    for name in names:
        label_path = os.path.join(label_dir, name)
        if not os.path.isfile(label_path):
            raise TrainError(f"--data-dir {root}: {split}/{name} has no label map {split}annot/{name}")
        try:
            image = np.asarray(Image.open(os.path.join(image_dir, name)).convert("RGB"))
            label = np.asarray(Image.open(label_path))
        except Exception as exc:  # PIL raises several kinds for a file that is not an image
            raise TrainError(f"--data-dir {root}: cannot read {split}/{name} or its label map ({_one_line(exc)})") \
                from None
        if label.ndim != 2 or label.shape != image.shape[:2]:
            raise TrainError(f"--data-dir {root}: {split}annot/{name} is {label.shape}, expected one channel of the "
                             f"image's size {image.shape[:2]}")
        if images and image.shape != images[0].shape:
            raise TrainError(f"--data-dir {root}: {split}/{name} is {image.shape[1]}x{image.shape[0]}, the others "
                             f"{images[0].shape[1]}x{images[0].shape[0]} (camvid images share one size)")
        if int(label.max()) > CAMVID_VOID:
            raise TrainError(f"--data-dir {root}: {split}annot/{name} has label {int(label.max())}, expected 0..10 "
                             f"and {CAMVID_VOID} (void)")
        images.append(image)
        labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.stack(labels).astype(np.int64))
    y[y == CAMVID_VOID] = IGNORE_INDEX
    return x, y


def load_camvid(args) -> Data:
    """CamVid (SegNet tutorial layout): train on train/, test on test/ at full size (val/ unused);
    random --image-size crops and flips in training (the FC-DenseNet paper's 224x224)."""
    root = _check_dir(args.data_dir)
    (xtr, ytr), (xte, yte) = (read_camvid_split(root, split, limit)
                              for split, limit in (("train", args.train_samples), ("test", args.test_samples)))
    size = args.image_size
    if size > min(xtr.shape[2:]):
        raise TrainError(f"--image-size {size}: the training crops must fit the {xtr.shape[3]}x{xtr.shape[2]} images")
    pixels = xtr.float() / 255
    mean, std = pixels.mean((0, 2, 3)).tolist(), pixels.std((0, 2, 3)).tolist()
    del pixels
    return Data(TensorSplit(xtr, ytr, mean, std, flip=True, crop=size), TensorSplit(xte, yte, mean, std), 3,
                len(CAMVID_CLASSES), size,
                f"CamVid from {root}: {len(ytr)} train / {len(yte)} test images, {xte.shape[3]}x{xte.shape[2]}, "
                f"{len(CAMVID_CLASSES)} classes (void ignored), random {size}x{size} crops + flip", segmentation=True)


def load_imagefolder(args) -> Data:
    """DATA_DIR/train and DATA_DIR/val in torchvision.datasets.ImageFolder's layout (one folder per
    class).  Train: RandomResizedCrop + flip; val: resize to size*256/224 and centre crop."""
    from torchvision import datasets, transforms

    root = _check_dir(args.data_dir)
    size = args.image_size
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    tfs = {"train": transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] + norm),
           "val": transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)] + norm)}
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise TrainError(f"--data-dir {root}: no {split}/ folder (imagefolder expects {root}/train/<class>/... "
                             f"and {root}/val/<class>/...)")
    sets = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        try:
            sets[split] = datasets.ImageFolder(folder, transform=tfs[split])
        except (FileNotFoundError, RuntimeError) as exc:
            raise TrainError(f"--data-dir {folder}: not an image folder ({_one_line(exc)})") from None
    if sets["train"].classes != sets["val"].classes:
        raise TrainError(f"--data-dir {root}: train/ has {len(sets['train'].classes)} classes and val/ "
                         f"{len(sets['val'].classes)}, or they are named differently")
    subsets = []
    for split, limit in (("train", args.train_samples), ("val", args.test_samples)):
        keep = _subset(len(sets[split]), limit)
        subsets.append(sets[split] if keep is None else torch.utils.data.Subset(sets[split], keep.tolist()))
    train, val = subsets
    return Data(FolderSplit(train), FolderSplit(val), 3, len(sets["train"].classes), size,
                f"imagefolder {root}: {len(train)} train / {len(val)} val images, {len(sets['train'].classes)} classes, "
                f"{size}x{size} crops")


def load_data(args) -> Data:
    """The dataset named by args.dataset (args as resolved by options.resolve); TrainError when the
    data are missing or malformed."""
    if args.dataset in CIFAR_LAYOUTS:
        return load_cifar(args, CIFAR_LAYOUTS[args.dataset])
    return {"digits": load_digits, "synthetic": load_synthetic, "imagefolder": load_imagefolder, "shapes": load_shapes,
            "camvid": load_camvid}[args.dataset](args)
