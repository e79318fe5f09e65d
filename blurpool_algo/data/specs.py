"""What every dataset is: a :class:`DatasetSpec`, the options it reads (:class:`DataOptions`) and its errors.

A spec owns everything that differs between datasets: its check of the data, its class count, its training-set size
when fixed, its training and evaluation loaders, its shift-consistency loader and that measurement's defaults. The
rest of the package asks the registry (:func:`blurpool_algo.data.dataset_spec`) and never names a dataset.

Loaders shard with Composer's ``dist.get_sampler``: batch sizes are per rank and the data order is fixed by the seed.

Example:
    >>> DataOptions(num_workers=-1)
    Traceback (most recent call last):
    ...
    blurpool_algo.data.specs.DataError: data.num_workers: must be an int >= 0, got -1
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from blurpool_algo.checks import CheckError, check_choice, check_int
from blurpool_algo.metrics.protocol import CONSISTENCY_MODES, ConsistencyProtocol

__all__ = ["DEFAULT_MAX_BAD_IMAGES", "DataError", "DataOptions", "DatasetSpec", "build_sampler"]

#: Default of ``max_bad_images``: unreadable images skipped per ImageFolder tree before it is an error.
DEFAULT_MAX_BAD_IMAGES = 100

_Value = TypeVar("_Value")


class DataError(ValueError):
    """The data cannot serve the run; ``str()`` is one line, ``"<key>: <message>"``.

    Attributes:
        key: what it concerns: a recipe key (``data.name``, ``data.root``, ``data.image_size``, ``model.num_classes``,
            ...), or for :meth:`DatasetSpec.consistency_protocol` the protocol's field (``mode``, ``max_shift``,
            ``crop_size``), which the caller names by its own key (a callback's, a command-line flag's).
        message: what is wrong, without the key.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):
        # The default would call __init__ with the whole text alone; keep the two parts through pickling.
        return type(self), (self.key, self.message)


def checked(key: str, check: Callable[..., _Value], value: Any, *args: Any, **kwargs: Any) -> _Value:
    """``check(value, ...)`` from :mod:`blurpool_algo.checks`, its refusal as a :class:`DataError` under ``key``."""
    try:
        return check(key, value, *args, **kwargs)
    except CheckError as error:
        raise DataError(key, error.requirement) from None


@dataclass(frozen=True)
class DataOptions:
    """The dataset options of a run, checked once here (a bad one is a :class:`DataError` naming its recipe key).

    Attributes:
        root: the dataset folder (``data.root``; datasets that need none ignore it).
        num_workers: dataloader worker processes per rank, 0 = load in the training process (``data.num_workers``).
        seed: fixes the training data order (sampler shuffle) and generated data (``seed``).
        num_classes: classes of generated labels (``model.num_classes``).
        synthetic_samples: training samples of generated data (``data.synthetic_samples``).
        image_size: training image side, None = the dataset's own (``data.image_size``).
        max_bad_images: unreadable image files each tree may skip before reading is an error; 0 = the first one
            (``data.max_bad_images``).
    """

    root: str | os.PathLike[str] | None = None
    num_workers: int = 0
    seed: int = 0
    num_classes: int = 10
    synthetic_samples: int = 64
    image_size: int | None = None
    max_bad_images: int = DEFAULT_MAX_BAD_IMAGES

    def __post_init__(self) -> None:
        checked("data.num_workers", check_int, self.num_workers, minimum=0)
        checked("seed", check_int, self.seed, minimum=0)
        checked("model.num_classes", check_int, self.num_classes, minimum=1)
        checked("data.synthetic_samples", check_int, self.synthetic_samples, minimum=1)
        checked("data.image_size", check_int, self.image_size, minimum=8, allow_none=True)
        checked("data.max_bad_images", check_int, self.max_bad_images, minimum=0, hint="0: any unreadable image stops")


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


class DatasetSpec(abc.ABC):
    """One dataset: subclasses give its name and the hooks marked abstract; the loaders and the consistency protocol
    are built here, the same way for every dataset."""

    #: The value of ``data.name`` that selects it.
    name: ClassVar[str]

    # ------------------------------------------------------------------------------------------------ what it holds

    def check(self, options: DataOptions) -> None:
        """Raises :class:`DataError` before any work if the data cannot be used (default: nothing to check)."""
        del options

    @abc.abstractmethod
    def num_classes(self, options: DataOptions) -> int | None:
        """Classes in the dataset; None = any (generated labels follow ``options.num_classes``)."""

    def train_size(self, options: DataOptions) -> int | None:
        """Training samples when known without reading the data; None = unknown until read."""
        del options
        return None

    @abc.abstractmethod
    def datasets(self, options: DataOptions, *, eval_batch_size: int) -> tuple[Dataset, Dataset]:
        """The full (train, eval) datasets (``eval_batch_size`` lets generated data fill one eval batch)."""

    # ------------------------------------------------------------------------------------------------ consistency

    @abc.abstractmethod
    def image_size(self, options: DataOptions) -> int:
        """Side of the images a model trains on: the consistency crop when none is given."""

    def default_max_shift(self, options: DataOptions) -> int:
        """The shift range measured when none is given: an eighth of the image side (the paper's 32 at 256)."""
        return max(1, self.image_size(options) // 8)

    def largest_frame(self, options: DataOptions) -> int | None:
        """The largest image side the consistency loader can offer; None = any (the images are resized or framed)."""
        del options
        return None

    def check_frame(self, options: DataOptions, side: int, what: str) -> None:
        """Raises :class:`DataError` (key ``crop_size``) if the consistency loader cannot offer ``side`` px images;
        ``what`` says how ``side`` was made, for the message."""
        largest = self.largest_frame(options)
        if largest is not None and side > largest:
            raise DataError("crop_size", f"{what} = {side} px exceeds the {largest} px images of {self.name}")

    @abc.abstractmethod
    def consistency_dataset(self, options: DataOptions, side: int, *, batch_size: int) -> Dataset:
        """Validation images prepared at ``side`` px for shift consistency (``side`` already checked)."""

    # --------------------------------------------------------------------------------------------- built the same

    def loaders(
        self, options: DataOptions, *, train_batch_size: int, eval_batch_size: int
    ) -> tuple[DataLoader, DataLoader]:
        """The (train, eval) dataloaders of one rank.

        The train loader shuffles with ``options.seed`` and drops the last partial batch (a 1-sample batch breaks
        BatchNorm and skews the per-step loss); the eval loader keeps the dataset order and every sample.

        Args:
            options: the run's dataset options.
            train_batch_size: training batch size PER RANK (the global batch divided by the world size).
            eval_batch_size: evaluation batch size per rank.

        Raises:
            DataError: the data cannot be used, or the batch is larger than each rank's share of the training set.
            ValueError: a batch size that is not an int >= 1.
        """
        check_int("train_batch_size", train_batch_size, minimum=1)
        check_int("eval_batch_size", eval_batch_size, minimum=1)
        self.check(options)
        train_set, eval_set = self.datasets(options, eval_batch_size=eval_batch_size)
        train_sampler = build_sampler(train_set, shuffle=True, drop_last=True, seed=options.seed)
        eval_sampler = build_sampler(eval_set, shuffle=False, drop_last=False, seed=options.seed)
        if len(train_sampler) < train_batch_size:
            # The train loader drops partial batches: it would yield nothing, and training would never step.
            raise DataError(
                "train_batch_size",
                f"{train_batch_size} per rank exceeds the {len(train_sampler)} training samples of each of the "
                f"{train_sampler.num_replicas} rank(s) for data.name={self.name!r}",
            )
        return (
            _loader(train_set, train_sampler, train_batch_size, options.num_workers, drop_last=True),
            _loader(eval_set, eval_sampler, eval_batch_size, options.num_workers, drop_last=False),
        )

    def consistency_protocol(
        self, options: DataOptions, *, mode: str = "crop", max_shift: int | None = None, crop_size: int | None = None
    ) -> ConsistencyProtocol:
        """The shift-consistency protocol for this dataset: given values, else its defaults.

        The crop defaults to the training image side (:meth:`image_size`), or to what fixed-size images leave after
        ``max_shift`` (crop mode); ``max_shift`` to :meth:`default_max_shift`.

        Raises:
            DataError: key ``mode``, ``max_shift`` or ``crop_size``: a bad value, or a frame (``crop_size +
                max_shift`` in crop mode, ``crop_size`` in circular mode) the dataset cannot offer.
        """
        checked("mode", check_choice, mode, CONSISTENCY_MODES)
        if max_shift is None:
            max_shift = self.default_max_shift(options)
        checked("max_shift", check_int, max_shift, minimum=1)
        margin = max_shift if mode == "crop" else 0
        if crop_size is None:
            largest = self.largest_frame(options)
            crop_size = self.image_size(options) if largest is None else largest - margin
            if crop_size < 1:
                raise DataError("max_shift", f"max_shift {max_shift} leaves no crop of the {largest} px images")
        checked("crop_size", check_int, crop_size, minimum=1)
        protocol = ConsistencyProtocol(mode=mode, max_shift=max_shift, crop_size=crop_size)
        self.check_frame(options, crop_size + margin, "crop_size + max_shift" if mode == "crop" else "crop_size")
        return protocol

    def consistency_loader(self, options: DataOptions, protocol: ConsistencyProtocol, *, batch_size: int) -> DataLoader:
        """Validation images of one rank, prepared at ``protocol.frame_size`` px for shift consistency.

        The order is fixed and every sample is kept (the metrics leave out the padding a distributed sampler adds).

        Raises:
            DataError: the data cannot be used, or cannot offer images of the protocol's frame (key ``crop_size``).
            ValueError: a batch size that is not an int >= 1, or a protocol without a crop size.
        """
        check_int("batch_size", batch_size, minimum=1)
        side = check_int("protocol.frame_size", protocol.frame_size, minimum=1, hint="give the protocol a crop_size")
        self.check_frame(options, side, "crop_size + max_shift" if protocol.mode == "crop" else "crop_size")
        self.check(options)
        dataset = self.consistency_dataset(options, side, batch_size=batch_size)
        sampler = build_sampler(dataset, shuffle=False, drop_last=False, seed=options.seed)
        # The metrics re-wrap the loader to learn each sample's index, so workers kept alive here would sit idle.
        return _loader(dataset, sampler, batch_size, options.num_workers, drop_last=False, persistent=False)


def _loader(
    dataset: Dataset,
    sampler: DistributedSampler,
    batch_size: int,
    num_workers: int,
    *,
    drop_last: bool,
    persistent: bool = True,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=persistent and num_workers > 0,
    )
