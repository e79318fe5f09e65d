"""``streaming_imagenet``: ImageNet as mosaicml-streaming MDS shards (written by ``python -m blurpool_algo.shards``).

``data.remote`` holds ``train/`` and ``val/`` MDS datasets: a local folder (read in place, or copied into
``data.local`` if that is set) or an object-store URL (``s3://``, ``gs://``, ``oci://``, ...; shards are downloaded
into the ``data.local`` cache). Training reads a :class:`StreamingImages` dataset: streaming's deterministic shuffle
(``data.shuffle_algo``, seeded by ``seed``), per-rank partitioning that survives a change of world size, and the
mid-epoch resumption Composer drives through the dataset's ``state_dict``. Evaluation and the consistency monitor read
the val shards by index, with the same sampler as the folder spec. Images are decoded with PIL and get the ImageFolder
spec's transforms, so a model sees the same pixels from both.

Local shards are checked before any work: an ``index.json`` per split, and every shard file present at the size the
index gives (a truncated or missing shard is a :class:`DataError` naming ``data.remote`` and the file);
``data.validate_hash`` also hashes each shard against the index.

Example:
    >>> spec = StreamingImageNetSpec()
    >>> spec.check(StreamingOptions())
    Traceback (most recent call last):
    ...
    blurpool_algo.data.specs.DataError: data.remote: must be set for data.name='streaming_imagenet': a folder or \
URL holding train/ and val/ MDS shards (write them with python -m blurpool_algo.shards --root IMAGENET --out SHARDS)
    >>> StreamingOptions(remote="s3://bucket/imagenet").local is None  # checked by the spec: a URL needs a cache
    True
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from streaming import StreamingDataset
from streaming.base.hashing import get_hash
from torch.utils.data import DataLoader, Dataset

from blurpool_algo.checks import check_choice, check_float, check_int
from blurpool_algo.data.imagenet import consistency_transform, eval_transform, train_transform
from blurpool_algo.data.specs import DataError, DataOptions, DatasetSpec, build_sampler, checked
from blurpool_algo.metrics.protocol import PAPER_CROP_SIZE, PAPER_MAX_SHIFT

__all__ = [
    "CLASSES_FILE",
    "REMOTE_SCHEMES",
    "SHUFFLE_ALGOS",
    "StreamingImageNetSpec",
    "StreamingImages",
    "StreamingOptions",
]

#: The class folder names, in label order, that the writer puts beside each split's ``index.json``.
CLASSES_FILE = "classes.json"
#: Object-store URL schemes streaming downloads from; anything else is a local path.
REMOTE_SCHEMES: tuple[str, ...] = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "dbfs:/", "hf://")
#: ``data.shuffle_algo`` values (streaming's); ``py1e`` (the default) spreads each shard's samples over a block.
SHUFFLE_ALGOS: tuple[str, ...] = ("py1e", "py1br", "py1b", "py1s", "py2s", "naive")
#: ``data.validate_hash`` values: hashes the writer records in each index.
HASHES: tuple[str, ...] = ("sha1", "xxh64")
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class StreamingOptions(DataOptions):
    """:class:`DataOptions` plus the shard keys (``data.remote``, ``data.local``, ...), each checked here.

    Attributes:
        remote: the shards: a local folder or an object-store URL holding ``train/`` and ``val/``.
        local: the cache folder shards are copied or downloaded into; None = read a local ``remote`` in place.
        shuffle_algo: streaming's shuffle (:data:`SHUFFLE_ALGOS`).
        predownload: samples per rank to download ahead; None = streaming's 8 x the batch size.
        cache_limit: most bytes the cache holds (``"100gb"``, an int), evicting shards; None = no limit.
        validate_hash: hash each shard against its index (``sha1``, ``xxh64``) when it arrives; None = sizes only.
        download_timeout: seconds per shard download before streaming retries.
    """

    remote: str | None = None
    local: str | None = None
    shuffle_algo: str = "py1e"
    predownload: int | None = None
    cache_limit: str | int | None = None
    validate_hash: str | None = None
    download_timeout: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        checked("data.shuffle_algo", check_choice, self.shuffle_algo, SHUFFLE_ALGOS)
        checked("data.predownload", check_int, self.predownload, minimum=1, allow_none=True)
        checked("data.validate_hash", check_choice, self.validate_hash, (*HASHES, None))
        checked("data.download_timeout", check_float, self.download_timeout, minimum=0.0, inclusive=False)
        if isinstance(self.cache_limit, int):
            checked("data.cache_limit", check_int, self.cache_limit, minimum=1)
        elif self.cache_limit is not None and not _is_size(self.cache_limit):
            raise DataError(
                "data.cache_limit", f"must be bytes (an int) or a size like '500gb', got {self.cache_limit!r}"
            )

    @property
    def is_url(self) -> bool:
        return self.remote is not None and self.remote.startswith(REMOTE_SCHEMES)


def _is_size(text: str) -> bool:
    """Bytes as streaming reads them: digits (a YAML int arrives as a string here), or a number and a unit (500gb)."""
    number = text.lower().removesuffix("b").rstrip("kmgtp")
    return bool(number) and number.replace(".", "", 1).isdigit()


# ------------------------------------------------------------------------------------------------- the datasets


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class StreamingImages(StreamingDataset):
    """A StreamingDataset of the writer's shards whose items are ``(transform(image), label)``, the image decoded
    from its stored bytes with PIL (an untransformed PIL image when ``transform`` is None)."""

    def __init__(self, *, transform: Any = None, **streaming_options: Any) -> None:
        super().__init__(**streaming_options)
        self.transform = transform

    def get_item(self, sample_id: int, retry: int = 7) -> tuple[Any, int]:
        sample = super().get_item(sample_id, retry)
        image = _decode(sample["image"])
        return (self.transform(image) if self.transform is not None else image), int(sample["label"])


class _ByIndex(Dataset):
    """Map-style view of the val shards with a transform: the evaluation and consistency loaders index it with the
    folder spec's sampler (the consistency metrics key each image's shifts by its index)."""

    def __init__(self, shards: StreamingImages, transform: Any) -> None:
        self.shards, self.transform = shards, transform

    def __len__(self) -> int:
        return int(self.shards.num_samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.shards.get_item(index)
        return self.transform(image), label


# ------------------------------------------------------------------------------------------------------- checks


def _options(options: DataOptions) -> StreamingOptions:
    if not isinstance(options, StreamingOptions) or not options.remote:
        raise DataError(
            "data.remote",
            "must be set for data.name='streaming_imagenet': a folder or URL holding train/ and val/ MDS shards "
            "(write them with python -m blurpool_algo.shards --root IMAGENET --out SHARDS)",
        )
    if options.is_url and not options.local:
        raise DataError("data.local", f"must be set for a remote URL ({options.remote}): the local cache folder")
    return options


def _check_split(folder: Path, validate_hash: str | None) -> None:
    """The split's index is there and readable, and each shard file it lists has the size (and hash) it gives."""
    index_file = folder / "index.json"
    if not index_file.is_file():
        raise DataError(
            "data.remote", f"{index_file} does not exist: not a shard split (write one with python -m "
            "blurpool_algo.shards; a killed write leaves only a .partial folder)",
        )  # fmt: skip
    try:
        shards = json.loads(index_file.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError("data.remote", f"{index_file} is not a streaming index: {error}") from None
    if not shards or not sum(shard.get("samples", 0) for shard in shards):
        raise DataError("data.remote", f"{index_file} lists no samples")
    for shard in shards:
        # A compressed dataset's remote holds the zip form only; the raw form appears in a cache.
        stored = [shard[form] for form in ("raw_data", "zip_data") if shard.get(form)]
        present = [entry for entry in stored if (folder / entry["basename"]).is_file()]
        if not present:
            raise DataError("data.remote", f"shard {folder / stored[0]['basename']} listed in {index_file} is missing")
        entry = present[0]
        path = folder / entry["basename"]
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(
                "data.remote", f"shard {path} has {size} bytes, the index says {entry['bytes']}: truncated or replaced"
            )
        if validate_hash is not None:
            expected = entry.get("hashes", {}).get(validate_hash)
            if expected is None:
                raise DataError("data.validate_hash", f"{index_file} records no {validate_hash} hashes")
            if get_hash(validate_hash, path.read_bytes()) != expected:
                raise DataError("data.remote", f"shard {path} does not match its {validate_hash} hash in {index_file}")


# -------------------------------------------------------------------------------------------------------- spec

#: The val shards of this process, one per place: streaming refuses a second live dataset on a cache folder that a
#: download fills, and evaluation and the consistency monitor both read val (by index: no epoch state to share).
_VAL: dict[tuple[Any, ...], StreamingImages] = {}


class StreamingImageNetSpec(DatasetSpec):
    """ImageNet (or any tree the writer took) as MDS shards under ``data.remote``."""

    name = "streaming_imagenet"

    def check(self, options: DataOptions) -> None:
        shard_options = _options(options)
        if shard_options.is_url:
            return  # an object store is read by streaming itself; its errors are turned into DataErrors there
        root = Path(shard_options.remote).expanduser()
        if not root.is_dir():
            raise DataError(
                "data.remote", f"{root} is not a directory of shards (nor a URL: {', '.join(REMOTE_SCHEMES)})"
            )
        for split in _SPLITS:
            _check_split(root / split, shard_options.validate_hash)

    def num_classes(self, options: DataOptions) -> int | None:
        shard_options = _options(options)
        if shard_options.is_url:
            return None  # known once downloaded; labels past model.num_classes then fail in the loss
        classes = Path(shard_options.remote).expanduser() / "train" / CLASSES_FILE
        return len(json.loads(classes.read_text())) if classes.is_file() else None

    def image_size(self, options: DataOptions) -> int:
        return options.image_size or PAPER_CROP_SIZE

    def default_max_shift(self, options: DataOptions) -> int:
        return PAPER_MAX_SHIFT

    def _stream(self, options: StreamingOptions, split: str, **extra: Any) -> StreamingImages:
        """The split's StreamingImages: a local ``remote`` without ``local`` is read in place, else via the cache."""
        if options.local:
            where = {"remote": os.fspath(Path(options.remote).expanduser()) if not options.is_url else options.remote}
            where.update(local=os.fspath(Path(options.local).expanduser()), validate_hash=options.validate_hash,
                         download_timeout=options.download_timeout)  # fmt: skip
        else:
            where = {"local": os.fspath(Path(options.remote).expanduser())}
        try:
            return StreamingImages(
                split=split, predownload=options.predownload, cache_limit=options.cache_limit, **where, **extra
            )
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            key = "data.cache_limit" if "cache limit" in str(error).lower() else "data.remote"
            raise DataError(
                key, f"cannot open the {split} shards of {options.remote}: {' '.join(str(error).split())}"
            ) from None

    def _val(self, options: StreamingOptions) -> StreamingImages:
        key = (options.remote, options.local, options.validate_hash, options.predownload, options.cache_limit)
        if key not in _VAL:
            _VAL[key] = self._stream(options, "val")
        return _VAL[key]

    def datasets(self, options: DataOptions, *, eval_batch_size: int) -> tuple[Dataset, Dataset]:
        return self._datasets(_options(options), train_batch_size=None)

    def _datasets(self, options: StreamingOptions, *, train_batch_size: int | None) -> tuple[Dataset, Dataset]:
        size = self.image_size(options)
        train = self._stream(
            options, "train", transform=train_transform(size), shuffle=True, shuffle_seed=options.seed,
            shuffle_algo=options.shuffle_algo, batch_size=train_batch_size,
        )  # fmt: skip
        return train, _ByIndex(self._val(options), eval_transform(size))

    def loaders(
        self, options: DataOptions, *, train_batch_size: int, eval_batch_size: int
    ) -> tuple[DataLoader, DataLoader]:
        """As :meth:`DatasetSpec.loaders`, but the training loader iterates the shards (streaming partitions and
        shuffles them per rank: no sampler), which is what lets Composer resume it mid-epoch."""
        check_int("train_batch_size", train_batch_size, minimum=1)
        check_int("eval_batch_size", eval_batch_size, minimum=1)
        self.check(options)
        shard_options = _options(options)
        train_set, eval_set = self._datasets(shard_options, train_batch_size=train_batch_size)
        if len(train_set) < train_batch_size:
            raise DataError(
                "train_batch_size",
                f"{train_batch_size} per rank exceeds the {len(train_set)} training samples of each rank for "
                f"data.name={self.name!r}",
            )
        workers, pin = options.num_workers, torch.cuda.is_available()
        train = DataLoader(train_set, batch_size=train_batch_size, drop_last=True, num_workers=workers,
                           pin_memory=pin, persistent_workers=workers > 0)  # fmt: skip
        sampler = build_sampler(eval_set, shuffle=False, drop_last=False, seed=options.seed)
        evaluation = DataLoader(eval_set, batch_size=eval_batch_size, sampler=sampler, num_workers=workers,
                                pin_memory=pin, persistent_workers=workers > 0)  # fmt: skip
        return train, evaluation

    def consistency_dataset(self, options: DataOptions, side: int, *, batch_size: int) -> Dataset:
        shard_options = _options(options)
        return _ByIndex(self._val(shard_options), consistency_transform(side))
