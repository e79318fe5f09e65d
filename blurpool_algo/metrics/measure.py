"""The measurements: shift consistency (crop, circular) and the diagonal stability curve of a classifier.

Offsets are drawn from a generator seeded with ``seed`` and indexed by each sample's position in the dataset, so the
same seed gives the same number on 1 or N ranks and whatever the batch size (:mod:`.batches`). The views compared come
from one :class:`~blurpool_algo.metrics.protocol.ConsistencyProtocol`; counts live in torchmetrics states summed
across ranks (:mod:`.counting`). Torch only: any ``nn.Module`` that maps images to logits.

Example:
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> images = torch.randn(8, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    >>> loader = DataLoader(TensorDataset(images, torch.zeros(8, dtype=torch.long)), batch_size=4)
    >>> constant = lambda x: torch.zeros(len(x), 10)  # predicts class 0 whatever the input
    >>> shift_consistency(constant, loader, max_shift=4)
    100.0
    >>> diagonal_stability(constant, loader, max_shift=4, step=2).offsets
    [0, 2, 4]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from blurpool_algo.checks import check_choice, check_int
from blurpool_algo.metrics.batches import EvalMode, indexed_batches, logits_of, model_device_dtype
from blurpool_algo.metrics.counting import (
    DiagonalStabilityMetric,
    NonFiniteLogitsError,
    ShiftConsistencyMetric,
    metric_on,
    raise_if_any_rank_diverged,
)
from blurpool_algo.metrics.protocol import PAPER_MAX_SHIFT, ConsistencyProtocol

__all__ = [
    "OFFSET_DRAWS",
    "DiagonalStability",
    "diagonal_stability",
    "shift_consistency",
    "validate_consistency_options",
]

#: Values of ``offsets``: a fresh pair of offsets for every image, or one pair per batch (what the paper's code did).
OFFSET_DRAWS: tuple[str, ...] = ("per_image", "per_batch")


def validate_consistency_options(
    *,
    mode: str = "crop",
    max_shift: int = PAPER_MAX_SHIFT,
    crop_size: int | None = None,
    offsets: str = "per_image",
    num_batches: int | None = None,
    seed: int = 0,
) -> ConsistencyProtocol:
    """Raises ``ValueError`` naming the first bad option of :func:`shift_consistency`; returns the protocol built."""
    protocol = ConsistencyProtocol(mode=mode, max_shift=max_shift, crop_size=crop_size)
    check_choice("offsets", offsets, OFFSET_DRAWS)
    check_int("num_batches", num_batches, minimum=1, allow_none=True)
    check_int("seed", seed, minimum=0)
    return protocol


def _offset_table(size: int, low: int, high: int, seed: int) -> Tensor:
    """``(size, 4)`` offsets ``(dy_a, dx_a, dy_b, dx_b)`` in ``[low, high)``, row ``i`` for dataset sample ``i``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (size, 4), generator=generator, dtype=torch.int32)


class _Offsets:
    """Per-sample (or per-batch) offset pairs, a pure function of the seed and the sample's index."""

    def __init__(self, low: int, high: int, seed: int, per_batch: bool) -> None:
        self.low, self.high, self.seed, self.per_batch = low, high, seed, per_batch
        self.table = torch.empty(0, 4, dtype=torch.int32)
        self.batch_generator = torch.Generator().manual_seed(seed)

    def __call__(self, indices: Tensor) -> Tensor:
        if self.per_batch:
            row = torch.randint(self.low, self.high, (4,), generator=self.batch_generator, dtype=torch.int32)
            return row.expand(len(indices), 4)
        needed = int(indices.max()) + 1
        if needed > len(self.table):
            # Grow to a power of two: the rows already drawn stay the same because the generator is replayed.
            self.table = _offset_table(1 << math.ceil(math.log2(needed)), self.low, self.high, self.seed)
        return self.table[indices]


def shift_consistency(
    model: Callable[[Tensor], Tensor],
    dataloader: Iterable,
    *,
    mode: str = "crop",
    max_shift: int,
    crop_size: int | None = None,
    seed: int = 0,
    offsets: str = "per_image",
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Percentage of images whose top-1 class is the same under two random shifts.

    Two forward passes per image. Call it on every rank of a distributed job (the counts are summed across ranks);
    the result is the same for the same seed whatever the number of ranks, batch size or worker count, as long as the
    loader is map-style (offsets are keyed by dataset index) and its sampler is a ``DistributedSampler`` or
    unsharded.

    Args:
        model: maps ``(N, C, H, W)`` images to ``(N, classes)`` logits; an ``nn.Module`` is put in eval mode for the
            call and restored afterwards.
        dataloader: yields images, ``(images, targets)`` or ``{'input', 'target'}`` batches.
        mode: ``'crop'``: two ``crop_size`` crops at offsets in ``[0, max_shift)`` per axis, from images prepared at
            ``crop_size + max_shift`` (a larger image is centre-cropped to that first); ``'circular'``: two
            ``torch.roll`` shifts in ``[-max_shift, max_shift)`` per axis of the image (centre-cropped to
            ``crop_size`` first when given).
        max_shift: the shift range in pixels (the paper: 32 at 224 px).
        crop_size: ``'crop'``: the crop side, default ``image side - max_shift``; ``'circular'``: optional centre crop.
        seed: seeds the offsets.
        offsets: ``'per_image'`` (default) or ``'per_batch'``, one pair of offsets for a whole batch as in the paper's
            code (its number then depends on the batch composition).
        num_batches: stop after this many batches (None: the whole loader).
        device: where to run; defaults to the model's device.

    Returns:
        The consistency in percent.

    Raises:
        NonFiniteLogitsError: logits with a NaN or an inf (a diverged model), at the first batch that has them.
        ValueError: a bad option, images too small for ``crop_size + max_shift``, or logits whose batch size is not
            the images'.
    """
    protocol = validate_consistency_options(
        mode=mode, max_shift=max_shift, crop_size=crop_size, offsets=offsets, num_batches=num_batches, seed=seed
    )
    device, dtype = model_device_dtype(model, device)
    draw = _Offsets(*protocol.offset_range, seed, per_batch=offsets == "per_batch")
    metric = metric_on(ShiftConsistencyMetric(), device)
    images_seen, failure = 0, None
    with EvalMode(model):
        for batch in indexed_batches(dataloader, num_batches):
            images = batch.images.to(device=device, dtype=dtype, non_blocking=True)
            fitted = protocol.fitted(images.shape[-2:])
            first, second = fitted.views(fitted.frame(images), draw(batch.indices))
            images_seen += len(images)
            try:
                metric.update(logits_of(model, first), logits_of(model, second), batch.keep)
            except NonFiniteLogitsError as exc:
                failure = NonFiniteLogitsError(exc.nonfinite_images, images_seen, "shift consistency")
                break  # a diverged model: measuring more would only cost time
    raise_if_any_rank_diverged(failure, images_seen, "shift consistency", device)
    return float(metric.compute())


@dataclass(frozen=True)
class DiagonalStability:
    """One model's diagonal stability curve: per offset ``d`` (crop at ``(d, d)``), accuracy and P(true class).

    Attributes:
        offsets: the diagonal offsets in pixels, ``0..max_shift``.
        accuracy: top-1 accuracy in percent at each offset.
        true_class_probability: mean softmax probability of the true class at each offset.
        num_images: images averaged (each seen at every offset).
    """

    offsets: list[int]
    accuracy: list[float]
    true_class_probability: list[float]
    num_images: int

    @property
    def accuracy_spread(self) -> float:
        """Largest minus smallest accuracy over the offsets (percentage points): 0 for a shift-invariant model."""
        return max(self.accuracy) - min(self.accuracy)

    @property
    def probability_spread(self) -> float:
        """Largest minus smallest mean true-class probability over the offsets."""
        return max(self.true_class_probability) - min(self.true_class_probability)


def diagonal_stability(
    model: Callable[[Tensor], Tensor],
    dataloader: Iterable,
    *,
    max_shift: int,
    crop_size: int | None = None,
    step: int = 1,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> DiagonalStability:
    """Accuracy and mean true-class probability for crops at diagonal offsets ``(d, d)``, ``d = 0, step, ..max_shift``.

    The paper's Figure 1 protocol: images prepared at ``crop_size + max_shift``, one forward pass per offset. Needs
    labelled batches. Call it on every rank of a distributed job; the result is independent of the number of ranks
    (up to float summation order).

    Args:
        model: maps images to logits; an ``nn.Module`` is put in eval mode for the call.
        dataloader: yields ``(images, targets)`` or ``{'input', 'target'}`` batches.
        max_shift: the largest diagonal offset (the paper: 32).
        crop_size: the crop side, default ``image side - max_shift``.
        step: offset stride (``max_shift`` itself is always included).
        num_batches: stop after this many batches.
        device: where to run; defaults to the model's device.

    Raises:
        NonFiniteLogitsError: logits with a NaN or an inf (a diverged model), at the first forward pass that has them.
        ValueError: a bad option, or logits whose batch size is not the images'.
    """
    protocol = ConsistencyProtocol(mode="crop", max_shift=max_shift, crop_size=crop_size)
    check_int("step", step, minimum=1)
    check_int("num_batches", num_batches, minimum=1, allow_none=True)
    shifts = sorted({*range(0, max_shift + 1, step), max_shift})
    device, dtype = model_device_dtype(model, device)
    metric = metric_on(DiagonalStabilityMetric(len(shifts)), device)
    images_seen, failure = 0, None
    with EvalMode(model):
        for batch in indexed_batches(dataloader, num_batches):
            if batch.targets is None:
                raise TypeError("diagonal_stability needs (images, targets) batches: the loader yields no targets")
            images = batch.images.to(device=device, dtype=dtype, non_blocking=True)
            fitted = protocol.fitted(images.shape[-2:])
            images = fitted.frame(images)
            images_seen += len(images)
            try:
                for index, shift in enumerate(shifts):
                    metric.update(
                        index, logits_of(model, fitted.diagonal_view(images, shift)), batch.targets, batch.keep
                    )
            except NonFiniteLogitsError as exc:
                failure = NonFiniteLogitsError(exc.nonfinite_images, images_seen, "diagonal stability")
                break  # a diverged model: measuring more would only cost time
    raise_if_any_rank_diverged(failure, images_seen, "diagonal stability", device)
    accuracy, probability, num_images = metric.compute()
    return DiagonalStability(
        offsets=shifts,
        accuracy=accuracy.tolist(),
        true_class_probability=probability.tolist(),
        num_images=int(num_images),
    )
