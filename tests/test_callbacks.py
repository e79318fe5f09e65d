"""ThroughputMonitor in a real Composer Trainer on the CPU: logged keys, sample counts, wait and compute timing, what
the step time leaves out, peak memory, multi-rank arithmetic, validation and checkpoints."""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch
from composer import Trainer
from composer.callbacks import SpeedMonitor
from composer.core import Callback, State
from composer.loggers import InMemoryLogger, Logger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import blurpool_algo.callbacks.peak_memory as peak_memory_module
import blurpool_algo.callbacks.throughput as throughput_module
from blurpool_algo.callbacks import ShiftConsistencyMonitor, ThroughputMonitor
from blurpool_algo.metrics import ConsistencyProtocol, shift_consistency

NUM_CLASSES = 10
MB = 1024 * 1024
WINDOWED_KEYS = [
    "throughput/samples_per_sec",
    "throughput/batches_per_sec",
    "throughput/device/samples_per_sec",
    "throughput/device/batches_per_sec",
    "throughput/compute_time_per_batch",
    "throughput/dataloader_wait_fraction",
    "throughput/peak_memory_bytes",
]
SUMMARY_KEYS = [
    "samples_per_sec",
    "batches_per_sec",
    "device_samples_per_sec",
    "compute_time_per_batch",
    "dataloader_wait_fraction",
    "peak_memory_bytes",
    "num_batches",
]

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from Linux /proc")


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES)
    )


class _SleepyNet(nn.Module):
    """The tiny net, sleeping in its forward: on every call, or on the first call only."""

    def __init__(self, seconds: float, first_only: bool = False) -> None:
        super().__init__()
        self.net = _net()
        self.seconds = seconds
        self.first_only = first_only
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.first_only or self.calls == 1:
            time.sleep(self.seconds)
        return self.net(x)


class _SavesBigActivation(nn.Module):
    """Keeps a large tensor alive from the forward pass until backward, as a real activation would be."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.net = _net()
        self.scale = nn.Parameter(torch.ones(()))
        self.numel = nbytes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.ones(self.numel)  # written, so resident
        # The product's backward needs `big` for the gradient of `scale`, so autograd holds it until backward.
        return self.net(x) + (big * self.scale).sum() * 0.0


class _FreesBigTemporary(nn.Module):
    """Allocates a large tensor in the forward pass and frees it before returning."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.net = _net()
        self.numel = nbytes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.ones(self.numel).sum()
        return self.net(x) + total * 0.0


class _SlowDataset(Dataset):
    """Random images and labels whose ``__getitem__`` sleeps, like a dataloader that cannot keep up."""

    def __init__(self, n: int, seconds: float) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.seconds)
        return self.images[i], self.labels[i]


class _SleepAtBatchEnd(Callback):
    """Stands in for checkpointing or a slow callback that runs between batches, after the monitor."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def batch_end(self, state: State, logger: Logger) -> None:
        time.sleep(self.seconds)


def _dataset(n: int = 24) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return TensorDataset(images, labels)


def _fit(
    monitor: ThroughputMonitor,
    net: nn.Module | None = None,
    dataset: Dataset | None = None,
    max_duration: str = "6ba",
    callbacks: list[Callback] | None = None,
    **kwargs,
) -> InMemoryLogger:
    """Fits a tiny classifier with batch size 4 on the CPU; returns the logger holding what was logged."""
    torch.manual_seed(0)
    model = ComposerClassifier(net if net is not None else _net(), num_classes=NUM_CLASSES)
    memory = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(dataset if dataset is not None else _dataset(), batch_size=4),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
        max_duration=max_duration,
        callbacks=[monitor, *(callbacks or [])],
        loggers=[memory],
        device="cpu",
        progress_bar=False,
        **kwargs,
    )
    trainer.fit()
    trainer.close()
    return memory


def _values(memory: InMemoryLogger, key: str) -> list[float]:
    return [value for _, value in memory.data.get(key, [])]


def test_every_key_is_logged_once_the_window_is_full():
    monitor = ThroughputMonitor(window_size=2)
    memory = _fit(monitor, max_duration="6ba")

    for key in WINDOWED_KEYS:
        values = _values(memory, key)
        assert len(values) == 5, key  # batches 2..6
        assert all(math.isfinite(v) and v > 0 for v in values if key != "throughput/dataloader_wait_fraction"), key
    assert all(0.0 <= v <= 1.0 for v in _values(memory, "throughput/dataloader_wait_fraction"))
    assert sorted(monitor.summary) == sorted(SUMMARY_KEYS)
    for key in SUMMARY_KEYS:
        assert _values(memory, f"throughput/fit/{key}") == [monitor.summary[key]], key
    assert monitor.summary["num_batches"] == 5  # the first of 6 batches is left out


def test_nothing_windowed_is_logged_before_the_window_is_full():
    monitor = ThroughputMonitor(window_size=10)
    memory = _fit(monitor, max_duration="6ba")

    assert not [key for key in memory.data if key in WINDOWED_KEYS]
    for key in SUMMARY_KEYS:
        assert len(_values(memory, f"throughput/fit/{key}")) == 1, key
    assert monitor.summary["num_batches"] == 5


def test_a_single_batch_fit_is_summarized_with_that_batch():
    monitor = ThroughputMonitor(window_size=1)
    _fit(monitor, max_duration="1ba")

    assert monitor.summary["num_batches"] == 1
    assert monitor.summary["samples_per_sec"] / monitor.summary["batches_per_sec"] == pytest.approx(4)


@pytest.mark.filterwarnings("ignore:Cannot split tensor:UserWarning")  # Composer, about the short last batch
def test_samples_are_counted_from_the_timestamp_including_a_short_last_batch():
    # 22 samples in batches of 4: five full batches and one of 2.
    monitor = ThroughputMonitor(window_size=2)
    memory = _fit(monitor, dataset=_dataset(22), max_duration="1ep")

    summary = monitor.summary
    assert summary["num_batches"] == 5
    # Batches 2..6 (the first is left out) hold 4 * 4 + 2 samples.
    assert summary["samples_per_sec"] / summary["batches_per_sec"] == pytest.approx(18 / 5)
    assert summary["device_samples_per_sec"] == pytest.approx(summary["samples_per_sec"])  # world size 1
    samples = _values(memory, "throughput/samples_per_sec")
    batches = _values(memory, "throughput/batches_per_sec")
    assert [s / b for s, b in zip(samples, batches, strict=True)] == pytest.approx([4, 4, 4, 4, 3])


def test_compute_summary_is_available_during_the_fit():
    class Probe(Callback):
        def __init__(self, monitor: ThroughputMonitor) -> None:
            self.monitor = monitor
            self.seen: list[float] = []

        def batch_end(self, state: State, logger: Logger) -> None:
            self.seen.append(self.monitor.compute_summary()["num_batches"])

    monitor = ThroughputMonitor(window_size=2)
    probe = Probe(monitor)
    _fit(monitor, max_duration="4ba", callbacks=[probe])

    # After the first batch it is summarized alone; from the second on, the first is left out.
    assert probe.seen == [1, 1, 2, 3]
    assert monitor.summary["num_batches"] == 3


def test_dataloader_wait_fraction_tells_a_slow_loader_from_a_fast_one():
    slow, fast = ThroughputMonitor(window_size=2), ThroughputMonitor(window_size=2)
    _fit(slow, dataset=_SlowDataset(16, seconds=0.025), max_duration="4ba")  # 100 ms of waiting per batch
    _fit(fast, max_duration="4ba")

    # Seconds of waiting per batch. The slow loader's sleeps are a floor that no load on the machine can lower (an
    # absolute bound on the fast loader's fraction was flaky on a loaded 2-core machine); the fast one is the control.
    def wait_per_batch(summary: dict[str, float]) -> float:
        return summary["dataloader_wait_fraction"] / summary["batches_per_sec"]

    assert wait_per_batch(slow.summary) >= 0.1
    assert wait_per_batch(fast.summary) < 0.1
    # A slow loader lowers the throughput; its waiting is not counted as the model's compute.
    assert slow.summary["samples_per_sec"] < fast.summary["samples_per_sec"]
    assert slow.summary["compute_time_per_batch"] < wait_per_batch(slow.summary)


def test_compute_time_tells_a_slow_model():
    monitor = ThroughputMonitor(window_size=2)
    memory = _fit(monitor, net=_SleepyNet(0.05), max_duration="4ba")

    assert monitor.summary["compute_time_per_batch"] >= 0.05
    assert all(v >= 0.05 for v in _values(memory, "throughput/compute_time_per_batch"))
    assert monitor.summary["dataloader_wait_fraction"] < 0.25


def test_the_summary_leaves_out_the_first_batch():
    # Only the first forward sleeps. Counted in, it alone would make the mean over 5 batches >= 0.1 s.
    monitor = ThroughputMonitor(window_size=5)
    memory = _fit(monitor, net=_SleepyNet(0.5, first_only=True), max_duration="5ba")

    # The one full window does hold the first batch: the sleep is measured.
    assert _values(memory, "throughput/compute_time_per_batch") == [pytest.approx(0.1, abs=0.05)]
    assert monitor.summary["num_batches"] == 4
    assert monitor.summary["compute_time_per_batch"] < 0.5 / 5


def test_step_time_leaves_out_evaluation_epoch_ends_and_work_between_batches():
    # Two epochs of 3 batches; a 0.2 s evaluation at each epoch end, 0.1 s of other callbacks after each batch.
    # Composer fires BEFORE_DATALOADER at each epoch end with no batch to follow; the next epoch's must replace it.
    monitor = ThroughputMonitor(window_size=1)
    memory = _fit(
        monitor,
        dataset=_dataset(12),
        max_duration="2ep",
        callbacks=[_SleepAtBatchEnd(0.1)],
        eval_dataloader=DataLoader(_SlowDataset(1, seconds=0.2), batch_size=1),
        eval_interval="1ep",
    )

    assert monitor.summary["num_batches"] == 5
    waits = _values(memory, "throughput/dataloader_wait_fraction")
    assert len(waits) == 6
    assert max(waits) < 0.5
    assert 1 / monitor.summary["batches_per_sec"] < 0.1  # the mean step time


@linux_only
def test_peak_memory_sees_an_activation_held_for_backward():
    base, big = ThroughputMonitor(window_size=1), ThroughputMonitor(window_size=1)
    _fit(base, max_duration="2ba")
    memory = _fit(big, net=_SavesBigActivation(200 * MB), max_duration="2ba")

    assert base.summary["peak_memory_bytes"] > 0
    assert big.summary["peak_memory_bytes"] >= base.summary["peak_memory_bytes"] + 150 * MB
    assert _values(memory, "throughput/peak_memory_bytes")[-1] >= base.summary["peak_memory_bytes"] + 150 * MB


@linux_only
def test_peak_memory_of_a_temporary_freed_in_the_forward_pass():
    base, big = ThroughputMonitor(window_size=1), ThroughputMonitor(window_size=1)
    # A first fit in a fresh worker loads code and caches lazily (tens of MB): that would raise the base's peak, not
    # the temporary's, so a throwaway fit goes first.
    _fit(ThroughputMonitor(window_size=1), max_duration="1ba")
    _fit(base, max_duration="2ba")
    _fit(big, net=_FreesBigTemporary(200 * MB), max_duration="2ba")

    if big.peak_memory_source == "rss+hwm":
        # The kernel's high-water mark, reset at FIT_START, catches what no sample at an event can.
        assert big.summary["peak_memory_bytes"] >= base.summary["peak_memory_bytes"] + 150 * MB
    else:
        # This system refused the reset: the peak is what the samples saw, and not the process's stale high mark.
        assert big.peak_memory_source == "rss"
        assert big.summary["peak_memory_bytes"] == big._peak_memory.sampled


@linux_only
def test_peak_memory_leaves_out_a_peak_from_before_the_fit():
    stale = torch.ones(400 * MB // 4)
    del stale
    hwm_before = peak_memory_module._proc_status_bytes("VmHWM")
    assert hwm_before is not None

    monitor = ThroughputMonitor(window_size=1)
    _fit(monitor, max_duration="2ba")

    assert 0 < monitor.summary["peak_memory_bytes"] < hwm_before - 200 * MB


@linux_only
def test_peak_memory_falls_back_to_samples_when_the_reset_is_refused(monkeypatch):
    monkeypatch.setattr(peak_memory_module, "_reset_peak_rss", lambda: False)
    # Without the reset, VmHWM still holds this peak from before the fit: it must not be reported.
    stale = torch.ones(400 * MB // 4)
    del stale
    hwm_before = peak_memory_module._proc_status_bytes("VmHWM")
    assert hwm_before is not None

    base, big = ThroughputMonitor(window_size=1), ThroughputMonitor(window_size=1)
    _fit(base, max_duration="2ba")
    _fit(big, net=_SavesBigActivation(200 * MB), max_duration="2ba")

    assert base.peak_memory_source == big.peak_memory_source == "rss"
    assert 0 < base.summary["peak_memory_bytes"] < hwm_before - 200 * MB
    # The samples at AFTER_LOSS see the activation autograd holds for backward.
    assert big.summary["peak_memory_bytes"] >= base.summary["peak_memory_bytes"] + 150 * MB


def test_peak_memory_falls_back_to_getrusage_without_proc(monkeypatch):
    monkeypatch.setattr(peak_memory_module, "_proc_status_bytes", lambda field: None)
    monitor = ThroughputMonitor(window_size=1)
    _fit(monitor, max_duration="2ba")

    assert monitor.peak_memory_source == "ru_maxrss"
    assert monitor.summary["peak_memory_bytes"] > 0
    if os.path.exists("/proc/self/status"):  # a check in bytes independent of getrusage's units
        with open("/proc/self/status") as f:
            rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        assert monitor.summary["peak_memory_bytes"] >= rss_kb * 1024 * 0.9


class _FakeTwoRanks:
    """Stands in for ``composer.utils.dist`` in the callback's module: two ranks, the other with a higher peak."""

    def __init__(self, other_peak: float) -> None:
        self.other_peak = other_peak
        self.reductions: list[str] = []

    def get_world_size(self) -> int:
        return 2

    def all_reduce(self, tensor: torch.Tensor, reduce_operation: str = "SUM") -> None:
        self.reductions.append(reduce_operation)
        other = torch.full_like(tensor, self.other_peak)
        reduced = {"SUM": tensor + other, "MAX": torch.maximum(tensor, other), "MIN": torch.minimum(tensor, other)}
        tensor.copy_(reduced[reduce_operation])


def test_two_ranks_divide_device_rates_and_take_the_largest_peak(monkeypatch):
    fake = _FakeTwoRanks(other_peak=2.0**40)
    monkeypatch.setattr(throughput_module, "dist", fake)
    monitor = ThroughputMonitor(window_size=2)
    memory = _fit(monitor, max_duration="3ba")

    samples = _values(memory, "throughput/samples_per_sec")
    assert _values(memory, "throughput/device/samples_per_sec") == pytest.approx([s / 2 for s in samples])
    batches = _values(memory, "throughput/batches_per_sec")
    assert _values(memory, "throughput/device/batches_per_sec") == pytest.approx([b / 2 for b in batches])
    assert monitor.summary["device_samples_per_sec"] == pytest.approx(monitor.summary["samples_per_sec"] / 2)
    assert fake.reductions == ["MAX"]  # once, at FIT_END
    assert monitor.summary["peak_memory_bytes"] == 2.0**40


@pytest.mark.parametrize("window_size", [0, -3, 2.5, "10", None, True])
def test_window_size_must_be_a_positive_int(window_size):
    with pytest.raises(ValueError, match="window_size") as excinfo:
        ThroughputMonitor(window_size=window_size)
    assert repr(window_size) in str(excinfo.value)
    assert ">= 1" in str(excinfo.value)


def test_running_next_to_speed_monitor_warns_of_the_shared_keys():
    model = ComposerClassifier(_net(), num_classes=NUM_CLASSES)
    with pytest.warns(UserWarning, match="SpeedMonitor"):
        Trainer(
            model=model,
            train_dataloader=DataLoader(_dataset(), batch_size=4),
            optimizers=torch.optim.SGD(model.parameters(), lr=0.01),
            max_duration="1ba",
            callbacks=[ThroughputMonitor(), SpeedMonitor()],
            device="cpu",
            progress_bar=False,
        ).close()


def test_checkpoints_save_and_resume_with_the_monitor(tmp_path):
    first = ThroughputMonitor(window_size=2)
    _fit(first, max_duration="4ba", save_folder=str(tmp_path), save_interval="2ba")
    checkpoint = tmp_path / "ep0-ba4-rank0.pt"
    assert checkpoint.exists()

    resumed = ThroughputMonitor(window_size=2)
    memory = _fit(resumed, max_duration="6ba", load_path=str(checkpoint))

    # The resumed fit measures its own two batches only.
    assert resumed.summary["num_batches"] == 1
    assert len(_values(memory, "throughput/samples_per_sec")) == 1


# ------------------------------------------------------------------------------------------- ShiftConsistencyMonitor


def _consistency_trainer(monitor: ShiftConsistencyMonitor, *, duration: str = "2ep", eval_loader=True) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 20, 20, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (48,), generator=generator)
    torch.manual_seed(0)
    return Trainer(
        model=ComposerClassifier(_net(), num_classes=NUM_CLASSES),
        train_dataloader=DataLoader(TensorDataset(images, labels), batch_size=8),
        eval_dataloader=DataLoader(TensorDataset(images[:24], labels[:24]), batch_size=8) if eval_loader else None,
        max_duration=duration,
        callbacks=[monitor],
        loggers=[InMemoryLogger()],
        progress_bar=False,
        device="cpu",
    )


def _logged(trainer: Trainer, key: str) -> list[tuple[int, float]]:
    logger = next(d for d in trainer.logger.destinations if isinstance(d, InMemoryLogger))
    return [(int(stamp.batch), float(value)) for stamp, value in logger.data.get(key, [])]


@pytest.mark.parametrize("mode", ["crop", "circular"])
def test_shift_monitor_logs_at_each_epoch_the_number_the_metric_gives(mode):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(40, 3, 24, 24, generator=generator)
    loader = DataLoader(TensorDataset(images, torch.zeros(40, dtype=torch.long)), batch_size=16)
    monitor = ShiftConsistencyMonitor(loader, mode=mode, max_shift=4, crop_size=20 if mode == "crop" else None)
    trainer = _consistency_trainer(monitor)
    trainer.fit()
    logged = _logged(trainer, f"metrics/shift_consistency/{mode}")
    # 6 batches per epoch: one measurement at each epoch end, none repeated at the end of fit.
    assert [batch for batch, _ in logged] == [6, 12]
    reference = shift_consistency(
        trainer.state.model.module, loader, mode=mode, max_shift=4, crop_size=20 if mode == "crop" else None
    )
    assert logged[-1][1] == monitor.last_value == reference


class _RecordsTrainingMode(Callback):
    def __init__(self) -> None:
        self.modes: list[bool] = []

    def before_forward(self, state: State, logger: Logger) -> None:
        self.modes.append(state.model.training)


def test_shift_monitor_on_batch_intervals_and_at_the_end_of_training():
    monitor = ShiftConsistencyMonitor(mode="circular", max_shift=3, crop_size=None, interval="4ba")
    recorder = _RecordsTrainingMode()
    trainer = _consistency_trainer(monitor, duration="10ba")
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    # Every 4 batches, and once more at the end of training (batch 10).
    assert [batch for batch, _ in _logged(trainer, "metrics/shift_consistency/circular")] == [4, 8, 10]
    # Training resumed in training mode after each measurement.
    assert recorder.modes == [True] * 10


def test_shift_monitor_defaults_to_the_trainers_eval_loader():
    monitor = ShiftConsistencyMonitor(max_shift=4, crop_size=16)
    trainer = _consistency_trainer(monitor, duration="1ep")
    trainer.fit()
    eval_loader = trainer.state.evaluators[0].dataloader.dataloader
    reference = shift_consistency(trainer.state.model.module, eval_loader, max_shift=4, crop_size=16)
    assert _logged(trainer, "metrics/shift_consistency/crop") == [(6, reference)]


def test_shift_monitor_num_batches_bounds_each_measurement():
    class CountingLoader:
        def __init__(self) -> None:
            self.batches = 0

        def __iter__(self):
            for _ in range(10):
                self.batches += 1
                yield torch.randn(4, 3, 20, 20), torch.zeros(4, dtype=torch.long)

    loader = CountingLoader()
    trainer = _consistency_trainer(
        ShiftConsistencyMonitor(loader, max_shift=4, crop_size=16, num_batches=3), duration="2ep"
    )
    trainer.fit()
    assert loader.batches == 2 * 3


def test_shift_monitor_without_any_loader_says_what_to_give():
    trainer = _consistency_trainer(ShiftConsistencyMonitor(max_shift=4, crop_size=16), eval_loader=False)
    with pytest.raises(ValueError, match="give it one, or give the Trainer an eval_dataloader"):
        trainer.fit()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "roll"}, "mode must be one of"),
        ({"max_shift": 0}, "max_shift must be an int >= 1"),
        ({"crop_size": -3}, "crop_size must be an int >= 1 or None"),
        ({"num_batches": 0}, "num_batches must be an int >= 1 or None"),
        ({"interval": "soon"}, "interval must be a Composer time string"),
        ({"offsets": "random"}, "offsets must be one of"),
    ],
)
def test_shift_monitor_rejects_bad_options_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        ShiftConsistencyMonitor(**options)


# ---------------------------------------------------------------------------------- ShiftConsistencyMonitor: divergence


def _diverging_trainer(network: nn.Module, monitor: ShiftConsistencyMonitor, *, lr: float, batches: int) -> Trainer:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 16, 16, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (16,), generator=generator)
    model = ComposerClassifier(network, num_classes=NUM_CLASSES)
    return Trainer(
        model=model,
        train_dataloader=DataLoader(TensorDataset(images, labels), batch_size=8),
        optimizers=torch.optim.SGD(model.parameters(), lr=lr),
        max_duration=f"{batches}ba",
        callbacks=[monitor],
        loggers=[InMemoryLogger()],
        progress_bar=False,
        device="cpu",
    )


def _monitor_loader() -> DataLoader:
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=8)


def test_a_run_whose_weights_go_nan_logs_nan_and_diverged_and_finishes():
    torch.manual_seed(0)
    network = _net()
    monitor = ShiftConsistencyMonitor(_monitor_loader(), max_shift=4, crop_size=12, interval="1ba")
    trainer = _diverging_trainer(network, monitor, lr=1e30, batches=2)
    with pytest.warns(UserWarning, match="diverged") as caught:
        trainer.fit()  # no crash
    # The training really diverged: the second loss is NaN and so are the weights the monitor measured last.
    losses = [value for _, value in _logged(trainer, "loss/train/total")]
    assert len(losses) == 2 and math.isfinite(losses[0]) and math.isnan(losses[1])
    assert all(bool(p.isnan().all()) for p in network.parameters())

    consistency = _logged(trainer, "metrics/shift_consistency/crop")
    assert [batch for batch, _ in consistency] == [1, 2] and all(math.isnan(value) for _, value in consistency)
    assert _logged(trainer, "metrics/shift_consistency/diverged") == [(1, 1.0), (2, 1.0)]
    assert monitor.diverged and math.isnan(monitor.last_value)
    # The first diverged measurement stopped at the loader's first batch, every image of it non-finite.
    assert (monitor.diverged_images, monitor.diverged_images_seen, monitor.diverged_at_batch) == (8, 8, 1)
    # Warned once, naming the run, although two measurements diverged.
    messages = [str(w.message) for w in caught if "diverged" in str(w.message)]
    assert len(messages) == 1 and trainer.state.run_name in messages[0]


class _NaNWhenPoisoned(nn.Module):
    """The tiny net; in eval mode (the monitor's forward passes) its logits are NaN while ``poisoned``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.poisoned = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits * float("nan") if self.poisoned and not self.training else logits


class _PoisonAtBatch(Callback):
    def __init__(self, network: _NaNWhenPoisoned, batch: int) -> None:
        self.network, self.batch = network, batch

    def batch_start(self, state: State, logger: Logger) -> None:
        self.network.poisoned = int(state.timestamp.batch) + 1 == self.batch


def test_a_later_finite_measurement_does_not_erase_the_divergence():
    torch.manual_seed(0)
    network = _NaNWhenPoisoned()
    monitor = ShiftConsistencyMonitor(_monitor_loader(), max_shift=4, crop_size=12, interval="1ba")
    trainer = _diverging_trainer(network, monitor, lr=0.01, batches=3)
    trainer.state.callbacks.insert(0, _PoisonAtBatch(network, batch=2))
    with pytest.warns(UserWarning, match="diverged"):
        trainer.fit()
    values = [value for _, value in _logged(trainer, "metrics/shift_consistency/crop")]
    assert math.isfinite(values[0]) and math.isnan(values[1]) and math.isfinite(values[2])
    assert _logged(trainer, "metrics/shift_consistency/diverged") == [(2, 1.0)]
    # last_value is the latest measurement; diverged, and when, stay for the monitor's life.
    assert monitor.last_value == values[2] and monitor.diverged and monitor.diverged_at_batch == 2


def test_other_measurement_errors_still_stop_training():
    class OneRowInEval(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.net(x)
            return logits if self.training else logits[:1]

    monitor = ShiftConsistencyMonitor(_monitor_loader(), max_shift=4, crop_size=12, interval="1ba")
    trainer = _diverging_trainer(OneRowInEval(), monitor, lr=0.01, batches=1)
    with pytest.raises(ValueError, match="one row of logits per image"):
        trainer.fit()
    assert not monitor.diverged


def test_shift_monitor_exposes_its_protocol():
    monitor = ShiftConsistencyMonitor(mode="circular", max_shift=8, crop_size=36)
    assert monitor.protocol == ConsistencyProtocol(mode="circular", max_shift=8, crop_size=36)
    assert ShiftConsistencyMonitor().protocol.frame_size == 256  # the defaults: 224 px crops, shifts up to 32
