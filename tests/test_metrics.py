"""Shift-consistency metrics against references that cannot be fooled.

* models invariant by construction (circular convolutions, no stride, global pooling) must score exactly 100;
* a model that subsamples by 4 must score clearly less, and BlurPool with circular padding must raise the score of a
  random strided CNN;
* an "oracle" model that reads the crop position off a coordinate image shows which offsets were really drawn;
* the diagonal curve is checked against a plain loop of slices and forward passes;
* seeds, batch sizes, workers and 1 vs 2 ranks (real gloo processes) give identical numbers.
"""

from __future__ import annotations

import os
import pickle
import socket
import time

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from blurpool_algo import apply_blurpool
from blurpool_algo.metrics import (
    ConsistencyProtocol,
    DiagonalStability,
    DiagonalStabilityMetric,
    NonFiniteLogitsError,
    ShiftConsistencyMetric,
    diagonal_stability,
    plot_diagonal_stability,
    shift_consistency,
    shifted_crops,
    shifted_rolls,
)

NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------------------ fixtures


def smooth_images(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, size, size, generator=generator)
    images = nn.functional.avg_pool2d(images, 3, 1, 1, count_include_pad=False)
    return images, torch.randint(0, NUM_CLASSES, (n,), generator=generator)


class Subsample(nn.Module):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :: self.factor, :: self.factor]


def circular_features(subsample: int | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, padding_mode="circular"), nn.ReLU()]
    if subsample:
        layers.append(Subsample(subsample))
    layers += [nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def strided_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, padding_mode="circular"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def classifier(features: nn.Module, images: torch.Tensor) -> nn.Module:
    """Random features and head, with features standardized on ``images`` so predictions spread over the classes.

    Without it a random network predicts one class for every input, and any consistency measure reads 100.
    """
    with torch.no_grad():
        values = features(images)
    norm = nn.BatchNorm1d(values.shape[1])
    norm.running_mean.copy_(values.mean(0))
    norm.running_var.copy_(values.var(0))
    return nn.Sequential(features, norm, nn.Linear(values.shape[1], NUM_CLASSES)).eval()


def distinct_predictions(model: nn.Module, images: torch.Tensor) -> int:
    with torch.no_grad():
        return len(model(images).argmax(1).unique())


class PositionOracle(nn.Module):
    """Reads the top-left pixel of a coordinate image (pixel value = row * width + col) and records it.

    Its logits are one-hot at that position, so two crops agree exactly when they start at the same pixel.
    """

    def __init__(self, width: int, classes: int) -> None:
        super().__init__()
        self.width, self.classes = width, classes
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = x[:, 0, 0, 0].round().long()
        self.seen.append(torch.stack([position // self.width, position % self.width], dim=1))
        return nn.functional.one_hot(position, self.classes).float()


def coordinate_images(n: int, size: int) -> torch.Tensor:
    grid = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
    return grid.expand(n, 3, size, size).clone()


# -------------------------------------------------------------------------------------------------- shift primitives


@pytest.mark.parametrize("shape", [(3, 2, 5, 7), (1, 1, 4, 4), (4, 3, 9, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shifted_rolls_equal_torch_roll_per_image(shape, dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    images = torch.randn(shape, generator=generator).to(dtype)
    shifts = torch.randint(-2 * max(shape), 2 * max(shape), (shape[0], 2), generator=generator)
    rolled = shifted_rolls(images, shifts)
    for image, shift, result in zip(images, shifts, rolled, strict=True):
        assert torch.equal(result, torch.roll(image, tuple(shift.tolist()), dims=(1, 2)))


@pytest.mark.parametrize("crop", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_shifted_crops_equal_slices(crop, dtype):
    generator = torch.Generator().manual_seed(crop)
    images = torch.randn(6, 2, 8, 9, generator=generator).to(dtype)
    offsets = torch.stack([torch.randint(0, 9 - crop, (6,)), torch.randint(0, 10 - crop, (6,))], dim=1)
    crops = shifted_crops(images, offsets, crop)
    assert crops.shape == (6, 2, crop, crop)
    for image, (top, left), result in zip(images, offsets.tolist(), crops, strict=True):
        assert torch.equal(result, image[:, top : top + crop, left : left + crop])


# --------------------------------------------------------------------------------------------- consistency references


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_shift", [1, 5, 16])
def test_model_invariant_by_construction_is_exactly_100_circular(seed, max_shift):
    torch.manual_seed(seed)
    images, labels = smooth_images(128, 32, seed)
    model = classifier(circular_features(), images)
    assert distinct_predictions(model, images) >= 5  # the 100 below is not a constant prediction
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    assert shift_consistency(model, loader, mode="circular", max_shift=max_shift, seed=seed) == 100.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subsampling_by_4_is_clearly_less_consistent(seed):
    torch.manual_seed(seed)
    images, labels = smooth_images(256, 32, seed)
    model = classifier(circular_features(subsample=4), images)
    loader = DataLoader(TensorDataset(images, labels), batch_size=64)
    assert shift_consistency(model, loader, mode="circular", max_shift=8, seed=seed) < 80.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_blurpool_raises_circular_consistency_of_a_strided_cnn(seed):
    torch.manual_seed(seed)
    images, labels = smooth_images(256, 32, seed)
    loader = DataLoader(TensorDataset(images, labels), batch_size=64)
    features = strided_features()
    baseline = classifier(features, images)
    before = shift_consistency(baseline, loader, mode="circular", max_shift=8, seed=seed)
    report = apply_blurpool(features, pad_mode="circular", min_channels=1)
    assert report.counts()["num_blurconv_layers"] == 2 and report.counts()["num_blurmaxpool_layers"] == 1
    blurred = classifier(features, images)  # same weights; the head re-standardized for the blurred features
    assert distinct_predictions(blurred, images) >= 5
    after = shift_consistency(blurred, loader, mode="circular", max_shift=8, seed=seed)
    assert after > before + 20.0, (before, after)


def test_crop_mode_is_below_100_for_a_circularly_invariant_model():
    # Crops bring new content into the frame: circular invariance does not make crop consistency trivial.
    torch.manual_seed(0)
    images, labels = smooth_images(256, 40)
    model = classifier(circular_features(), images)
    loader = DataLoader(TensorDataset(images, labels), batch_size=64)
    assert shift_consistency(model, loader, mode="crop", max_shift=8) < 99.0


# ------------------------------------------------------------------------------------------ which offsets are drawn


@pytest.mark.parametrize("max_shift", [1, 4, 7])
def test_crop_offsets_cover_exactly_0_to_max_shift(max_shift):
    crop, size = 5, 5 + max_shift
    oracle = PositionOracle(size, size * size)
    loader = DataLoader(coordinate_images(400, size), batch_size=50)
    shift_consistency(oracle, loader, mode="crop", max_shift=max_shift, crop_size=crop)
    seen = torch.cat(oracle.seen)
    assert seen.shape == (800, 2)  # two crops per image
    assert seen.min() == 0 and seen.max() == max_shift - 1
    # Every offset in range turns up for both axes (400 images, at most 7 values: missing one is ~1e-20 likely).
    assert set(seen[:, 0].tolist()) == set(range(max_shift)) == set(seen[:, 1].tolist())


def test_crop_window_is_centred_in_a_larger_image():
    # 20 px images, crop 8 + shift 4 = a 12 px window centred at (4, 4): offsets land in 4..7.
    oracle = PositionOracle(20, 400)
    shift_consistency(oracle, DataLoader(coordinate_images(200, 20), batch_size=50), max_shift=4, crop_size=8)
    seen = torch.cat(oracle.seen)
    assert seen.min() == 4 and seen.max() == 7


@pytest.mark.parametrize("max_shift", [2, 3])
def test_circular_shifts_cover_minus_to_plus_max_shift(max_shift):
    size = 12
    oracle = PositionOracle(size, size * size)
    shift_consistency(
        oracle, DataLoader(coordinate_images(300, size), batch_size=50), mode="circular", max_shift=max_shift
    )
    # The top-left pixel of an image rolled by (dy, dx) is the pixel (-dy, -dx) mod size.
    shifts = (-torch.cat(oracle.seen)).remainder(size)
    shifts = torch.where(shifts > size // 2, shifts - size, shifts)
    assert set(shifts[:, 0].tolist()) == set(range(-max_shift, max_shift)) == set(shifts[:, 1].tolist())


def test_oracle_consistency_matches_the_chance_of_equal_offsets():
    # Two crops agree only when both offsets coincide: probability 1 / max_shift**2 per image.
    max_shift, n = 2, 2000
    oracle = PositionOracle(6, 36)
    value = shift_consistency(oracle, DataLoader(coordinate_images(n, 6), batch_size=100), max_shift=max_shift)
    expected, sigma = 100.0 / max_shift**2, 100.0 * (0.25 * 0.75 / n) ** 0.5
    assert abs(value - expected) < 5 * sigma


def test_per_batch_offsets_are_shared_by_the_whole_batch():
    oracle = PositionOracle(9, 81)
    loader = DataLoader(coordinate_images(160, 9), batch_size=16)
    value = shift_consistency(oracle, loader, max_shift=4, offsets="per_batch", seed=3)
    for positions in oracle.seen:
        assert (positions == positions[0]).all()
    # Ten batches that each agree or disagree as a whole.
    assert value in {10.0 * k for k in range(11)}
    per_image = PositionOracle(9, 81)
    shift_consistency(per_image, loader, max_shift=4, offsets="per_image", seed=3)
    assert any(len(positions.unique(dim=0)) > 1 for positions in per_image.seen)


# ------------------------------------------------------------------------------------------------------ determinism


def _random_cnn(images: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return classifier(strided_features(), images)


@pytest.mark.parametrize("mode", ["crop", "circular"])
def test_same_seed_same_number_whatever_the_batch_size_or_workers(mode):
    images, labels = smooth_images(90, 40)
    model = _random_cnn(images)
    dataset = TensorDataset(images, labels)
    reference = shift_consistency(model, DataLoader(dataset, batch_size=32), mode=mode, max_shift=8, seed=5)
    assert reference < 100.0  # a model that can disagree, so equality below means something
    for loader in (
        DataLoader(dataset, batch_size=7),
        DataLoader(dataset, batch_size=90),
        DataLoader(dataset, batch_size=16, num_workers=2),
        DataLoader(dataset, batch_size=16, shuffle=True),
    ):
        assert shift_consistency(model, loader, mode=mode, max_shift=8, seed=5) == reference
    others = {
        shift_consistency(model, DataLoader(dataset, batch_size=32), mode=mode, max_shift=8, seed=s) for s in range(4)
    }
    assert len(others) > 1  # the seed does change the draw


def test_distributed_shards_weighted_together_equal_one_rank():
    # Two DistributedSampler shards of an odd-sized set (one sample repeated as padding), run in one process.
    images, labels = smooth_images(37, 40)
    model = _random_cnn(images)
    dataset = TensorDataset(images, labels)
    reference = shift_consistency(model, DataLoader(dataset, batch_size=8), max_shift=8, seed=1)
    agree = 0.0
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False, drop_last=False)
        value = shift_consistency(model, DataLoader(dataset, batch_size=8, sampler=sampler), max_shift=8, seed=1)
        agree += value * (19 if rank == 0 else 18) / 100.0  # rank 1's 19th sample is padding, not counted
    assert agree == pytest.approx(reference * 37 / 100.0, abs=1e-9)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        images, labels = smooth_images(37, 40)
        model = _random_cnn(images)
        dataset = TensorDataset(images, labels)
        sampler = DistributedSampler(dataset, shuffle=False, drop_last=False)
        loader = DataLoader(dataset, batch_size=8, sampler=sampler)
        crop = shift_consistency(model, loader, max_shift=8, seed=1)
        circular = shift_consistency(model, loader, mode="circular", max_shift=8, seed=1)
        curve = diagonal_stability(model, loader, max_shift=8, step=2)
        # One image of rank 1's second batch overflows: both ranks must raise, with the counts of both, not hang.
        diverged = []
        # Forward call 2 is batch 1's first view; diagonal_stability makes 9 calls (offsets 0..8) per batch.
        for measure, call in ((shift_consistency, 2), (diagonal_stability, 9 + 2)):
            poisoned = NonFinite(model, float("inf"), rows=[2], calls={call} if rank == 1 else set())
            try:
                measure(poisoned, loader, max_shift=8)
            except NonFiniteLogitsError as exc:
                diverged.append((exc.nonfinite_images, exc.images_seen))
        results[rank] = (crop, circular, curve, diverged)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_result_and_agree_on_divergence():
    images, labels = smooth_images(37, 40)
    model = _random_cnn(images)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    crop = shift_consistency(model, loader, max_shift=8, seed=1)
    circular = shift_consistency(model, loader, mode="circular", max_shift=8, seed=1)
    curve = diagonal_stability(model, loader, max_shift=8, step=2)
    results = mp.Manager().dict()
    context = mp.start_processes(
        _rank_worker, args=(2, _free_port(), results), nprocs=2, join=False, start_method="fork"
    )
    # A rank left waiting in a collective would hang the test: give up after a minute instead.
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish within 60 s: one is waiting in a collective")
    for rank in (0, 1):
        rank_crop, rank_circular, rank_curve, rank_diverged = results[rank]
        # Rank 1 stopped after its second batch (16 images), rank 0 measured all its 19.
        assert rank_diverged == [(1, 16 + 19), (1, 16 + 19)]
        assert (rank_crop, rank_circular) == (crop, circular)
        assert rank_curve.num_images == curve.num_images == 37
        assert rank_curve.accuracy == pytest.approx(curve.accuracy, abs=1e-9)
        assert rank_curve.true_class_probability == pytest.approx(curve.true_class_probability, abs=1e-6)


# ------------------------------------------------------------------------------------------------- diagonal stability


@pytest.mark.parametrize(("max_shift", "step"), [(4, 1), (6, 4), (8, 3)])
def test_diagonal_stability_equals_a_plain_loop(max_shift, step):
    images, labels = smooth_images(50, 24 + max_shift + 2)  # 2 px more than needed: the window is centred
    model = _random_cnn(images)
    curve = diagonal_stability(
        model, DataLoader(TensorDataset(images, labels), batch_size=16), max_shift=max_shift, crop_size=24, step=step
    )
    expected_offsets = sorted(set(range(0, max_shift + 1, step)) | {max_shift})
    assert curve.offsets == expected_offsets and curve.num_images == 50
    with torch.no_grad():
        for offset, accuracy, probability in zip(
            curve.offsets, curve.accuracy, curve.true_class_probability, strict=True
        ):
            start = 1 + offset
            logits = model(images[..., start : start + 24, start : start + 24])
            assert accuracy == pytest.approx(100.0 * int((logits.argmax(1) == labels).sum()) / 50, abs=1e-9)
            truth = logits.softmax(1)[torch.arange(50), labels].mean().item()
            assert probability == pytest.approx(truth, abs=1e-6)


def test_diagonal_stability_of_a_position_blind_model_is_flat():
    # Constant images: every crop is the same, so the curve cannot depend on the offset.
    images = torch.ones(20, 3, 20, 20) * torch.linspace(-1, 1, 20).view(20, 1, 1, 1)
    labels = torch.arange(20) % NUM_CLASSES
    model = _random_cnn(images)
    curve = diagonal_stability(model, DataLoader(TensorDataset(images, labels), batch_size=8), max_shift=6)
    assert curve.accuracy_spread == 0.0 and curve.probability_spread == pytest.approx(0.0, abs=1e-6)


def test_diagonal_stability_needs_targets():
    with pytest.raises(TypeError, match="targets"):
        diagonal_stability(nn.Flatten(), DataLoader(torch.zeros(4, 3, 10, 10), batch_size=2), max_shift=2)


# ------------------------------------------------------------------------------------------------------- edge cases


def test_the_model_mode_is_restored_and_no_gradients_are_kept():
    images, labels = smooth_images(16, 20)
    model = _random_cnn(images).train()
    shift_consistency(model, DataLoader(TensorDataset(images, labels), batch_size=8), max_shift=4)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    diagonal_stability(model, DataLoader(TensorDataset(images, labels), batch_size=8), max_shift=4)
    assert not model.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_in_another_dtype_gets_inputs_in_its_dtype(dtype):
    images, labels = smooth_images(16, 20)
    model = _random_cnn(images)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    value = shift_consistency(model.to(dtype), loader, max_shift=4)
    assert 0.0 <= value <= 100.0


def test_dict_batches_and_iterable_datasets():
    images, labels = smooth_images(24, 20)
    model = _random_cnn(images)
    reference = shift_consistency(model, DataLoader(TensorDataset(images, labels), batch_size=8), max_shift=4)

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(images, labels, strict=True)

    # An iterable dataset keys offsets by stream position, which here is the dataset index: the same number.
    assert shift_consistency(model, DataLoader(Stream(), batch_size=8), max_shift=4) == reference
    dict_batches = [{"input": images[i : i + 8], "target": labels[i : i + 8]} for i in range(0, 24, 8)]
    assert shift_consistency(model, dict_batches, max_shift=4) == reference


def test_num_batches_bounds_the_work():
    oracle = PositionOracle(10, 100)
    shift_consistency(oracle, DataLoader(coordinate_images(100, 10), batch_size=10), max_shift=2, num_batches=3)
    assert len(oracle.seen) == 6  # two forward passes per batch


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "shift"}, "mode must be one of 'crop', 'circular'"),
        ({"max_shift": 0}, "max_shift must be an int >= 1"),
        ({"max_shift": 2.5}, "max_shift must be an int >= 1"),
        ({"crop_size": 0}, "crop_size must be an int >= 1 or None"),
        ({"offsets": "per_epoch"}, "offsets must be one of 'per_image', 'per_batch'"),
        ({"num_batches": 0}, "num_batches must be an int >= 1 or None"),
        ({"seed": -1}, "seed must be an int >= 0"),
    ],
)
def test_bad_options_are_named_before_any_forward_pass(options, message):
    oracle = PositionOracle(10, 100)
    with pytest.raises(ValueError, match=message):
        shift_consistency(oracle, DataLoader(coordinate_images(4, 10), batch_size=2), **{"max_shift": 2, **options})
    assert oracle.seen == []


def test_images_too_small_for_crop_plus_shift_say_so():
    with pytest.raises(ValueError, match=r"smaller than crop_size \+ max_shift = 34"):
        shift_consistency(nn.Flatten(), DataLoader(torch.zeros(2, 3, 32, 32), batch_size=2), max_shift=8, crop_size=26)


def test_the_metric_refuses_mismatched_logits_and_empty_loaders():
    metric = ShiftConsistencyMetric()
    with pytest.raises(ValueError, match="one shape"):
        metric.update(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="zero images"):
        metric.compute()


# ------------------------------------------------------------------------------------------------------------ plots


def test_plot_writes_a_png_and_no_temporary_file(tmp_path):
    curve = DiagonalStability(
        offsets=[0, 1, 2], accuracy=[90.0, 80.0, 85.0], true_class_probability=[0.8, 0.7, 0.75], num_images=10
    )
    flat = DiagonalStability(offsets=[0, 1, 2], accuracy=[88.0] * 3, true_class_probability=[0.77] * 3, num_images=10)
    path = plot_diagonal_stability({"baseline": curve, "blurpool": flat}, tmp_path / "stability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stability.png"]
    with pytest.raises(ValueError, match="at least one"):
        plot_diagonal_stability({}, tmp_path / "empty.png")


# ----------------------------------------------------------------------------------- diverged models cannot flatter


class NonFinite(nn.Module):
    """Wraps a model and overwrites the logits of chosen images (by position in the call's batch) with a value.

    ``rows=None`` poisons every image; ``calls`` limits the poisoning to those forward calls (0-based), None to all.
    """

    def __init__(self, model: nn.Module, value: float, rows: list[int] | None = None, calls: set[int] | None = None):
        super().__init__()
        self.model, self.value, self.rows, self.calls = model, value, rows, calls
        self.num_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if self.calls is None or self.num_calls in self.calls:
            logits = logits.clone()
            logits[slice(None) if self.rows is None else self.rows] = self.value
        self.num_calls += 1
        return logits


class OneRowOfLogits(nn.Module):
    """Returns one row of logits for the whole batch: ``==`` against N predictions would broadcast to N agreements."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:1]


def _diverging_setup() -> tuple[nn.Module, DataLoader]:
    images, labels = smooth_images(24, 24)
    return _random_cnn(images), DataLoader(TensorDataset(images, labels), batch_size=8)


def _consistency(model: nn.Module, loader: DataLoader, mode: str) -> float:
    return shift_consistency(model, loader, mode=mode, max_shift=4, crop_size=20 if mode == "crop" else None)


@pytest.mark.parametrize("mode", ["crop", "circular"])
def test_nan_logits_raise_at_the_first_batch_instead_of_scoring_100(mode):
    model, loader = _diverging_setup()
    assert _consistency(model, loader, mode) < 100.0  # control: the finite model gets a real number
    diverged = NonFinite(model, float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="has diverged") as caught:
        _consistency(diverged, loader, mode)
    assert (caught.value.nonfinite_images, caught.value.images_seen) == (8, 8)
    assert diverged.num_calls == 2  # the first batch's two views, nothing measured after it
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


@pytest.mark.parametrize("mode", ["crop", "circular"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_one_image_with_non_finite_logits_in_one_view_is_enough(mode, value):
    model, loader = _diverging_setup()
    # Image 3 of the second batch, in its second view only (forward call 3: batch 1, view b).
    poisoned = NonFinite(model, value, rows=[3], calls={3})
    with pytest.raises(NonFiniteLogitsError) as caught:
        _consistency(poisoned, loader, mode)
    assert (caught.value.nonfinite_images, caught.value.images_seen) == (1, 16)
    assert "1 of 16 images" in str(caught.value) and "shift consistency" in str(caught.value)


@pytest.mark.parametrize("mode", ["crop", "circular"])
def test_one_row_of_logits_for_a_batch_is_an_error_naming_both_shapes(mode):
    model, loader = _diverging_setup()
    assert _consistency(model, loader, mode) < 100.0  # control: the real logits disagree somewhere
    side = 20 if mode == "crop" else 24
    with pytest.raises(ValueError, match=rf"logits of shape \(1, 10\) for images of shape \(8, 3, {side}, {side}\)"):
        _consistency(OneRowOfLogits(model), loader, mode)


def test_diagonal_stability_refuses_non_finite_logits_and_one_row_of_logits():
    model, loader = _diverging_setup()
    assert diagonal_stability(model, loader, max_shift=4).num_images == 24  # control
    # Image 5 of the third batch at offset 2 only (3 offsets per batch at step 2: calls 6, 7, 8 are batch 2).
    poisoned = NonFinite(model, float("inf"), rows=[5], calls={7})
    with pytest.raises(NonFiniteLogitsError, match="diagonal stability has no meaning") as caught:
        diagonal_stability(poisoned, loader, max_shift=4, step=2)
    assert (caught.value.nonfinite_images, caught.value.images_seen) == (1, 24)
    assert poisoned.num_calls == 8  # stopped at the first non-finite pass
    with pytest.raises(ValueError, match=r"logits of shape \(1, 10\) for images of shape \(8, 3, 20, 20\)"):
        diagonal_stability(OneRowOfLogits(model), loader, max_shift=4)


def test_the_metric_classes_refuse_non_finite_logits_and_mismatched_batches():
    finite, nan = torch.randn(4, 3), torch.full((4, 3), float("nan"))
    shift = ShiftConsistencyMetric()
    shift.update(finite, finite)
    with pytest.raises(NonFiniteLogitsError) as caught:
        shift.update(finite, nan)
    assert (caught.value.nonfinite_images, caught.value.images_seen) == (4, 8)
    with pytest.raises(ValueError, match=r"weight of shape \(2,\) for logits of shape \(4, 3\)"):
        shift.update(finite, finite, torch.ones(2))
    assert float(shift.compute()) == 100.0 and int(shift.total) == 4  # the refused updates left no trace

    stability = DiagonalStabilityMetric(2)
    target = torch.zeros(4, dtype=torch.long)
    with pytest.raises(NonFiniteLogitsError, match="1 of 4 images"):
        stability.update(0, torch.cat([finite[:3], torch.full((1, 3), float("inf"))]), target)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 3\) for targets of shape \(4,\)"):
        stability.update(0, finite[:1], target)
    with pytest.raises(ValueError, match=r"weight of shape \(3,\) for logits of shape \(4, 3\)"):
        stability.update(0, finite, target, torch.ones(3))
    assert int(stability.count.sum()) == 0


def test_the_error_keeps_its_counts_through_pickling():
    error = NonFiniteLogitsError(3, 40, "diagonal stability")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.nonfinite_images, copy.images_seen, copy.measure) == (3, 40, "diagonal stability")
    assert str(copy) == str(error)


# ---------------------------------------------------------------------------------------------------- the protocol


def test_protocol_frames_and_offset_ranges():
    crop = ConsistencyProtocol(mode="crop", max_shift=32, crop_size=224)
    circular = ConsistencyProtocol(mode="circular", max_shift=32, crop_size=224)
    assert (crop.frame_size, crop.offset_range) == (256, (0, 32))
    assert (circular.frame_size, circular.offset_range) == (224, (-32, 32))
    assert ConsistencyProtocol(crop_size=None).frame_size is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "shift"}, "mode must be one of 'crop', 'circular', got 'shift'"),
        ({"max_shift": 0}, "max_shift must be an int >= 1, got 0"),
        ({"crop_size": 2.0}, "crop_size must be an int >= 1 or None, got 2.0"),
    ],
)
def test_protocol_refuses_bad_fields(options, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ConsistencyProtocol(**options)


def test_protocol_views_are_crops_and_rolls_of_the_frame():
    images = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    offsets = torch.tensor([[0, 3, 2, 1], [3, 3, 0, -2]])
    crop = ConsistencyProtocol(mode="crop", max_shift=4, crop_size=6)
    framed = crop.frame(images)
    assert torch.equal(framed, images[..., 1:11, 1:11])  # the centred 10 px frame
    first, second = crop.views(framed, offsets.clamp(min=0))
    assert torch.equal(first[1], framed[1, :, 3:9, 3:9]) and torch.equal(second[0], framed[0, :, 2:8, 1:7])
    assert torch.equal(crop.diagonal_view(framed, 2), framed[..., 2:8, 2:8])
    rolled, rolled_back = ConsistencyProtocol(mode="circular", max_shift=4, crop_size=None).views(images, offsets)
    assert torch.equal(rolled[0], torch.roll(images[0], (0, 3), dims=(1, 2)))
    assert torch.equal(rolled_back[1], torch.roll(images[1], (0, -2), dims=(1, 2)))


def test_protocol_fitted_to_images_takes_the_crop_they_leave():
    protocol = ConsistencyProtocol(mode="crop", max_shift=8, crop_size=None)
    assert protocol.fitted((40, 44)).crop_size == 32  # the smaller side - max_shift
    assert ConsistencyProtocol(mode="circular", crop_size=None).fitted((40, 44)).crop_size is None  # the whole image
    with pytest.raises(ValueError, match="leave no crop"):
        protocol.fitted((8, 8))
