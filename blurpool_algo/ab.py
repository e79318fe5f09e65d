"""A/B runs: a baseline recipe against a treatment recipe over several seeds, and a report people can read.

    python -m blurpool_algo.ab --baseline yamls/quickstart_baseline.yaml \\
        --treatment yamls/quickstart_blurpool.yaml --seeds 3 --out runs/ab [key=value ...]

Every (seed, arm) run is a separate process of ``python -m blurpool_algo.train`` (or ``composer -n N -m
blurpool_algo.train`` with ``--nproc N``). Both arms get the same seeds, hence the same initial weights and data order,
and the same overrides. Separate processes keep peak memory and speed per arm. The runs alternate (seed 1: baseline,
treatment; seed 2: ...) so that drift of a shared machine hits both arms alike. Each finished run leaves
``runs/<arm>-seed<S>.json`` under ``--out``; rerunning the same command skips those runs, so an interrupted A/B
resumes where it stopped. The report (``report.json``, ``report.md``, three PNG plots) is written at the end, whole or
not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blurpool_algo.train import DIE_WITH_PARENT_ENV, DIVERGED_EXIT, TRUST_FLAG_HELP, die_with_parent

ARMS: tuple[str, ...] = ("baseline", "treatment")
#: The metrics of the report: key -> (label, unit, higher is better).
METRICS: dict[str, tuple[str, str, bool]] = {
    "accuracy": ("top-1 accuracy", "%", True),
    "shift_consistency": ("shift consistency", "%", True),
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


class ABError(RuntimeError):
    """An A/B that cannot start (exit code 2) or finish (exit code 1); ``str()`` says what to do."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Plan:
    """One A/B: two recipes, the seeds, the overrides for both arms, where it goes."""

    baseline: Path
    treatment: Path
    seeds: list[int]
    overrides: list[str]
    out: Path
    nproc: int = 1
    command: str = ""
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Arm -> algorithm name -> every option of the algorithm as built, defaults included.
    algorithm_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def recipe(self, arm: str) -> Path:
        return self.baseline if arm == "baseline" else self.treatment

    def run_json(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / f"{arm}-seed{seed}.json"

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a rerun to resume this A/B rather than mix two different ones: the resolved recipes,
        the algorithms' effective options (a changed package default changes them), the package version, the
        overrides, seeds and process count."""
        from blurpool_algo import __version__

        return {
            "recipes": self.resolved,
            "algorithm_options": self.algorithm_options,
            "package_version": __version__,
            "overrides": self.overrides,
            "seeds": self.seeds,
            "nproc": self.nproc,
        }


# ------------------------------------------------------------------------------------------------------ planning


def parse_seeds(text: str) -> list[int]:
    """``'3'`` -> three seeds from 17 (the recipes' seed) up; ``'1,5,9'`` -> those seeds."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ABError(f"--seeds must be a count (3) or a comma-separated list of seeds (1,5,9), got {text!r}") from None
    if len(values) == 1:
        if values[0] < 1:
            raise ABError(f"--seeds must be at least 1, got {values[0]}")
        return [17 + i for i in range(values[0])]
    if len(set(values)) != len(values) or min(values) < 0:
        raise ABError(f"--seeds must be distinct seeds >= 0, got {text!r}")
    return values


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    text = repr(value)
    # An object without a repr of its own shows its address, which differs in every process: name its type instead.
    return type(value).__qualname__ if " at 0x" in text else text


def effective_options(algorithm: Any) -> dict[str, Any]:
    """Each constructor argument of ``algorithm`` as the built object holds it (defaults included), JSON-ready."""
    parameters = inspect.signature(type(algorithm).__init__).parameters
    return {
        name: _jsonable(getattr(algorithm, name)) for name in parameters if name != "self" and hasattr(algorithm, name)
    }


def _resolved(path: Path, overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe as resolved (every key, defaults included), and its algorithms' effective options."""
    from omegaconf import OmegaConf

    from blurpool_algo.config import RecipeError, algorithm_registry, load_recipe

    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as error:
        raise ABError(f"{error}") from None
    registry = algorithm_registry()
    options = {name: effective_options(registry[name](**(value or {}))) for name, value in recipe.algorithms.items()}
    return OmegaConf.to_container(OmegaConf.structured(recipe)), options  # type: ignore[return-value]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        # An empty section (``algorithms: {}``) is no key; an entry with all defaults (``blurpool: {}``) is one.
        return flat or ({prefix.rstrip("."): {}} if prefix.count(".") > 1 else {})
    return {prefix.rstrip("."): tree}


def arm_differences(plan: Plan) -> list[str]:
    """The recipe keys whose values differ between the arms (``seed`` and ``run_name`` aside)."""
    base, treat = (_flatten(plan.resolved[arm]) for arm in ARMS)
    keys = sorted(set(base) | set(treat))
    return [
        f"{key}: {base.get(key, '(absent)')!r} -> {treat.get(key, '(absent)')!r}"
        for key in keys
        if base.get(key, "(absent)") != treat.get(key, "(absent)") and key not in ("seed", "run_name")
    ]


def _run_overrides(plan: Plan, arm: str, seed: int) -> list[str]:
    extra = [f"seed={seed}", f"run_name={plan.out.name}-{arm}-seed{seed}", "progress_bar=false"]
    if plan.resolved[arm].get("save_folder"):
        # Checkpoints under --out, resumed after an interruption in the middle of a run.
        extra += [f"save_folder={plan.out / 'checkpoints' / f'{arm}-seed{seed}'}", "autoresume=true"]
    return [*plan.overrides, *extra]


def make_plan(args: argparse.Namespace) -> Plan:
    """Checks both recipes (with the overrides and every seed) and the output folder, before any run."""
    plan = Plan(
        baseline=Path(args.baseline),
        treatment=Path(args.treatment),
        seeds=parse_seeds(args.seeds),
        overrides=list(args.overrides),
        out=Path(args.out),
        nproc=args.nproc,
        command=shlex.join(["python", "-m", "blurpool_algo.ab", *args.argv]),
    )
    if plan.nproc < 1:
        raise ABError(f"--nproc must be at least 1, got {plan.nproc}")
    for arm in ARMS:
        plan.resolved[arm], plan.algorithm_options[arm] = _resolved(plan.recipe(arm), plan.overrides)
        for seed in plan.seeds:  # an override may interact with the seed-specific keys
            _resolved(plan.recipe(arm), _run_overrides(plan, arm, seed))
        # Set per run: not part of what the arms share.
        del plan.resolved[arm]["seed"], plan.resolved[arm]["run_name"]
    if plan.out.exists() and not plan.out.is_dir():
        raise ABError(f"--out {plan.out} exists and is not a folder")
    marker = plan.out / "ab.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        current = json.loads(json.dumps(plan.fingerprint()))
        changed = [key for key in current if previous.get(key) != current[key]]
        if changed:
            raise ABError(
                f"--out {plan.out} holds an A/B with other {', '.join(changed)} (a changed recipe, override, seed "
                "or package default would mix two experiments in one report); resume it with its own command and "
                "package version, or choose another --out"
            )
    return plan


# ------------------------------------------------------------------------------------------------------- running


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _train_command(plan: Plan, arm: str, seed: int, summary: Path) -> list[str]:
    if plan.nproc == 1:
        launcher = [sys.executable, "-m", "blurpool_algo.train"]
    else:
        composer = shutil.which("composer", path=os.path.dirname(sys.executable)) or shutil.which("composer")
        if composer is None:
            raise ABError("--nproc > 1 needs Composer's launcher `composer` on the PATH")
        launcher = [composer, "-n", str(plan.nproc), "-m", "blurpool_algo.train"]
    return [*launcher, "-f", str(plan.recipe(arm)), *_run_overrides(plan, arm, seed), "--summary-json", str(summary),
            "--diagonal-stability"]  # fmt: skip


def _terminate(process: subprocess.Popen) -> None:
    """Stops a run and every process it started (the launcher's ranks too): SIGTERM to its process group, then
    SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class _Lock:
    """``--out``'s lock: held by the runner and inherited by the run it starts, so it stays held while either lives.

    ``lock.json`` beside it names the runner's and the current run's pids, for the message a second runner gets.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / "ab.lock"
        self.pids = out / "lock.json"
        self.handle = open(self.path, "a+")  # noqa: SIM115 - held for the runner's lifetime
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            holders = json.loads(self.pids.read_text()) if self.pids.exists() else {}
            alive = {role: pid for role, pid in holders.items() if _alive(pid)}
            named = ", ".join(f"{role} pid {pid}" for role, pid in alive.items()) or "a process"
            raise ABError(
                f"--out {out} is in use by an A/B that is still running ({named}); wait for it to finish or stop it "
                "(kill the pid), then rerun this command to resume"
            ) from None
        self.record(None)

    def __enter__(self) -> _Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pids.unlink(missing_ok=True)
        self.handle.close()  # releases the lock (a run that outlived the runner would still hold its inherited copy)

    def record(self, child: int | None) -> None:
        holders = {"runner": os.getpid(), **({"run": child} if child else {})}
        _write_atomically(self.pids, json.dumps(holders) + "\n")

    @property
    def fd(self) -> int:
        return self.handle.fileno()


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


def run_all(plan: Plan, log=print) -> dict[str, dict[int, dict[str, Any]]]:
    """Runs every (seed, arm) not finished before; returns arm -> seed -> the run's summary.

    A run diverged (its summary says so, exit code 3) counts as finished: the report shows it as diverged.
    """
    from blurpool_algo.config import describe_run

    (plan.out / "runs").mkdir(parents=True, exist_ok=True)
    with _Lock(plan.out) as lock:
        _write_atomically(plan.out / "ab.json", json.dumps(plan.fingerprint(), indent=2) + "\n")
        order = [(seed, arm) for seed in plan.seeds for arm in ARMS]
        results: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in ARMS}
        runner = os.getpid()
        for number, (seed, arm) in enumerate(order, start=1):
            summary_path = plan.run_json(arm, seed)
            tag = f"[ab {number}/{len(order)}] {arm} seed {seed}"
            if summary_path.exists():
                results[arm][seed] = json.loads(summary_path.read_text())
                log(f"{tag}: finished before, reused: {describe_run(results[arm][seed])}")
                continue
            log_path = summary_path.with_suffix(".log")
            log(f"{tag}: running, log {log_path}")
            # Appended: an earlier attempt's log (of a run killed with its machine, say) is evidence; never overwritten.
            with open(log_path, "a") as stream:
                started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                stream.write(f"===== {started}: attempt by runner pid {runner} =====\n")
                stream.flush()
                process = subprocess.Popen(
                    _train_command(plan, arm, seed, summary_path), stdout=stream, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=functools.partial(die_with_parent, runner), pass_fds=(lock.fd,),
                    env={**os.environ, DIE_WITH_PARENT_ENV: "1"},
                )  # fmt: skip
                lock.record(process.pid)
                try:
                    code = process.wait()
                finally:
                    _terminate(process)  # on an interruption of this process, the run must not go on alone
                    lock.record(None)
            if code not in (0, DIVERGED_EXIT) or not summary_path.exists():
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise ABError(
                    f"the {arm} arm failed for seed {seed} (exit code {code}); no report was written. Its log: "
                    f"{log_path}; last lines:\n  " + "\n  ".join(tail),
                    exit_code=1,
                )
            results[arm][seed] = json.loads(summary_path.read_text())
            log(f"{tag}: {describe_run(results[arm][seed])}")
    return results


# ------------------------------------------------------------------------------------------------------ statistics


def _value(summary: dict[str, Any], metric: str) -> float:
    throughput = summary.get("throughput") or {}
    consistency = summary.get("shift_consistency") or {}
    if metric == "shift_consistency":
        return float(consistency.get("crop", consistency.get("circular", math.nan)))
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


def compare(baseline: dict[str, Any], treatment: dict[str, Any]) -> dict[str, Any]:
    """Treatment minus baseline, and whether it exceeds seed-to-seed noise (Welch's t-test, two-sided, 95%)."""
    gone = [arm for arm, stats in zip(ARMS, (baseline, treatment), strict=True) if stats.get("diverged_seeds")]
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


# -------------------------------------------------------------------------------------------------------- report


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("blurpool-algo", "torch", "torchvision", "mosaicml", "torchmetrics"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def build_report(plan: Plan, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The content of ``report.json``.

    An arm with a diverged run (non-finite outputs, for any seed) has no statistics: every metric of it holds
    ``mean`` and ``std`` null and ``diverged_seeds``, and every difference involving it is ``n/a``. A mean over the
    seeds that survived would flatter the arm; numbers of a diverged model mean nothing.
    """
    diverged = {arm: [seed for seed in plan.seeds if results[arm][seed].get("diverged")] for arm in ARMS}
    arms = {
        arm: {
            metric: describe_values(
                [None if seed in diverged[arm] else _value(results[arm][seed], metric) for seed in plan.seeds],
                diverged[arm],
            )
            for metric in METRICS
        }
        for arm in ARMS
    }
    return {
        "command": plan.command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seeds": plan.seeds,
        "units": {metric: unit for metric, (_, unit, _) in METRICS.items()},
        "arms": arms,
        "delta": {metric: compare(arms["baseline"][metric], arms["treatment"][metric]) for metric in METRICS},
        "recipes": {arm: {"path": str(plan.recipe(arm)), "resolved": plan.resolved[arm]} for arm in ARMS},
        "arm_differences": arm_differences(plan),
        "overrides": plan.overrides,
        "runs": {
            arm: {str(seed): {k: results[arm][seed][k] for k in ("run_name", "algorithms")} for seed in plan.seeds}
            for arm in ARMS
        },
        "diverged": diverged,
        "versions": _versions(),
        "machine": _machine(),
    }


def _cell(stats: dict[str, Any], unit: str) -> str:
    if stats.get("diverged_seeds"):
        seeds = stats["diverged_seeds"]
        return f"diverged (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
    if math.isnan(stats["mean"]):
        return "not measured"
    digits = 0 if unit in ("samples/s", "MiB") else 2
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} {unit}"


def _seed_cell(value: float | None) -> str:
    """One seed's value in the per-seed table: None is a diverged run's."""
    return "diverged" if value is None else "n/a" if math.isnan(value) else f"{value:.2f}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Header and one row per metric: label, baseline, treatment, difference, noise verdict."""
    rows = [["metric", "baseline", "treatment", "treatment - baseline", "vs seed-to-seed noise"]]
    for metric, (label, unit, _) in METRICS.items():
        delta = report["delta"][metric]
        digits = 0 if unit in ("samples/s", "MiB") else 2
        # Differences of percentages are percentage points.
        difference = (
            "n/a"
            if math.isnan(delta["difference"])
            else f"{delta['difference']:+.{digits}f} {'pp' if unit == '%' else unit} ({100 * delta['relative']:+.1f} %)"
        )
        rows.append([
            label,
            _cell(report["arms"]["baseline"][metric], unit),
            _cell(report["arms"]["treatment"][metric], unit),
            difference,
            delta.get("verdict", "n/a"),
        ])  # fmt: skip
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown_report(report: dict[str, Any]) -> str:
    rows = table_rows(report)
    table = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    table += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    per_seed = [
        f"| {METRICS[m][0]} | "
        + " | ".join(", ".join(_seed_cell(v) for v in report["arms"][arm][m]["values"]) for arm in ARMS)
        + " |"
        for m in METRICS
    ]
    differences = report["arm_differences"] or ["(none: the arms resolve to the same recipe)"]
    machine = report["machine"]
    versions = report["versions"]
    return "\n".join(
        [
            "# A/B report",
            "",
            f"Baseline `{report['recipes']['baseline']['path']}` vs treatment "
            f"`{report['recipes']['treatment']['path']}`, seeds {', '.join(map(str, report['seeds']))}; "
            "mean ± sample standard deviation over the seeds.",
            "",
            *table,
            "",
            "A difference is *beyond seed noise* when Welch's t-test rejects equal means at 95 % (two-sided). With few "
            "seeds only large differences can pass.",
            "",
            "Per seed, in seed order (baseline | treatment):",
            "",
            "| metric | baseline | treatment |",
            "|---|---|---|",
            *per_seed,
            "",
            "Shift consistency: the crop protocol of each recipe's `shift_consistency_monitor` at the end of training "
            "(% of images whose top-1 is the same for two random shifts). Throughput and peak memory: the run's "
            "`throughput_monitor` (samples/s of step time without the first batch; peak resident memory on CPU, CUDA "
            "allocator peak on GPU). Wall time: from building the Trainer to the end of the final evaluation.",
            "",
            "![accuracy over training](accuracy.png)",
            "![diagonal stability](stability.png)",
            "![throughput](throughput.png)",
            "",
            "## What differs between the arms",
            "",
            *[f"- `{line}`" for line in differences],
            "",
            "## How it was made",
            "",
            "```bash",
            report["command"],
            "```",
            "",
            f"Overrides for both arms: {', '.join(f'`{o}`' for o in report['overrides']) or 'none'}.",
            f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, GPU: {machine['gpu'] or 'none'}.",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
            f"Created {report['created']}.",
            "",
        ]
    )


def _plots(plan: Plan, results: dict[str, dict[int, dict[str, Any]]], folder: Path) -> None:
    from matplotlib.figure import Figure

    from blurpool_algo.metrics import DiagonalStability, plot_diagonal_stability

    colors = {"baseline": "tab:blue", "treatment": "tab:orange"}
    for name, key, scale, ylabel in (
        ("accuracy.png", "metrics/eval/MulticlassAccuracy", 100.0, "eval top-1 accuracy (%)"),
        ("throughput.png", "throughput/samples_per_sec", 1.0, "samples/s (windowed)"),
    ):
        figure = Figure(figsize=(6.4, 4.0))
        axes = figure.subplots()
        for arm in ARMS:
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
        figure.savefig(folder / name, format="png", dpi=110)
    curves = {}
    for arm in ARMS:
        found = [results[arm][seed].get("stability") for seed in plan.seeds]
        found = [curve for curve in found if curve]
        if found:
            curves[arm] = DiagonalStability(
                offsets=found[0]["offsets"],
                accuracy=[statistics.fmean(c["accuracy"][i] for c in found) for i in range(len(found[0]["offsets"]))],
                true_class_probability=[
                    statistics.fmean(c["true_class_probability"][i] for c in found)
                    for i in range(len(found[0]["offsets"]))
                ],
                num_images=found[0]["num_images"],
            )
    if curves:
        plot_diagonal_stability(curves, folder / "stability.png")
    else:
        figure = Figure(figsize=(6.4, 4.0))
        figure.text(0.5, 0.5, "no diagonal stability: the recipes have no crop-mode shift_consistency_monitor",
                    ha="center")  # fmt: skip
        figure.savefig(folder / "stability.png", format="png")


def write_report(plan: Plan, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Builds every report file in a temporary folder, then moves them into ``plan.out``: all or none appear."""
    report = build_report(plan, results)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=plan.out))
    try:
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "report.md").write_text(markdown_report(report))
        _plots(plan, results, staging)
        for name in REPORT_FILES:
            os.replace(staging / name, plan.out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


# ---------------------------------------------------------------------------------------------------------- main


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m blurpool_algo.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="the baseline recipe, e.g. yamls/quickstart_baseline.yaml")
    parser.add_argument("--treatment", required=True, help="the treatment recipe, e.g. yamls/quickstart_blurpool.yaml")
    parser.add_argument("--seeds", default="3", help="a count (3: seeds 17, 18, 19) or a list (1,5,9); default 3")
    parser.add_argument("--out", default="runs/ab", help="the A/B's folder (default runs/ab)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run, through Composer's launcher")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_FLAG_HELP)
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both arms, e.g. max_duration=2ep")
    args = parser.parse_intermixed_args(argv)
    args.argv = argv
    if args.trust_checkpoint:
        args.overrides.append("trust_checkpoint=true")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        plan = make_plan(args)
        results = run_all(plan, log=lambda line: print(line, flush=True))
        report = write_report(plan, results)
    except ABError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted: no report written; rerun the same command to resume (finished runs are kept)",
              file=sys.stderr)  # fmt: skip
        return 130
    print(f"\nA/B over seeds {', '.join(map(str, plan.seeds))} (mean ± std), report in {plan.out}/report.md:\n")
    print(format_table(table_rows(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
