"""Write an ImageNet-shaped ImageFolder tree as mosaicml-streaming MDS shards, for ``data.name=streaming_imagenet``.

    python -m blurpool_algo.shards --root /data/imagenet --out /data/imagenet-shards [--workers 8] [--compression zstd]

writes ``OUT/train`` and ``OUT/val``: MDS datasets with two columns, ``image`` (the image file's bytes as stored,
never re-encoded) and ``label`` (the class index in the folder tree's order, sorted folder names: the mapping the
``imagenet`` spec uses), plus ``classes.json`` in each split (the class folder names, in label order).

Each split is written into a temporary folder beside its final place and renamed when whole, so a split folder that
exists is complete: a killed run leaves at most a ``.partial`` folder (removed by the next run), and a rerun skips
the splits already written. A tree the ``imagenet`` spec would refuse is refused here, before anything is written:
one line naming the problem, exit status 2. Files PIL cannot open are skipped and counted, as the folder spec does.

Example:
    >>> import tempfile
    >>> main(["--root", tempfile.mkdtemp(), "--out", tempfile.mkdtemp()])  # an empty folder: no train/ in it
    2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from streaming import MDSWriter
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from blurpool_algo.data.imagenet import ImageNetSpec
from blurpool_algo.data.specs import DataError, DataOptions
from blurpool_algo.data.streaming_imagenet import CLASSES_FILE

__all__ = ["CLASSES_FILE", "COLUMNS", "COMPRESSIONS", "SPLITS", "main", "write_split"]

#: The MDS columns: the encoded image as its file holds it, and the int label.
COLUMNS: dict[str, str] = {"image": "bytes", "label": "int"}
#: Splits written, each from ``ROOT/<split>`` to ``OUT/<split>``.
SPLITS: tuple[str, ...] = ("train", "val")
#: ``--compression`` values (streaming's codecs; JPEG bytes barely compress, so ``none`` is the default).
COMPRESSIONS: tuple[str, ...] = ("none", "zstd", "br", "gz", "snappy", "bz2")
_PARTIAL = ".partial"


def _read(path: str) -> bytes | None:
    """The file's bytes, or None if PIL cannot identify it as an image (checked on the header: no decode)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError):
        return None
    return Path(path).read_bytes()


def write_split(
    source: Path,
    out: Path,
    *,
    workers: int = 8,
    compression: str = "none",
    size_limit: int = 1 << 26,
    progress: bool = True,
) -> tuple[int, int]:
    """Writes the ImageFolder tree ``source`` as an MDS dataset at ``out``, atomically (a temporary folder renamed
    when whole). Returns ``(samples written, unreadable files skipped)``.

    Args:
        source: ``ROOT/<split>``, holding ``<class>/<image>``.
        out: the split's folder; must not exist.
        workers: threads reading files (reading is I/O; the order written is the tree's whatever the count).
        compression: one of :data:`COMPRESSIONS`.
        size_limit: bytes per shard before a new one starts (streaming's default, 64 MiB).
        progress: show a tqdm bar.
    """
    folder = ImageFolder(source, loader=lambda path: path)  # lists (path, label) in sorted order, opens nothing
    partial = out.with_name(out.name + _PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)  # a killed run's leftovers
    written = skipped = 0
    with (
        MDSWriter(
            out=str(partial),
            columns=COLUMNS,
            compression=None if compression == "none" else compression,
            hashes=["sha1", "xxh64"],
            size_limit=size_limit,
        ) as writer,
        ThreadPoolExecutor(max(1, workers)) as pool,
    ):
        paths = [path for path, _ in folder.samples]
        bar = tqdm(total=len(paths), desc=f"shards {out.name}", unit="img", disable=not progress)
        # map() keeps the tree's order; reads run ahead on the pool's threads while the writer packs.
        for (path, label), data in zip(folder.samples, pool.map(_read, paths), strict=True):
            if data is None:
                skipped += 1
                print(f"shards: skipping unreadable image {path}", file=sys.stderr)
            else:
                writer.write({"image": data, "label": label})
                written += 1
            bar.update()
        bar.close()
    (partial / CLASSES_FILE).write_text(json.dumps(folder.classes) + "\n")
    os.replace(partial, out)  # the rename is what makes the split exist: a split folder is always whole
    return written, skipped


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blurpool_algo.shards",
        description="Write ROOT/train and ROOT/val (ImageFolder trees) as MDS shards in OUT/train and OUT/val.",
    )
    parser.add_argument("--root", required=True, help="folder holding train/<class>/<image> and val/<class>/<image>")
    parser.add_argument("--out", required=True, help="folder to write train/ and val/ shards into")
    parser.add_argument("--workers", type=int, default=8, help="threads reading image files (default 8)")
    parser.add_argument("--compression", default="none", help=f"one of {', '.join(COMPRESSIONS)} (default none)")
    parser.add_argument("--shard-size", type=int, default=1 << 26, help="bytes per shard (default 64 MiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 written, 2 a bad tree or option, nothing written)."""
    args = _parser().parse_args(argv)
    problems = []
    if args.compression not in COMPRESSIONS:
        problems.append(f"--compression: must be one of {', '.join(COMPRESSIONS)}, got {args.compression!r}")
    if args.workers < 1:
        problems.append(f"--workers: must be an int >= 1, got {args.workers}")
    if args.shard_size < 1 << 10:
        problems.append(f"--shard-size: must be an int >= 1024 bytes, got {args.shard_size}")
    try:
        ImageNetSpec().check(DataOptions(root=args.root))  # the folder spec's own check: the same trees accepted
    except DataError as error:
        problems.append(f"--root: {error.message}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        problems.append(f"--out: {out} exists and is not a directory")
    if problems:
        print(f"shards: {problems[0]}", file=sys.stderr)
        return 2
    root = Path(args.root).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        if (out / split).exists():
            print(f"shards: {out / split} exists (a split is renamed into place only when whole): skipped")
            continue
        written, skipped = write_split(
            root / split,
            out / split,
            workers=args.workers,
            compression=args.compression,
            size_limit=args.shard_size,
            progress=not args.no_progress,
        )
        print(f"shards: {out / split}: {written} images" + (f", {skipped} unreadable skipped" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
