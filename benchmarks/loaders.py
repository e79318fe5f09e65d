"""Training images/s of the two ImageNet data paths side by side: the ImageFolder tree (``data.name=imagenet``) and
its MDS shards (``data.name=streaming_imagenet``), each with 0, 1 and 2 DataLoader workers.

    python benchmarks/loaders.py                          # a generated tree of ImageNet-sized JPEGs in a temp folder
    python benchmarks/loaders.py --root /data/imagenet --images 2048 --workers 0 4 8 --json docs/results/loaders.json

Both paths run the recipes' own training loaders (RandomResizedCrop to --image-size, flip, normalise: the same
transforms), one rank, in this process, interleaved path by path for each worker count; the figure is the median of
--repeats passes over --images images, the first batch of each pass left out (worker start-up). The shards are
written once from the tree by ``python -m blurpool_algo.shards`` and read in place (a local folder, no cache copy).
This measures decoding and augmenting on this machine's CPU: what a GPU needs fed, divided by this, is the number of
worker cores a GPU needs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from blurpool_algo.data import DataOptions, StreamingOptions, dataset_spec
from blurpool_algo.files import write_json_atomically
from blurpool_algo.shards import main as write_shards


def generated_tree(root: Path, *, classes: int, per_class: int, side: tuple[int, int] = (375, 500)) -> Path:
    """An ImageFolder pair of JPEGs at ImageNet's typical 500x375 px (smooth noise: ~40-80 KB each, like photos)."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", 1)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                small = torch.randint(0, 256, (3, side[0] // 8, side[1] // 8), generator=generator).float()
                image = torch.nn.functional.interpolate(small[None], size=side, mode="bilinear")[0]
                pixels = image.clamp(0, 255).byte().permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / f"{index}.JPEG", quality=90)
    return root


def images_per_second(loader, images: int, batch_size: int) -> float:
    """Images/s over ``images`` images after the first batch (start-up)."""
    iterator = iter(loader)
    next(iterator)
    seen, start = 0, time.perf_counter()
    while seen < images - batch_size:
        try:
            batch, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        seen += len(batch)
    return seen / (time.perf_counter() - start)


def measure(root: Path, shards: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for workers in args.workers:
        for path in ("folder", "shards"):
            if path == "folder":
                spec, options = dataset_spec("imagenet"), DataOptions(root=root, num_workers=workers, seed=0,
                                                                      image_size=args.image_size)  # fmt: skip
            else:
                spec = dataset_spec("streaming_imagenet")
                options = StreamingOptions(remote=str(shards), num_workers=workers, seed=0, image_size=args.image_size)
            rates = []
            for _ in range(args.repeats):
                train, _ = spec.loaders(options, train_batch_size=args.batch_size, eval_batch_size=args.batch_size)
                rates.append(images_per_second(train, args.images, args.batch_size))
                del train
            rows.append({"path": path, "workers": workers, "images_per_s": statistics.median(rates),
                         "all_images_per_s": rates})  # fmt: skip
            print(f"{path:7s} workers={workers}: {statistics.median(rates):8.1f} images/s", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="an ImageFolder pair (train/, val/); default: a generated tree")
    parser.add_argument("--classes", type=int, default=4, help="classes of the generated tree")
    parser.add_argument("--per-class", type=int, default=64, help="training images per class of the generated tree")
    parser.add_argument("--images", type=int, default=192, help="images timed per pass")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here (atomically)")
    args = parser.parse_args(argv)
    for name in ("classes", "per_class", "images", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be an int >= 1", file=sys.stderr)
            return 2
    if args.image_size < 8 or any(w < 0 for w in args.workers) or args.images <= args.batch_size:
        print("error: --image-size must be >= 8, --workers >= 0, and --images more than one batch", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root) if args.root else generated_tree(Path(scratch) / "tree", classes=args.classes,
                                                                per_class=args.per_class)  # fmt: skip
        shards = Path(scratch) / "shards"
        status = write_shards(["--root", str(root), "--out", str(shards), "--no-progress"])
        if status:
            return status
        rows = measure(root, shards, args)
    print(f"\n| path | {' | '.join(f'{w} workers' for w in args.workers)} |")
    print(f"|---|{'---|' * len(args.workers)}")
    for path in ("folder", "shards"):
        cells = [f"{row['images_per_s']:.0f}" for row in rows if row["path"] == path]
        print(f"| {path} | {' | '.join(cells)} |")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json_atomically(args.json, {"settings": settings, "cpu_threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
