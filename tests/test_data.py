"""Tests for blurpool_algo.data: data checks, the ImageNet folder loaders, the embedded mnist5k digits, synthetic data
and the per-rank samplers.

Expected values come from the specification (ImageNet mean/std, 256/224 resize ratio, a 4:1 stratified split, a 4-px
zero border) or are computed here independently from the raw data; none is copied from running the code under test.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from composer.utils import dist
from PIL import Image
from torch.utils.data import TensorDataset
from torchvision import transforms

from blurpool_algo.data import (
    DATASETS,
    DataError,
    DataOptions,
    MNIST5k,
    TooManyBadImagesError,
    bad_image_count,
    build_sampler,
    dataset_spec,
    load_mnist5k,
    mnist5k_split,
)
from blurpool_algo.data.mnist5k import MNIST5K_MEAN, MNIST5K_STD, _mnist5k_raw, _mnist5k_split_cached
from blurpool_algo.metrics import ConsistencyProtocol

# The standard ImageNet statistics, typed from torchvision's documentation.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# A 2-class tree: constant-grey images for class 'a_grey' (value 128), white for 'b_white' (value 255). Sizes vary and
# are not square, so crops and resizes really happen; one JPEG per split checks that format too (a constant image
# survives JPEG exactly enough for the tolerances used below).
GREY, WHITE = 128, 255
TRAIN_FILES = [("a_grey", "0.png", (300, 260)), ("a_grey", "1.jpg", (90, 120)), ("a_grey", "2.png", (50, 40))]
TRAIN_FILES += [("b_white", "0.png", (240, 320)), ("b_white", "1.jpeg", (70, 60)), ("b_white", "2.PNG", (33, 47))]
VAL_FILES = [("a_grey", "0.png", (280, 300)), ("a_grey", "1.jpg", (100, 80))]
VAL_FILES += [("b_white", "0.png", (260, 256)), ("b_white", "1.png", (64, 90))]


def _write_image(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def _make_tree(root: Path) -> Path:
    for split, files in (("train", TRAIN_FILES), ("val", VAL_FILES)):
        for cls, fname, size in files:
            _write_image(root / split / cls / fname, size, GREY if cls == "a_grey" else WHITE)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _make_tree(tmp_path / "imagenet")


def _normalized(value: int) -> torch.Tensor:
    """Per-channel normalized value of a grey level, by hand: (value / 255 - mean) / std."""
    return torch.tensor([(value / 255 - m) / s for m, s in zip(MEAN, STD, strict=True)])


def _unnormalize_mnist(images: torch.Tensor) -> torch.Tensor:
    """Back to the 0..255 pixel values (rounded), from the normalization x = (p / 255 - mean) / std."""
    return torch.round((images * MNIST5K_STD + MNIST5K_MEAN) * 255)


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    # Composer reads the world size and rank from these when torch.distributed is not initialized.
    for var in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------------------------------------
# the registry, DataOptions, check / num_classes
# ---------------------------------------------------------------------------------------------------------------------


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _check(name, root) -> None:
    dataset_spec(name).check(DataOptions(root=root))


def _num_classes(name, root) -> int | None:
    return dataset_spec(name).num_classes(DataOptions(root=root))


def _loaders(name: str, *, train_batch_size: int, eval_batch_size: int, **options):
    spec = dataset_spec(name)
    return spec.loaders(DataOptions(**options), train_batch_size=train_batch_size, eval_batch_size=eval_batch_size)


def _framed(name: str, *, side: int, batch_size: int, max_shift: int = 8, **options):
    """The consistency loader of ``name`` for ``side - max_shift`` px crops shifted by up to ``max_shift``."""
    spec, data_options = dataset_spec(name), DataOptions(**options)
    protocol = spec.consistency_protocol(data_options, max_shift=max_shift, crop_size=side - max_shift)
    assert protocol.frame_size == side
    return spec.consistency_loader(data_options, protocol, batch_size=batch_size)


@pytest.mark.parametrize("name", ["imagenet1k", "MNIST5k", "", None, "cifar10"])
def test_check_data_unknown_name(name):
    with pytest.raises(ValueError) as excinfo:
        _check(name, None)
    message = _one_line_error(excinfo)
    assert "data.name" in message
    for allowed in ("imagenet", "mnist5k", "synthetic"):
        assert repr(allowed) in message


def test_check_data_valid_tree(tree):
    _check("imagenet", str(tree))
    _check("imagenet", tree)
    assert _num_classes("imagenet", str(tree)) == 2


def test_check_data_root_unset():
    for root in (None, ""):
        with pytest.raises(ValueError) as excinfo:
            _check("imagenet", root)
        message = _one_line_error(excinfo)
        assert "data.root" in message and "imagenet" in message


def _remove(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()


def _break_missing_root(root: Path) -> Path:
    return root / "does-not-exist"


def _break_root_is_file(root: Path) -> Path:
    (root / "a-file").write_text("not a folder")
    return root / "a-file"


def _break_no_train(root: Path) -> Path:
    _remove(root / "train")
    return root


def _break_no_val(root: Path) -> Path:
    _remove(root / "val")
    return root


def _break_no_class_folders(root: Path) -> Path:
    for cls in ("a_grey", "b_white"):
        _remove(root / "train" / cls)
    (root / "train" / "stray.png").write_bytes(b"")  # a file directly under train/ is not a class
    return root


def _break_empty_class_folder(root: Path) -> Path:
    (root / "val" / "b_white" / "empty").mkdir()
    for image in (root / "val" / "b_white").glob("*.png"):
        image.unlink()
    (root / "val" / "b_white" / "notes.txt").write_text("no images here")
    return root


def _break_empty_train_class(root: Path) -> Path:
    (root / "train" / "c_empty").mkdir()
    (root / "val" / "c_empty").mkdir()
    return root


def _break_val_classes_differ(root: Path) -> Path:
    (root / "val" / "b_white").rename(root / "val" / "c_other")
    return root


def _break_val_class_missing(root: Path) -> Path:
    _remove(root / "val" / "b_white")
    return root


BREAKERS = [
    _break_missing_root,
    _break_root_is_file,
    _break_no_train,
    _break_no_val,
    _break_no_class_folders,
    _break_empty_class_folder,
    _break_empty_train_class,
    _break_val_classes_differ,
    _break_val_class_missing,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("_break_"))
def test_check_data_bad_tree(tree, breaker):
    root = breaker(tree)
    with pytest.raises(ValueError) as excinfo:
        _check("imagenet", str(root))
    message = _one_line_error(excinfo)
    assert "data.root" in message
    assert str(root) in message


def test_check_data_names_the_offending_class(tree):
    _break_val_classes_differ(tree)
    with pytest.raises(ValueError, match="b_white") as excinfo:
        _check("imagenet", tree)
    assert "c_other" in str(excinfo.value)


def test_check_data_images_in_subfolders_count(tree):
    # ImageFolder walks subfolders of a class folder, so the check must too.
    nested = tree / "val" / "b_white"
    for image in list(nested.iterdir()):
        image.rename(tree / f"moved-{image.name}")
    _write_image(nested / "deeper" / "x.png", (20, 20), WHITE)
    _check("imagenet", tree)


@pytest.mark.parametrize("name", ["mnist5k", "synthetic"])
def test_check_data_other_datasets_ignore_root(name, tmp_path):
    for root in (None, str(tmp_path / "nowhere"), "relative/path"):
        _check(name, root)


def test_num_classes_of_each_dataset(tree):
    assert _num_classes("mnist5k", None) == 10
    assert _num_classes("synthetic", None) is None
    assert _num_classes("imagenet", tree) == 2
    with pytest.raises(ValueError, match=r"data\.name"):
        _num_classes("nope", None)
    with pytest.raises(ValueError, match=r"data\.root"):
        _num_classes("imagenet", None)


# ---------------------------------------------------------------------------------------------------------------------
# imagenet loaders
# ---------------------------------------------------------------------------------------------------------------------


def _all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("image_size", [None, 64])
def test_imagenet_loaders_shapes_labels_and_normalization(tree, image_size):
    train, val = _loaders(
        "imagenet", root=str(tree), train_batch_size=3, eval_batch_size=4, num_workers=0, seed=0, image_size=image_size
    )
    side = image_size or 224
    train_x, train_y = _all_batches(train)
    val_x, val_y = _all_batches(val)
    assert train_x.shape == (6, 3, side, side)  # 6 images, batches of 3, nothing dropped
    assert val_x.shape == (4, 3, side, side)
    assert train_x.dtype == val_x.dtype == torch.float32
    # Labels follow the sorted class folders: a_grey = 0, b_white = 1; eval keeps the folder order.
    assert sorted(train_y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert val_y.tolist() == [0, 0, 1, 1]
    # Every crop of a constant image is constant: its normalized value is known by hand, per channel.
    for images, labels in ((train_x, train_y), (val_x, val_y)):
        for image, label in zip(images, labels, strict=True):
            expected = _normalized(GREY if label == 0 else WHITE)
            assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.03)
            assert image.std(dim=(1, 2)).max() < 0.05


@pytest.mark.parametrize(("image_size", "resize", "crop"), [(None, 256, 224), (64, 73, 64), (112, 128, 112)])
def test_imagenet_eval_is_resize_then_center_crop(tmp_path, image_size, resize, crop):
    # A non-constant, non-square image: the eval output must be exactly Resize(resize) + CenterCrop(crop) of it, with
    # resize = 256/224 * crop (64 * 256 / 224 = 73.1 -> 73).
    root = _make_tree(tmp_path / "imagenet")
    ramp = torch.arange(150 * 200, dtype=torch.int64).reshape(150, 200) % 251
    pixels = torch.stack([ramp, ramp.flip(1), ramp.t().reshape(150, 200)], dim=-1).to(torch.uint8).numpy()
    (root / "val" / "a_grey" / "0.png").unlink()
    Image.fromarray(pixels).save(root / "val" / "a_grey" / "0.png")

    _, val = _loaders(
        "imagenet", root=root, train_batch_size=2, eval_batch_size=4, num_workers=0, seed=0, image_size=image_size
    )
    got = next(iter(val))[0][0]
    reference = transforms.Compose(
        [transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    with Image.open(root / "val" / "a_grey" / "0.png") as image:
        expected = reference(image.convert("RGB"))
    assert got.shape == (3, crop, crop)
    torch.testing.assert_close(got, expected)


def test_imagenet_train_crops_are_random_and_flipped(tmp_path):
    # Black left half, white right half: an unflipped crop is never brighter on its left edge than on its right, a
    # mirrored one is whenever it straddles the edge. Random crops and flips must both occur.
    root = _make_tree(tmp_path / "imagenet")
    halves = torch.zeros(120, 160, dtype=torch.uint8)
    halves[:, 80:] = 255
    Image.fromarray(halves.numpy()).convert("RGB").save(root / "train" / "a_grey" / "0.png")
    train, _ = _loaders(
        "imagenet", root=root, train_batch_size=6, eval_batch_size=2, num_workers=0, seed=0, image_size=32
    )
    dataset = train.dataset
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path.endswith(os.path.join("a_grey", "0.png")))
    torch.manual_seed(0)
    crops = torch.stack([dataset[index][0] for _ in range(60)])
    assert crops.shape == (60, 3, 32, 32)
    assert len({crop.numpy().tobytes() for crop in crops}) > 50
    left, right = crops[:, 0, :, 0].mean(dim=1), crops[:, 0, :, -1].mean(dim=1)
    assert (right > left + 1).sum() > 5  # as loaded
    assert (left > right + 1).sum() > 5  # mirrored


def test_imagenet_loaders_check_the_tree(tree):
    _break_val_classes_differ(tree)
    with pytest.raises(ValueError, match=r"data\.root"):
        _loaders("imagenet", root=tree, train_batch_size=2, eval_batch_size=2, num_workers=0, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# imagenet: unreadable images
# ---------------------------------------------------------------------------------------------------------------------

# Each split holds 2 classes x 3 real JPEGs (40x48 noise, so every image differs) and 2 unreadable files with the
# .JPEG extension, placed so that ImageFolder's sorted order is, per split:
#   0 a/0.JPEG, 1 a/1.JPEG, 2 a/1_truncated.JPEG (bad), 3 a/2.JPEG, 4 b/0.JPEG, 5 b/1.JPEG, 6 b/2.JPEG,
#   7 b/9_text.JPEG (bad, the last sample: its substitute wraps around to sample 0).
BAD_FILES = (("a", "1_truncated.JPEG"), ("b", "9_text.JPEG"))
BAD_INDICES = (2, 7)
READABLE_PER_SPLIT = 6


def _jpeg_bytes(seed: int) -> bytes:
    pixels = torch.randint(0, 256, (48, 40, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, "JPEG")
    return buffer.getvalue()


def _make_bad_tree(root: Path, *, with_bad: bool = True) -> Path:
    seed = 0
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for k in range(3):
                seed += 1
                (root / split / cls / f"{k}.JPEG").write_bytes(_jpeg_bytes(seed))
        if with_bad:
            # The first half of a real JPEG: PIL reads the header, then fails with "image file is truncated".
            truncated = _jpeg_bytes(100)
            (root / split / "a" / BAD_FILES[0][1]).write_bytes(truncated[: len(truncated) // 2])
            # Not an image at all: PIL cannot identify it.
            (root / split / "b" / BAD_FILES[1][1]).write_text("this is a text file, not a JPEG\n")
    return root


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    return _make_bad_tree(tmp_path / "imagenet")


def _bad_paths(root: Path, split: str) -> list[str]:
    return [str(root / split / cls / name) for cls, name in BAD_FILES]


def _imagenet(root: Path, **kwargs):
    options = {"train_batch_size": 2, "eval_batch_size": 3, "num_workers": 0, "seed": 0, "image_size": 32} | kwargs
    return _loaders("imagenet", root=root, **options)


def _skip_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    return [str(r.message) for r in records if issubclass(r.category, UserWarning) and "unreadable" in str(r.message)]


def test_unreadable_images_are_skipped_counted_and_warned(bad_tree):
    train, val = _imagenet(bad_tree)
    assert len(train.dataset) == len(val.dataset) == 8  # the bad files are samples too: nothing is decoded up front
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        train_batches = list(train)
        val_x, val_y = _all_batches(val)
    # Every batch keeps its full shape: a bad file is replaced by another image, never dropped.
    assert len(train_batches) == 4
    assert all(x.shape == (2, 3, 32, 32) and y.shape == (2,) for x, y in train_batches)
    assert val_x.shape == (8, 3, 32, 32) and val_y.shape == (8,)
    assert bad_image_count(train) == bad_image_count(train.dataset) == 2
    assert bad_image_count(val) == bad_image_count(val.dataset) == 2
    # One warning per bad file and split, naming the file and the error type.
    messages = _skip_warnings(records)
    assert len(messages) == 4
    for path in _bad_paths(bad_tree, "train") + _bad_paths(bad_tree, "val"):
        (message,) = [m for m in messages if path in m]
        assert ("OSError" if "truncated" in path else "UnidentifiedImageError") in message
        assert "data.max_bad_images" in message

    # A second epoch meets the same files again: no new warning, and they are not counted twice.
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert len(list(train)) == 4 and len(_all_batches(val)[1]) == 8
    assert not _skip_warnings(records)
    assert bad_image_count(train) == bad_image_count(val) == 2


def test_unreadable_image_is_replaced_by_the_next_readable_one(bad_tree):
    _, val = _imagenet(bad_tree)
    dataset = val.dataset
    assert [dataset.samples[i][0] for i in BAD_INDICES] == _bad_paths(bad_tree, "val")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The eval transform is deterministic: the same index gives the same sample every time ...
        for index in BAD_INDICES:
            first, again = dataset[index], dataset[index]
            assert torch.equal(first[0], again[0]) and first[1] == again[1]
        # ... namely the next readable sample of the dataset, wrapping around after the last one.
        for bad, substitute in zip(BAD_INDICES, (3, 0), strict=True):
            image, label = dataset[bad]
            expected_image, expected_label = dataset[substitute]
            assert torch.equal(image, expected_image) and label == expected_label
        # Readable samples are their own images, all different (noise), so the substitutes are not any image.
        images = [dataset[i][0] for i in range(8) if i not in BAD_INDICES]
        assert len({image.numpy().tobytes() for image in images}) == READABLE_PER_SPLIT
    assert bad_image_count(dataset) == 2


def test_more_unreadable_images_than_max_bad_images_is_an_error(bad_tree):
    _, val = _imagenet(bad_tree, max_bad_images=1)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        with pytest.raises(TooManyBadImagesError) as excinfo:
            _all_batches(val)
    message = _one_line_error(excinfo)
    assert isinstance(excinfo.value, ValueError)
    assert "data.max_bad_images" in message and "max_bad_images=1" in message
    assert "2 unreadable images" in message
    assert _bad_paths(bad_tree, "val")[1] in message  # the one over the threshold
    # The first bad file was within the threshold: skipped with a warning, as usual.
    assert [m for m in _skip_warnings(records) if _bad_paths(bad_tree, "val")[0] in m]


def test_max_bad_images_zero_is_strict(bad_tree):
    train, val = _imagenet(bad_tree, max_bad_images=0)
    first_bad = _bad_paths(bad_tree, "val")[0]
    with pytest.raises(TooManyBadImagesError, match="max_bad_images=0") as excinfo:
        _all_batches(val)
    message = _one_line_error(excinfo)
    assert first_bad in message and "OSError" in message and "truncated" in message
    assert bad_image_count(val) == 1
    with pytest.raises(TooManyBadImagesError, match=r"data\.max_bad_images"):
        list(train)


def test_clean_tree_counts_no_bad_image(tmp_path):
    root = _make_bad_tree(tmp_path / "imagenet", with_bad=False)
    train, val = _imagenet(root, max_bad_images=0)
    consistency = _framed("imagenet", root=root, side=40, batch_size=3, num_workers=0, seed=0, max_bad_images=0)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        assert len(list(train)) == 3
        assert _all_batches(val)[0].shape == (6, 3, 32, 32)
        assert _all_batches(consistency)[0].shape == (6, 3, 40, 40)
    assert not _skip_warnings(records)
    assert bad_image_count(train) == bad_image_count(val) == bad_image_count(consistency) == 0
    # The other datasets never skip anything: they take the keyword and count 0.
    synthetic, _ = _synthetic(0, max_bad_images=0)
    assert bad_image_count(synthetic) == bad_image_count(synthetic.dataset) == 0


def test_consistency_loader_skips_and_counts_unreadable_images(bad_tree):
    loader = _framed("imagenet", root=bad_tree, side=40, batch_size=3, num_workers=0, seed=0)
    with pytest.warns(UserWarning, match="unreadable") as records:
        images, labels = _all_batches(loader)
    assert images.shape == (8, 3, 40, 40) and labels.shape == (8,)
    assert bad_image_count(loader) == 2
    assert {path for path in _bad_paths(bad_tree, "val") if any(path in str(r.message) for r in records)} == set(
        _bad_paths(bad_tree, "val")
    )
    strict = _framed("imagenet", root=bad_tree, side=40, batch_size=3, num_workers=0, seed=0, max_bad_images=1)
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(TooManyBadImagesError, match="max_bad_images=1"):
        _all_batches(strict)


def test_bad_image_count_is_shared_across_worker_processes(bad_tree):
    # One sample per batch, two workers: worker 0 loads samples 0, 2, 4, 6 and worker 1 samples 1, 3, 5, 7, so each
    # meets one of the bad files (2 and 7). Only a counter both workers share adds up to 2 in the main process.
    _, val = _imagenet(bad_tree, eval_batch_size=1, num_workers=2)
    images, labels = _all_batches(val)
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    assert bad_image_count(val) == 2
    # And the threshold sees both workers' files: with max_bad_images=1, the second bad file is an error (re-raised
    # in the main process by the DataLoader, with the worker's message).
    _, val = _imagenet(bad_tree, eval_batch_size=1, num_workers=2, max_bad_images=1)
    assert "max_bad_images=1" in str(_loader_error(val))
    assert bad_image_count(val) == 2


def _loader_error(loader) -> TooManyBadImagesError:
    """The error that reading all of ``loader`` raises, with its traceback dropped."""
    try:
        _all_batches(loader)
    except TooManyBadImagesError as error:
        # The traceback's frames hold the loader and its worker iterator in a reference cycle. Left to a later garbage
        # collection, torch's shutdown then waits 5 s per worker (seen: a 10 s pause in another test); without the
        # traceback the loader is freed when the test ends, and its workers stop at once.
        error.__traceback__ = None
        return error
    raise AssertionError("reading the loader raised no TooManyBadImagesError")


@pytest.mark.parametrize("value", [-1, True, 1.5, "3", None])
def test_max_bad_images_must_be_a_non_negative_int(bad_tree, value):
    with pytest.raises(DataError, match=r"^data\.max_bad_images: must be an int >= 0") as excinfo:
        _imagenet(bad_tree, max_bad_images=value)
    assert excinfo.value.key == "data.max_bad_images" and repr(value) in _one_line_error(excinfo)


# ---------------------------------------------------------------------------------------------------------------------
# mnist5k
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_raw() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist5k()


@pytest.fixture(scope="module")
def mnist_train() -> MNIST5k:
    return MNIST5k("train")


@pytest.fixture(scope="module")
def mnist_val() -> MNIST5k:
    return MNIST5k("val")


def _stack(dataset, indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    indices = range(len(dataset)) if indices is None else indices
    images, labels = zip(*(dataset[i] for i in indices), strict=True)
    return torch.stack(images), torch.tensor(labels)


def test_mnist5k_raw_data(mnist_raw):
    images, labels = mnist_raw
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) == 9
    assert int(images.max()) == 255  # pixels, not labels, fill the image
    # Real digits are distinct images.
    assert len({row.numpy().tobytes() for row in images}) == 5000
    # load_mnist5k hands out copies: modifying them leaves later loads intact.
    mine = load_mnist5k()[0]
    mine[0].fill_(7)
    assert torch.equal(load_mnist5k()[0][0], images[0])


def test_mnist5k_split_sizes_and_class_counts(mnist_raw, mnist_train, mnist_val):
    _, labels = mnist_raw
    full = torch.bincount(labels, minlength=10)
    # Stratified 4:1 split: each class gives a fifth of its digits to validation; exact when the counts divide by 5.
    assert all(count % 5 == 0 for count in full.tolist())
    expected_val = full // 5
    expected_train = full - expected_val
    assert len(mnist_train) == 4000 and len(mnist_val) == 1000
    assert torch.equal(torch.bincount(mnist_train.labels, minlength=10), expected_train)
    assert torch.equal(torch.bincount(mnist_val.labels, minlength=10), expected_val)
    train_idx, val_idx = mnist5k_split()
    assert len(train_idx) == 4000 and len(val_idx) == 1000
    assert torch.equal(torch.bincount(labels[val_idx], minlength=10), expected_val)


def test_mnist5k_splits_are_disjoint_and_cover_the_digits(mnist_raw, mnist_train, mnist_val):
    def rows(dataset) -> set[bytes]:
        images, _ = _stack(MNIST5k(dataset.split, augment=False))
        digits = _unnormalize_mnist(images[:, 0, 4:32, 4:32]).to(torch.uint8)
        return {digit.numpy().tobytes() for digit in digits}

    train_rows, val_rows = rows(mnist_train), rows(mnist_val)
    assert len(train_rows) == 4000 and len(val_rows) == 1000
    assert not train_rows & val_rows
    assert train_rows | val_rows == {row.numpy().tobytes() for row in mnist_raw[0]}


def test_mnist5k_split_is_fixed(mnist_raw):
    train_idx, val_idx = mnist5k_split()
    # Recompute from scratch under different global RNG states: the split must not depend on them (nor on the run).
    for global_seed in (1, 12345):
        _mnist5k_split_cached.cache_clear()
        _mnist5k_raw.cache_clear()
        torch.manual_seed(global_seed)
        again_train, again_val = mnist5k_split()
        assert torch.equal(again_train, train_idx) and torch.equal(again_val, val_idx)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())

    # And the loaders of two run seeds evaluate on the same digits, in the same order.
    loaders = [
        _loaders("mnist5k", root=None, train_batch_size=64, eval_batch_size=500, num_workers=0, seed=seed)
        for seed in (0, 1)
    ]
    (x0, y0), (x1, y1) = (_all_batches(val) for _, val in loaders)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert torch.equal(loaders[0][0].dataset.labels, loaders[1][0].dataset.labels)


def test_mnist5k_images_layout(mnist_raw, mnist_val):
    images, labels = _stack(mnist_val)
    assert images.shape == (1000, 3, 36, 36) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # The 4-px border holds the normalized value of a 0 pixel: (0 - mean) / std = -0.0794 / 0.2484 = -0.3196.
    zero = -MNIST5K_MEAN / MNIST5K_STD
    assert zero == pytest.approx(-0.3196, abs=1e-3)
    border = torch.ones(36, 36, dtype=torch.bool)
    border[4:32, 4:32] = False
    assert torch.allclose(images[:, :, border], torch.full_like(images[:, :, border], zero))
    # The centre is the digit itself, normalized: (pixel / 255 - mean) / std.
    raw_images, raw_labels = mnist_raw
    _, val_idx = mnist5k_split()
    expected = (raw_images[val_idx].float() / 255 - MNIST5K_MEAN) / MNIST5K_STD
    torch.testing.assert_close(images[:, 0, 4:32, 4:32], expected)
    assert torch.equal(labels, raw_labels[val_idx])
    # The constants fit the data: the padded images come out about zero-mean, unit-variance.
    assert abs(float(images.mean())) < 0.05 and abs(float(images.std()) - 1) < 0.05
    # Items are ordinary tensors: modifying one in place works and leaves the dataset intact.
    item = mnist_val[0][0]
    item.add_(1)
    assert torch.equal(mnist_val[0][0] + 1, item)


def test_mnist5k_eval_loader_is_deterministic():
    _, val = _loaders("mnist5k", root=None, train_batch_size=64, eval_batch_size=128, num_workers=0, seed=3)
    torch.manual_seed(0)
    first = _all_batches(val)
    torch.manual_seed(1)
    second = _all_batches(val)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert len(first[1]) == 1000


def _ink_box(pixels: torch.Tensor) -> tuple[int, int]:
    """Top row and left column with ink."""
    rows = torch.nonzero(pixels.sum(dim=1)).flatten()
    cols = torch.nonzero(pixels.sum(dim=0)).flatten()
    return int(rows[0]), int(cols[0])


def test_mnist5k_training_shifts(mnist_train):
    plain = MNIST5k("train", augment=False)
    torch.manual_seed(0)
    shifts = set()
    for draw in range(600):
        index = draw % 150
        shifted = _unnormalize_mnist(mnist_train[index][0][0])
        original = _unnormalize_mnist(plain[index][0][0])
        # A 28x28 digit in a 4-px border, shifted by at most 4 px, stays inside: the ink is all still there ...
        assert shifted.sum() == original.sum()
        # ... and the image is the original moved by (dy, dx) in [-4, 4]^2, zeros filled in.
        (top, left), (top0, left0) = _ink_box(shifted), _ink_box(original)
        dy, dx = top - top0, left - left0
        assert max(abs(dy), abs(dx)) <= 4
        assert torch.equal(shifted, torch.roll(original, (dy, dx), dims=(0, 1)))
        shifts.add((dy, dx))
    dys, dxs = {dy for dy, _ in shifts}, {dx for _, dx in shifts}
    assert dys == dxs == set(range(-4, 5))  # every shift per axis occurs, including the extremes
    assert len(shifts) > 60


def test_mnist5k_shifts_follow_torch_rng(mnist_train):
    torch.manual_seed(7)
    first_epoch = [mnist_train[i][0] for i in range(8)]
    second_epoch = [mnist_train[i][0] for i in range(8)]
    torch.manual_seed(7)
    replay = [mnist_train[i][0] for i in range(8)]
    assert any(not torch.equal(a, b) for a, b in zip(first_epoch, second_epoch, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first_epoch, replay, strict=True))


def test_mnist5k_train_loader():
    train, _ = _loaders("mnist5k", root=None, train_batch_size=64, eval_batch_size=64, num_workers=0, seed=0)
    batches = list(train)
    assert len(batches) == 4000 // 64  # the last partial batch is dropped
    images, _ = batches[0]
    assert images.shape == (64, 3, 36, 36) and images.dtype == torch.float32
    all_labels = torch.cat([labels for _, labels in batches])
    assert int(all_labels.min()) >= 0 and int(all_labels.max()) <= 9
    assert len(set(all_labels.tolist())) == 10


def test_mnist5k_is_real_digits(mnist_val):
    # The mean "1" is a vertical stroke: far more ink in the centre columns than near the sides. Noise has none.
    images, labels = _stack(mnist_val)
    ink = _unnormalize_mnist(images[labels == 1, 0]).mean(dim=0)
    centre = ink[:, 16:20].sum()
    sides = ink[:, 4:8].sum() + ink[:, 28:32].sum()
    assert centre > 5 * sides
    assert centre > 0


# ---------------------------------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------------------------------


def _synthetic(seed: int, **kwargs):
    options = {"train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0, "num_classes": 3} | kwargs
    return _loaders("synthetic", root=None, seed=seed, **options)


def test_synthetic_is_deterministic_per_seed():
    a_train, a_val = _synthetic(0)
    b_train, b_val = _synthetic(0)
    c_train, c_val = _synthetic(1)
    assert torch.equal(a_train.dataset.tensors[0], b_train.dataset.tensors[0])
    assert torch.equal(a_val.dataset.tensors[0], b_val.dataset.tensors[0])
    assert torch.equal(a_train.dataset.tensors[1], b_train.dataset.tensors[1])
    assert not torch.equal(a_train.dataset.tensors[0], c_train.dataset.tensors[0])
    assert not torch.equal(a_val.dataset.tensors[0], c_val.dataset.tensors[0])
    # Train and eval are different samples.
    assert not torch.equal(a_train.dataset.tensors[0][:32], a_val.dataset.tensors[0])


def test_synthetic_shapes_and_classes():
    train, val = _synthetic(0, synthetic_samples=200, num_classes=3, image_size=20)
    x, y = _all_batches(train)
    assert x.shape == (200, 3, 20, 20)
    assert set(y.tolist()) == {0, 1, 2}
    vx, vy = _all_batches(val)
    assert vx.shape == (100, 3, 20, 20) and set(vy.tolist()) <= {0, 1, 2}
    # Default: 64 samples of 32x32; eval holds at least one eval batch.
    train, val = _synthetic(0, num_classes=5, eval_batch_size=48)
    assert len(train.dataset) == 64 and len(val.dataset) == 48
    assert train.dataset.tensors[0].shape[1:] == (3, 32, 32)
    assert int(train.dataset.tensors[1].max()) < 5


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"eval_batch_size": -1}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"num_classes": 0}, "num_classes"),
        ({"image_size": 0}, "image_size"),
        ({"synthetic_samples": 8, "train_batch_size": 16}, "train_batch_size"),
    ],
)
def test_bad_loader_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        _synthetic(0, **kwargs)


def test_build_dataloaders_unknown_name():
    with pytest.raises(ValueError, match=r"data\.name"):
        _loaders("cifar", root=None, train_batch_size=2, eval_batch_size=2, num_workers=0, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------------


def test_single_process_loaders_see_everything():
    assert dist.get_world_size() == 1
    train, val = _synthetic(0, synthetic_samples=40, eval_batch_size=8)
    assert train.sampler.num_replicas == 1 and train.sampler.rank == 0
    assert sorted(train.sampler) == list(range(40))
    assert list(val.sampler) == list(range(20))  # eval: dataset order, no shuffle
    assert train.batch_size == 8 and val.batch_size == 8
    assert train.persistent_workers is False and train.pin_memory == torch.cuda.is_available()


def test_seed_fixes_the_training_order():
    def first_batch(seed: int) -> tuple[list[int], torch.Tensor]:
        train, _ = _loaders("mnist5k", root=None, train_batch_size=64, eval_batch_size=64, num_workers=0, seed=seed)
        return list(train.sampler)[:64], next(iter(train))[1]

    order_a, labels_a = first_batch(0)
    order_b, labels_b = first_batch(0)
    order_c, labels_c = first_batch(1)
    assert order_a == order_b and torch.equal(labels_a, labels_b)
    assert order_a != order_c and not torch.equal(labels_a, labels_c)
    assert order_a != sorted(order_a)  # shuffled


@pytest.mark.parametrize("size", [40, 41])
@pytest.mark.parametrize("epoch", [0, 3])
def test_two_way_shards_are_disjoint_and_cover(size, epoch):
    dataset = TensorDataset(torch.arange(size))
    shards = []
    for rank in range(2):
        sampler = build_sampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=5, drop_last=True)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == size // 2
    assert not set(shards[0]) & set(shards[1])
    covered = set(shards[0]) | set(shards[1])
    assert len(covered) == size - size % 2 and covered <= set(range(size))


def test_loaders_shard_by_rank(monkeypatch):
    # Composer takes the world size and rank from the environment when torch.distributed is not initialized.
    shards = []
    for rank in range(2):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        train, val = _synthetic(0, synthetic_samples=48, train_batch_size=4, eval_batch_size=4)
        assert train.sampler.num_replicas == 2 and train.sampler.rank == rank
        assert train.batch_size == 4  # per rank, as given
        shards.append((list(train.sampler), list(val.sampler)))
    (train0, val0), (train1, val1) = shards
    assert len(train0) == len(train1) == 24
    assert not set(train0) & set(train1) and set(train0) | set(train1) == set(range(48))
    assert set(val0) | set(val1) == set(range(24)) and not set(val0) & set(val1)


def test_worker_processes_reproduce_the_augmentation():
    # With workers, torch seeds each one from the main process's RNG: a seeded run replays the same shifted images.
    def first_batch(global_seed: int) -> torch.Tensor:
        train, val = _loaders("mnist5k", root=None, train_batch_size=32, eval_batch_size=500, num_workers=1, seed=0)
        assert train.persistent_workers and val.persistent_workers
        torch.manual_seed(global_seed)
        return next(iter(train))[0]

    first, replay, other = first_batch(0), first_batch(0), first_batch(1)
    assert torch.equal(first, replay)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("size", [28, 36, 44, 45])
def test_mnist5k_frames_of_any_size_hold_the_same_centred_digit(size):
    framed, usual = MNIST5k("val", size=size), MNIST5k("val")
    image, label = framed[7]
    reference, reference_label = usual[7]
    assert image.shape == (3, size, size) and label == reference_label
    # The 28 px digit sits at the same place relative to each frame's centre; the rest is zero border.
    top = (size - 28) // 2
    assert torch.equal(image[:, top : top + 28, top : top + 28], reference[:, 4:32, 4:32])
    background = reference[0, 0, 0]
    border = image.clone()
    border[:, top : top + 28, top : top + 28] = background
    assert torch.all(border == background)


def test_mnist5k_refuses_frames_smaller_than_the_digits():
    with pytest.raises(ValueError, match="size must be an int >= 28"):
        MNIST5k("val", size=27)


def test_consistency_loader_frames_mnist5k_and_reuses_the_synthetic_validation_set():
    framed = _framed("mnist5k", root=None, side=44, batch_size=250, num_workers=0, seed=0)
    images, _ = next(iter(framed))
    assert images.shape == (250, 3, 44, 44) and len(framed.dataset) == 1000
    options = {"root": None, "num_workers": 0, "seed": 5, "synthetic_samples": 40, "image_size": 24}
    _, evaluation = _loaders("synthetic", train_batch_size=8, eval_batch_size=8, **options)
    consistency = _framed("synthetic", side=24, batch_size=8, **options)
    assert torch.equal(consistency.dataset.tensors[0], evaluation.dataset.tensors[0])


@pytest.mark.parametrize(
    ("name", "side", "message"),
    [
        ("mnist5k", 20, "crop_size + max_shift = 20 px is smaller than the 28 px mnist5k digits"),
        ("synthetic", 40, "crop_size + max_shift = 40 px exceeds the 32 px images of synthetic"),
    ],
)
def test_consistency_loader_refuses_images_that_cannot_hold_the_window(name, side, message):
    with pytest.raises(DataError) as excinfo:
        _framed(name, root=None, side=side, batch_size=4, num_workers=0, seed=0)
    assert (excinfo.value.key, excinfo.value.message) == ("crop_size", message)
    # A protocol built elsewhere (not by this dataset's consistency_protocol) is checked by the loader too.
    protocol = ConsistencyProtocol(mode="crop", max_shift=8, crop_size=side - 8)
    with pytest.raises(DataError, match=re.escape(message)):
        dataset_spec(name).consistency_loader(DataOptions(), protocol, batch_size=4)


# ---------------------------------------------------------------------------------------------------------------------
# Specs: the registry, DataError, DataOptions, the consistency protocol of each dataset
# ---------------------------------------------------------------------------------------------------------------------


def test_the_registry_holds_one_spec_per_name():
    assert DATASETS == ("imagenet", "mnist5k", "streaming_imagenet", "synthetic")
    assert [dataset_spec(name).name for name in DATASETS] == list(DATASETS)
    with pytest.raises(DataError) as excinfo:
        dataset_spec("cifar10")
    assert excinfo.value.key == "data.name"
    assert excinfo.value.message == (
        "must be one of 'imagenet', 'mnist5k', 'streaming_imagenet', 'synthetic', got 'cifar10'"
    )


def test_data_error_carries_its_key_apart_and_survives_pickling():
    error = DataError("data.root", "/nowhere does not exist")
    assert isinstance(error, ValueError) and str(error) == "data.root: /nowhere does not exist"
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.key, copy.message, str(copy)) == (DataError, error.key, error.message, str(error))


@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("num_workers", -1, "data.num_workers"),
        ("seed", -1, "seed"),
        ("seed", 1.0, "seed"),
        ("num_classes", 0, "model.num_classes"),
        ("synthetic_samples", 0, "data.synthetic_samples"),
        ("image_size", 7, "data.image_size"),
        ("image_size", True, "data.image_size"),
        ("max_bad_images", -1, "data.max_bad_images"),
    ],
)
def test_data_options_refusals_name_the_recipe_key(field, value, key):
    with pytest.raises(DataError) as excinfo:
        DataOptions(**{field: value})
    assert excinfo.value.key == key
    assert excinfo.value.message.startswith("must be an int >=") and excinfo.value.message.endswith(f"got {value!r}")


def test_imagenet_without_root_says_how_to_give_one():
    with pytest.raises(DataError) as excinfo:
        dataset_spec("imagenet").check(DataOptions())
    assert excinfo.value.key == "data.root"
    assert "data.root=/path/to/imagenet" in excinfo.value.message and "IMAGENET_ROOT" in excinfo.value.message


def test_train_size_of_each_dataset(tree):
    assert dataset_spec("synthetic").train_size(DataOptions(synthetic_samples=40)) == 40
    assert dataset_spec("mnist5k").train_size(DataOptions()) == len(mnist5k_split()[0]) == 4000
    assert dataset_spec("imagenet").train_size(DataOptions(root=tree)) is None  # known only by listing the tree


# The defaults typed from the issue, not computed: imagenet 32 px shifts of the training crop (224 unless
# data.image_size); mnist5k 8 px shifts of its 36 px frames; synthetic max(1, side // 8) and what its fixed-size images
# leave (side - max_shift for crops, side for rolls).
@pytest.mark.parametrize(
    ("name", "options", "mode", "max_shift", "crop_size", "frame_size"),
    [
        ("imagenet", {}, "crop", 32, 224, 256),
        ("imagenet", {"image_size": 112}, "crop", 32, 112, 144),
        ("imagenet", {}, "circular", 32, 224, 224),
        ("mnist5k", {}, "crop", 8, 36, 44),
        ("mnist5k", {"image_size": 64}, "crop", 8, 36, 44),
        ("mnist5k", {}, "circular", 8, 36, 36),
        ("synthetic", {}, "crop", 4, 28, 32),
        ("synthetic", {"image_size": 16}, "crop", 2, 14, 16),
        ("synthetic", {"image_size": 16}, "circular", 2, 16, 16),
        ("synthetic", {"image_size": 8}, "crop", 1, 7, 8),
    ],
)
def test_consistency_defaults_of_each_dataset(name, options, mode, max_shift, crop_size, frame_size):
    protocol = dataset_spec(name).consistency_protocol(DataOptions(**options), mode=mode)
    assert protocol == ConsistencyProtocol(mode=mode, max_shift=max_shift, crop_size=crop_size)
    assert protocol.frame_size == frame_size


def test_given_consistency_sizes_override_the_defaults():
    protocol = dataset_spec("imagenet").consistency_protocol(DataOptions(), max_shift=16, crop_size=128)
    assert (protocol.max_shift, protocol.crop_size, protocol.frame_size) == (16, 128, 144)
    # A fixed-size dataset's default crop follows the given shift.
    assert dataset_spec("synthetic").consistency_protocol(DataOptions(), max_shift=12).crop_size == 20


FRAME, ROLLED = "crop_size + max_shift", "crop_size"  # the frame's side in crop and circular mode
SYNTHETIC, DIGITS = "the 32 px images of synthetic", "the 28 px mnist5k digits"


@pytest.mark.parametrize(
    ("name", "kwargs", "key", "message"),
    [
        ("synthetic", {"max_shift": 0}, "max_shift", "must be an int >= 1, got 0"),
        ("synthetic", {"crop_size": True}, "crop_size", "must be an int >= 1, got True"),
        ("synthetic", {"mode": "shift"}, "mode", "must be one of 'crop', 'circular', got 'shift'"),
        ("synthetic", {"max_shift": 32}, "max_shift", "max_shift 32 leaves no crop of the 32 px images"),
        ("synthetic", {"crop_size": 30}, "crop_size", f"{FRAME} = 34 px exceeds the 32 px images of synthetic"),
        ("synthetic", {"mode": "circular", "crop_size": 33}, "crop_size", f"{ROLLED} = 33 px exceeds {SYNTHETIC}"),
        ("mnist5k", {"crop_size": 16}, "crop_size", f"{FRAME} = 24 px is smaller than the 28 px mnist5k digits"),
        ("mnist5k", {"mode": "circular", "crop_size": 27}, "crop_size", f"{ROLLED} = 27 px is smaller than {DIGITS}"),
    ],
)  # fmt: skip
def test_consistency_protocol_refusals_name_the_field(name, kwargs, key, message):
    with pytest.raises(DataError) as excinfo:
        dataset_spec(name).consistency_protocol(DataOptions(), **kwargs)
    assert (excinfo.value.key, excinfo.value.message) == (key, message)


def test_consistency_loader_serves_the_protocols_frame():
    spec, options = dataset_spec("mnist5k"), DataOptions()
    for mode, side in (("crop", 44), ("circular", 36)):
        loader = spec.consistency_loader(options, spec.consistency_protocol(options, mode=mode), batch_size=50)
        images, labels = next(iter(loader))
        assert images.shape == (50, 3, side, side) and labels.shape == (50,)
        assert loader.persistent_workers is False and len(loader.dataset) == 1000
    with pytest.raises(ValueError, match="frame_size"):  # a protocol whose crop comes from the images has no frame
        spec.consistency_loader(options, ConsistencyProtocol(crop_size=None), batch_size=50)
