"""Recipes: the schema's errors (each naming its key and source), every recipe file, and the parts validation keeps."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
import torch
from helpers import QUICKSTART, ROOT, YAMLS

from blurpool_algo.recipe import RecipeError, load_recipe, recipe_parts


def _error(path, overrides=(), **env) -> RecipeError:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, list(overrides))
    return caught.value


# ------------------------------------------------------------------------------------------------- every recipe


@pytest.mark.parametrize("name", ["quickstart_baseline", "quickstart_blurpool", "quickstart_aps"])
def test_quickstart_recipes_validate(name):
    recipe = load_recipe(YAMLS / f"{name}.yaml")
    assert recipe.data.name == "mnist5k"
    assert recipe.model.name == "resnet10"
    assert ("blurpool" in recipe.algorithms) == (name != "quickstart_baseline")


@pytest.mark.parametrize("name", ["resnet50_baseline", "resnet50_blurpool", "resnet50_blurpool_paper", "resnet50_aps"])
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
        (
            ["data.name=streaming_imagenet", "data.remote="],
            "data.remote",
            "must be set for data.name='streaming_imagenet'",
        ),
        (["data.name=streaming_imagenet", "data.remote=/nonexistent/shards"], "data.remote", "/nonexistent/shards"),
        (
            ["data.name=streaming_imagenet", "data.remote=gs://b/x", "data.local="],
            "data.local",
            "must be set for a remote URL",
        ),
        (["data.shuffle_algo=py3e"], "data.shuffle_algo", "'py1e'"),
        (["data.predownload=0"], "data.predownload", ">= 1 or None"),
        (["data.cache_limit=lots"], "data.cache_limit", "a size like '500gb'"),
        (["data.validate_hash=md5"], "data.validate_hash", "'xxh64'"),
        (["data.download_timeout=0"], "data.download_timeout", "> 0"),
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


# ------------------------------------------------------------------------------------------------------- parts


def test_validation_returns_what_it_built():
    from composer.core import Time

    recipe = load_recipe(QUICKSTART, ["scheduler.milestones=[2ep,3ep]", "device=cpu"])
    parts = recipe_parts(recipe)
    assert [part.key for part in parts.algorithms] == ["algorithms.blurpool"]
    assert parts.times["max_duration"] == Time.from_timestring(recipe.max_duration)
    assert parts.milestones == [Time.from_timestring("2ep"), Time.from_timestring("3ep")]
    assert (parts.device, parts.precision) == ("cpu", "fp32")
    assert parts.data_options.num_classes == recipe.model.num_classes
    assert recipe_parts(recipe) is parts  # kept, not validated again


def test_the_instance_validation_built_goes_to_the_first_build_only():
    part = recipe_parts(load_recipe(QUICKSTART)).callbacks[0]
    validated = part.unclaimed
    assert validated is not None
    first, second = part.build(), part.build()
    assert first is validated
    assert second is not first and type(second) is type(first) and part.unclaimed is None


def test_a_recipe_changed_after_loading_is_validated_again():
    recipe = load_recipe(QUICKSTART)
    recipe.eval_batch_size = 0
    with pytest.raises(RecipeError) as caught:
        recipe_parts(recipe)
    assert caught.value.key == "eval_batch_size" and ">= 1" in caught.value.message
    recipe.eval_batch_size = 16
    assert recipe_parts(recipe).data_options.seed == recipe.seed
