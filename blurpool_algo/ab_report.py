"""The A/B/n's report: statistics over the seeds, the noise verdicts, and the files people read (``report.json``,
``report.md``, three PNG plots), published together and each whole.

Each metric is summarised per arm as mean and sample standard deviation over the seeds; the difference between each
arm and the reference (the first arm) is judged against seed-to-seed noise with Welch's t-test (two-sided, 95 %). A
diverged run takes its arm out of the statistics: its numbers are those of a model with no meaning, and a mean over
the other seeds would flatter it.

Example:
    >>> baseline, treatment = describe_values([97.7, 97.6, 97.9]), describe_values([98.6, 98.8, 99.0])
    >>> round(treatment["mean"], 2), round(treatment["std"], 2)
    (98.8, 0.2)
    >>> compare(baseline, treatment)["verdict"]
    'beyond seed noise (t = +7.34, limit ±3.18)'
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from blurpool_algo.ab_plan import ARMS, Plan, arm_differences
from blurpool_algo.files import atomic_path, write_json_atomically, write_text_atomically
from blurpool_algo.metrics import DiagonalStability, plot_diagonal_stability

__all__ = [
    "METRICS",
    "REPORT_FILES",
    "build_report",
    "compare",
    "describe_values",
    "format_table",
    "markdown_report",
    "table_rows",
    "write_report",
]

#: The metrics of the report: key -> (label, unit, higher is better).
METRICS: dict[str, tuple[str, str, bool]] = {
    "accuracy": ("top-1 accuracy", "%", True),
    "shift_consistency": ("shift consistency", "%", True),
    "circular_consistency": ("circular consistency", "%", True),
    "samples_per_sec": ("throughput", "samples/s", True),
    "peak_memory": ("peak memory", "MiB", False),
    "wall_time": ("wall time", "s", False),
}
REPORT_FILES: tuple[str, ...] = ("report.json", "report.md", "accuracy.png", "stability.png", "throughput.png")
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond 30 the normal's 1.96 is close enough.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# -------------------------------------------------------------------------------------------------------- statistics


def _value(summary: dict[str, Any], metric: str) -> float:
    throughput = summary.get("throughput") or {}
    consistency = summary.get("shift_consistency") or {}
    if metric == "shift_consistency":
        return float(consistency.get("crop", math.nan))
    if metric == "circular_consistency":
        return float(consistency.get("circular", math.nan))
    if metric == "samples_per_sec":
        return float(throughput.get("samples_per_sec", math.nan))
    if metric == "peak_memory":
        return float(throughput.get("peak_memory_bytes", math.nan)) / 2**20
    return float(summary[metric])


def describe_values(values: Sequence[float], diverged_seeds: Sequence[int] = ()) -> dict[str, Any]:
    """``{mean, std, values}``; std is the sample standard deviation (0 for one value).

    With ``diverged_seeds``, ``mean`` and ``std`` are None and the seeds are kept under ``diverged_seeds`` (their
    ``values`` entries are None).
    """
    if diverged_seeds:
        return {"mean": None, "std": None, "values": list(values), "diverged_seeds": list(diverged_seeds)}
    finite = [v for v in values if not math.isnan(v)]
    mean = statistics.fmean(finite) if finite else math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else math.nan)
    return {"mean": mean, "std": std, "values": list(values)}


def compare(baseline: dict[str, Any], treatment: dict[str, Any], names: tuple[str, str] = ARMS) -> dict[str, Any]:
    """Treatment minus baseline (an arm minus the reference), and whether it exceeds seed-to-seed noise (Welch's
    t-test, two-sided, 95%). ``names`` are the two arms' names, for the verdict on a diverged arm."""
    gone = [arm for arm, stats in zip(names, (baseline, treatment), strict=True) if stats.get("diverged_seeds")]
    if gone:
        return {"difference": math.nan, "relative": math.nan, "beyond_noise": None, "t": math.nan,
                "verdict": f"n/a: the {' and '.join(gone)} arm{'s' if len(gone) > 1 else ''} diverged"}  # fmt: skip
    a, b = ([v for v in arm["values"] if not math.isnan(v)] for arm in (baseline, treatment))
    delta = treatment["mean"] - baseline["mean"]
    result: dict[str, Any] = {
        "difference": delta,
        "relative": delta / baseline["mean"] if baseline["mean"] else math.nan,
        "beyond_noise": None,
        "t": math.nan,
    }
    if len(a) < 2 or len(b) < 2:
        result["verdict"] = "one seed: noise unknown"
        return result
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        result["beyond_noise"] = delta != 0
        result["verdict"] = "no seed-to-seed spread" + (": beyond noise" if delta else ": identical")
        return result
    t = delta / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    critical = _T_975[max(1, math.floor(df)) - 1] if df < len(_T_975) + 1 else 1.96
    result.update(t=t, df=df, beyond_noise=abs(t) > critical)
    side = "beyond" if abs(t) > critical else "within"
    result["verdict"] = f"{side} seed noise (t = {t:+.2f}, limit ±{critical:.2f})"
    return result


# ------------------------------------------------------------------------------------------------------------ report


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("blurpool-algo", "torch", "torchvision", "mosaicml", "torchmetrics"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def build_report(plan: Plan, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The content of ``report.json``.

    ``arms``: arm -> metric -> statistics, in the arms' order; ``reference``: the first arm; ``deltas``: every other
    arm -> metric -> its difference from the reference and the noise verdict; ``differences``: every other arm -> the
    recipe keys it changes against the reference. ``delta`` and ``arm_differences`` are the second arm's entries of
    those two (what a two-arm A/B's readers know).

    An arm with a diverged run (non-finite outputs, for any seed) has no statistics: every metric of it holds
    ``mean`` and ``std`` null and ``diverged_seeds``, and every difference involving it is ``n/a``. A mean over the
    seeds that survived would flatter the arm; numbers of a diverged model mean nothing.
    """
    names = plan.arm_names
    diverged = {arm: [seed for seed in plan.seeds if results[arm][seed].get("diverged")] for arm in names}
    arms = {
        arm: {
            metric: describe_values(
                [None if seed in diverged[arm] else _value(results[arm][seed], metric) for seed in plan.seeds],
                diverged[arm],
            )
            for metric in METRICS
        }
        for arm in names
    }
    reference = plan.reference
    deltas = {
        arm: {metric: compare(arms[reference][metric], arms[arm][metric], (reference, arm)) for metric in METRICS}
        for arm in plan.others
    }
    differences = {arm: arm_differences(plan, arm) for arm in plan.others}
    return {
        "command": plan.command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seeds": plan.seeds,
        "units": {metric: unit for metric, (_, unit, _) in METRICS.items()},
        "reference": reference,
        "arms": arms,
        "deltas": deltas,
        "delta": deltas[plan.others[0]],
        "recipes": {arm: {"path": str(plan.recipe(arm)), "resolved": plan.resolved[arm]} for arm in names},
        "differences": differences,
        "arm_differences": differences[plan.others[0]],
        "overrides": plan.overrides,
        "runs": {
            arm: {str(seed): {k: results[arm][seed][k] for k in ("run_name", "algorithms")} for seed in plan.seeds}
            for arm in names
        },
        "diverged": diverged,
        "versions": _versions(),
        "machine": _machine(),
    }


def _digits(unit: str) -> int:
    """Decimals shown for a value of ``unit``: whole samples/s and MiB, two decimals for the rest."""
    return 0 if unit in ("samples/s", "MiB") else 2


def _cell(stats: dict[str, Any], unit: str) -> str:
    if stats.get("diverged_seeds"):
        seeds = stats["diverged_seeds"]
        return f"diverged (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
    if math.isnan(stats["mean"]):
        return "not measured"
    digits = _digits(unit)
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} {unit}"


def _seed_cell(value: float | None) -> str:
    """One seed's value in the per-seed table: None is a diverged run's."""
    return "diverged" if value is None else "n/a" if math.isnan(value) else f"{value:.2f}"


def _difference(delta: dict[str, Any], unit: str) -> str:
    if math.isnan(delta["difference"]):
        return "n/a"
    # Differences of percentages are percentage points.
    points = "pp" if unit == "%" else unit
    return f"{delta['difference']:+.{_digits(unit)}f} {points} ({100 * delta['relative']:+.1f} %)"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Header and one row per metric: label, one column per arm, then per arm after the reference its difference
    from the reference and the noise verdict (two arms: label, baseline, treatment, difference, verdict)."""
    names, reference = list(report["arms"]), report["reference"]
    others = [arm for arm in names if arm != reference]
    header = ["metric", *names]
    for arm in others:
        header += [f"{arm} - {reference}", "vs seed-to-seed noise"]
    rows = [header]
    for metric, (label, unit, _) in METRICS.items():
        row = [label, *(_cell(report["arms"][arm][metric], unit) for arm in names)]
        for arm in others:
            delta = report["deltas"][arm][metric]
            row += [_difference(delta, unit), delta.get("verdict", "n/a")]
        rows.append(row)
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown_report(report: dict[str, Any]) -> str:
    rows = table_rows(report)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    names, reference = list(report["arms"]), report["reference"]
    per_seed = [
        f"| {METRICS[m][0]} | "
        + " | ".join(", ".join(_seed_cell(v) for v in report["arms"][arm][m]["values"]) for arm in names)
        + " |"
        for m in METRICS
    ]
    differences = []
    for arm, lines in report["differences"].items():
        differences += ["", f"`{arm}` against `{reference}`:", ""]
        differences += [f"- `{line}`" for line in lines] or [f"- (none: `{arm}` resolves to the same recipe)"]
    recipes = ", ".join(f"`{arm}` (`{report['recipes'][arm]['path']}`)" for arm in names)
    machine = report["machine"]
    versions = report["versions"]
    return "\n".join(
        [
            "# A/B report",
            "",
            f"Arms {recipes}; every arm is compared to the first, `{reference}`. Seeds "
            f"{', '.join(map(str, report['seeds']))}; mean ± sample standard deviation over the seeds.",
            "",
            *table,
            "",
            "A difference is *beyond seed noise* when Welch's t-test rejects equal means at 95 % (two-sided). With few "
            "seeds only large differences can pass.",
            "",
            f"Per seed, in seed order ({' | '.join(names)}):",
            "",
            "| metric | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
            *per_seed,
            "",
            "Shift consistency: the crop protocol of each recipe's `shift_consistency_monitor` at the end of training "
            "(% of images whose top-1 is the same for two random shifts). Circular consistency: the same images, "
            "centre-cropped to the crop size and rolled (`torch.roll`) by two random shifts in [-max_shift, "
            "max_shift) per axis, measured after training (100 % by construction for a network invariant to "
            "circular shifts). Throughput and peak memory: the run's "
            "`throughput_monitor` (samples/s of step time without the first batch; peak resident memory on CPU, CUDA "
            "allocator peak on GPU). Wall time: from building the Trainer to the end of the final evaluation.",
            "",
            "![accuracy over training](accuracy.png)",
            "![diagonal stability](stability.png)",
            "![throughput](throughput.png)",
            "",
            "## What differs between the arms",
            *differences,
            "",
            "## How it was made",
            "",
            "```bash",
            report["command"],
            "```",
            "",
            f"Overrides for every arm: {', '.join(f'`{o}`' for o in report['overrides']) or 'none'}.",
            f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, GPU: {machine['gpu'] or 'none'}.",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
            f"Created {report['created']}.",
            "",
        ]
    )


def _save(figure: Any, path: Path, **options: Any) -> None:
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", **options)


def _mean_stability(curves: list[dict[str, Any]]) -> DiagonalStability:
    """The seeds' diagonal stability curves (as their summaries hold them) averaged offset by offset."""
    offsets = curves[0]["offsets"]
    return DiagonalStability(
        offsets=offsets,
        accuracy=[statistics.fmean(c["accuracy"][i] for c in curves) for i in range(len(offsets))],
        true_class_probability=[
            statistics.fmean(c["true_class_probability"][i] for c in curves) for i in range(len(offsets))
        ],
        num_images=curves[0]["num_images"],
    )


def _plots(plan: Plan, results: dict[str, dict[int, dict[str, Any]]], folder: Path) -> None:
    # Imported here, not at the top: matplotlib takes a second to import and only the plots need it.
    from matplotlib.figure import Figure

    # Matplotlib's default cycle, in the arms' order (as the stability plot draws them): baseline blue, then orange.
    colors = {arm: f"C{index % 10}" for index, arm in enumerate(plan.arm_names)}
    for name, key, scale, ylabel in (
        ("accuracy.png", "metrics/eval/MulticlassAccuracy", 100.0, "eval top-1 accuracy (%)"),
        ("throughput.png", "throughput/samples_per_sec", 1.0, "samples/s (windowed)"),
    ):
        figure = Figure(figsize=(6.4, 4.0))
        axes = figure.subplots()
        for arm in plan.arm_names:
            for index, seed in enumerate(plan.seeds):
                series = results[arm][seed].get("history", {}).get(key, [])
                if series:
                    steps, values = zip(*series, strict=True)
                    axes.plot(steps, [v * scale for v in values], color=colors[arm], marker=".", alpha=0.8,
                              label=arm if index == 0 else None)  # fmt: skip
        axes.set_xlabel("training batch")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        else:
            axes.text(0.5, 0.5, "not logged by these recipes", ha="center", transform=axes.transAxes)
        figure.tight_layout()
        _save(figure, folder / name, dpi=110)
    curves = {}
    for arm in plan.arm_names:
        found = [curve for curve in (results[arm][seed].get("stability") for seed in plan.seeds) if curve]
        if found:
            curves[arm] = _mean_stability(found)
    if curves:
        plot_diagonal_stability(curves, folder / "stability.png")
    else:
        figure = Figure(figsize=(6.4, 4.0))
        figure.text(0.5, 0.5, "no diagonal stability: the recipes have no crop-mode shift_consistency_monitor",
                    ha="center")  # fmt: skip
        _save(figure, folder / "stability.png")


def write_report(plan: Plan, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Writes every report file into a staging folder inside ``plan.out``, then moves them into ``plan.out``.

    Each file is written whole (:mod:`blurpool_algo.files`); the staging folder keeps a failure while building any
    of them (a plot, say) from publishing the others beside an older report. The moves are renames within one
    folder, which take no time for a crash to fall into mid-file.
    """
    report = build_report(plan, results)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=plan.out))
    try:
        write_json_atomically(staging / "report.json", report)
        write_text_atomically(staging / "report.md", markdown_report(report))
        _plots(plan, results, staging)
        for name in REPORT_FILES:
            os.replace(staging / name, plan.out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
