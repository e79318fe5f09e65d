"""ImageNet from mosaicml-streaming shards: the writer (python -m blurpool_algo.shards), data.name=streaming_imagenet
read by Composer Trainers (a run, autoresume mid-epoch), bad shards as clear errors, and the same evaluation from
shards as from the folder tree the shards were written from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, YAMLS
from streaming import StreamingDataset
from torchvision.datasets import ImageFolder

from blurpool_algo import shards as writer
from blurpool_algo.callbacks import network_of
from blurpool_algo.data.streaming_imagenet import StreamingImages
from blurpool_algo.metrics import shift_consistency
from blurpool_algo.recipe import RecipeError, load_recipe, recipe_parts
from blurpool_algo.train import main as train_main
from blurpool_algo.trainer import build_trainer, consistency_loader, top1_accuracy

#: The quickstart's small ResNet on the shards: 32 px crops, batches of 2 (6 per epoch of the 12 training images).
SHARD_RUN = [
    "data.name=streaming_imagenet",
    "data.image_size=32",
    "train_batch_size=2",
    "eval_batch_size=4",
    "callbacks.shift_consistency_monitor.crop_size=24",
    "callbacks.shift_consistency_monitor.max_shift=8",
    "progress_bar=false",
]


@pytest.fixture(scope="session")
def shards(imagenet_tree, tmp_path_factory) -> Path:
    """The `imagenet_tree` fixture written as shards by the command line (train: 12 images, val: 4)."""
    out = tmp_path_factory.mktemp("shards")
    assert writer.main(["--root", str(imagenet_tree), "--out", str(out), "--workers", "2", "--no-progress"]) == 0
    return out


def _refusal(capsys, argv: list[str]) -> str:
    assert writer.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------------- writer


def test_the_writer_refuses_bad_trees_and_options_before_writing(imagenet_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert "--root:" in _refusal(capsys, ["--root", str(tmp_path / "none"), "--out", str(out)])
    lopsided = tmp_path / "lopsided"
    shutil.copytree(imagenet_tree, lopsided)
    shutil.rmtree(lopsided / "val" / "n01443537")  # val lacks a class train has: labels would not line up
    message = _refusal(capsys, ["--root", str(lopsided), "--out", str(out)])
    assert "same class folders" in message and "n01443537" in message
    message = _refusal(capsys, ["--root", str(imagenet_tree), "--out", str(out), "--compression", "lz4"])
    assert message.startswith("shards: --compression: must be one of none, zstd")
    assert not out.exists()  # nothing written for any refusal


def test_labels_and_bytes_round_trip_in_the_folder_order(imagenet_tree, shards):
    for split, count in (("train", 12), ("val", 4)):
        folder = ImageFolder(imagenet_tree / split)
        stored = StreamingDataset(local=str(shards), split=split)
        assert stored.num_samples == count == len(folder.samples)
        for index, (path, label) in enumerate(folder.samples):
            sample = stored.get_item(index)
            assert sample["label"] == label and sample["image"] == Path(path).read_bytes()  # never re-encoded
        assert json.loads((shards / split / writer.CLASSES_FILE).read_text()) == folder.classes


def test_a_killed_write_leaves_no_split_the_spec_accepts_and_a_rerun_completes(imagenet_tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_read, calls = writer._read, []

    def dying_read(path: str):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt  # what a kill looks like mid-split, after 4 images
        return real_read(path)

    monkeypatch.setattr(writer, "_read", dying_read)
    with pytest.raises(KeyboardInterrupt):
        writer.main(["--root", str(imagenet_tree), "--out", str(out), "--workers", "1", "--no-progress"])
    assert not (out / "train").exists() and (out / "train.partial").is_dir()
    with pytest.raises(RecipeError, match=r"data.remote: .*train.index.json does not exist"):
        load_recipe(QUICKSTART, [*SHARD_RUN, f"data.remote={out}"])
    monkeypatch.setattr(writer, "_read", real_read)
    assert writer.main(["--root", str(imagenet_tree), "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]  # the partial folder is gone
    assert StreamingDataset(local=str(out), split="train").num_samples == 12


# ------------------------------------------------------------------------------------------------- bad shards


def test_missing_or_corrupt_shards_are_one_line_errors_naming_the_key_and_path(shards, tmp_path, capsys):
    def broken(name: str, damage) -> Path:
        copy = tmp_path / name
        shutil.copytree(shards, copy)
        damage(copy)
        return copy

    shard = "train/shard.00000.mds"
    cases = {
        "no_index": (lambda c: (c / "val" / "index.json").unlink(), "data.remote", "val/index.json does not exist"),
        "no_shard": (lambda c: (c / shard).unlink(), "data.remote", "shard.00000.mds listed in"),
        "truncated": (lambda c: (c / shard).write_bytes((c / shard).read_bytes()[:-100]), "data.remote", "truncated"),
        "flipped": (lambda c: _flip_last_byte(c / shard), "data.remote", "does not match its xxh64 hash"),
    }
    for name, (damage, key, text) in cases.items():
        copy = broken(name, damage)
        extra = ["data.validate_hash=xxh64"] if name == "flipped" else []
        with pytest.raises(RecipeError) as caught:
            load_recipe(QUICKSTART, [*SHARD_RUN, f"data.remote={copy}", *extra])
        assert caught.value.key == key and text in caught.value.message and str(copy) in caught.value.message, name
    # The flipped byte keeps the size: only the hash sees it (the control for the hash check).
    load_recipe(QUICKSTART, [*SHARD_RUN, f"data.remote={tmp_path / 'flipped'}"])
    # Through the command line: exit 2, one line, no traceback.
    assert train_main(["-f", str(QUICKSTART), *SHARD_RUN, f"data.remote={tmp_path / 'truncated'}"]) == 2
    err = capsys.readouterr().err
    assert "data.remote" in err and "truncated" in err and "Traceback" not in err
    with pytest.raises(RecipeError, match=r"data\.local: must be set for a remote URL"):
        load_recipe(QUICKSTART, [*SHARD_RUN, "data.remote=s3://bucket/imagenet"])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------------- runs


def test_shards_and_folder_give_one_model_the_same_pixels_top1_and_consistency(imagenet_tree, shards):
    common = ["data.image_size=32", "eval_batch_size=4", "train_batch_size=2", "progress_bar=false",
              "data.num_workers=0", "model.name=resnet10", "callbacks.shift_consistency_monitor.crop_size=32",
              "callbacks.shift_consistency_monitor.max_shift=8"]  # fmt: skip
    folder = load_recipe(YAMLS / "resnet50_blurpool.yaml", [*common, f"data.root={imagenet_tree}"])
    sharded = load_recipe(
        YAMLS / "resnet50_blurpool.yaml", [*common, f"data.remote={shards}", "data.name=streaming_imagenet"]
    )
    trainers = [build_trainer(folder), build_trainer(sharded)]
    trainers[1].state.model.load_state_dict(trainers[0].state.model.state_dict())  # one model, two data paths
    batches = [next(iter(t.state.evaluators[0].dataloader.dataloader)) for t in trainers]
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])
    assert top1_accuracy(trainers[0]) == top1_accuracy(trainers[1])
    # The monitor's protocol (32 px crops shifted by up to 8: 40 px frames), on each path's own consistency loader.
    protocol = next(iter(recipe_parts(folder).protocols.values()))
    loaders = [consistency_loader(recipe, protocol) for recipe in (folder, sharded)]
    frames = [next(iter(loader))[0] for loader in loaders]
    assert frames[0].shape[-1] == protocol.frame_size == 40 and torch.equal(frames[0], frames[1])
    values = [
        shift_consistency(network_of(t.state.model), loader, mode="crop", max_shift=8, crop_size=32)
        for t, loader in zip(trainers, loaders, strict=True)
    ]
    assert values[0] == values[1]


def test_a_run_from_shards_resumes_mid_epoch_with_the_samples_of_an_uninterrupted_run(shards, tmp_path, monkeypatch):
    seen: list[int] = []
    real_get_item = StreamingImages.get_item

    def recording_get_item(self, sample_id, retry=7):
        if self.shuffle:  # the training shards (evaluation reads val in order)
            seen.append(int(sample_id))
        return real_get_item(self, sample_id, retry)

    monkeypatch.setattr(StreamingImages, "get_item", recording_get_item)
    monkeypatch.chdir(tmp_path)
    base = [*SHARD_RUN, f"data.remote={shards}", "eval_interval=1ep", "callbacks={}", "algorithms={}"]
    build_trainer(load_recipe(QUICKSTART, [*base, "max_duration=5ba"])).fit()
    uninterrupted, seen[:] = list(seen), []
    saving = [*base, "run_name=resumed", "save_folder=ckpt/{run_name}", "save_interval=2ba", "autoresume=true"]
    first = build_trainer(load_recipe(QUICKSTART, [*saving, "max_duration=2ba"]))
    first.fit()
    first.close()
    resumed = build_trainer(load_recipe(QUICKSTART, [*saving, "max_duration=5ba"]))
    assert int(resumed.state.timestamp.batch) == 2  # it resumed from the batch-2 checkpoint, mid-epoch
    resumed.fit()
    assert len(uninterrupted) == 10 and seen == uninterrupted  # 4 samples, then 6 more from where they stopped
    assert seen[4:] != uninterrupted[:6]  # the control: not the epoch's start again
