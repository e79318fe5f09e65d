"""Composer callbacks that measure what BlurPool is for and what it costs.

:class:`ShiftConsistencyMonitor` measures what it is for: how often the model's top-1 survives a shift of the input
(:func:`blurpool_algo.metrics.shift_consistency`), logged during training.

:class:`ThroughputMonitor` measures the cost: throughput, compute time per batch, the share of each step spent waiting
for the dataloader, and peak memory, so that an A/B between a baseline and a BlurPool run compares the model and not a
dataloader bottleneck.
"""

from __future__ import annotations

import math
import resource
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable
from typing import ClassVar, NamedTuple

import torch
from composer.callbacks import SpeedMonitor
from composer.core import Callback, Event, State, Time
from composer.core.precision import get_precision_context
from composer.devices import DeviceGPU
from composer.loggers import Logger
from composer.models import ComposerClassifier
from composer.utils import create_interval_scheduler, dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from blurpool_algo.metrics import NonFiniteLogitsError, shift_consistency, validate_consistency_options

__all__ = ["ShiftConsistencyMonitor", "ThroughputMonitor", "network_of"]

_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"


def _proc_status_bytes(field: str) -> int | None:
    """Returns a ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or None where unreadable."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark (``VmHWM``); returns whether that worked.

    Writing ``5`` to ``/proc/self/clear_refs`` does this on Linux >= 4.0; containers may forbid it.
    """
    try:
        with open(_PROC_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
    except OSError:  # PermissionError included; also the file is missing outside Linux
        return False
    return True


def _max_rss_bytes() -> int:
    """The process's lifetime peak resident set from ``getrusage``, in bytes (it cannot be reset)."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024


class _Batch(NamedTuple):
    samples: int  # global, over all ranks
    wait: float  # seconds waiting for the dataloader
    compute: float  # seconds from the batch's arrival to BATCH_END, device synchronized


class ThroughputMonitor(Callback):
    """Logs throughput, compute time, dataloader wait and peak memory of training.

    Each training batch's *step time* is the time waiting for the dataloader (``Event.BEFORE_DATALOADER`` to
    ``Event.AFTER_DATALOADER``) plus its compute (``Event.AFTER_DATALOADER`` to ``Event.BATCH_END``: host-to-device
    copy, forward, backward, optimizer step, train metrics and whatever algorithms and callbacks run before this one
    at ``BATCH_END``), read with :func:`time.perf_counter` after synchronizing the GPU, if any. Time between batches
    (evaluation, checkpointing, callbacks after ``BATCH_END``) is not counted, whereas Composer's wall clock, and so
    :class:`~composer.callbacks.SpeedMonitor`, counts it into the next batch. Samples are global (all ranks), the
    delta of ``state.timestamp.sample``, like SpeedMonitor's; times are this rank's own.

    Once ``window_size`` batches have run, every ``Event.BATCH_END`` logs over the last ``window_size`` batches the
    keys below. The first four are SpeedMonitor's keys with its meaning (per second of step time rather than of wall
    clock), so dashboards compare across the two; for the same reason the two callbacks must not run together, and
    ``Event.INIT`` warns if they do.

    ========================================== =====================================================================
    Key                                        Logged value
    ========================================== =====================================================================
    ``throughput/samples_per_sec``             global samples / summed step time
    ``throughput/batches_per_sec``             batches / summed step time
    ``throughput/device/samples_per_sec``      ``throughput/samples_per_sec`` / world size
    ``throughput/device/batches_per_sec``      ``throughput/batches_per_sec`` / world size
    ``throughput/compute_time_per_batch``      mean compute time of a batch, seconds
    ``throughput/dataloader_wait_fraction``    summed dataloader wait / summed step time, 0 to 1
    ``throughput/peak_memory_bytes``           this rank's peak memory since ``Event.FIT_START``, bytes
    ========================================== =====================================================================

    At ``Event.FIT_END`` it stores :attr:`summary` over the whole fit and logs each entry as ``throughput/fit/<key>``:
    ``samples_per_sec``, ``batches_per_sec``, ``device_samples_per_sec``, ``compute_time_per_batch``,
    ``dataloader_wait_fraction`` (as above), ``peak_memory_bytes`` (the maximum over ranks) and ``num_batches`` (the
    batches measured). The fit's first batch is left out when more than one ran: it pays for warm-up (allocator
    growth, cuDNN autotuning, lazy initialization). With no batch measured the rates are NaN.

    Peak memory: on a GPU, ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's reserve),
    reset at ``Event.FIT_START``. On the CPU, the process's resident set: the largest of ``VmRSS`` samples taken at
    ``Event.AFTER_LOSS`` (where activations saved for backward peak) and ``Event.BATCH_END``, and of the kernel's
    high-water mark ``VmHWM`` when it could be reset at ``FIT_START`` (which also catches temporaries freed inside the
    forward pass). It counts everything the process holds, not only the model, and not dataloader workers, so compare
    runs made in separate processes. Outside Linux it is ``getrusage``'s ``ru_maxrss``, the process's lifetime peak.
    :attr:`peak_memory_source` names the method used.

    Args:
        window_size (int, optional): Number of most recent batches the logged rates average over. Defaults to 100.

    Attributes:
        summary (dict[str, float]): The last fit's summary, set at ``Event.FIT_END``; empty before.
        peak_memory_source (str): How peak memory is measured: ``"cuda"``, ``"rss+hwm"`` (VmRSS samples and a reset
            VmHWM), ``"rss"`` (VmRSS samples only, the reset was refused), ``"ru_maxrss"``; empty before a fit.

    Example:
        >>> trainer = Trainer(..., callbacks=[ThroughputMonitor(window_size=50)])  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
        >>> trainer.state.callbacks[0].summary["samples_per_sec"]  # doctest: +SKIP
    """

    def __init__(self, window_size: int = 100) -> None:
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ValueError(
                f"window_size must be an int >= 1 (the number of batches to average over), got {window_size!r}"
            )
        self.window_size = window_size
        self.summary: dict[str, float] = {}
        self.peak_memory_source = ""
        self._reset()

    def _reset(self) -> None:
        self._window: deque[_Batch] = deque(maxlen=self.window_size)
        self._wait_start: float | None = None
        self._compute_start: float | None = None
        self._wait: float = 0.0
        self._first: _Batch | None = None
        self._num_after_first = 0
        self._samples_after_first = 0
        self._wait_after_first = 0.0
        self._compute_after_first = 0.0
        self._use_cuda = False
        self._peak_rss_sampled = 0

    def _synchronize(self) -> None:
        # CUDA kernels run asynchronously: without this, time would go to whichever event happens to block.
        if self._use_cuda:
            torch.cuda.synchronize()

    def _sample_rss(self) -> None:
        if self.peak_memory_source in ("rss", "rss+hwm"):
            rss = _proc_status_bytes("VmRSS")
            if rss is not None:
                self._peak_rss_sampled = max(self._peak_rss_sampled, rss)

    def _peak_memory_bytes(self) -> int:
        """This rank's peak memory since the fit started, in bytes (see the class docstring for the method)."""
        if self.peak_memory_source == "cuda":
            return int(torch.cuda.max_memory_allocated(torch.cuda.current_device()))
        if self.peak_memory_source == "ru_maxrss":
            return _max_rss_bytes()
        peak = self._peak_rss_sampled
        if self.peak_memory_source == "rss+hwm":
            peak = max(peak, _proc_status_bytes("VmHWM") or 0)
        return peak

    def compute_summary(self) -> dict[str, float]:
        """Summarizes the fit so far, leaving out its first batch when more than one ran.

        Unlike the summary made at ``Event.FIT_END``, ``peak_memory_bytes`` is this rank's own: this method runs no
        collective, so any rank may call it at any time.

        Returns:
            dict[str, float]: The keys listed in the class docstring.
        """
        if self._num_after_first > 0:
            num, samples = self._num_after_first, self._samples_after_first
            wait, compute = self._wait_after_first, self._compute_after_first
        elif self._first is not None:
            num, samples, wait, compute = 1, self._first.samples, self._first.wait, self._first.compute
        else:
            num, samples, wait, compute = 0, 0, 0.0, 0.0
        step = wait + compute
        nan = math.nan
        samples_per_sec = samples / step if step > 0 else nan
        return {
            "samples_per_sec": samples_per_sec,
            "batches_per_sec": num / step if step > 0 else nan,
            "device_samples_per_sec": samples_per_sec / dist.get_world_size(),
            "compute_time_per_batch": compute / num if num > 0 else nan,
            "dataloader_wait_fraction": wait / step if step > 0 else nan,
            "peak_memory_bytes": float(self._peak_memory_bytes()),
            "num_batches": float(num),
        }

    def init(self, state: State, logger: Logger) -> None:
        del logger  # unused
        if any(isinstance(callback, SpeedMonitor) for callback in state.callbacks):
            warnings.warn(
                "ThroughputMonitor and SpeedMonitor both log throughput/samples_per_sec, throughput/batches_per_sec "
                "and their throughput/device/ forms, with different time bases; the logged series would mix. "
                "Keep one of the two.",
                stacklevel=2,
            )

    def fit_start(self, state: State, logger: Logger) -> None:
        del logger  # unused
        self._reset()
        self._use_cuda = isinstance(state.device, DeviceGPU)
        if self._use_cuda:
            # DeviceGPU made the trainer's GPU the current device.
            torch.cuda.reset_peak_memory_stats(torch.cuda.current_device())
            self.peak_memory_source = "cuda"
        elif _proc_status_bytes("VmRSS") is not None:
            self.peak_memory_source = "rss+hwm" if _reset_peak_rss() else "rss"
            self._sample_rss()
        else:
            self.peak_memory_source = "ru_maxrss"

    def before_dataloader(self, state: State, logger: Logger) -> None:
        del state, logger  # unused
        # Let queued GPU work from between batches (evaluation) finish before the wait starts. Composer fires this
        # event once more at the end of each epoch with no AFTER_DATALOADER; the next batch's call overwrites it.
        self._synchronize()
        self._wait_start = time.perf_counter()

    def after_dataloader(self, state: State, logger: Logger) -> None:
        del state, logger  # unused
        self._synchronize()
        now = time.perf_counter()
        self._wait = now - self._wait_start if self._wait_start is not None else 0.0
        self._wait_start = None
        self._compute_start = now

    def after_loss(self, state: State, logger: Logger) -> None:
        del state, logger  # unused
        self._sample_rss()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._compute_start is None:  # no AFTER_DATALOADER seen for this batch
            return
        self._synchronize()
        compute = time.perf_counter() - self._compute_start
        self._compute_start = None
        self._sample_rss()

        samples = int(state.timestamp.sample.value) - int(state.previous_timestamp.sample.value)
        batch = _Batch(samples, self._wait, compute)
        self._window.append(batch)
        if self._first is None:
            self._first = batch
        else:
            self._num_after_first += 1
            self._samples_after_first += samples
            self._wait_after_first += batch.wait
            self._compute_after_first += compute

        if len(self._window) < self.window_size:
            return
        wait = sum(b.wait for b in self._window)
        compute_sum = sum(b.compute for b in self._window)
        step = wait + compute_sum
        if step <= 0:  # a clock too coarse to time this window
            return
        world_size = dist.get_world_size()
        samples_per_sec = sum(b.samples for b in self._window) / step
        batches_per_sec = len(self._window) / step
        logger.log_metrics(
            {
                "throughput/samples_per_sec": samples_per_sec,
                "throughput/batches_per_sec": batches_per_sec,
                "throughput/device/samples_per_sec": samples_per_sec / world_size,
                "throughput/device/batches_per_sec": batches_per_sec / world_size,
                "throughput/compute_time_per_batch": compute_sum / len(self._window),
                "throughput/dataloader_wait_fraction": wait / step,
                "throughput/peak_memory_bytes": self._peak_memory_bytes(),
            }
        )

    def fit_end(self, state: State, logger: Logger) -> None:
        summary = self.compute_summary()
        # Every rank reaches FIT_END, so this collective cannot hang; without a process group it returns at once.
        peak = state.device.tensor_to_device(torch.tensor([summary["peak_memory_bytes"]], dtype=torch.float64))
        dist.all_reduce(peak, reduce_operation="MAX")
        summary["peak_memory_bytes"] = float(peak.item())
        self.summary = summary
        logger.log_metrics({f"throughput/fit/{key}": value for key, value in summary.items()})


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
        max_shift: int = 32,
        crop_size: int | None = 224,
        num_batches: int | None = None,
        interval: str | int | Time = "1ep",
        seed: int = 0,
        offsets: str = "per_image",
    ) -> None:
        validate_consistency_options(
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
