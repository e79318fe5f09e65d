"""The A/B runner, end to end through its command line: report files and schema, resume after a real interruption,
failures that leave no report, and the noise verdict against scipy's Welch test."""

from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from blurpool_algo.ab import ABError, compare, describe_values, parse_seeds

# One worker runs the whole module, so its trained fixture is built once.
pytestmark = pytest.mark.xdist_group("ab")

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "yamls" / "quickstart_baseline.yaml"
TREATMENT = ROOT / "yamls" / "quickstart_blurpool.yaml"
# Synthetic 32 px images, two training batches: each run takes seconds, and still goes through every monitor.
TINY = [
    "data.name=synthetic",
    "data.synthetic_samples=64",
    "data.image_size=32",
    "train_batch_size=16",
    "eval_batch_size=32",
    "max_duration=2ba",
    "callbacks.shift_consistency_monitor.crop_size=24",
]
METRICS = ("accuracy", "shift_consistency", "samples_per_sec", "peak_memory", "wall_time")
REPORT = ("report.json", "report.md", "accuracy.png", "stability.png", "throughput.png")


def ab_command(out: Path, *extra: str, baseline: Path = BASELINE, treatment: Path = TREATMENT) -> list[str]:
    return [sys.executable, "-m", "blurpool_algo.ab", "--baseline", str(baseline), "--treatment", str(treatment),
            "--seeds", "2", "--out", str(out), *TINY, *extra]  # fmt: skip


def run_ab(out: Path, *extra: str, **recipes) -> subprocess.CompletedProcess:
    return subprocess.run(ab_command(out, *extra, **recipes), cwd=ROOT, capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("ab") / "tiny"
    result = run_ab(out)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return out, result


def test_every_report_file_with_the_schema(finished):
    out, result = finished
    assert all((out / name).is_file() for name in REPORT)
    for name in REPORT:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["seeds"] == [17, 18]
    units = {"accuracy": "%", "shift_consistency": "%", "samples_per_sec": "samples/s", "peak_memory": "MiB"}
    assert report["units"] == {**units, "wall_time": "s"}
    for arm in ("baseline", "treatment"):
        runs = {seed: json.loads((out / "runs" / f"{arm}-seed{seed}.json").read_text()) for seed in (17, 18)}
        for metric in METRICS:
            entry = report["arms"][arm][metric]
            assert set(entry) == {"mean", "std", "values"} and len(entry["values"]) == 2
            assert entry["mean"] == pytest.approx(statistics.fmean(entry["values"]))
            assert entry["std"] == pytest.approx(statistics.stdev(entry["values"]))
        assert report["arms"][arm]["accuracy"]["values"] == [runs[17]["accuracy"], runs[18]["accuracy"]]
        assert report["arms"][arm]["shift_consistency"]["values"] == [
            runs[s]["shift_consistency"]["crop"] for s in (17, 18)
        ]
        assert report["recipes"][arm]["path"].endswith(f"quickstart_{'blurpool' if arm == 'treatment' else arm}.yaml")
    assert report["runs"]["treatment"]["17"]["algorithms"] == ["BlurPool"]
    assert report["runs"]["baseline"]["17"]["algorithms"] == []
    assert report["overrides"] == TINY
    assert report["arm_differences"] == [
        "algorithms.blurpool.blur_first: '(absent)' -> True",
        "algorithms.blurpool.filter_size: '(absent)' -> 3",
        "algorithms.blurpool.min_channels: '(absent)' -> 16",
        "algorithms.blurpool.pad_mode: '(absent)' -> 'zeros'",
    ]
    assert {"torch", "mosaicml", "python"} <= set(report["versions"]) and report["machine"]["cpu_count"] >= 1
    markdown = (out / "report.md").read_text()
    assert "| top-1 accuracy |" in markdown and "python -m blurpool_algo.ab" in markdown
    assert "![diagonal stability](stability.png)" in markdown
    # The same table on the terminal, and a progress line per arm and seed.
    assert "shift consistency" in result.stdout.split("report in")[-1]
    assert sum(line.startswith("[ab ") and "running" in line for line in result.stdout.splitlines()) == 4
    # No temporary file is left behind.
    assert not [p for p in out.rglob(".*") if p.name != ".."]


def test_both_arms_start_from_the_same_seed(finished):
    out, _ = finished
    logs = {arm: (out / "runs" / f"{arm}-seed17.json") for arm in ("baseline", "treatment")}
    names = {arm: json.loads(path.read_text())["run_name"] for arm, path in logs.items()}
    assert names == {"baseline": "tiny-baseline-seed17", "treatment": "tiny-treatment-seed17"}


def test_interrupted_then_resumed_gives_the_same_report(finished, tmp_path):
    reference = json.loads((finished[0] / "report.json").read_text())
    out = tmp_path / "tiny"
    process = subprocess.Popen(ab_command(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "runs" / "baseline-seed17.json"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), process.communicate()[1][-3000:]
    process.send_signal(signal.SIGTERM)  # interrupted while the second run trains
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "rerun the same command to resume" in stderr
    assert not any((out / name).exists() for name in REPORT)
    kept = first.read_text()
    resumed = run_ab(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[ab 1/4] baseline seed 17: finished before, reused" in resumed.stdout
    assert first.read_text() == kept
    report = json.loads((out / "report.json").read_text())
    for arm in ("baseline", "treatment"):
        for metric in ("accuracy", "shift_consistency"):
            assert report["arms"][arm][metric]["values"] == reference["arms"][arm][metric]["values"], (arm, metric)


def test_a_failing_arm_names_itself_and_leaves_no_report(tmp_path):
    broken = tmp_path / "broken_treatment.yaml"
    # inception_v3 passes the recipe check but cannot run on 32 px images: the failure comes mid-run.
    broken.write_text(TREATMENT.read_text().replace("name: resnet10", "name: inception_v3"))
    out = tmp_path / "failing"
    result = run_ab(out, treatment=broken)
    assert result.returncode == 1
    assert "the treatment arm failed for seed 17" in result.stderr and "treatment-seed17.log" in result.stderr
    assert not any((out / name).exists() for name in REPORT)
    assert (out / "runs" / "baseline-seed17.json").exists()  # the finished run is kept for a resume


def test_bad_recipe_path_is_an_error_before_any_run(tmp_path):
    out = tmp_path / "never"
    result = run_ab(out, baseline=tmp_path / "missing.yaml")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: -f: recipe file not found: {tmp_path / 'missing.yaml'}"
    assert not out.exists()


def test_an_out_folder_of_another_ab_is_refused(finished):
    out, _ = finished
    result = run_ab(out, "optimizer.lr=0.2")
    assert result.returncode == 2 and "holds an A/B of other recipes, overrides or seeds" in result.stderr


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
