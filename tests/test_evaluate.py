"""`python -m blurpool_algo.evaluate`: a checkpoint's top-1, consistency and stability plot, and its errors.

The reference numbers come from the training run itself: the evaluation of its last checkpoint must reproduce the
run's final top-1 and the crop consistency its ShiftConsistencyMonitor logged (same protocol, same seed).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import QUICKSTART, QUICKSTART_BASELINE, ROOT, TINY

from blurpool_algo.evaluate import evaluate_recipe
from blurpool_algo.recipe import RecipeError, load_recipe
from blurpool_algo.trainer import run_recipe

# One worker runs the whole module, so its trained fixture is built once.
pytestmark = pytest.mark.xdist_group("evaluate")

BLURPOOL, BASELINE = QUICKSTART, QUICKSTART_BASELINE
FAST = [*TINY, "max_duration=4ba"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    summary = run_recipe(load_recipe(BLURPOOL, [*FAST, f"save_folder={folder}", "run_name=evaluated"]))
    return folder / "latest-rank0.pt", summary


def test_cli_reproduces_the_runs_numbers_and_writes_whole_files(trained, tmp_path):
    checkpoint, summary = trained
    out = tmp_path / "evaluation"
    result = subprocess.run(
        [sys.executable, "-m", "blurpool_algo.evaluate", "-f", str(BLURPOOL), f"load_path={checkpoint}",
         "--out", str(out), "--step", "2", *FAST],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    assert report["accuracy"] == pytest.approx(summary.accuracy, abs=1e-9)
    assert report["crop_consistency"] == pytest.approx(summary.shift_consistency["crop"], abs=1e-9)
    assert 0.0 <= report["circular_consistency"] <= 100.0
    assert (report["max_shift"], report["crop_size"], report["num_images"]) == (8, 8, 16)
    assert report["diagonal_stability"]["offsets"] == [0, 2, 4, 6, 8]
    assert (out / "diagonal_stability.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.iterdir()) == ["diagonal_stability.png", "evaluation.json"]
    assert f"top-1 accuracy: {summary.accuracy:.2f} %" in result.stdout


def test_a_blurpool_checkpoint_under_the_baseline_recipe_gets_its_blur_back(trained):
    # Composer's autoload re-adds the algorithm the checkpoint needs: same architecture, same numbers.
    checkpoint, summary = trained
    evaluation = evaluate_recipe(load_recipe(BASELINE, [*FAST, f"load_path={checkpoint}"]), num_batches=1)
    assert evaluation.accuracy == pytest.approx(summary.accuracy, abs=1e-9)


@pytest.mark.parametrize(
    ("overrides", "options", "fragment"),
    [
        (["model.name=resnet18"], {}, "does not fit the recipe's resnet18"),
        ([], {"crop_size": 12}, "crop_size + max_shift = 20 px exceeds the 16 px images of synthetic"),
        ([], {"max_shift": 0}, "--max-shift: must be an int >= 1"),
    ],
)
def test_incompatible_checkpoint_or_protocol_is_a_one_line_error(trained, overrides, options, fragment):
    checkpoint, _ = trained
    recipe = load_recipe(BLURPOOL, [*FAST, f"load_path={checkpoint}", *overrides])
    with pytest.raises(RecipeError) as caught:
        evaluate_recipe(recipe, **options)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_a_diverged_checkpoint_is_an_error_not_a_perfect_consistency(trained, tmp_path):
    from blurpool_algo.checkpoints import load_checkpoint_file

    checkpoint = load_checkpoint_file(trained[0])
    checkpoint["state"]["model"]["module.fc.weight"].fill_(float("nan"))
    torch.save(checkpoint, tmp_path / "diverged.pt")
    with pytest.raises(RecipeError, match=r"diverged\.pt holds a diverged model: 16 of 16 images got NaN"):
        evaluate_recipe(load_recipe(BLURPOOL, [*FAST, f"load_path={tmp_path / 'diverged.pt'}"]))


def test_not_a_checkpoint_and_no_checkpoint(tmp_path):
    garbage = tmp_path / "notes.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(RecipeError, match=r"notes\.pt is not a torch checkpoint file"):
        evaluate_recipe(load_recipe(BLURPOOL, [*FAST, f"load_path={garbage}"]))
    with pytest.raises(RecipeError, match="evaluation needs a checkpoint"):
        evaluate_recipe(load_recipe(BLURPOOL, FAST))


def test_cli_errors_exit_2_and_name_the_source(tmp_path, capsys):
    # The command's main in this process (one real `python -m blurpool_algo.evaluate` is in test_checkpoints.py).
    from blurpool_algo.evaluate import main

    assert main(["-f", str(BLURPOOL), f"load_path={tmp_path / 'x.pt'}"]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: command line: load_path: checkpoint not found: {tmp_path / 'x.pt'}"
    )
