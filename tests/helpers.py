"""Shared by the tests that train: the tiny recipe every end-to-end test uses, and small file utilities."""

from __future__ import annotations

from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
YAMLS = ROOT / "yamls"
QUICKSTART = YAMLS / "quickstart_blurpool.yaml"
QUICKSTART_BASELINE = YAMLS / "quickstart_baseline.yaml"

#: The quickstart recipes on 16 px synthetic images, 8 per batch: a run of a few batches takes about a second and
#: still goes through every monitor (the consistency monitor takes 8 px crops shifted by up to 8).
TINY = [
    "data.name=synthetic",
    "data.synthetic_samples=32",
    "data.image_size=16",
    "train_batch_size=8",
    "eval_batch_size=16",
    "callbacks.shift_consistency_monitor.crop_size=8",
    "progress_bar=false",
]


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights a Composer checkpoint holds (read with the safe loader: these are our own files)."""
    from blurpool_algo.checkpoints import load_checkpoint_file

    return load_checkpoint_file(checkpoint)["state"]["model"]


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Bit for bit: the same keys, and every tensor equal."""
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
