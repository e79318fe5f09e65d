"""Shift-consistency metrics: how often a classifier's prediction survives a small shift of its input.

BlurPool's claim (Zhang, ICML 2019) is that anti-aliasing makes a CNN's output stable under shifts. Three measures:

* **crop consistency**, the paper's protocol: each image is prepared at ``crop_size + max_shift`` (ImageNet: Resize
  256 + CenterCrop 256); two ``crop_size`` crops are taken at offsets drawn from ``[0, max_shift)`` per axis; the
  metric is the percentage of pairs whose top-1 classes agree. Labels are not needed.
* **circular consistency**: the same with two ``torch.roll`` shifts drawn from ``[-max_shift, max_shift)`` per axis, so
  no content enters or leaves the frame (a network built only from circular convolutions and global pooling scores
  exactly 100).
* **diagonal stability**, the paper's Figure 1: for crops at diagonal offsets ``(d, d)``, ``d = 0..max_shift``, the
  accuracy and the mean softmax probability of the true class, per offset.

Offsets are drawn from a generator seeded with ``seed`` and indexed by each sample's position in the dataset, so the
same seed gives the same number on 1 or N ranks and whatever the batch size. Counts live in torchmetrics states that
are summed across ranks. This module imports no Composer code: it works on any ``nn.Module`` that maps images to
logits.

A model whose logits hold a NaN or an inf has diverged (or its weights are corrupt): all its NaN predictions share one
argmax, so every pair would "agree". Such logits raise :class:`NonFiniteLogitsError` instead of giving a number.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torch.utils.data._utils.collate import default_collate
from torchmetrics import Metric

__all__ = [
    "CONSISTENCY_MODES",
    "OFFSET_DRAWS",
    "DiagonalStability",
    "DiagonalStabilityMetric",
    "NonFiniteLogitsError",
    "ShiftConsistencyMetric",
    "diagonal_stability",
    "plot_diagonal_stability",
    "shift_consistency",
    "shifted_crops",
    "shifted_rolls",
]

#: Values of ``mode``: two random crops (the paper's protocol) or two circular shifts.
CONSISTENCY_MODES: tuple[str, ...] = ("crop", "circular")
#: Values of ``offsets``: a fresh pair of offsets for every image, or one pair per batch (what the paper's code did).
OFFSET_DRAWS: tuple[str, ...] = ("per_image", "per_batch")


# ----------------------------------------------------------------------------------------------------- validation


def _positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an int >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def validate_consistency_options(
    *,
    mode: str = "crop",
    max_shift: int = 32,
    crop_size: int | None = None,
    offsets: str = "per_image",
    num_batches: int | None = None,
    seed: int = 0,
) -> None:
    """Raises ``ValueError`` naming the first bad option of :func:`shift_consistency`; callers check before any work."""
    _choice("mode", mode, CONSISTENCY_MODES)
    _positive_int("max_shift", max_shift)
    _positive_int("crop_size", crop_size, allow_none=True)
    _choice("offsets", offsets, OFFSET_DRAWS)
    _positive_int("num_batches", num_batches, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")


# ----------------------------------------------------------------------------------------------- diverged models


class NonFiniteLogitsError(ValueError):
    """The model gave NaN or infinite logits: it has diverged (or its weights are corrupt), so nothing is measured.

    Raised at the first batch with such logits; nothing after it is measured. In a distributed job every rank raises
    it, with the counts summed over ranks.

    Attributes:
        nonfinite_images: images with a NaN or an inf in their logits, in the batch where they were first seen.
        images_seen: images measured up to and including that batch.
        measure: what was being measured (``'shift consistency'`` or ``'diagonal stability'``).
    """

    def __init__(self, nonfinite_images: int, images_seen: int, measure: str = "shift consistency") -> None:
        self.nonfinite_images = nonfinite_images
        self.images_seen = images_seen
        self.measure = measure
        super().__init__(
            f"{nonfinite_images} of {images_seen} images got NaN or infinite logits: the model has diverged (or its "
            f"weights are corrupt), and its {measure} has no meaning"
        )

    def __reduce__(self):
        # The default would call __init__ with the message alone; keep the counts through pickling (worker processes).
        return type(self), (self.nonfinite_images, self.images_seen, self.measure)


def _nonfinite_rows(*logits: Tensor) -> int:
    """How many images (rows) hold a NaN or an inf in any of ``logits``; one device sync."""
    finite = torch.isfinite(logits[0]).all(dim=1)
    for more in logits[1:]:
        finite &= torch.isfinite(more).all(dim=1)
    return int((~finite).sum())


def _check_weight(weight: Tensor | None, logits: Tensor) -> None:
    # A weight of another length would broadcast against the per-image comparison and count images that do not exist.
    if weight is not None and tuple(weight.shape) != (len(logits),):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} for logits of shape {tuple(logits.shape)}: expected one 0/1 "
            f"per image"
        )


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _raise_if_any_rank_diverged(
    failure: NonFiniteLogitsError | None, images_seen: int, measure: str, device: torch.device
) -> None:
    """Raises on every rank when any rank saw non-finite logits.

    A rank that raised alone would leave the others waiting forever in the metric's sync, so in a distributed job the
    ranks first agree (one all-reduce of two numbers). Weights are the same on every rank, so a diverged model is
    caught on all of them; a single overflowing image is caught on one.
    """
    if _distributed_world_size() > 1:
        bad = failure.nonfinite_images if failure is not None else 0
        counts = torch.tensor([bad, images_seen], dtype=torch.long, device=device)
        torch.distributed.all_reduce(counts)
        if int(counts[0]) > 0:
            raise NonFiniteLogitsError(int(counts[0]), int(counts[1]), measure)
    elif failure is not None:
        raise failure


# ---------------------------------------------------------------------------------------------------------- metrics


class ShiftConsistencyMetric(Metric):
    """Percentage of prediction pairs whose top-1 classes agree; counts are summed across ranks.

    ``update(logits_a, logits_b, weight=None)`` takes the logits of the same images under two shifts; ``weight`` (0/1
    per image) leaves out samples a distributed sampler repeated to even out its shards. Logits with a NaN or an inf
    raise :class:`NonFiniteLogitsError`, and a ``weight`` of another length ``ValueError``; a refused update leaves
    the counts as they were.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    agree: Tensor
    total: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("agree", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits_a: Tensor, logits_b: Tensor, weight: Tensor | None = None) -> None:
        if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
            raise ValueError(
                f"expected two (batch, classes) logit tensors of one shape, got {tuple(logits_a.shape)} and "
                f"{tuple(logits_b.shape)}"
            )
        _check_weight(weight, logits_a)
        nonfinite = _nonfinite_rows(logits_a, logits_b)
        if nonfinite:
            raise NonFiniteLogitsError(nonfinite, int(self.total) + len(logits_a), "shift consistency")
        same = logits_a.argmax(dim=1) == logits_b.argmax(dim=1)
        keep = torch.ones_like(same) if weight is None else weight.to(device=same.device, dtype=torch.bool)
        self.agree += (same & keep).sum()
        self.total += keep.sum()

    def compute(self) -> Tensor:
        if self.total == 0:
            raise ValueError("shift consistency of zero images: the dataloader yielded no batch")
        return 100.0 * self.agree.double() / self.total.double()


class DiagonalStabilityMetric(Metric):
    """Per-offset accuracy and mean true-class probability, summed across ranks.

    ``update(offset_index, logits, target, weight=None)`` adds one batch seen at one offset. Logits with a NaN or an
    inf raise :class:`NonFiniteLogitsError`, and logits, targets or weights of different lengths ``ValueError``; a
    refused update leaves the counts as they were.

    Args:
        num_offsets: how many offsets the curve has.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    probability: Tensor
    count: Tensor

    def __init__(self, num_offsets: int, **kwargs) -> None:
        super().__init__(**kwargs)
        _positive_int("num_offsets", num_offsets)
        self.num_offsets = num_offsets
        self.add_state("correct", default=torch.zeros(num_offsets, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("probability", default=torch.zeros(num_offsets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_offsets, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, offset_index: int, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> None:
        if logits.ndim != 2 or tuple(target.shape) != (len(logits),):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} for targets of shape {tuple(target.shape)}: expected "
                f"(batch, classes) logits and (batch,) targets"
            )
        _check_weight(weight, logits)
        nonfinite = _nonfinite_rows(logits)
        if nonfinite:
            raise NonFiniteLogitsError(nonfinite, int(self.count[offset_index]) + len(logits), "diagonal stability")
        target = target.to(logits.device).long()
        keep = (
            torch.ones(len(target), dtype=torch.bool, device=logits.device)
            if weight is None
            else weight.to(device=logits.device, dtype=torch.bool)
        )
        probability = logits.float().softmax(dim=1).gather(1, target[:, None]).squeeze(1)
        self.correct[offset_index] += ((logits.argmax(dim=1) == target) & keep).sum()
        self.probability[offset_index] += probability[keep].sum().to(self.probability.dtype)
        self.count[offset_index] += keep.sum()

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(accuracy in percent, mean true-class probability)`` per offset, and the number of images."""
        if not bool((self.count > 0).all()):
            raise ValueError("diagonal stability of zero images: the dataloader yielded no batch")
        count = self.count.double()
        return 100.0 * self.correct.double() / count, self.probability.double() / count, self.count[0].clone()


# ------------------------------------------------------------------------------------------------- shifting images


def _window_start(size: int, window: int, axis: str) -> int:
    """Top-left of a centred ``window`` in an image side of ``size`` (0 when they are equal)."""
    if window > size:
        raise ValueError(
            f"images are {size} px along {axis}, smaller than crop_size + max_shift = {window}: prepare them at "
            f"crop_size + max_shift (ImageNet: Resize 256 + CenterCrop 256 for 224 crops shifted by up to 32)"
        )
    return (size - window) // 2


def shifted_crops(images: Tensor, offsets: Tensor, crop_size: int) -> Tensor:
    """``crop_size`` crops of ``images`` at per-image top-left ``offsets``; one gather, no Python loop.

    Args:
        images: ``(N, C, H, W)``.
        offsets: ``(N, 2)`` integer ``(top, left)`` per image; each crop must fit inside its image.
        crop_size: side of the square crops.

    Returns:
        ``(N, C, crop_size, crop_size)``.
    """
    n, c, _, width = images.shape
    offsets = offsets.to(images.device).long()
    steps = torch.arange(crop_size, device=images.device)
    rows = (offsets[:, 0:1] + steps).view(n, 1, crop_size, 1).expand(n, c, crop_size, width)
    images = images.gather(2, rows)
    cols = (offsets[:, 1:2] + steps).view(n, 1, 1, crop_size).expand(n, c, crop_size, crop_size)
    return images.gather(3, cols)


def shifted_rolls(images: Tensor, shifts: Tensor) -> Tensor:
    """Each image rolled by its own ``(dy, dx)``: row ``i`` of the result is row ``i - dy`` (mod H), as ``torch.roll``.

    Args:
        images: ``(N, C, H, W)``.
        shifts: ``(N, 2)`` integer ``(dy, dx)`` per image, any sign.
    """
    n, c, height, width = images.shape
    shifts = shifts.to(images.device).long()
    rows = (torch.arange(height, device=images.device) - shifts[:, 0:1]).remainder(height)
    images = images.gather(2, rows.view(n, 1, height, 1).expand(n, c, height, width))
    cols = (torch.arange(width, device=images.device) - shifts[:, 1:2]).remainder(width)
    return images.gather(3, cols.view(n, 1, 1, width).expand(n, c, height, width))


def _center_crop(images: Tensor, size: int) -> Tensor:
    top = _window_start(images.shape[-2], size, "height")
    left = _window_start(images.shape[-1], size, "width")
    return images[..., top : top + size, left : left + size]


# ------------------------------------------------------------------------------------------------ iterating batches


@dataclass
class _Batch:
    images: Tensor
    targets: Tensor | None
    #: Position of each sample in the dataset (the key of its random offsets).
    indices: Tensor
    #: False for samples a DistributedSampler repeated to even out the shards (counted once, on their own rank).
    keep: Tensor


class _Indexed(Dataset):
    """A map-style dataset whose items also carry their index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class _CollateWithIndex:
    """Collates the indices apart from the items, which keep the loader's own ``collate_fn`` (picklable for workers)."""

    def __init__(self, collate_fn: Callable | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items):
        indices, samples = zip(*items, strict=True)
        return torch.tensor(indices, dtype=torch.long), self.collate_fn(list(samples))


def _split(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], target
    if isinstance(batch, Mapping) and isinstance(batch.get("input"), Tensor):
        return batch["input"], batch.get("target")
    raise TypeError(
        "expected batches of images, (images, targets) pairs or {'input': ..., 'target': ...} dicts, got "
        f"{type(batch).__name__}"
    )


def _sharding(dataloader: DataLoader) -> tuple[int, int, int | None]:
    """``(num_replicas, rank, dataset_len)`` of a DistributedSampler that pads its shards, else ``(1, 0, None)``."""
    sampler = dataloader.sampler
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return sampler.num_replicas, sampler.rank, len(sampler.dataset)  # type: ignore[arg-type]
    return 1, 0, None


def _batches(dataloader: Iterable, num_batches: int | None) -> Iterator[_Batch]:
    """Yields the loader's batches with each sample's dataset index and whether it counts."""
    map_style = isinstance(dataloader, DataLoader) and not isinstance(dataloader.dataset, IterableDataset)
    if map_style:
        num_replicas, rank, dataset_len = _sharding(dataloader)
        workers = dataloader.num_workers
        source: Iterable = DataLoader(
            _Indexed(dataloader.dataset),
            batch_sampler=dataloader.batch_sampler,
            num_workers=workers,
            collate_fn=_CollateWithIndex(dataloader.collate_fn),
            pin_memory=dataloader.pin_memory,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context if workers else None,
            prefetch_factor=dataloader.prefetch_factor if workers else None,
        )
    else:
        # Without a map-style dataset there are no indices: samples are keyed by their position in this rank's
        # stream, so a seed still reproduces the number for a fixed loader, but not across different shardings.
        num_replicas, rank, dataset_len = 1, 0, None
        source = dataloader
    position = 0
    for batch in itertools.islice(source, num_batches):
        if map_style:
            indices, batch = batch
        images, targets = _split(batch)
        positions = torch.arange(position, position + len(images))
        position += len(images)
        if not map_style:
            indices = positions
        # DistributedSampler pads the tail by repeating samples; its k-th sample on rank r sits at k * R + r of the
        # padded order, which is padding when past the dataset's end.
        keep = (
            positions * num_replicas + rank < dataset_len
            if dataset_len is not None
            else torch.ones(len(images), dtype=torch.bool)
        )
        yield _Batch(images, targets, indices, keep)


def _model_device_dtype(model: Callable[[Tensor], Tensor], device: torch.device | str | None):
    parameters = list(model.parameters()) if isinstance(model, nn.Module) else []
    floating = [p for p in parameters if p.is_floating_point()]
    if device is None:
        device = parameters[0].device if parameters else torch.device("cpu")
    # A model cast to bf16/fp16 without autocast takes inputs of its own dtype; under autocast fp32 inputs are right.
    dtype = floating[0].dtype if floating and not torch.is_autocast_enabled() else torch.float32
    return torch.device(device), dtype


class _EvalMode:
    """Puts an ``nn.Module`` in eval mode and gradients off, and restores its mode afterwards."""

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        self.model = model
        self.was_training = isinstance(model, nn.Module) and model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        if isinstance(self.model, nn.Module):
            self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        if isinstance(self.model, nn.Module):
            self.model.train(self.was_training)


def _logits(model: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    output = model(images)
    if not isinstance(output, Tensor) or output.ndim != 2:
        raise TypeError(
            "the model must map (N, C, H, W) images to (N, classes) logits, got "
            f"{type(output).__name__}{'' if not isinstance(output, Tensor) else tuple(output.shape)}"
        )
    if len(output) != len(images):
        # (1, C) logits for N images would broadcast in the comparison and count N agreements.
        raise ValueError(
            f"the model returned logits of shape {tuple(output.shape)} for images of shape {tuple(images.shape)}: "
            f"expected one row of logits per image"
        )
    return output


def _metric_on(metric: Metric, device: torch.device) -> Metric:
    if device.type == "mps":  # MPS has no float64
        metric.set_dtype(torch.float32)
    return metric.to(device)


# -------------------------------------------------------------------------------------------------- public functions


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
    validate_consistency_options(
        mode=mode, max_shift=max_shift, crop_size=crop_size, offsets=offsets, num_batches=num_batches, seed=seed
    )
    device, dtype = _model_device_dtype(model, device)
    low, high = (0, max_shift) if mode == "crop" else (-max_shift, max_shift)
    draw = _Offsets(low, high, seed, per_batch=offsets == "per_batch")
    metric = _metric_on(ShiftConsistencyMetric(), device)
    images_seen, failure = 0, None
    with _EvalMode(model):
        for batch in _batches(dataloader, num_batches):
            images = batch.images.to(device=device, dtype=dtype, non_blocking=True)
            pair = draw(batch.indices)
            if mode == "crop":
                side = crop_size or min(images.shape[-2:]) - max_shift
                if side < 1:
                    raise ValueError(f"images of {tuple(images.shape[-2:])} px leave no crop for max_shift={max_shift}")
                images = _center_crop(images, side + max_shift)
                first, second = shifted_crops(images, pair[:, :2], side), shifted_crops(images, pair[:, 2:], side)
            else:
                if crop_size is not None:
                    images = _center_crop(images, crop_size)
                first, second = shifted_rolls(images, pair[:, :2]), shifted_rolls(images, pair[:, 2:])
            images_seen += len(images)
            try:
                metric.update(_logits(model, first), _logits(model, second), batch.keep)
            except NonFiniteLogitsError as exc:
                failure = NonFiniteLogitsError(exc.nonfinite_images, images_seen, "shift consistency")
                break  # a diverged model: measuring more would only cost time
    _raise_if_any_rank_diverged(failure, images_seen, "shift consistency", device)
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
    _positive_int("max_shift", max_shift)
    _positive_int("crop_size", crop_size, allow_none=True)
    _positive_int("step", step)
    _positive_int("num_batches", num_batches, allow_none=True)
    shifts = sorted({*range(0, max_shift + 1, step), max_shift})
    device, dtype = _model_device_dtype(model, device)
    metric = _metric_on(DiagonalStabilityMetric(len(shifts)), device)
    images_seen, failure = 0, None
    with _EvalMode(model):
        for batch in _batches(dataloader, num_batches):
            if batch.targets is None:
                raise TypeError("diagonal_stability needs (images, targets) batches: the loader yields no targets")
            images = batch.images.to(device=device, dtype=dtype, non_blocking=True)
            side = crop_size or min(images.shape[-2:]) - max_shift
            if side < 1:
                raise ValueError(f"images of {tuple(images.shape[-2:])} px leave no crop for max_shift={max_shift}")
            images = _center_crop(images, side + max_shift)
            images_seen += len(images)
            try:
                for index, shift in enumerate(shifts):
                    crop = images[..., shift : shift + side, shift : shift + side]
                    metric.update(index, _logits(model, crop), batch.targets, batch.keep)
            except NonFiniteLogitsError as exc:
                failure = NonFiniteLogitsError(exc.nonfinite_images, images_seen, "diagonal stability")
                break  # a diverged model: measuring more would only cost time
    _raise_if_any_rank_diverged(failure, images_seen, "diagonal stability", device)
    accuracy, probability, num_images = metric.compute()
    return DiagonalStability(
        offsets=shifts,
        accuracy=accuracy.tolist(),
        true_class_probability=probability.tolist(),
        num_images=int(num_images),
    )


def plot_diagonal_stability(curves: Mapping[str, DiagonalStability], path: str | os.PathLike[str]) -> Path:
    """Writes a PNG of the curves (one line per model: P(true class) on top, accuracy below), whole or not at all.

    Args:
        curves: label (e.g. ``'baseline'``, ``'blurpool'``) -> its curve.
        path: the PNG to write; its folder must exist.

    Returns:
        The written path.
    """
    if not curves:
        raise ValueError("curves must hold at least one labelled DiagonalStability")
    # The object-oriented API: no pyplot global state, no GUI backend, safe in worker processes and tests.
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(6.4, 6.0))
    top, bottom = figure.subplots(2, 1, sharex=True)
    for label, curve in curves.items():
        top.plot(curve.offsets, curve.true_class_probability, marker=".", label=label)
        bottom.plot(curve.offsets, curve.accuracy, marker=".", label=label)
    top.set_ylabel("mean P(true class)")
    top.set_title("Diagonal shift stability (flat = shift-invariant)")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("top-1 accuracy (%)")
    bottom.set_xlabel("diagonal shift (px)")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the result is an ordinary file
        figure.savefig(temporary, format="png", dpi=120)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
