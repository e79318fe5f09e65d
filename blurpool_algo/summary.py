"""What a finished run reports: :class:`RunSummary`, its one-line form (:func:`describe_run`) and its JSON file.

Standard library only (no Composer, no torch), so the A/B runner can format the summaries it reads back from JSON
without importing a trainer. :func:`describe_run` is the one formatting: ``str(RunSummary)``, ``run.py`` and the A/B
runner all print it.

Example:
    >>> summary = RunSummary(run_name="quickstart", accuracy=97.25, wall_time=61.04, algorithms=["BlurPool"],
    ...                      shift_consistency={"crop": 93.5, "circular": 88.25}, throughput={"samples_per_sec": 812.4})
    >>> print(summary)  # doctest: +NORMALIZE_WHITESPACE
    quickstart: top-1 accuracy 97.25 %, crop consistency 93.50 %, circular consistency 88.25 %, 812 samples/s,
    wall time 61.0 s, algorithms: BlurPool
    >>> print(describe_run({"run_name": "lr", "diverged": True, "diverged_at_batch": 7, "wall_time": 3.0,
    ...                     "algorithms": []}))
    lr: DIVERGED at batch 7 (non-finite outputs): no accuracy or consistency reported, wall time 3.0 s, algorithms: none
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from blurpool_algo.files import write_json_atomically

if TYPE_CHECKING:
    from blurpool_algo.metrics import DiagonalStability

__all__ = ["HISTORY_KEYS", "RunSummary", "describe_run", "write_summary_json"]

#: The logged series a run's summary keeps: eval top-1 (fraction), windowed throughput, shift consistency.
HISTORY_KEYS: tuple[str, ...] = (
    "metrics/eval/MulticlassAccuracy",
    "throughput/samples_per_sec",
    "metrics/shift_consistency/crop",
    "metrics/shift_consistency/circular",
)


@dataclass
class RunSummary:
    """What a finished run reports (the same on every rank).

    Attributes:
        run_name: Composer's run name.
        accuracy: final top-1 accuracy in percent, reduced over ranks.
        wall_time: seconds from building the Trainer to the end of the final evaluation.
        algorithms: class names of the run's algorithms.
        shift_consistency: mode -> consistency in percent: the last of each ShiftConsistencyMonitor (``'crop'``,
            ``'circular'``), and ``'circular'`` measured after training on a crop monitor's images when no monitor
            measures it (:func:`~blurpool_algo.trainer.run_recipe`).
        throughput: the ThroughputMonitor's fit summary (``samples_per_sec``, ``peak_memory_bytes``, ...), if any.
        diverged: the model's outputs went non-finite (a NaN or infinite final training loss, or NaN/inf logits in a
            shift-consistency measurement): its accuracy and consistency mean nothing, and are not reported.
        diverged_at_batch: the first batch at which that was seen.
    """

    run_name: str
    accuracy: float
    wall_time: float
    algorithms: list[str]
    shift_consistency: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    #: Logged key -> ``[batch, value]`` pairs over training, for :data:`HISTORY_KEYS` (the A/B runner plots them).
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    #: The diagonal stability curve at the end of training, when asked for (``run_recipe(..., stability=True)``).
    stability: DiagonalStability | None = None
    diverged: bool = False
    diverged_at_batch: int | None = None
    #: Unreadable image files the run's loaders skipped (``data.max_bad_images``), training and evaluation trees.
    bad_images: int = 0

    def __str__(self) -> str:
        return describe_run(asdict(self))


def describe_run(summary: Mapping[str, Any]) -> str:
    """One line for a run summary (a :class:`RunSummary` as a dict, as its JSON holds it): run.py and the A/B print
    it. A diverged run shows no accuracy or consistency, which would be numbers of a model with no meaning."""
    if summary.get("diverged"):
        parts = [f"DIVERGED at batch {summary.get('diverged_at_batch')} (non-finite outputs): no accuracy or "
                 "consistency reported"]  # fmt: skip
    else:
        parts = [f"top-1 accuracy {summary['accuracy']:.2f} %"]
        parts += [
            f"{mode} consistency {value:.2f} %" for mode, value in (summary.get("shift_consistency") or {}).items()
        ]
    throughput = summary.get("throughput") or {}
    if "samples_per_sec" in throughput:
        parts.append(f"{throughput['samples_per_sec']:.0f} samples/s")
    if throughput.get("peak_memory_bytes"):
        parts.append(f"peak memory {throughput['peak_memory_bytes'] / 2**20:.0f} MiB")
    parts.append(f"wall time {summary['wall_time']:.1f} s")
    if summary.get("bad_images"):
        parts.append(f"{summary['bad_images']} unreadable images skipped")
    return f"{summary['run_name']}: {', '.join(parts)}, algorithms: {', '.join(summary['algorithms']) or 'none'}"


def write_summary_json(summary: RunSummary, path: str | os.PathLike[str]) -> None:
    """Writes ``summary`` (with its history and stability curve) as JSON, whole or not at all."""
    write_json_atomically(path, asdict(summary))
