"""A/B/n runs: two or more recipes (arms) over several seeds, each compared to the first, and a report people can read.

    python -m blurpool_algo.ab --arm baseline=yamls/quickstart_baseline.yaml \\
        --arm blurpool=yamls/quickstart_blurpool.yaml --arm aps=yamls/quickstart_aps.yaml \\
        --seeds 3 --out runs/abn [key=value ...]
    python -m blurpool_algo.ab --baseline yamls/quickstart_baseline.yaml \\
        --treatment yamls/quickstart_blurpool.yaml --seeds 3 --out runs/ab [key=value ...]

``--arm NAME=RECIPE`` names an arm (repeat it, in the order wanted; the first is the reference every other arm is
compared to); ``--baseline A --treatment B`` is ``--arm baseline=A --arm treatment=B``. Every (seed, arm) run is a
separate process of ``python -m blurpool_algo.train`` (or ``composer -n N -m blurpool_algo.train`` with ``--nproc
N``). Every arm gets the same seeds, hence the same initial weights and data order, and the same overrides. Separate
processes keep peak memory and speed per arm. The runs alternate (seed 1: every arm in order; seed 2: ...) so that
drift of a shared machine hits every arm alike. Each finished run leaves ``runs/<arm>-seed<S>.json`` under ``--out``;
rerunning the same command skips those runs, so an interrupted A/B resumes where it stopped. The report
(``report.json``, ``report.md``, three PNG plots) is written at the end, whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blurpool_algo.ab_plan import ARM_NAME_HINT, SEEDS_HINT, ABError, Plan, make_plan
from blurpool_algo.ab_report import format_table, table_rows, write_report
from blurpool_algo.files import write_json_atomically
from blurpool_algo.summary import describe_run
from blurpool_algo.train import DIE_WITH_PARENT_ENV, DIVERGED_EXIT, TRUST_FLAG_HELP, die_with_parent

__all__ = ["main", "run_all"]


def _train_command(plan: Plan, arm: str, seed: int, summary: Path) -> list[str]:
    if plan.nproc == 1:
        launcher = [sys.executable, "-m", "blurpool_algo.train"]
    else:
        composer = shutil.which("composer", path=os.path.dirname(sys.executable)) or shutil.which("composer")
        if composer is None:
            raise ABError("--nproc > 1 needs Composer's launcher `composer` on the PATH")
        launcher = [composer, "-n", str(plan.nproc), "-m", "blurpool_algo.train"]
    return [*launcher, "-f", str(plan.recipe(arm)), *plan.run_overrides(arm, seed), "--summary-json", str(summary),
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
        write_json_atomically(self.pids, {"runner": os.getpid(), **({"run": child} if child else {})})

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


def run_all(plan: Plan, log: Callable[[str], None] = print) -> dict[str, dict[int, dict[str, Any]]]:
    """Runs every (seed, arm) not finished before; returns arm -> seed -> the run's summary.

    A run diverged (its summary says so, exit code 3) counts as finished: the report shows it as diverged.
    """
    (plan.out / "runs").mkdir(parents=True, exist_ok=True)
    with _Lock(plan.out) as lock:
        write_json_atomically(plan.out / "ab.json", plan.fingerprint())
        order = [(seed, arm) for seed in plan.seeds for arm in plan.arm_names]
        results: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in plan.arm_names}
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


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """``python -m blurpool_algo.ab``: 0 reported, 1 a run failed, 2 refused before any run, 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m blurpool_algo.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arm", action="append", metavar="NAME=RECIPE",
        help=f"an arm: its name ({ARM_NAME_HINT}) and recipe, e.g. aps=yamls/quickstart_aps.yaml; repeat it, two "
        "or more, in order: the first is the reference every other arm is compared to",
    )  # fmt: skip
    parser.add_argument("--baseline", help="the baseline recipe (with --treatment: the arms baseline and treatment)")
    parser.add_argument("--treatment", help="the treatment recipe, e.g. yamls/quickstart_blurpool.yaml")
    parser.add_argument("--seeds", default="3", help=f"a count or a list ({SEEDS_HINT}); default 3")
    parser.add_argument("--out", default="runs/ab", help="the A/B's folder (default runs/ab)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run, through Composer's launcher")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_FLAG_HELP)
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every arm, e.g. max_duration=2ep")
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
    print(f"\nA/B over seeds {', '.join(map(str, plan.seeds))} (mean ± std; every arm against {plan.reference}), "
          f"report in {plan.out}/report.md:\n")  # fmt: skip
    print(format_table(table_rows(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
