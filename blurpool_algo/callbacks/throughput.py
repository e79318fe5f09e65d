"""ThroughputMonitor: what BlurPool costs in training, per second of step time, with the dataloader's share and the
peak memory beside it."""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from dataclasses import dataclass

import torch
from composer.callbacks import SpeedMonitor
from composer.core import Callback, State
from composer.devices import DeviceGPU, DeviceMPS
from composer.loggers import Logger
from composer.utils import dist

from blurpool_algo.callbacks.peak_memory import PeakMemory
from blurpool_algo.checks import check_int

__all__ = ["ThroughputMonitor"]


@dataclass
class _Totals:
    """Batches, global samples, seconds waiting for the dataloader and seconds of compute, summed; the rates."""

    batches: int = 0
    samples: int = 0
    wait: float = 0.0
    compute: float = 0.0

    def add(self, other: _Totals) -> None:
        self.batches += other.batches
        self.samples += other.samples
        self.wait += other.wait
        self.compute += other.compute

    @property
    def step(self) -> float:
        return self.wait + self.compute

    def rates(self) -> dict[str, float]:
        """Per second of step time (NaN without any): the formulas of every logged and summarized value."""
        step, nan = self.step, math.nan
        return {
            "samples_per_sec": self.samples / step if step > 0 else nan,
            "batches_per_sec": self.batches / step if step > 0 else nan,
            "compute_time_per_batch": self.compute / self.batches if self.batches > 0 else nan,
            "dataloader_wait_fraction": self.wait / step if step > 0 else nan,
        }


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

    Peak memory (:mod:`blurpool_algo.callbacks.peak_memory`, the method chosen at ``Event.FIT_START``): on a GPU,
    ``torch.cuda.max_memory_allocated``, reset at ``FIT_START``; elsewhere samples at ``Event.AFTER_LOSS`` (where
    activations saved for backward peak) and ``Event.BATCH_END``, with the kernel's high-water mark ``VmHWM`` when it
    could be reset. On the CPU it counts everything the process holds (not dataloader workers), so compare runs made in
    separate processes. :attr:`peak_memory_source` names the method used.

    Args:
        window_size (int, optional): Number of most recent batches the logged rates average over. Defaults to 100.

    Attributes:
        summary (dict[str, float]): The last fit's summary, set at ``Event.FIT_END``; empty before.
        peak_memory_source (str): How peak memory is measured: ``"cuda"``, ``"mps"``, ``"rss+hwm"`` (VmRSS samples and
            a reset VmHWM), ``"rss"`` (VmRSS samples only, the reset was refused), ``"ru_maxrss"``; empty before a fit.

    Example:
        .. code-block:: python

            trainer = Trainer(..., callbacks=[ThroughputMonitor(window_size=50)])
            trainer.fit()
            trainer.state.callbacks[0].summary["samples_per_sec"]
    """

    def __init__(self, window_size: int = 100) -> None:
        self.window_size = check_int(
            "window_size", window_size, minimum=1, hint="the number of batches to average over"
        )
        self.summary: dict[str, float] = {}
        self._start_fit(device=None)

    def _start_fit(self, device: str | None) -> None:
        """Forgets the last fit; with a ``device`` (``'cuda'``, ``'mps'``, ``'cpu'``), starts measuring on it."""
        self._peak_memory = PeakMemory.start(device) if device is not None else None
        # CUDA kernels run asynchronously: without a sync, time would go to whichever event happens to block.
        self._synchronize = torch.cuda.synchronize if device == "cuda" else lambda: None
        self._window: deque[_Totals] = deque(maxlen=self.window_size)
        self._first: _Totals | None = None  # warm-up, left out of the summary when more batches ran
        self._after_first = _Totals()
        self._wait_start: float | None = None
        self._compute_start: float | None = None
        self._wait = 0.0

    @property
    def peak_memory_source(self) -> str:
        """How peak memory is measured (see the class docstring); empty before a fit."""
        return self._peak_memory.source if self._peak_memory is not None else ""

    def _peak_memory_bytes(self) -> int:
        return self._peak_memory.bytes() if self._peak_memory is not None else 0

    def compute_summary(self) -> dict[str, float]:
        """Summarizes the fit so far, leaving out its first batch when more than one ran.

        Unlike the summary made at ``Event.FIT_END``, ``peak_memory_bytes`` is this rank's own: this method runs no
        collective, so any rank may call it at any time.

        Returns:
            dict[str, float]: The keys listed in the class docstring.
        """
        totals = self._after_first if self._after_first.batches > 0 else self._first or _Totals()
        rates = totals.rates()
        return {
            "samples_per_sec": rates["samples_per_sec"],
            "batches_per_sec": rates["batches_per_sec"],
            "device_samples_per_sec": rates["samples_per_sec"] / dist.get_world_size(),
            "compute_time_per_batch": rates["compute_time_per_batch"],
            "dataloader_wait_fraction": rates["dataloader_wait_fraction"],
            "peak_memory_bytes": float(self._peak_memory_bytes()),
            "num_batches": float(totals.batches),
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
        device = (
            "cuda" if isinstance(state.device, DeviceGPU) else "mps" if isinstance(state.device, DeviceMPS) else "cpu"
        )
        self._start_fit(device)

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
        if self._peak_memory is not None:
            self._peak_memory.sample()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._compute_start is None or self._peak_memory is None:  # no AFTER_DATALOADER seen for this batch
            return
        self._synchronize()
        compute = time.perf_counter() - self._compute_start
        self._compute_start = None
        self._peak_memory.sample()
        samples = int(state.timestamp.sample.value) - int(state.previous_timestamp.sample.value)
        batch = _Totals(batches=1, samples=samples, wait=self._wait, compute=compute)
        self._window.append(batch)
        if self._first is None:
            self._first = batch
        else:
            self._after_first.add(batch)

        window = _Totals()
        for each in self._window:
            window.add(each)
        if len(self._window) < self.window_size or window.step <= 0:  # not full yet, or a clock too coarse
            return
        rates, world_size = window.rates(), dist.get_world_size()
        logger.log_metrics(
            {
                "throughput/samples_per_sec": rates["samples_per_sec"],
                "throughput/batches_per_sec": rates["batches_per_sec"],
                "throughput/device/samples_per_sec": rates["samples_per_sec"] / world_size,
                "throughput/device/batches_per_sec": rates["batches_per_sec"] / world_size,
                "throughput/compute_time_per_batch": rates["compute_time_per_batch"],
                "throughput/dataloader_wait_fraction": rates["dataloader_wait_fraction"],
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
