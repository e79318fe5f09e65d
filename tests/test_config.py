"""Recipes and the runner: schema errors, every recipe, short real runs, the launcher, and resume equivalence."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY
from PIL import Image

from blurpool_algo.callbacks import ShiftConsistencyMonitor
from blurpool_algo.config import RecipeError, build_trainer, load_recipe, run_recipe
from blurpool_algo.layers import BlurConv2d, BlurMaxPool2d

YAMLS = ROOT / "yamls"
QUICKSTART = YAMLS / "quickstart_blurpool.yaml"
FAST = ["progress_bar=false"]


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory) -> Path:
    """A tiny ImageFolder tree shaped like ImageNet's: train/ and val/, two classes, a few real JPEG files."""
    root = tmp_path_factory.mktemp("imagenet")
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for label in ("n01440764", "n01443537"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = torch.randint(0, 256, (80, 96, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.JPEG")
    return root


def _error(path, overrides=(), **env) -> RecipeError:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, list(overrides))
    return caught.value


# ------------------------------------------------------------------------------------------------- every recipe


@pytest.mark.parametrize("name", ["quickstart_baseline", "quickstart_blurpool"])
def test_quickstart_recipes_validate(name):
    recipe = load_recipe(YAMLS / f"{name}.yaml")
    assert recipe.data.name == "mnist5k"
    assert recipe.model.name == "resnet10"
    assert ("blurpool" in recipe.algorithms) == name.endswith("blurpool")


@pytest.mark.parametrize("name", ["resnet50_baseline", "resnet50_blurpool", "resnet50_blurpool_paper"])
def test_imagenet_recipes_validate_with_a_root(name, imagenet_tree):
    recipe = load_recipe(YAMLS / f"{name}.yaml", [f"data.root={imagenet_tree}"])
    # The published reference: 90 epochs, SGD momentum 0.9, lr 0.1 per 256 images, wd 1e-4, step decay at 30/60.
    assert recipe.max_duration == "90ep"
    assert (recipe.optimizer.name, recipe.optimizer.momentum, recipe.optimizer.weight_decay) == ("sgd", 0.9, 1e-4)
    assert recipe.optimizer.lr == pytest.approx(0.1 * recipe.train_batch_size / 256)
    assert recipe.train_batch_size % 8 == 0
    assert (recipe.scheduler.name, recipe.scheduler.milestones, recipe.scheduler.gamma) == (
        "multistep", ["30ep", "60ep"], 0.1,
    )  # fmt: skip
    assert "channels_last" in recipe.algorithms
    assert recipe.precision == "auto"


def test_imagenet_root_from_the_environment(imagenet_tree, monkeypatch):
    monkeypatch.setenv("IMAGENET_ROOT", str(imagenet_tree))
    assert load_recipe(YAMLS / "resnet50_blurpool.yaml").data.root == str(imagenet_tree)


@pytest.mark.parametrize(
    ("family", "treatment"),
    [("quickstart", "blurpool"), ("resnet50", "blurpool"), ("resnet50", "blurpool_paper")],
)
def test_twins_differ_only_in_algorithms(family, treatment, imagenet_tree):
    overrides = [f"data.root={imagenet_tree}"]
    baseline = dataclasses.asdict(load_recipe(YAMLS / f"{family}_baseline.yaml", overrides))
    blurpool = dataclasses.asdict(load_recipe(YAMLS / f"{family}_{treatment}.yaml", overrides))
    assert "blurpool" not in baseline["algorithms"] and "blurpool" in blurpool["algorithms"]
    baseline.pop("algorithms")
    blurpool_algorithms = blurpool.pop("algorithms")
    assert baseline == blurpool
    assert set(blurpool_algorithms) - {"blurpool"} == set(
        load_recipe(YAMLS / f"{family}_baseline.yaml", overrides).algorithms
    )


# ------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["max_duraton=1ep"], "max_duraton", "Did you mean"),
        (["model.nme=resnet18"], "model.nme", "not in"),
        (["seed=abc"], "seed", "could not be converted"),
        (["train_batch_size=1.5"], "train_batch_size", "could not be converted"),
        (["model.name=resnet51"], "model.name", "resnet50"),
        (["data.name=cifar10"], "data.name", "mnist5k"),
        (["algorithms.blur_pool={}"], "algorithms.blur_pool", "blurpool"),
        (["algorithms.blurpool.filter_size=0"], "algorithms.blurpool", "filter_size"),
        (["algorithms.blurpool.filter_sise=3"], "algorithms.blurpool", "filter_sise"),
        (["algorithms.label_smoothing.smoothin=0.1"], "algorithms.label_smoothing", "smoothin"),
        (["loggers.neptun={}"], "loggers.neptun", "tensorboard"),
        (["callbacks.speed_monitr={}"], "callbacks.speed_monitr", "speed_monitor"),
        (["precision=fp8"], "precision", "amp_bf16"),
        (["device=tpu"], "device", "gpu"),
        (["max_duration=forever"], "max_duration", "90ep, 500ba, 1000sp"),
        (["max_duration=1.5ep"], "max_duration", "not a time this key takes"),
        (["max_duration=0ba"], "max_duration", "must be > 0"),
        (["max_duration=-2ba"], "max_duration", "must be > 0"),
        (["max_duration=4"], "max_duration", "with one of the units: 90ep, 500ba, 1000sp"),
        (["max_duration=100tok"], "max_duration", "not a time this key takes"),
        (["max_duration=0.5dur"], "max_duration", "not a time this key takes"),
        (["eval_interval=0ep"], "eval_interval", "must be > 0"),
        (["scheduler.warmup=-1ba"], "scheduler.warmup", "must be >= 0"),
        (["scheduler.milestones=[1ep,soon]"], "scheduler.milestones[1]", "not a time this key takes"),
        (["save_interval=0ba", "save_folder=/tmp/x"], "save_interval", "must be > 0"),
        (["save_interval=-1ba", "save_folder=/tmp/x"], "save_interval", "must be > 0"),
        (["save_num_checkpoints_to_keep=0"], "save_num_checkpoints_to_keep", "(0 would keep none); write -1 to keep"),
        (["save_folder=/proc/blurpool-algo-test"], "save_folder", "cannot write checkpoints under /proc"),
        (["precision=amp_bf16", "device=cpu"], "precision", "needs a GPU; on cpu use fp32"),
        (["precision=amp_fp16", "device=cpu"], "precision", "needs a GPU"),
        (["algorithms=[blurpool]"], "algorithms", "must be a mapping of names to options"),
        (["optimizer.lr=-0.1"], "optimizer.lr", "must be a finite number > 0"),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay", ">= 0"),
        (["data.max_bad_images=-1"], "data.max_bad_images", ">= 0"),
        (["algorithms.blurpool.exclude=[layr4.*]"], "algorithms.blurpool.exclude", "closest names: layer4"),
        (["optimizer.name=lion"], "optimizer.name", "adamw"),
        (["eval_batch_size=0"], "eval_batch_size", ">= 1"),
        (["autoresume=true"], "autoresume", "run_name"),
        (["load_path=/nonexistent/ckpt.pt"], "load_path", "/nonexistent/ckpt.pt"),
        (["model.num_classes=5"], "model.num_classes", "10 classes"),
        (["train_batch_size=8192"], "train_batch_size", "4000 training samples"),
        (["callbacks.shift_consistency_monitor.crop_size=12"], "callbacks.shift_consistency_monitor", "28 px mnist5k"),
        (["callbacks.shift_consistency_monitor.mode=roll"], "callbacks.shift_consistency_monitor", "'circular'"),
        (["callbacks.throughput_monitor.window_size=0"], "callbacks.throughput_monitor", "window_size"),
    ],
)
def test_recipe_errors_name_the_key_and_the_source(overrides, key, fragment):
    error = _error(QUICKSTART, overrides)
    assert error.key == key
    assert fragment in error.message
    assert error.source == "command line"  # every bad value here came from an override
    assert "\n" not in str(error)
    assert str(error).startswith(f"{error.source}: {key}: ")


@pytest.mark.parametrize("device", ["gpu", "mps"])
def test_a_device_the_machine_lacks_is_a_recipe_error(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    error = _error(QUICKSTART, [f"device={device}"])
    assert error.key == "device" and "not available on this machine; available: cpu" in error.message
    # Without a GPU, auto precision is fp32 on the CPU, and amp is refused up front.
    assert _error(QUICKSTART, ["precision=amp_bf16"]).key == "precision"


@pytest.mark.parametrize("pattern", ["layer4", "layer4.*", "module.layer4.0.conv1", "layer4.0.downsample*"])
def test_exclude_patterns_that_name_modules_pass_the_check(pattern):
    assert load_recipe(QUICKSTART, [f"algorithms.blurpool.exclude=[{pattern}]"]).algorithms["blurpool"]["exclude"]


def test_a_save_folder_on_a_read_only_file_system_is_a_recipe_error(tmp_path):
    mount = tmp_path / "read-only"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN; /proc stands in above (save_folder=/proc/...)")
    try:
        error = _error(QUICKSTART, [f"save_folder={mount}/runs/{{run_name}}"])
        assert error.key == "save_folder" and "Read-only file system" in error.message
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_errors_in_the_file_name_the_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(QUICKSTART.read_text().replace("max_duration: 4ep", "max_duraton: 4ep"))
    error = _error(recipe)
    assert (error.source, error.key) == (str(recipe), "max_duraton")
    recipe.write_text(QUICKSTART.read_text() + "\nmodel: [not, a, mapping]\n")
    assert _error(recipe).source == str(recipe)
    recipe.write_text("seed: [unclosed\n")
    assert _error(recipe).key == "<yaml>"


def test_rerunning_a_saved_run_needs_autoresume_or_overwrite(tmp_path):
    saving = [f"save_folder={tmp_path}/{{run_name}}", "run_name=again"]
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "ep1-ba62-rank0.pt").write_bytes(b"")
    error = _error(QUICKSTART, saving)
    assert error.key == "save_folder" and "autoresume=true" in error.message
    assert load_recipe(QUICKSTART, [*saving, "save_overwrite=true"]).save_overwrite


def test_missing_recipe_file():
    error = _error("yamls/no_such_recipe.yaml")
    assert error.key == "-f" and "no_such_recipe.yaml" in error.message


def test_missing_mandatory_key(tmp_path):
    recipe = tmp_path / "short.yaml"
    recipe.write_text("max_duration: 1ep\ntrain_batch_size: 8\neval_batch_size: 8\nmodel: {name: resnet18}\n")
    error = _error(recipe)
    assert error.key == "data.name" and error.message == "missing mandatory value: name"


def test_missing_imagenet_root_names_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    assert _error(YAMLS / "resnet50_blurpool.yaml").key == "data.root"
    error = _error(YAMLS / "resnet50_blurpool.yaml", [f"data.root={tmp_path / 'nowhere'}"])
    assert error.key == "data.root" and "nowhere" in error.message
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert _error(YAMLS / "resnet50_blurpool.yaml", [f"data.root={tmp_path / 'empty'}"]).key == "data.root"


def test_global_batch_must_divide_by_the_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    error = _error(QUICKSTART)
    assert error.key == "train_batch_size" and "world size 3" in error.message
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_recipe(QUICKSTART).train_batch_size == 64


def test_logger_with_a_missing_package_is_a_recipe_error():
    try:
        import wandb  # noqa: F401
    except ImportError:
        error = _error(QUICKSTART, ["loggers.wandb={}"])
        assert error.key == "loggers.wandb" and "package" in error.message
    else:
        assert load_recipe(QUICKSTART, ["loggers.wandb={}"]).loggers == {"wandb": {}}


def test_bad_override_syntax():
    error = _error(QUICKSTART, ["seed"])
    assert error.source == "command line" and "key=value" in error.message


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-f", "yamls/nope.yaml"], "-f: recipe file not found"),
        (["-f", "yamls/quickstart_blurpool.yaml", "model.nme=x"], "model.nme"),
        (["-f", "yamls/resnet50_blurpool.yaml", "data.root=/no/such/imagenet"], "data.root"),
    ],
)
def test_run_py_reports_one_line_without_traceback(args, fragment, capsys, monkeypatch):
    # run.py's main in this process (one real `python run.py` subprocess is in test_checkpoints.py).
    from blurpool_algo.train import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("IMAGENET_ROOT", "")
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0]


# --------------------------------------------------------------------------------------------------------- runs


def _blur_layer_count(trainer) -> int:
    return sum(isinstance(m, BlurConv2d | BlurMaxPool2d) for m in trainer.state.model.modules())


def test_imagenet_recipe_trains_two_batches_on_a_folder_tree(imagenet_tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's file logger and checkpoints write under ./runs
    tree = tmp_path / "imagenet"
    shutil.copytree(imagenet_tree, tree)
    (tree / "val" / "n01440764" / "broken.JPEG").write_text("not an image\n")  # skipped, counted, warned about
    recipe = load_recipe(
        YAMLS / "resnet50_blurpool.yaml",
        [f"data.root={tree}", "train_batch_size=4", "eval_batch_size=4", "max_duration=2ba",
         "data.num_workers=0", "data.image_size=64", *FAST],
    )  # fmt: skip
    seen = {}
    with pytest.warns(UserWarning, match="broken.JPEG"):
        summary = run_recipe(recipe, trainer_hook=lambda t: seen.update(trainer=t, blur=_blur_layer_count(t)))
    assert summary.bad_images == 1 and "1 unreadable images skipped" in str(summary)
    assert seen["blur"] == 7  # resnet50: 1 BlurMaxPool2d + 6 BlurConv2d
    assert int(seen["trainer"].state.timestamp.batch) == 2
    assert 0.0 <= summary.accuracy <= 100.0
    assert summary.algorithms == ["ChannelsLast", "BlurPool"]
    assert list((tmp_path / "runs").glob("*/logs-rank0.txt"))
    # The paper's protocol: the monitor's own loader prepares 256 px images for 224 px crops shifted up to 32.
    monitor = next(c for c in seen["trainer"].state.callbacks if isinstance(c, ShiftConsistencyMonitor))
    images, _ = next(iter(monitor.dataloader))
    assert images.shape[-2:] == (256, 256)
    assert 0.0 <= summary.shift_consistency["crop"] <= 100.0
    assert summary.throughput["samples_per_sec"] > 0


def test_quickstart_trains_a_few_batches():
    recipe = load_recipe(QUICKSTART, ["max_duration=3ba", *FAST])
    seen = {}
    summary = run_recipe(recipe, trainer_hook=lambda t: seen.update(blur=_blur_layer_count(t), trainer=t))
    assert seen["blur"] == 7  # resnet10: max-pool + strided 3x3 and 1x1 convs of stages 2-4
    assert 0.0 <= summary.accuracy <= 100.0
    # Consistency is measured at the end of training on all 1,000 validation digits, 36 px crops of 44 px frames.
    monitor = next(c for c in seen["trainer"].state.callbacks if isinstance(c, ShiftConsistencyMonitor))
    assert len(monitor.dataloader.dataset) == 1000
    assert summary.shift_consistency == {"crop": monitor.last_value}
    assert summary.throughput["num_batches"] == 2  # 3 batches, the first left out as warm-up
    line = str(summary)
    assert f"crop consistency {monitor.last_value:.2f} %" in line and "samples/s" in line


def test_same_seed_same_initial_weights_whatever_ran_before():
    recipe = load_recipe(QUICKSTART, FAST)
    first = build_trainer(recipe).state.model.state_dict()
    torch.randn(1000)  # the process's RNG moves on, as it would after another run
    second = build_trainer(recipe).state.model.state_dict()
    other_seed = build_trainer(load_recipe(QUICKSTART, [*FAST, "seed=18"])).state.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["module.conv1.weight"], other_seed["module.conv1.weight"])


def test_two_rank_launcher_run(tmp_path):
    composer = shutil.which("composer", path=os.path.dirname(sys.executable)) or shutil.which("composer")
    assert composer, "Composer's launcher must be installed with the package"
    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Both ranks start from a checkpoint after batch 1, through the checkpoint gate (each rank loads the file).
    start = build_trainer(load_recipe(QUICKSTART, [*TINY, "max_duration=1ba"]))
    start.fit()
    start.save_checkpoint(str(tmp_path / "start.pt"))
    result = subprocess.run(
        [composer, "-n", "2", "--master_port", str(port), "run.py", "-f", str(QUICKSTART), *TINY,
         "max_duration=3ba", f"load_path={tmp_path / 'start.pt'}", "--diagonal-stability",
         "--summary-json", str(tmp_path / "summary.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("summary:")]
    assert len(summaries) == 1, result.stdout[-3000:]
    # Rank 0 wrote the summary, with a diagonal curve measured on both ranks over all 16 validation images.
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stability"]["num_images"] == 16 and len(summary["stability"]["offsets"]) == 9
    # Batches 2 and 3 trained (the first of them left out of the timing as warm-up), not all three: it resumed.
    assert summary["throughput"]["num_batches"] == 1


@pytest.mark.parametrize("schedule", ["constant", "cosine", "multistep"])
def test_every_schedule_warms_up(schedule):
    recipe = load_recipe(
        QUICKSTART,
        [f"scheduler.name={schedule}", "scheduler.warmup=8ba", "max_duration=2ba", "optimizer.lr=0.1", *TINY],
    )
    trainer = build_trainer(recipe)
    trainer.fit()
    lr = trainer.state.optimizers[0].param_groups[0]["lr"]
    trainer.close()
    assert 0.0 < lr < 0.05  # 2 of 8 warmup batches done: still far below the peak of 0.1
