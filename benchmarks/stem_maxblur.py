"""The stem's max-blur-subsample alone: ResNet-50's ``MaxPool2d(3, 2, 1)`` and its replacements, eager and compiled.

    python benchmarks/stem_maxblur.py                       # CPU, channels_last, 8x64x80x80 (batch 8 at 160 px)
    python benchmarks/stem_maxblur.py --device cuda --shape 128,64,112,112 --json runs/stem.json

Forward + backward of each arm on a ReLU'd map (tie-heavy, as the stem's is), with a random output gradient, the arms
interleaved within each repetition; median and min ms of ``--repeats``, and the time each adds over the original
pool. Arms: ``original`` (``nn.MaxPool2d``), ``ours_plain`` (``BlurMaxPool2d``: ``max_pool2d`` at stride 1, then the
strided blur), ``ours_fused`` (``layers/maxblur.py``'s stencil; the layer takes it only under ``torch.compile``, so
eager runs it directly, to show why eager keeps the plain path) and ``composer`` (Composer's ``BlurMaxPool2d``).
Compiled arms are ``torch.compile``'d one by one (Composer's with its graph breaks).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from composer.algorithms.blurpool.blurpool_layers import BlurMaxPool2d as ComposerBlurMaxPool2d
from torch import nn

from blurpool_algo.files import write_json_atomically
from blurpool_algo.layers import BlurMaxPool2d

#: Calls per timed sample: several, so that the timer's resolution and scheduler ticks average out.
CALLS = 5


class _Fused(nn.Module):
    """The stencil run directly, whether compiled or not."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlurMaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool._fused(x)


def arms() -> dict[str, nn.Module]:
    plain = BlurMaxPool2d(3, 2, 1)
    plain.fused = False  # the plain formulation even under torch.compile
    return {
        "original": nn.MaxPool2d(3, 2, 1),
        "ours_plain": plain,
        "ours_fused": _Fused(),
        "composer": ComposerBlurMaxPool2d(3, 2, 1),
    }


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for _ in range(CALLS):
            module(x).backward(grad)

    return run


def measure(compiled: bool, shape: list[int], device: torch.device, repeats: int) -> dict[str, dict[str, float]]:
    """Median and min ms of forward + backward per arm, and the median added over the original pool."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, device=device, generator=generator).relu().contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out_shape = nn.MaxPool2d(3, 2, 1)(x.detach()).shape
    grad = torch.randn(out_shape, device=device, generator=generator).contiguous(memory_format=torch.channels_last)
    runs = {}
    for name, module in arms().items():
        module.to(device)
        runs[name] = _step(torch.compile(module) if compiled else module, x, grad)
        runs[name]()  # warm-up (and the compile)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[name].append((time.perf_counter() - start) / CALLS * 1e3)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        name: {"median_ms": medians[name], "min_ms": min(values), "added_ms": medians[name] - medians["original"]}
        for name, values in seconds.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="8,64,80,80", help="N,C,H,W of the pool's input")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    parser.add_argument("--json", default=None, help="also write the figures here (atomically)")
    args = parser.parse_args(argv)
    shape = [int(v) for v in args.shape.split(",")]
    device = torch.device(args.device)
    results = {}
    for compiled in (False, True) if args.compile else (False,):
        mode = "compiled" if compiled else "eager"
        results[mode] = measure(compiled, shape, device, args.repeats)
        print(f"{mode}: forward+backward of {'x'.join(map(str, shape))}, median ms (added over the original; min)")
        for name, row in results[mode].items():
            print(f"  {name:<11} {row['median_ms']:8.2f} ({row['added_ms']:+.2f}; min {row['min_ms']:.2f})")
    if args.json:
        write_json_atomically(args.json, {"shape": shape, "device": str(device), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
