"""ShiftConsistencyMonitor: what BlurPool is for, measured during training (how often the model's top-1 survives a
shift of its input, :func:`blurpool_algo.metrics.shift_consistency`), and the divergence it reveals."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import ClassVar

import torch
from composer.core import Callback, Event, State, Time
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.models import ComposerClassifier
from composer.utils import create_interval_scheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from blurpool_algo.metrics import (
    PAPER_CROP_SIZE,
    PAPER_MAX_SHIFT,
    NonFiniteLogitsError,
    shift_consistency,
    validate_consistency_options,
)

__all__ = ["ShiftConsistencyMonitor", "network_of"]


class _BatchForward(nn.Module):
    """Images -> logits through a ComposerModel that is not a ComposerClassifier (its forward takes a batch)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images, None))


def network_of(model: nn.Module) -> nn.Module:
    """The images -> logits module inside the Trainer's model (past DDP and the ComposerClassifier wrapper)."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    if isinstance(model, ComposerClassifier):
        return model.module
    return _BatchForward(model)


class ShiftConsistencyMonitor(Callback):
    """Logs how often the model's top-1 survives a shift of its input, during training.

    At every ``interval`` (and at the end of training) it runs :func:`~blurpool_algo.metrics.shift_consistency` on its
    own dataloader, or on the Trainer's first evaluation dataloader when none is given, in the Trainer's precision,
    on every rank (counts are summed across ranks), and logs ``metrics/shift_consistency/<mode>``. The cost is two
    forward passes per image of at most ``num_batches`` batches per rank.

    A diverged model (NaN or infinite logits, :class:`~blurpool_algo.metrics.NonFiniteLogitsError`) does not stop
    training: that measurement logs ``metrics/shift_consistency/<mode>`` as NaN and ``metrics/shift_consistency/
    diverged`` as 1.0, sets :attr:`diverged`, and warns once. ``diverged`` then stays True for the monitor's life,
    even if a later measurement is finite again: weights that once gave non-finite logits are not to be trusted, and
    a run summary must say so. Any other error of the measurement propagates.

    Example:
        .. code-block:: python

            trainer = Trainer(..., callbacks=[ShiftConsistencyMonitor(val_loader_256px, num_batches=20)])

    Args:
        dataloader: yields ``(images, targets)`` of side ``crop_size + max_shift`` for ``'crop'`` (ImageNet: Resize 256
            + CenterCrop 256); None: the Trainer's first evaluation dataloader.
        mode: ``'crop'`` (the paper's protocol) or ``'circular'`` (``torch.roll`` shifts).
        max_shift: shift range in pixels.
        crop_size: the crop side (``'crop'``; None = image side - max_shift) or an optional centre crop
            (``'circular'``).
        num_batches: batches per measurement and rank; None: the whole loader.
        interval: a Composer time string (``'1ep'``, ``'500ba'``) or an int number of epochs.
        seed: seeds the offsets, so every measurement uses the same draws and a change means the model changed.
        offsets: ``'per_image'`` or ``'per_batch'`` (the paper's code).

    Attributes:
        protocol: the measurement's :class:`~blurpool_algo.metrics.ConsistencyProtocol` (mode, max_shift, crop_size;
            its ``frame_size`` is the side the dataloader's images need, None when the crop comes from the images).
        last_value: the most recent consistency in percent (None before the first measurement, NaN when that
            measurement found the model diverged).
        diverged: whether any measurement found non-finite logits; never reset.
        diverged_images: at the first diverged measurement, the images whose logits were non-finite (None before).
        diverged_images_seen: the images measured by then, that batch included (None before).
        diverged_at_batch: the training batch after which that measurement ran (None before).
    """

    #: The key logged as 1.0 at each measurement that finds the model diverged (the same for every mode).
    diverged_metric_name: ClassVar[str] = "metrics/shift_consistency/diverged"

    def __init__(
        self,
        dataloader: Iterable | None = None,
        mode: str = "crop",
        max_shift: int = PAPER_MAX_SHIFT,
        crop_size: int | None = PAPER_CROP_SIZE,
        num_batches: int | None = None,
        interval: str | int | Time = "1ep",
        seed: int = 0,
        offsets: str = "per_image",
    ) -> None:
        self.protocol = validate_consistency_options(
            mode=mode, max_shift=max_shift, crop_size=crop_size, offsets=offsets, num_batches=num_batches, seed=seed
        )
        try:
            self._should_measure = create_interval_scheduler(
                interval, checkpoint_events=False, final_events={Event.FIT_END}
            )
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ValueError(
                f"interval must be a Composer time string such as '1ep' or '500ba', got {interval!r}: {exc}"
            ) from None
        self.dataloader = dataloader
        self.mode, self.max_shift, self.crop_size = mode, max_shift, crop_size
        self.num_batches, self.interval, self.seed, self.offsets = num_batches, interval, seed, offsets
        self.last_value: float | None = None
        self.diverged = False
        self.diverged_images: int | None = None
        self.diverged_images_seen: int | None = None
        self.diverged_at_batch: int | None = None

    @property
    def metric_name(self) -> str:
        """The logged key, ``metrics/shift_consistency/<mode>``."""
        return f"metrics/shift_consistency/{self.mode}"

    def _loader(self, state: State) -> Iterable:
        if self.dataloader is not None:
            return self.dataloader
        if not state.evaluators:
            raise ValueError(
                "ShiftConsistencyMonitor has no dataloader: give it one, or give the Trainer an eval_dataloader"
            )
        return state.evaluators[0].dataloader.dataloader

    def measure(self, state: State) -> float:
        """Measures now, on every rank; returns the consistency in percent, or NaN for a diverged model."""
        try:
            with get_precision_context(state.precision, state.precision_config):
                value = shift_consistency(
                    network_of(state.model),
                    self._loader(state),
                    mode=self.mode,
                    max_shift=self.max_shift,
                    crop_size=self.crop_size,
                    seed=self.seed,
                    offsets=self.offsets,
                    num_batches=self.num_batches,
                )
        except NonFiniteLogitsError as exc:
            # Every rank raises it together (the metric agrees across ranks first), so every rank takes this path.
            self._record_divergence(state, exc)
            value = math.nan
        self.last_value = value
        return value

    def _record_divergence(self, state: State, exc: NonFiniteLogitsError) -> None:
        if self.diverged:
            return  # keep the first divergence's numbers, and warn once
        self.diverged = True
        self.diverged_images, self.diverged_images_seen = exc.nonfinite_images, exc.images_seen
        self.diverged_at_batch = int(state.timestamp.batch)
        warnings.warn(
            f"run {state.run_name!r} diverged: after batch {self.diverged_at_batch}, {exc.nonfinite_images} of "
            f"{exc.images_seen} images got NaN or infinite logits; {self.metric_name} is logged as NaN and "
            f"{self.diverged_metric_name} as 1.0",
            UserWarning,
            stacklevel=2,
        )

    def _maybe_measure(self, state: State, event: Event, logger: Logger) -> None:
        if self._should_measure(state, event):
            value = self.measure(state)
            metrics = {self.metric_name: value}
            if math.isnan(value):  # only a diverged model gives NaN: a finite count of images never does
                metrics[self.diverged_metric_name] = 1.0
            logger.log_metrics(metrics)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._maybe_measure(state, Event.BATCH_END, logger)

    def epoch_end(self, state: State, logger: Logger) -> None:
        self._maybe_measure(state, Event.EPOCH_END, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._maybe_measure(state, Event.FIT_END, logger)
