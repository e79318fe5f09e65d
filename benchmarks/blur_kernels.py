"""Ways to compute one blur-subsample, timed against each other on the maps a ResNet-50 really blurs.

    python benchmarks/blur_kernels.py                      # channels_last, batch 8 at 160 px, 3-tap filter
    python benchmarks/blur_kernels.py --no-channels-last --json runs/blur_kernels.json

The layers compute the blur as one depthwise ``conv2d`` with the 2-D filter. This benchmark keeps the evidence for that
choice: every alternative below computes the same numbers (checked, outputs and input gradients, before timing) and
is timed forward + backward beside it, interleaved, median (and min) of ``--repeats``:

* ``depthwise``: the layers' form, a (C, 1, k, k) filter expanded without a copy, the zero padding inside the conv;
* ``padded_copy``: the same conv on a zero-padded copy of the map (``F.pad`` first; the other pad modes need it);
* ``repeat_filter``: the same conv with the filter rebuilt by ``.repeat`` on every call (what Composer does);
* ``separable``: a 1 x k depthwise conv, then a k x 1 one (row then column);
* ``box_cascade``: k - 1 two-tap box averages (``avg_pool2d``), the binomial filter's factorisation;
* ``transpose_backward``: an autograd Function that saves nothing for the backward and computes it with
  ``conv_transpose2d`` (it would spare the memory of the blur's input where nothing else keeps it).

Shapes: what ResNet-50's anti-aliased layers blur at batch 8 and 160 px (the stem max-pool's stride-1 output, the
stride-1 blurs before each strided 3x3 conv, the stride-2 blurs before each shortcut).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from blurpool_algo.checks import check_int, fail
from blurpool_algo.files import write_json_atomically
from blurpool_algo.filters import binomial_filter_2d, binomial_taps, blur_padding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import MIN_REPEATS, interleaved  # a sibling script, not a package: the same timing protocol

# (name, channels, side, stride) at batch 8, 160 px input.
RESNET50_BLURS = [
    ("maxpool (stride-1 max)", 64, 80, 2),
    ("layer2.0.conv2", 128, 40, 1),
    ("layer2.0.downsample", 256, 40, 2),
    ("layer3.0.conv2", 256, 20, 1),
    ("layer3.0.downsample", 512, 20, 2),
    ("layer4.0.conv2", 512, 10, 1),
    ("layer4.0.downsample", 1024, 10, 2),
]


def depthwise(x: torch.Tensor, filter_size: int, stride: int) -> torch.Tensor:
    channels = x.shape[1]
    weight = binomial_filter_2d(filter_size)[None, None].expand(channels, 1, -1, -1)
    return F.conv2d(x, weight, stride=stride, padding=filter_size // 2, groups=channels)


def padded_copy(x: torch.Tensor, filter_size: int, stride: int) -> torch.Tensor:
    channels = x.shape[1]
    weight = binomial_filter_2d(filter_size)[None, None].expand(channels, 1, -1, -1)
    before, after = blur_padding(filter_size)
    return F.conv2d(F.pad(x, (before, after, before, after)), weight, stride=stride, groups=channels)


def repeat_filter(x: torch.Tensor, filter_size: int, stride: int) -> torch.Tensor:
    channels = x.shape[1]
    weight = binomial_filter_2d(filter_size)[None, None].repeat(channels, 1, 1, 1)
    return F.conv2d(x, weight, stride=stride, padding=filter_size // 2, groups=channels)


def separable(x: torch.Tensor, filter_size: int, stride: int) -> torch.Tensor:
    channels = x.shape[1]
    taps = binomial_taps(filter_size)
    before, after = blur_padding(filter_size)
    rows = F.conv2d(F.pad(x, (before, after, 0, 0)), taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1),
                    stride=(1, stride), groups=channels)  # fmt: skip
    return F.conv2d(F.pad(rows, (0, 0, before, after)), taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1),
                    stride=(stride, 1), groups=channels)  # fmt: skip


def box_cascade(x: torch.Tensor, filter_size: int, stride: int) -> torch.Tensor:
    before, after = blur_padding(filter_size)
    out = F.pad(x, (before, after, before, after))
    for step in range(filter_size - 1):
        out = F.avg_pool2d(out, 2, stride if step == filter_size - 2 else 1)
    return out


class _BlurSavingNothing(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        return F.conv2d(x, weight, stride=stride, padding=padding, groups=x.shape[1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, stride, padding = inputs
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape[-2], x.shape[-1], stride, padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (weight,) = ctx.saved_tensors
        height, width, stride, padding = ctx.geometry
        size = weight.shape[-1]
        extra = [(height + 2 * padding - size) % stride, (width + 2 * padding - size) % stride]
        grad_input = F.conv_transpose2d(
            grad, weight, stride=stride, padding=padding, output_padding=extra, groups=grad.shape[1]
        )
        return grad_input, None, None, None


def transpose_backward(x: torch.Tensor, filter_size: int, stride: int) -> torch.Tensor:
    if filter_size % 2 == 0:
        raise ValueError("transpose_backward needs an odd filter size (symmetric padding)")
    weight = binomial_filter_2d(filter_size)[None, None].expand(x.shape[1], 1, -1, -1).contiguous()
    return _BlurSavingNothing.apply(x, weight, stride, filter_size // 2)


FORMS: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "depthwise": depthwise,
    "padded_copy": padded_copy,
    "repeat_filter": repeat_filter,
    "separable": separable,
    "box_cascade": box_cascade,
    "transpose_backward": transpose_backward,
}


def _forward_backward(form: Callable, x: torch.Tensor, grad: torch.Tensor, filter_size: int, stride: int):
    def run() -> None:
        x.grad = None
        form(x, filter_size, stride).backward(grad)

    return run


def measure(channels_last: bool, batch_size: int, filter_size: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for name, channels, side, stride in RESNET50_BLURS:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, channels, side, side, generator=generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        reference = depthwise(x, filter_size, stride)
        grad = torch.randn(reference.shape, generator=generator).to(memory_format=torch.preserve_format)
        if channels_last:
            grad = grad.contiguous(memory_format=torch.channels_last)
        (reference_grad,) = torch.autograd.grad(reference, x, grad)
        runs = {}
        for form_name, form in FORMS.items():
            out = form(x, filter_size, stride)
            (form_grad,) = torch.autograd.grad(out, x, grad)
            torch.testing.assert_close(out, reference, msg=f"{form_name} output, {name}")
            torch.testing.assert_close(form_grad, reference_grad, msg=f"{form_name} gradient, {name}")
            runs[form_name] = _forward_backward(form, x, grad, filter_size, stride)
        times = interleaved(runs, repeats, x.device)
        rows.append({
            "blur": name, "shape": [batch_size, channels, side, side], "stride": stride,
            "forms": {f: {"median_ms": t["median_ms"], "min_ms": t["min_ms"]} for f, t in times.items()},
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    forms = list(FORMS)
    lines = [
        "forward+backward, median ms of depthwise, others as a ratio to it (lower is faster)",
        f"  {'blur':<24}{'input':>18}{'stride':>7}" + "".join(f"{form:>20}" for form in forms),
    ]
    for row in rows:
        base = row["forms"]["depthwise"]["median_ms"]
        cells = [f"{base:>17.2f}ms"] + [f"{row['forms'][form]['median_ms'] / base:>19.2f}x" for form in forms[1:]]
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"  {row['blur']:<24}{shape:>18}{row['stride']:>7}" + "".join(cells))
    return "\n".join(lines)


def check_options(args: argparse.Namespace) -> None:
    """Refuses, before any work, options that would time noise or a form that cannot run."""
    check_int("--repeats", args.repeats, minimum=MIN_REPEATS, hint="medians of fewer are noise")
    if check_int("--filter-size", args.filter_size, minimum=3) % 2 == 0:
        raise fail("--filter-size", "odd", args.filter_size, hint="transpose_backward pads symmetrically")
    check_int("--batch-size", args.batch_size, minimum=1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--filter-size", type=int, default=3, help="odd, >= 3 (transpose_backward pads symmetrically)")
    parser.add_argument("--repeats", type=int, default=21, help=f">= {MIN_REPEATS}")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    try:
        check_options(args)
    except ValueError as error:
        parser.error(str(error))  # exits with code 2
    rows = measure(args.channels_last, args.batch_size, args.filter_size, args.repeats)
    print(f"channels_last={args.channels_last}, filter_size={args.filter_size}, {torch.get_num_threads()} threads")
    print(table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(args.json, {"settings": vars(args) | {"json": str(args.json)}, "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
