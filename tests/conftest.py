"""Test-session settings and fixtures shared by every test file."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image


def pytest_configure(config):
    # Under pytest-xdist each worker gets one core; more threads per worker only oversubscribe the machine.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
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
