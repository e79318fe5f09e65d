"""The Trainer a recipe builds and short real runs: an ImageNet-shaped tree, the quickstart, seeding, the launcher,
every schedule, and the parts validation built handed to the first Trainer only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from helpers import QUICKSTART, ROOT, TINY, YAMLS

from blurpool_algo.callbacks import ShiftConsistencyMonitor, network_of
from blurpool_algo.layers import BlurConv2d, BlurMaxPool2d
from blurpool_algo.metrics import shift_consistency
from blurpool_algo.recipe import load_recipe
from blurpool_algo.shards import main as shards_main
from blurpool_algo.trainer import build_trainer, run_recipe

FAST = ["progress_bar=false"]


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
    # One batch (250 digits) per consistency measurement keeps the test cheap; the recipe measures all 1,000.
    recipe = load_recipe(QUICKSTART, ["max_duration=3ba", "callbacks.shift_consistency_monitor.num_batches=1", *FAST])
    seen = {}
    summary = run_recipe(recipe, trainer_hook=lambda t: seen.update(blur=_blur_layer_count(t), trainer=t))
    assert seen["blur"] == 7  # resnet10: max-pool + strided 3x3 and 1x1 convs of stages 2-4
    assert 0.0 <= summary.accuracy <= 100.0
    # Consistency is measured at the end of training on the 1,000 validation digits, 36 px crops of 44 px frames.
    monitor = next(c for c in seen["trainer"].state.callbacks if isinstance(c, ShiftConsistencyMonitor))
    assert len(monitor.dataloader.dataset) == 1000
    # Beside it, circular consistency after training: the same digits centre-cropped to 36 px and rolled by shifts in
    # [-8, 8) per axis, the recipe's numbers written out here.
    circular = shift_consistency(network_of(seen["trainer"].state.model), monitor.dataloader, mode="circular",
                                 max_shift=8, crop_size=36, num_batches=1)  # fmt: skip
    assert summary.shift_consistency == {"crop": monitor.last_value, "circular": circular}
    assert summary.throughput["num_batches"] == 2  # 3 batches, the first left out as warm-up
    line = str(summary)
    assert f"crop consistency {monitor.last_value:.2f} %, circular consistency {circular:.2f} %" in line
    assert "samples/s" in line


def test_a_circular_monitor_gives_the_circular_number_and_no_crop_one():
    recipe = load_recipe(QUICKSTART, [*TINY, "max_duration=1ba", "callbacks.shift_consistency_monitor.mode=circular"])
    seen = {}
    summary = run_recipe(recipe, trainer_hook=lambda t: seen.update(trainer=t))
    monitor = next(c for c in seen["trainer"].state.callbacks if isinstance(c, ShiftConsistencyMonitor))
    assert summary.shift_consistency == {"circular": monitor.last_value}


def test_same_seed_same_initial_weights_whatever_ran_before_and_no_shared_callbacks():
    recipe = load_recipe(QUICKSTART, FAST)
    first_trainer = build_trainer(recipe)
    first = first_trainer.state.model.state_dict()
    torch.randn(1000)  # the process's RNG moves on, as it would after another run
    second_trainer = build_trainer(recipe)
    second = second_trainer.state.model.state_dict()
    # Each Trainer owns its algorithms and callbacks (a monitor's measurements, its loader): none is shared.
    owned = [{id(c) for c in t.state.callbacks + t.state.algorithms} for t in (first_trainer, second_trainer)]
    assert owned[0] and not owned[0] & owned[1]
    other_seed = build_trainer(load_recipe(QUICKSTART, [*FAST, "seed=18"])).state.model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["module.conv1.weight"], other_seed["module.conv1.weight"])


def test_two_rank_launcher_run(imagenet_tree, tmp_path):
    composer = shutil.which("composer", path=os.path.dirname(sys.executable)) or shutil.which("composer")
    assert composer, "Composer's launcher must be installed with the package"
    with socket.socket() as probe:  # a free port for the ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The ranks read MDS shards of the ImageNet-shaped tree (12 training images, 4 validation), through a cache
    # folder as from an object store: 3 batches of 2 per rank and epoch.
    assert shards_main(["--root", str(imagenet_tree), "--out", str(tmp_path / "shards"), "--no-progress"]) == 0
    data = ["data.name=streaming_imagenet", f"data.remote={tmp_path / 'shards'}", f"data.local={tmp_path / 'cache'}",
            "data.image_size=16", "data.num_workers=0", "train_batch_size=4", "eval_batch_size=4",
            "callbacks.shift_consistency_monitor.crop_size=8", "progress_bar=false"]  # fmt: skip
    # Both ranks start from a checkpoint after batch 1 of one rank, through the checkpoint gate (each rank loads the
    # file), mid-epoch: streaming resumes the epoch's sample order on the new world size.
    start = build_trainer(load_recipe(QUICKSTART, [*data, "max_duration=1ba", f"data.local={tmp_path / 'cache1'}"]))
    start.fit()
    start.save_checkpoint(str(tmp_path / "start.pt"))
    result = subprocess.run(
        [composer, "-n", "2", "--master_port", str(port), "run.py", "-f", str(QUICKSTART), *data,
         "max_duration=3ba", f"load_path={tmp_path / 'start.pt'}", "--diagonal-stability",
         "--summary-json", str(tmp_path / "summary.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("summary:")]
    assert len(summaries) == 1, result.stdout[-3000:]
    # Rank 0 wrote the summary, with a diagonal curve measured on both ranks over all 4 validation images.
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stability"]["num_images"] == 4 and len(summary["stability"]["offsets"]) == 9
    # Batches 2 and 3 trained (the first of them left out of the timing as warm-up), not all three: it resumed.
    assert summary["throughput"]["num_batches"] == 1
    # Each rank downloaded the shards into the cache (the local leader copies, the other waits for it).
    assert (tmp_path / "cache" / "train" / "index.json").is_file()


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
