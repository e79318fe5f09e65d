"""``synthetic``: seeded noise images with random labels, for tests (no files, any class count and image size)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from blurpool_algo.data.specs import DataOptions, DatasetSpec

__all__ = ["SyntheticSpec"]

#: Side of the synthetic images when ``data.image_size`` is not given.
DEFAULT_SIDE = 32


class SyntheticSpec(DatasetSpec):
    """``options.synthetic_samples`` images to train on and half as many (at least one eval batch) to evaluate on,
    ``options.image_size`` px (default 32), labels in ``[0, options.num_classes)``, all fixed by ``options.seed``.
    The consistency loader reuses the evaluation images, so the frame can be at most their side."""

    name = "synthetic"

    def num_classes(self, options: DataOptions) -> None:
        return None  # any: the labels follow options.num_classes

    def train_size(self, options: DataOptions) -> int:
        return options.synthetic_samples

    def image_size(self, options: DataOptions) -> int:
        return options.image_size or DEFAULT_SIDE

    def largest_frame(self, options: DataOptions) -> int:
        return self.image_size(options)

    def datasets(self, options: DataOptions, *, eval_batch_size: int) -> tuple[Dataset, Dataset]:
        side = self.image_size(options)
        generator = torch.Generator().manual_seed(options.seed)

        def make(n: int) -> TensorDataset:
            images = torch.randn(n, 3, side, side, generator=generator)
            labels = torch.randint(0, options.num_classes, (n,), generator=generator)
            return TensorDataset(images, labels)

        samples = options.synthetic_samples
        return make(samples), make(max(samples // 2, eval_batch_size))

    def consistency_dataset(self, options: DataOptions, side: int, *, batch_size: int) -> Dataset:
        # The evaluation set of datasets() (same seed and sizes); the metrics centre-crop it to the frame.
        return self.datasets(options, eval_batch_size=batch_size)[1]
