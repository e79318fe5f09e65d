"""The checkpoint gate: hostile files never run code, the wrong network never loads, partial files are refused.

Every hostile file is made from a real checkpoint of a tiny run, changed in one way. Where a check could pass
because the attack was harmless, a control shows the same file does run its code through a path without the gate
(the trusted opt-in, or Composer on its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import composer.algorithms
import pytest
import torch
from composer import Trainer
from composer.models import ComposerClassifier
from helpers import QUICKSTART, QUICKSTART_BASELINE, ROOT, TINY, assert_same_weights
from torch.utils.data import DataLoader, TensorDataset

from blurpool_algo import BlurPool
from blurpool_algo.checkpoints import (
    CheckpointError,
    check_model_state,
    checkpoint_file_status,
    load_checkpoint_file,
    parse_algorithm_description,
)
from blurpool_algo.evaluate import main as evaluate_main
from blurpool_algo.models import resnet10
from blurpool_algo.recipe import RecipeError, load_recipe
from blurpool_algo.trainer import build_trainer


class RunsCommand:
    """Unpickling it runs a shell command: what a hostile checkpoint would hide among its entries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> Path:
    """A real checkpoint of the BlurPool quickstart recipe on tiny data, after 2 batches."""
    folder = tmp_path_factory.mktemp("saved")
    trainer = build_trainer(load_recipe(QUICKSTART, [*TINY, "max_duration=2ba", f"save_folder={folder}"]))
    trainer.fit()
    trainer.close()
    return folder / "ep0-ba2-rank0.pt"


def _variant(saved: Path, folder: Path, name: str, change) -> Path:
    checkpoint = load_checkpoint_file(saved)
    change(checkpoint)
    path = folder / name
    torch.save(checkpoint, path)
    return path


def _refusal(recipe: Path, overrides: list[str]) -> RecipeError:
    with pytest.raises(RecipeError) as caught:
        build_trainer(load_recipe(recipe, [*TINY, *overrides]))
    assert "\n" not in str(caught.value)
    return caught.value


# --------------------------------------------------------------------------------------------------- pickled code


def test_a_pickled_command_never_runs_and_the_opt_in_runs_it(saved, tmp_path):
    marker = tmp_path / "ran"
    evil = _variant(saved, tmp_path, "evil.pt", lambda c: c.update(extra=RunsCommand(f"touch {marker}")))

    with pytest.raises(CheckpointError) as caught:
        load_checkpoint_file(evil)
    assert caught.value.reason == "unsafe_type" and caught.value.details == ("posix.system",)
    error = _refusal(QUICKSTART, [f"load_path={evil}"])
    assert error.key == "load_path" and "posix.system" in error.message and "trust_checkpoint=true" in error.message
    assert not marker.exists()

    # Autoresume reads the save folder's latest checkpoint through the same gate.
    folder = tmp_path / "run"
    folder.mkdir()
    os.replace(evil, folder / "ep0-ba2-rank0.pt")
    os.symlink("ep0-ba2-rank0.pt", folder / "latest-rank0.pt")
    error = _refusal(QUICKSTART, [f"save_folder={folder}", "run_name=r", "autoresume=true", "max_duration=3ba"])
    assert error.key == "autoresume" and "posix.system" in error.message
    assert not marker.exists()

    # Control: the payload is live, and the opt-in for a trusted file is what lets it run.
    build_trainer(load_recipe(QUICKSTART, [*TINY, f"load_path={folder / 'ep0-ba2-rank0.pt'}", "trust_checkpoint=true"]))
    assert marker.exists()


def test_an_algorithm_description_is_parsed_never_evaluated(saved, tmp_path):
    marker = tmp_path / "ran"
    description = f"blurpool_algo.BlurPool(exclude=[__import__('os').system('touch {marker}') or 'x'])"
    evil = _variant(
        saved, tmp_path, "evil.pt", lambda c: c["state"].update(algorithms=[("BlurPool", {"repr": description})])
    )
    # Into the baseline recipe, whose Trainer lacks the algorithm: Composer's autoload would eval the description.
    error = _refusal(QUICKSTART_BASELINE, [f"load_path={evil}"])
    assert error.key == "load_path" and "algorithm description that is refused" in error.message
    assert not marker.exists()

    # Control: Composer alone evaluates it (what every load did before the gate).
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))), batch_size=8)
    Trainer(model=ComposerClassifier(resnet10(num_classes=10), num_classes=10), train_dataloader=loader,
            max_duration="1ba", load_path=str(evil), device="cpu", progress_bar=False)  # fmt: skip
    assert marker.exists()


@pytest.mark.parametrize(
    "description",
    [
        "blurpool_algo.BlurPool(filter_size=__import__('os').getpid())",
        "blurpool_algo.BlurPool(**{'filter_size': 3})",
        "blurpool_algo.BlurPool(filter_size=0)",
        "blurpool_algo.BlurPool(placement='everywhere')",
        "os.system('true')",
        "BlurPool().__class__",
        "[BlurPool()]",
        "blurpool_algo.BlurPool(",
        "ChannelsLast()",  # a known algorithm, but not the one the entry is stored under
    ],
)
def test_descriptions_that_are_refused(saved, tmp_path, description):
    evil = _variant(
        saved, tmp_path, "bad.pt", lambda c: c["state"].update(algorithms=[("BlurPool", {"repr": description})])
    )
    error = _refusal(QUICKSTART_BASELINE, [f"load_path={evil}"])
    assert "algorithm description that is refused" in error.message


def test_descriptions_of_known_algorithms_parse_to_their_class():
    options = {"filter_size": 4, "pad_mode": "reflect", "exclude": ("layer4.*",)}
    algorithm, args, kwargs = parse_algorithm_description(repr(BlurPool(**options)))
    assert algorithm is BlurPool and args == () and algorithm(**kwargs) == BlurPool(**options)
    # Composer's own descriptions, as its checkpoints store them.
    for instance in (composer.algorithms.BlurPool(min_channels=8), composer.algorithms.SqueezeExcite()):
        algorithm, args, kwargs = parse_algorithm_description(repr(instance))
        assert algorithm is type(instance) and algorithm(*args, **kwargs).__dict__ == instance.__dict__


def test_entries_composer_never_evaluates_pass_as_they_are(tmp_path):
    # ChannelsLast is not required_on_load, and has no __repr__: its entry reads "<... object at 0x...>".
    trainer = build_trainer(load_recipe(QUICKSTART, [*TINY, "algorithms.channels_last={}"]))
    trainer.save_checkpoint(str(tmp_path / "c.pt"))
    stored = dict(load_checkpoint_file(tmp_path / "c.pt")["state"]["algorithms"])
    assert " object at 0x" in stored["ChannelsLast"]["repr"]
    build_trainer(load_recipe(QUICKSTART, [*TINY, "algorithms.channels_last={}", f"load_path={tmp_path / 'c.pt'}"]))


# ------------------------------------------------------------------------------------------------- wrong network


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path):
    other = build_trainer(load_recipe(QUICKSTART, [*TINY, "model.name=resnet18"]))
    other.save_checkpoint(str(tmp_path / "resnet18.pt"))
    error = _refusal(QUICKSTART, [f"load_path={tmp_path / 'resnet18.pt'}"])
    assert error.key == "load_path" and "does not fit the recipe's resnet10" in error.message
    assert "unexpected 48 (module.layer1.1.bn1.bias" in error.message and "missing none" in error.message


def test_check_model_state_names_missing_unexpected_and_misshaped_keys():
    expected = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "c.blur_filter": torch.zeros(1, 1, 3, 3)}
    stored = {"a.weight": torch.zeros(3, 2), "x.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as caught:
        check_model_state(expected, stored, path="f.pt")
    assert caught.value.reason == "model_mismatch"
    assert caught.value.details == ("b.weight", "x.weight", "a.weight (3, 2) vs (2, 3)")
    # Blur filters may be missing (a baseline's weights); extra ones only when the load re-applies the algorithm.
    check_model_state(expected, {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}, path="f.pt")
    with_filter = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4), "d.blur_filter": torch.zeros(1)}
    with pytest.raises(CheckpointError):
        check_model_state({k: v for k, v in expected.items() if k != "c.blur_filter"}, with_filter, path="f.pt")
    check_model_state(expected, with_filter, path="f.pt", extra_filters=True)


def test_fine_tuning_a_blurred_model_from_a_baseline_checkpoint_is_a_strict_supported_load(tmp_path):
    baseline = build_trainer(load_recipe(QUICKSTART_BASELINE, TINY))
    baseline.save_checkpoint(str(tmp_path / "baseline.pt"))
    blurred = build_trainer(load_recipe(QUICKSTART, [*TINY, f"load_path={tmp_path / 'baseline.pt'}"]))
    expected = {f"module.{k}": v for k, v in baseline.state.model.module.state_dict().items()}
    got = {k: v for k, v in blurred.state.model.state_dict().items() if not k.endswith("blur_filter")}
    assert_same_weights(got, expected)


# ---------------------------------------------------------------------------------------------- unreadable files


def test_partial_empty_and_garbage_files_are_one_line_errors(saved, tmp_path):
    data = saved.read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_text("not a checkpoint\n")
    (tmp_path / "flipped.pt").write_bytes(data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:])
    assert checkpoint_file_status(saved) == "complete"
    expected = {"empty.pt": "incomplete", "truncated.pt": "incomplete", "garbage.pt": "not_a_checkpoint",
                "flipped.pt": "incomplete"}  # fmt: skip
    for name, reason in expected.items():
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint_file(tmp_path / name)
        assert caught.value.reason == reason, name
    # The recipe check catches the first three before any work (it reads headers only; the CRC is the gate's).
    for name in ("empty.pt", "truncated.pt", "garbage.pt"):
        with pytest.raises(RecipeError) as caught:
            load_recipe(QUICKSTART, [*TINY, f"load_path={tmp_path / name}"])
        assert caught.value.key == "load_path" and name in caught.value.message
    assert "incomplete" in _refusal(QUICKSTART, [f"load_path={tmp_path / 'flipped.pt'}"]).message


def test_command_lines_exit_2_with_one_line_and_no_traceback(saved, tmp_path, capsys):
    (tmp_path / "truncated.pt").write_bytes(saved.read_bytes()[:5000])
    args = ["-f", str(QUICKSTART), *TINY, f"load_path={tmp_path / 'truncated.pt'}"]
    result = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: command line: load_path: ")
    assert "incomplete checkpoint" in result.stderr
    # The evaluation command's main, in this process.
    assert evaluate_main(args) == 2
    assert capsys.readouterr().err.strip().startswith("error: command line: load_path: ")
