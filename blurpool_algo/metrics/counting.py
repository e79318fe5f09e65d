"""Counting agreements across ranks: the torchmetrics states of the measurements, and refusing diverged models.

A model whose logits hold a NaN or an inf has diverged (or its weights are corrupt): all its NaN predictions share one
argmax, so every pair would "agree". Such logits raise :class:`NonFiniteLogitsError` instead of giving a number; in a
distributed job the ranks agree first, so every rank raises together. Torch and torchmetrics only.

Example:
    >>> metric = ShiftConsistencyMetric()
    >>> metric.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]]))
    >>> float(metric.compute())
    50.0
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from blurpool_algo.checks import check_int

__all__ = ["DiagonalStabilityMetric", "NonFiniteLogitsError", "ShiftConsistencyMetric"]


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


def raise_if_any_rank_diverged(
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
        check_int("num_offsets", num_offsets, minimum=1)
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


def metric_on(metric: Metric, device: torch.device) -> Metric:
    """``metric`` on ``device`` (in float32 on MPS, which has no float64)."""
    if device.type == "mps":  # MPS has no float64
        metric.set_dtype(torch.float32)
    return metric.to(device)
