"""Feeding a model from any loader: each batch's images, targets, dataset indices and which samples count.

Offsets are keyed by each sample's position in the dataset, so a seed gives the same number on 1 or N ranks and
whatever the batch size; a ``DistributedSampler``'s padding repeats are left out. Also: the model's device and dtype,
eval mode for the call, and the logits' shape checks. Torch only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torch.utils.data._utils.collate import default_collate

__all__ = ["EvalMode", "IndexedBatch", "indexed_batches", "logits_of", "model_device_dtype"]


@dataclass
class IndexedBatch:
    images: Tensor
    targets: Tensor | None
    #: Position of each sample in the dataset (the key of its random offsets).
    indices: Tensor
    #: False for samples a DistributedSampler repeated to even out the shards (counted once, on their own rank).
    keep: Tensor


class _Indexed(Dataset):
    """A map-style dataset whose items also carry their index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        return index, self.dataset[index]


class _CollateWithIndex:
    """Collates the indices apart from the items, which keep the loader's own ``collate_fn`` (picklable for workers)."""

    def __init__(self, collate_fn: Callable | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, items):
        indices, samples = zip(*items, strict=True)
        return torch.tensor(indices, dtype=torch.long), self.collate_fn(list(samples))


def _split(batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        target = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
        return batch[0], target
    if isinstance(batch, Mapping) and isinstance(batch.get("input"), Tensor):
        return batch["input"], batch.get("target")
    raise TypeError(
        "expected batches of images, (images, targets) pairs or {'input': ..., 'target': ...} dicts, got "
        f"{type(batch).__name__}"
    )


def _sharding(dataloader: DataLoader) -> tuple[int, int, int | None]:
    """``(num_replicas, rank, dataset_len)`` of a DistributedSampler that pads its shards, else ``(1, 0, None)``."""
    sampler = dataloader.sampler
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
        return sampler.num_replicas, sampler.rank, len(sampler.dataset)  # type: ignore[arg-type]
    return 1, 0, None


def indexed_batches(dataloader: Iterable, num_batches: int | None) -> Iterator[IndexedBatch]:
    """Yields the loader's batches with each sample's dataset index and whether it counts."""
    map_style = isinstance(dataloader, DataLoader) and not isinstance(dataloader.dataset, IterableDataset)
    if map_style:
        num_replicas, rank, dataset_len = _sharding(dataloader)
        workers = dataloader.num_workers
        source: Iterable = DataLoader(
            _Indexed(dataloader.dataset),
            batch_sampler=dataloader.batch_sampler,
            num_workers=workers,
            collate_fn=_CollateWithIndex(dataloader.collate_fn),
            pin_memory=dataloader.pin_memory,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context if workers else None,
            prefetch_factor=dataloader.prefetch_factor if workers else None,
        )
    else:
        # Without a map-style dataset there are no indices: samples are keyed by their position in this rank's
        # stream, so a seed still reproduces the number for a fixed loader, but not across different shardings.
        num_replicas, rank, dataset_len = 1, 0, None
        source = dataloader
    position = 0
    for batch in itertools.islice(source, num_batches):
        if map_style:
            indices, batch = batch
        images, targets = _split(batch)
        positions = torch.arange(position, position + len(images))
        position += len(images)
        if not map_style:
            indices = positions
        # DistributedSampler pads the tail by repeating samples; its k-th sample on rank r sits at k * R + r of the
        # padded order, which is padding when past the dataset's end.
        keep = (
            positions * num_replicas + rank < dataset_len
            if dataset_len is not None
            else torch.ones(len(images), dtype=torch.bool)
        )
        yield IndexedBatch(images, targets, indices, keep)


def model_device_dtype(
    model: Callable[[Tensor], Tensor], device: torch.device | str | None
) -> tuple[torch.device, torch.dtype]:
    """Where to run ``model`` (``device``, else its parameters') and the dtype its inputs take."""
    parameters = list(model.parameters()) if isinstance(model, nn.Module) else []
    floating = [p for p in parameters if p.is_floating_point()]
    if device is None:
        device = parameters[0].device if parameters else torch.device("cpu")
    # A model cast to bf16/fp16 without autocast takes inputs of its own dtype; under autocast fp32 inputs are right.
    dtype = floating[0].dtype if floating and not torch.is_autocast_enabled() else torch.float32
    return torch.device(device), dtype


class EvalMode:
    """Puts an ``nn.Module`` in eval mode and gradients off, and restores its mode afterwards."""

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        self.model = model
        self.was_training = isinstance(model, nn.Module) and model.training
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        if isinstance(self.model, nn.Module):
            self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        if isinstance(self.model, nn.Module):
            self.model.train(self.was_training)


def logits_of(model: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """``model(images)``, checked to be one row of logits per image."""
    output = model(images)
    if not isinstance(output, Tensor) or output.ndim != 2:
        raise TypeError(
            "the model must map (N, C, H, W) images to (N, classes) logits, got "
            f"{type(output).__name__}{'' if not isinstance(output, Tensor) else tuple(output.shape)}"
        )
    if len(output) != len(images):
        # (1, C) logits for N images would broadcast in the comparison and count N agreements.
        raise ValueError(
            f"the model returned logits of shape {tuple(output.shape)} for images of shape {tuple(images.shape)}: "
            f"expected one row of logits per image"
        )
    return output
