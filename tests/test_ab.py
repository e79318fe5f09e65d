"""The A/B/n runner, end to end: report files and schema (three arms: a column per arm, a difference and verdict per
arm against the first), the runner killed with SIGTERM and with SIGKILL in the middle of a run (its child dies with
it, a second runner is refused while it lives, a partial checkpoint is set aside, the killed run's log is kept, the
resumed report equals an uninterrupted run's numbers), failures that leave no report, folders of another A/B (other
arms, another recipe, or a changed package default), the arms on the command line, diverged arms, the APS twin
recipes, and the noise verdict against scipy's Welch test.

One A/B is trained (session fixture, one worker): three arms (baseline, treatment, aps) for seed 17, given as
``--arm``, the treatment interrupted. Everything else runs the runner in this process, with real or stand-in children.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, QUICKSTART_BASELINE, ROOT, TINY, YAMLS
from scipy import stats

from blurpool_algo import ab, ab_plan, ab_report
from blurpool_algo.ab_plan import ABError, parse_arms, parse_seeds
from blurpool_algo.ab_report import compare, describe_values
from blurpool_algo.algorithm import BlurPool
from blurpool_algo.checkpoint_files import checkpoint_file_status
from blurpool_algo.recipe import load_recipe
from blurpool_algo.train import DIVERGED_EXIT
from blurpool_algo.train import main as train_main
from blurpool_algo.trainer import run_recipe

# One worker runs the whole module, so its trained fixture is built once.
pytestmark = pytest.mark.xdist_group("ab")

# Checkpoints every batch (under --out, resumed after an interruption), so a kill lands between or inside writes.
RUN = [*TINY, "max_duration=8ba", "save_folder=unused", "save_interval=1ba", "save_num_checkpoints_to_keep=2"]
METRICS = ("accuracy", "shift_consistency", "circular_consistency", "samples_per_sec", "peak_memory", "wall_time")
REPORT = ("report.json", "report.md", "accuracy.png", "stability.png", "throughput.png")
QUICKSTART_APS = YAMLS / "quickstart_aps.yaml"
#: The trained A/B's arms, in order: the reference, the BlurPool twin, the APS twin.
THREE_ARMS = {"baseline": QUICKSTART_BASELINE, "treatment": QUICKSTART, "aps": QUICKSTART_APS}


def ab_argv(
    out: Path,
    *extra: str,
    baseline: Path = QUICKSTART_BASELINE,
    treatment: Path = QUICKSTART,
    arms: dict[str, Path] | None = None,
) -> list[str]:
    """The runner's arguments: ``--arm NAME=RECIPE`` per arm with ``arms``, else ``--baseline`` / ``--treatment``."""
    given = [f"--arm={name}={path}" for name, path in arms.items()] if arms else []
    given = given or ["--baseline", str(baseline), "--treatment", str(treatment)]
    return [*given, "--seeds", "1", "--out", str(out), *RUN, *extra]


def start_runner(out: Path) -> subprocess.Popen:
    # One intra-op thread in the runs, as in this worker: the reference run below computes bit-identically.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "blurpool_algo.ab", *ab_argv(out, arms=THREE_ARMS)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m blurpool_algo.ab ARGV`` in this process (the runner; its runs are still child processes)."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = ab.main(argv)
    finally:
        signal.signal(signal.SIGTERM, handler)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, (
            f"the runner exited ({process.returncode}) before {what}: {process.stderr.read()}"
        )
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead: its parent (the killed runner, now init) has not reaped it yet.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[-1][0] != "Z"


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A three-arm A/B whose runner is killed (SIGKILL) while the treatment run trains, then resumed: what the tests
    read."""
    out = tmp_path_factory.mktemp("ab") / "tiny"
    checkpoints = out / "checkpoints" / "treatment-seed17"
    seen: dict = {}

    def treatment_started() -> bool:
        log_exists = (out / "runs" / "treatment-seed17.log").exists()
        pids = json.loads((out / "lock.json").read_text()) if (out / "lock.json").exists() else {}
        seen["run"] = pids.get("run")
        # The runner opens the run's log, then starts it, then records its pid: a pid seen after the log is its.
        return log_exists and seen["run"] is not None

    # 1. SIGKILL, which the runner never sees, once the treatment has checkpointed; a second runner is refused first.
    started = time.time()
    runner = start_runner(out)
    wait_for(treatment_started, runner, "the treatment run")
    seen["killed_run"] = seen["run"]
    handler = signal.getsignal(signal.SIGTERM)
    refused = io.StringIO()
    with contextlib.redirect_stderr(refused):
        seen["refused"] = (ab.main(ab_argv(out, arms=THREE_ARMS)), refused.getvalue())
    signal.signal(signal.SIGTERM, handler)
    latest = checkpoints / "latest-rank0.pt"
    wait_for(lambda: latest.exists() and latest.stat().st_mtime > started, runner, "the treatment run's checkpoint")
    runner.send_signal(signal.SIGKILL)
    runner.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while alive(seen["killed_run"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    seen["run_alive_after_kill"] = alive(seen["killed_run"])

    # A kill in the middle of a checkpoint write leaves the newest file partial. This kill may have landed between
    # writes: then the next checkpoint is made partial here, as such a kill would have left it.
    def batch(path: Path) -> int:
        return int(path.name.split("-ba")[1].split("-")[0])

    files = sorted(checkpoints.glob("ep*-rank0.pt"), key=batch)
    partial = next((p for p in files if checkpoint_file_status(p) == "incomplete"), None)
    if partial is None:
        partial = checkpoints / f"ep0-ba{batch(files[-1]) + 1}-rank0.pt"
        partial.write_bytes(files[-1].read_bytes()[:4096])
    seen["partial"] = partial.name

    # 2. The same command, once more, resumes and finishes (this runner in this process; its runs are children).
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = ab.main(ab_argv(out, arms=THREE_ARMS))
    finally:
        signal.signal(signal.SIGTERM, handler)
        os.environ.pop("OMP_NUM_THREADS") if threads is None else os.environ.update(OMP_NUM_THREADS=threads)
    assert code == 0, output.getvalue()[-3000:]
    return out, output.getvalue(), seen


def test_every_report_file_with_the_schema(finished):
    out, stdout, _ = finished
    assert all((out / name).is_file() for name in REPORT)
    for name in REPORT:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [17]
    units = {"accuracy": "%", "shift_consistency": "%", "circular_consistency": "%", "samples_per_sec": "samples/s"}
    assert report["units"] == {**units, "peak_memory": "MiB", "wall_time": "s"}
    assert list(report["arms"]) == list(THREE_ARMS) and report["reference"] == "baseline"  # the order given
    assert report["diverged"] == {"baseline": [], "treatment": [], "aps": []}
    for arm in THREE_ARMS:
        run = json.loads((out / "runs" / f"{arm}-seed17.json").read_text())
        for metric in METRICS:
            entry = report["arms"][arm][metric]
            assert set(entry) == {"mean", "std", "values"} and len(entry["values"]) == 1
            assert entry["mean"] == entry["values"][0] and entry["std"] == 0.0
        assert report["arms"][arm]["accuracy"]["values"] == [run["accuracy"]]
        assert report["arms"][arm]["shift_consistency"]["values"] == [run["shift_consistency"]["crop"]]
        # Circular consistency beside crop: measured after training on the crop monitor's images (every arm).
        assert report["arms"][arm]["circular_consistency"]["values"] == [run["shift_consistency"]["circular"]]
        assert report["recipes"][arm]["path"] == str(THREE_ARMS[arm])
        assert run["run_name"] == f"tiny-{arm}-seed17"  # every arm runs seed 17: the same initial weights
    assert report["runs"]["treatment"]["17"]["algorithms"] == ["BlurPool"]
    assert report["runs"]["aps"]["17"]["algorithms"] == ["BlurPool"]
    assert report["runs"]["baseline"]["17"]["algorithms"] == []
    assert report["overrides"] == RUN
    blurpool = [
        "algorithms.blurpool.blur_first: '(absent)' -> True",
        "algorithms.blurpool.filter_size: '(absent)' -> 3",
        "algorithms.blurpool.min_channels: '(absent)' -> 16",
        "algorithms.blurpool.pad_mode: '(absent)' -> 'zeros'",
    ]
    aps = ["algorithms.blurpool.circular_padding: '(absent)' -> True", "algorithms.blurpool.sampling: '(absent)' -> "
           "'adaptive'"]  # fmt: skip
    assert report["arm_differences"] == report["differences"]["treatment"] == blurpool  # the second arm's, as before
    assert report["differences"]["aps"] == sorted(blurpool + aps)  # each arm against the reference, not the previous
    assert set(report["deltas"]) == {"treatment", "aps"} and report["delta"] == report["deltas"]["treatment"]
    assert report["delta"]["accuracy"]["verdict"] == "one seed: noise unknown"
    for arm in ("treatment", "aps"):
        for metric in METRICS:
            expected = report["arms"][arm][metric]["mean"] - report["arms"]["baseline"][metric]["mean"]
            assert report["deltas"][arm][metric]["difference"] == pytest.approx(expected)
    # The table: a column per arm, then a difference and a verdict per arm against the reference.
    rows = ab_report.table_rows(report)
    assert rows[0] == ["metric", "baseline", "treatment", "aps", "treatment - baseline", "vs seed-to-seed noise",
                       "aps - baseline", "vs seed-to-seed noise"]  # fmt: skip
    assert [row[0] for row in rows[1:3]] == ["top-1 accuracy", "shift consistency"]
    assert rows[3][0] == "circular consistency" and all(len(row) == 8 for row in rows)
    assert {"torch", "mosaicml", "python"} <= set(report["versions"]) and report["machine"]["cpu_count"] >= 1
    markdown = (out / "report.md").read_text()
    assert "| top-1 accuracy |" in markdown and "python -m blurpool_algo.ab" in markdown
    assert "![diagonal stability](stability.png)" in markdown
    assert "| metric | baseline | treatment | aps |" in markdown and "`aps` against `baseline`:" in markdown
    # The same table on the terminal, and a progress line per run: the baseline reused, the treatment resumed.
    table = stdout.split("report in")[-1]
    assert "shift consistency" in table and "circular consistency" in table and "aps - baseline" in table
    assert "[ab 1/3] baseline seed 17: finished before, reused: tiny-baseline-seed17: top-1 accuracy" in stdout
    assert "[ab 2/3] treatment seed 17: running" in stdout and "[ab 3/3] aps seed 17: running" in stdout
    assert "circular consistency" in stdout.split("[ab 3/3] aps seed 17: ")[-1].splitlines()[0]  # the run's line
    # No temporary file is left behind, nor the lock's pid record.
    assert not [p for p in out.rglob(".*")] and not (out / "lock.json").exists()


def test_sigterm_stops_the_run_and_its_children_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    # This process is the runner; its run is a stand-in that starts a child of its own (as a launcher starts ranks).
    grandchild = "import time; time.sleep(300)"
    spawner = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(300)"
    run = [sys.executable, "-c", spawner]
    monkeypatch.setattr(ab, "_train_command", lambda plan, arm, seed, summary: run)
    out = tmp_path / "stopped"
    seen: dict = {}

    def stop_once_the_run_is_up() -> None:
        while "run" not in seen:
            pids = json.loads((out / "lock.json").read_text()) if (out / "lock.json").exists() else {}
            if pids.get("run") and len([p for p in _processes() if _group_of(p) == pids["run"]]) == 2:
                seen["run"] = pids["run"]
                seen["group"] = [p for p in _processes() if _group_of(p) == pids["run"]]
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill PID` or a scheduler's preemption sends the runner

    stopper = threading.Thread(target=stop_once_the_run_is_up, daemon=True)
    stopper.start()
    code, _, stderr = run_in_process(ab_argv(out), capsys)
    stopper.join(timeout=60)
    assert code == 130 and "rerun the same command to resume" in stderr
    assert not any(alive(pid) for pid in seen["group"])
    assert not any((out / name).exists() for name in REPORT)


def _processes() -> list[int]:
    return [int(pid) for pid in os.listdir("/proc") if pid.isdigit()]


def test_sigkill_of_the_runner_kills_its_run_and_a_second_runner_is_refused_meanwhile(finished):
    code, stderr = finished[2]["refused"]
    seen = finished[2]
    assert code == 2 and "is in use by an A/B that is still running (runner pid" in stderr
    assert f"run pid {seen['killed_run']}" in stderr
    assert not seen["run_alive_after_kill"]


def test_after_the_kill_the_partial_checkpoint_is_set_aside_and_every_attempt_logged(finished):
    out, _, seen = finished
    aside = [p.name for p in (out / "checkpoints" / "treatment-seed17" / "incomplete").iterdir()]
    assert [name.split(".pt.")[0] + ".pt" for name in aside] == [seen["partial"]]
    log = (out / "runs" / "treatment-seed17.log").read_text()
    assert log.count("===== ") == 2  # the killed attempt and the one that finished
    assert "set aside incomplete checkpoint" in log


def test_the_resumed_report_equals_an_uninterrupted_run(finished):
    out, _, _ = finished
    report = json.loads((out / "report.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        overrides = [*TINY, "max_duration=8ba", "seed=17", "run_name=reference"]
        reference = run_recipe(load_recipe(QUICKSTART, overrides))
    finally:
        torch.set_num_threads(threads)
    assert report["arms"]["treatment"]["accuracy"]["values"] == [reference.accuracy]
    assert report["arms"]["treatment"]["shift_consistency"]["values"] == [reference.shift_consistency["crop"]]
    assert report["arms"]["treatment"]["circular_consistency"]["values"] == [reference.shift_consistency["circular"]]


# ------------------------------------------------------------------------------------- refusals, failures, divergence


def test_an_out_folder_of_another_ab_is_refused(finished, capsys):
    out, _, _ = finished
    code, _, stderr = run_in_process(ab_argv(out, "optimizer.lr=0.2", arms=THREE_ARMS), capsys)
    assert code == 2 and "holds an A/B with other recipes, overrides" in stderr
    # Another set of arms (two of the three; the same three in another order) is another A/B.
    for arms in (None, dict(reversed(THREE_ARMS.items()))):
        code, _, stderr = run_in_process(ab_argv(out, arms=arms), capsys)
        assert code == 2 and "holds an A/B with other arms" in stderr
        assert "(its arms: baseline, treatment, aps)" in stderr


def test_a_changed_package_default_or_version_refuses_the_old_folder(finished, monkeypatch):
    out, _, _ = finished
    args = argparse.ArgumentParser().parse_args([])
    args.arm, args.seeds, args.out, args.nproc = [f"{name}={path}" for name, path in THREE_ARMS.items()], "1", out, 1
    args.overrides, args.argv = RUN, []
    ab_plan.make_plan(args)  # control: the same A/B resumes
    # As if a release changed the default of an option the recipes do not set.
    init = BlurPool.__init__
    names = [p.name for p in inspect.signature(init).parameters.values() if p.default is not inspect.Parameter.empty]
    with monkeypatch.context() as patch:
        if init.__kwdefaults__ and "replace_avgpools" in init.__kwdefaults__:
            patch.setattr(init, "__kwdefaults__", {**init.__kwdefaults__, "replace_avgpools": True})
        else:
            defaults = zip(names, init.__defaults__, strict=True)
            patch.setattr(init, "__defaults__", tuple(name == "replace_avgpools" or value for name, value in defaults))
        assert BlurPool().replace_avgpools is True
        with pytest.raises(ABError, match="holds an A/B with other algorithm_options"):
            ab_plan.make_plan(args)
    with monkeypatch.context() as patch:
        patch.setattr("blurpool_algo.__version__", "99.0")
        with pytest.raises(ABError, match="other package_version"):
            ab_plan.make_plan(args)


def test_a_failing_arm_names_itself_and_leaves_no_report(tmp_path, capsys, monkeypatch):
    # A stand-in run that fails at once: the runner's handling is what is tested, not a model's failure.
    fail = [sys.executable, "-c", "import sys; print('step 1'); print('the model broke', file=sys.stderr); sys.exit(7)"]
    monkeypatch.setattr(ab, "_train_command", lambda plan, arm, seed, summary: fail)
    out = tmp_path / "failing"
    code, _, stderr = run_in_process(ab_argv(out), capsys)
    assert code == 1
    assert "the baseline arm failed for seed 17 (exit code 7)" in stderr and "the model broke" in stderr
    assert "baseline-seed17.log" in stderr
    assert not any((out / name).exists() for name in REPORT)
    # The lock is released: the same folder takes the next attempt at once.
    assert run_in_process(ab_argv(out), capsys)[0] == 1


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_bad_recipe_path_is_an_error_before_any_run(tmp_path, capsys):
    out = tmp_path / "never"
    code, _, stderr = run_in_process(ab_argv(out, baseline=tmp_path / "missing.yaml"), capsys)
    assert code == 2
    assert stderr.strip() == f"error: -f: recipe file not found: {tmp_path / 'missing.yaml'}"
    assert not out.exists()


def test_a_diverged_run_exits_3_and_its_summary_says_so(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    lr = ["optimizer.lr=1e12", "scheduler.warmup=0ba"]  # the case: the loss goes NaN at the second batch
    code = train_main(["-f", str(QUICKSTART), *TINY, "max_duration=2ba", *lr, "--summary-json", str(summary)])
    assert code == DIVERGED_EXIT == 3
    written = json.loads(summary.read_text())
    assert written["diverged"] is True and written["shift_consistency"] == {}
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "DIVERGED at batch" in line and not re.search(r"\d %", line)  # no accuracy or consistency figure


def test_a_diverged_arm_is_shown_as_diverged_never_as_a_number(tmp_path):
    def summary(accuracy: float, consistency: float, diverged: bool) -> dict:
        return {"run_name": "r", "accuracy": accuracy, "wall_time": 1.0, "algorithms": [], "diverged": diverged,
                "shift_consistency": {} if diverged else {"crop": consistency},
                "throughput": {"samples_per_sec": 321.0, "peak_memory_bytes": 3 * 2**20}}  # fmt: skip

    plan = ab_plan.Plan(
        {"baseline": QUICKSTART_BASELINE, "treatment": QUICKSTART}, [17, 18], [], tmp_path,
        resolved={"baseline": {}, "treatment": {}},
    )  # fmt: skip
    results = {
        "baseline": {17: summary(90.0, 95.0, False), 18: summary(91.0, 96.0, False)},
        "treatment": {17: summary(10.0, 100.0, True), 18: summary(92.0, 97.0, False)},
    }
    report = ab_report.build_report(plan, results)
    assert report["diverged"] == {"baseline": [], "treatment": [17]}
    treatment = report["arms"]["treatment"]["accuracy"]
    assert treatment["mean"] is None and treatment["values"] == [None, 92.0] and treatment["diverged_seeds"] == [17]
    rows = ab_report.table_rows(report)
    for row in rows[1:]:
        assert row[2] == "diverged (seed 17)" and row[3] == "n/a" and row[4] == "n/a: the treatment arm diverged"
        assert not any(char.isdigit() for char in row[2].replace("17", ""))
    markdown = ab_report.markdown_report(report)
    assert "| top-1 accuracy | 90.00, 91.00 | diverged, 92.00 |" in markdown
    assert "10.00" not in markdown and "100.00" not in markdown
    # A third arm that diverged is its own: the treatment's comparison with the reference keeps its numbers.
    plan.arms["aps"], plan.resolved["aps"] = QUICKSTART_APS, {}
    results["aps"] = {17: summary(5.0, 100.0, True), 18: summary(93.0, 98.0, False)}
    results["treatment"][17] = summary(92.0, 97.0, False)
    report = ab_report.build_report(plan, results)
    rows = ab_report.table_rows(report)
    assert report["diverged"] == {"baseline": [], "treatment": [], "aps": [17]}
    assert rows[1][2:] == [
        "92.00 ± 0.00 %", "diverged (seed 17)", "+1.50 pp (+1.7 %)", "within seed noise (t = +3.00, limit ±12.71)",
        "n/a", "n/a: the aps arm diverged",
    ]  # fmt: skip
    # Control: the same results without the divergence show numbers.
    results["treatment"][17] = summary(10.0, 100.0, False)
    assert ab_report.table_rows(ab_report.build_report(plan, results))[1][2] == "51.00 ± 57.98 %"


# --------------------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("baseline", "treatment"),
    [
        ([1.0, 2.0, 3.0], [11.0, 12.0, 13.0]),
        ([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]),
        ([97.7, 97.6, 97.9], [97.6, 97.8, 98.0]),
        ([68.3, 70.1, 66.0], [92.1, 91.0, 93.5]),
        ([5.0, 5.1, 5.2, 4.9], [5.3, 5.6, 5.1]),
        ([372.0, 365.0, 380.0], [368.0, 340.0, 371.0]),
    ],
)
def test_noise_verdict_agrees_with_scipys_welch_test(baseline, treatment):
    verdict = compare(describe_values(baseline), describe_values(treatment))
    reference = stats.ttest_ind(treatment, baseline, equal_var=False)
    assert verdict["t"] == pytest.approx(reference.statistic)
    assert verdict["beyond_noise"] == (reference.pvalue < 0.05)
    assert verdict["difference"] == pytest.approx(statistics.fmean(treatment) - statistics.fmean(baseline))
    described = describe_values(treatment)
    assert described["mean"] == pytest.approx(statistics.fmean(treatment))
    assert described["std"] == pytest.approx(statistics.stdev(treatment))


def test_noise_verdict_with_one_seed_or_no_spread():
    assert compare(describe_values([1.0]), describe_values([2.0]))["beyond_noise"] is None
    assert compare(describe_values([1.0, 1.0]), describe_values([2.0, 2.0]))["beyond_noise"] is True
    nan = describe_values([math.nan, math.nan])
    assert math.isnan(nan["mean"])


@pytest.mark.parametrize(("text", "seeds"), [("3", [17, 18, 19]), ("1", [17]), ("4,9,2", [4, 9, 2])])
def test_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0", "a", "1,1", "-1,2"])
def test_bad_seeds(text):
    with pytest.raises(ABError, match="--seeds"):
        parse_seeds(text)


# ------------------------------------------------------------------------------------------------------------ arms


def test_arms_in_the_order_given_and_the_two_arm_flags_are_two_arms():
    arms = parse_arms(["ref=a.yaml", "b.2=b.yaml", "C_3=c=d.yaml"])  # a path may hold '='; the name may not
    assert list(arms.items()) == [("ref", Path("a.yaml")), ("b.2", Path("b.yaml")), ("C_3", Path("c=d.yaml"))]
    assert parse_arms(None, "a.yaml", "b.yaml") == {"baseline": Path("a.yaml"), "treatment": Path("b.yaml")}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arm", "a=A.yaml", "--baseline", "B.yaml"], "either as --arm NAME=RECIPE (repeated) or as --baseline"),
        (["--arm", "a=A.yaml", "--arm", "a=B.yaml"], "--arm names must be unique, got 'a' twice"),
        (["--arm", "a=A.yaml"], "at least two arms (the first is the reference), got only --arm a=A.yaml"),
        (["--arm", "a=A.yaml", "--arm", "=B.yaml"], "--arm names must be 1 to 64 letters"),
        (["--arm", "a=A.yaml", "--arm", "x/y=B.yaml"], "got 'x/y'"),
        (["--arm", "a=A.yaml", "--arm", ".hidden=B.yaml"], "got '.hidden'"),
        (["--arm", "a=A.yaml", "--arm", "B.yaml"], "--arm must be NAME=RECIPE"),
        (["--arm", "a=A.yaml", "--arm", "b="], "--arm must be NAME=RECIPE"),
        (["--baseline", "A.yaml"], "--treatment is missing"),
        (["--treatment", "B.yaml"], "--baseline is missing"),
        ([], "no arms: give --baseline A --treatment B, or two or more --arm NAME=RECIPE"),
    ],
)
def test_bad_arms_are_refused_before_anything_is_read_or_written(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    code, _, stderr = run_in_process([*argv, "--out", str(out)], capsys)
    assert code == 2 and stderr.startswith("error: ") and message in stderr
    assert not out.exists()


def _plan(out: Path, *argv: str) -> ab_plan.Plan:
    args = argparse.Namespace(arm=None, baseline=None, treatment=None, seeds="1", out=out, nproc=1, overrides=[],
                              argv=[])  # fmt: skip
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag == "--arm":
            args.arm = [*(args.arm or []), value]
        else:
            setattr(args, flag.lstrip("-"), value)
    return ab_plan.make_plan(args)


def test_baseline_and_treatment_flags_are_the_same_ab_as_two_arms(tmp_path):
    legacy = _plan(tmp_path, "--baseline", str(QUICKSTART_BASELINE), "--treatment", str(QUICKSTART))
    arms = _plan(tmp_path, "--arm", f"baseline={QUICKSTART_BASELINE}", "--arm", f"treatment={QUICKSTART}")
    assert legacy.fingerprint() == arms.fingerprint() and legacy.arms == arms.arms
    # Control: other names for the same two recipes make another A/B (its files are named by its arms).
    other = _plan(tmp_path, "--arm", f"base={QUICKSTART_BASELINE}", "--arm", f"blurpool={QUICKSTART}")
    assert other.fingerprint()["arms"] == ["base", "blurpool"] != legacy.fingerprint()["arms"]
    assert other.run_json("blurpool", 17) == tmp_path / "runs" / "blurpool-seed17.json"


def test_a_two_arm_folder_written_before_the_arms_were_recorded_still_resumes(tmp_path):
    plan = _plan(tmp_path, "--baseline", str(QUICKSTART_BASELINE), "--treatment", str(QUICKSTART))
    old = {key: value for key, value in json.loads(json.dumps(plan.fingerprint())).items() if key != "arms"}
    (tmp_path / "ab.json").write_text(json.dumps(old))
    _plan(tmp_path, "--baseline", str(QUICKSTART_BASELINE), "--treatment", str(QUICKSTART))
    with pytest.raises(ABError, match="other arms"):  # control: another arm set is refused
        _plan(tmp_path, "--arm", f"a={QUICKSTART_BASELINE}", "--arm", f"b={QUICKSTART}")


@pytest.mark.parametrize("family", ["quickstart", "resnet50"])
def test_the_aps_twins_differ_from_the_blurpool_recipes_in_sampling_and_padding_only(tmp_path, imagenet_tree, family):
    argv = ["--arm", f"blurpool={YAMLS / f'{family}_blurpool.yaml'}", "--arm", f"aps={YAMLS / f'{family}_aps.yaml'}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAGENET_ROOT", str(imagenet_tree))
        plan = _plan(tmp_path, *argv)
    # The keys the recipes set (the BlurPool twin leaves both at their defaults) ...
    assert ab_plan.arm_differences(plan, "aps") == [
        "algorithms.blurpool.circular_padding: '(absent)' -> True",
        "algorithms.blurpool.sampling: '(absent)' -> 'adaptive'",
    ]
    # ... and the algorithms as built: every other option the same.
    built = {arm: plan.algorithm_options[arm]["blurpool"] for arm in ("blurpool", "aps")}
    assert {key for key in built["aps"] if built["aps"][key] != built["blurpool"][key]} == {
        "sampling", "circular_padding"
    }  # fmt: skip
    assert (built["blurpool"]["sampling"], built["aps"]["sampling"]) == ("fixed", "adaptive")
