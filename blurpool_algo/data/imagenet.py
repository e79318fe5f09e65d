"""``imagenet``: ``root/train`` and ``root/val`` ImageFolder trees with the standard ResNet transforms.

A file that PIL cannot decode (truncated, or not an image) is skipped at read time with a warning, replaced by the next
readable sample and counted (:func:`bad_image_count`); more than ``max_bad_images`` of them per tree is a
:class:`TooManyBadImagesError`. Shift consistency follows the paper: Resize + CenterCrop to ``crop_size + max_shift``
(256 for 224 px crops shifted by up to 32).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, is_image_file

from blurpool_algo.data.specs import DataError, DataOptions, DatasetSpec
from blurpool_algo.metrics.protocol import PAPER_CROP_SIZE, PAPER_MAX_SHIFT

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageNetSpec",
    "TooManyBadImagesError",
    "bad_image_count",
    "consistency_transform",
    "eval_transform",
    "train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# What PIL raises for a file it cannot decode: UnidentifiedImageError (an OSError) for a file that is no image,
# OSError "image file is truncated" for one cut short, SyntaxError and ValueError from format plugins that meet
# malformed headers. Only the loader call is guarded, so the same errors from a transform still propagate.
_DECODE_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, ValueError)


# ---------------------------------------------------------------------------------------------------------- checks


def _has_image(directory: Path) -> bool:
    """Whether ImageFolder would find at least one image under ``directory`` (it walks subfolders, following links)."""
    # any() stops the walk at the first image: a class folder of ImageNet is not listed in full.
    return any(any(map(is_image_file, files)) for _, _, files in os.walk(directory, followlinks=True))


def _class_folders(split_dir: Path) -> list[str]:
    """Class folder names as ImageFolder finds them (sorted subdirectories), each checked to hold an image."""
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())
    if not classes:
        raise DataError(
            "data.root", f"{split_dir} has no class folders; expected {split_dir}{os.sep}<class>{os.sep}<image>"
        )
    # Every class must hold an image, as ImageFolder requires; checking now fails in seconds, not after a long scan.
    for cls in classes:
        if not _has_image(split_dir / cls):
            raise DataError(
                "data.root",
                f"class folder {split_dir / cls} holds no image file (extensions {', '.join(IMG_EXTENSIONS)})",
            )
    return classes


def _root(options: DataOptions) -> Path:
    """``options.root`` as a folder holding ``train/`` and ``val/``."""
    if options.root is None or str(options.root) == "":
        raise DataError(
            "data.root",
            "must be set for data.name='imagenet': a folder holding train/<class>/<image> and val/<class>/<image> "
            "(give data.root=/path/to/imagenet on the command line, or export IMAGENET_ROOT)",
        )
    path = Path(options.root).expanduser()
    if not path.exists():
        raise DataError("data.root", f"{path} does not exist")
    if not path.is_dir():
        raise DataError("data.root", f"{path} is not a directory")
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise DataError("data.root", f"{path} has no '{split}' folder; expected {path / split}{os.sep}<class>")
    return path


def _preview(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


# -------------------------------------------------------------------------------------------- unreadable images


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
    The train and eval loaders of :meth:`ImageNetSpec.loaders` count separately, each over its own tree, per rank.
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return dataset.bad_image_count if isinstance(dataset, _SkipUnreadableImageFolder) else 0


# ------------------------------------------------------------------------------------------------------------ spec


def _normalized(*steps: Callable[[Any], Any]) -> transforms.Compose:
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# The ImageNet transforms, defined once for every source of the same images (the folder tree, the MDS shards).
def train_transform(size: int) -> transforms.Compose:
    """Training: RandomResizedCrop(size), a horizontal flip, normalised."""
    return _normalized(transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip())


def eval_transform(size: int) -> transforms.Compose:
    """Evaluation: Resize(256/224 of size) + CenterCrop(size), normalised (224 px crops of a 256 px side)."""
    return _normalized(transforms.Resize(round(256 * size / 224)), transforms.CenterCrop(size))


def consistency_transform(side: int) -> transforms.Compose:
    """The paper's consistency protocol at any size: Resize(side) + CenterCrop(side), normalised (e.g. 256 for 224 px
    crops shifted by up to 32)."""
    return _normalized(transforms.Resize(side), transforms.CenterCrop(side))


class ImageNetSpec(DatasetSpec):
    """ImageNet (or any ImageFolder pair of the same layout) under ``data.root``: ``train/<class>/<image>`` and
    ``val/<class>/<image>`` with the same class folders, each holding at least one image file."""

    name = "imagenet"

    def check(self, options: DataOptions) -> None:
        path = _root(options)
        try:
            train_classes = _class_folders(path / "train")
            val_classes = _class_folders(path / "val")
        except OSError as error:  # unreadable folders, broken mounts: still a data.root problem, not a crash
            raise DataError("data.root", f"cannot read {path}: {error}") from error
        if train_classes != val_classes:
            missing = sorted(set(train_classes) - set(val_classes))
            extra = sorted(set(val_classes) - set(train_classes))
            raise DataError(
                "data.root",
                f"{path / 'val'} must have the same class folders as {path / 'train'}: missing from val "
                f"{_preview(missing)}, only in val {_preview(extra)}",
            )

    def num_classes(self, options: DataOptions) -> int:
        return sum(1 for entry in os.scandir(_root(options) / "train") if entry.is_dir())

    def image_size(self, options: DataOptions) -> int:
        return options.image_size or PAPER_CROP_SIZE  # the standard ResNet crop, the one the paper measures at

    def default_max_shift(self, options: DataOptions) -> int:
        return PAPER_MAX_SHIFT

    def datasets(self, options: DataOptions, *, eval_batch_size: int) -> tuple[Dataset, Dataset]:
        # The standard ResNet recipe; a smaller image_size scales the eval resize and crop alike (keeps 256/224).
        size = self.image_size(options)
        train, evaluation = train_transform(size), eval_transform(size)
        root = _root(options)
        return (
            _SkipUnreadableImageFolder(root / "train", train, max_bad_images=options.max_bad_images),
            _SkipUnreadableImageFolder(root / "val", evaluation, max_bad_images=options.max_bad_images),
        )

    def consistency_dataset(self, options: DataOptions, side: int, *, batch_size: int) -> Dataset:
        transform = consistency_transform(side)
        return _SkipUnreadableImageFolder(_root(options) / "val", transform, max_bad_images=options.max_bad_images)
