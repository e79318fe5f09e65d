"""What a shift-consistency measurement costs, relative to a plain evaluation pass over the same images.

    python benchmarks/consistency_cost.py          # the quickstart's resnet10, 1,000 mnist5k digits in 44 px frames
    python benchmarks/consistency_cost.py --model resnet50 --data synthetic --image-size 256 --crop-size 224 \\
        --max-shift 32 --images 64 --batch-size 16

The images are the dataset's consistency loader (its validation images at crop_size + max_shift, the dataset's own
protocol defaults unless given). In one process, interleaved, median (and min) of --repeats runs of each: a plain top-1
pass over centre crops, crop consistency, circular consistency and the diagonal stability curve (every offset). Prints
times and ratios to the plain pass; with --json also writes them. Weights are random: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader

from blurpool_algo import apply_blurpool
from blurpool_algo.data import DATASETS, StreamingOptions, dataset_spec
from blurpool_algo.files import write_json_atomically
from blurpool_algo.metrics import diagonal_stability, shift_consistency
from blurpool_algo.models import build_model


def plain_pass(model: torch.nn.Module, loader: DataLoader, crop_size: int) -> float:
    """Top-1 of centre crops of ``crop_size``: one forward pass per image, as an evaluation does."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            top = (images.shape[-1] - crop_size) // 2
            logits = model(images[..., top : top + crop_size, top : top + crop_size])
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet10")
    parser.add_argument("--data", choices=DATASETS, default="mnist5k")
    parser.add_argument("--root", help="the dataset folder (imagenet), or the shards (streaming_imagenet: data.remote)")
    parser.add_argument("--image-size", type=int, help="data.image_size (synthetic: the side of its images)")
    parser.add_argument("--images", type=int, default=1000, help="synthetic images")
    parser.add_argument("--crop-size", type=int, help="default: the dataset's")
    parser.add_argument("--max-shift", type=int, help="default: the dataset's")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blurpool", action="store_true", help="apply BlurPool to the model first")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    spec = dataset_spec(args.data)
    # synthetic evaluates on half its training samples: twice --images gives --images to measure on.
    # The options a recipe's data section builds (the shard keys included; other datasets ignore them).
    options = StreamingOptions(
        root=args.root, remote=args.root, synthetic_samples=2 * args.images, image_size=args.image_size
    )
    protocol = spec.consistency_protocol(options, max_shift=args.max_shift, crop_size=args.crop_size)
    loader = spec.consistency_loader(options, protocol, batch_size=args.batch_size)
    model = build_model(args.model, num_classes=10)
    if args.blurpool:
        apply_blurpool(model)
    common = {"max_shift": protocol.max_shift, "crop_size": protocol.crop_size}
    arms = {
        "plain evaluation pass": lambda: plain_pass(model, loader, protocol.crop_size),
        "crop consistency": lambda: shift_consistency(model, loader, mode="crop", **common),
        "circular consistency": lambda: shift_consistency(model, loader, mode="circular", **common),
        f"diagonal stability ({protocol.max_shift + 1} offsets)": lambda: diagonal_stability(model, loader, **common),
    }
    for run in arms.values():  # warm-up: allocator, lazy init
        run()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.repeats):
        for name, run in arms.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    base = statistics.median(times["plain evaluation pass"])
    print(
        f"{args.model} on {len(loader.dataset)} {args.data} images, crop {protocol.crop_size}, max_shift "
        f"{protocol.max_shift}, batch {args.batch_size}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'measurement':<34}{'median s':>10}{'min s':>10}{'x plain pass':>14}")
    results = {}
    for name, values in times.items():
        median = statistics.median(values)
        results[name] = {"median_s": median, "min_s": min(values), "ratio": median / base}
        print(f"{name:<34}{median:>10.3f}{min(values):>10.3f}{median / base:>14.2f}")
    if args.json:
        write_json_atomically(args.json, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
