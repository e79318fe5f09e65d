"""One command for a lent GPU: the layers' numerics on CUDA, the overhead benchmark on CUDA, and training throughput.

    python benchmarks/gpu_check.py --out docs/results/           # on a CUDA machine: at most --budget-s (480 s)
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke  # every part on the CPU at tiny sizes (seconds)

Without CUDA (and without ``--smoke``) it exits with code 2 and one line, before any work and without writing.
The parts, in this order, each writing one JSON into ``--out`` as soon as it ends:

* ``numerics`` (``gpu_numerics.json``): every layer kind of :mod:`blurpool_algo.layers` (2-D and 1-D), forward and
  backward on the device in float32, bfloat16 and float16, NCHW and channels_last (2-D), against the same layer in
  float64 on the CPU. The reference gets the *rounded* parameters and input, so the error measured is the kernels'
  arithmetic only; inputs hold distinct values per plane, so no max-pool tie can route a gradient elsewhere. The error
  is the largest absolute difference over the largest reference magnitude, for the output, the input gradient and
  each parameter gradient; :data:`TOLERANCES` per dtype (float32 with TF32 off: float32 means float32 here).
* ``overhead`` (``gpu_overhead.json``): ``benchmarks/overhead.py`` in this process, ResNet-50, bf16 AMP,
  channels_last, batch 128 at 224 px, eager: baseline, ours and Composer's, both blur orders, per layer and whole
  step, the allocator's peak memory.
* ``throughput`` (``gpu_throughput.json``): a synthetic-ImageNet training loop (random 224 px images on the device,
  SGD with momentum, bf16 AMP, channels_last) per arm, warm-up excluded; images/s of each timed round, interleaved.
* ``overhead_compiled`` (``gpu_overhead_compiled.json``): the overhead benchmark again with ``torch.compile``, for
  the baseline and the ``blur_first=True`` arms (compiling costs minutes; it runs last, in a child process that is
  killed when the budget is spent).

``gpu_summary.json`` holds the device, the torch/CUDA/cuDNN versions, each part's status (``done``, ``skipped`` with
the reason, ``failed`` with the error) and seconds, and the total wall time; it is rewritten after every part, so a
run cut short still says how far it got. A part starts only if the budget left covers its estimate
(:data:`ESTIMATES_S`); one that fails is recorded and the next runs. Exit code: 0 when no part failed and every
numerics check passed (skipped parts are recorded, not errors), 1 otherwise, 2 for bad options or no CUDA.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from blurpool_algo.checks import check_int
from blurpool_algo.files import write_json_atomically
from blurpool_algo.layers import (
    BlurAvgPool1d,
    BlurAvgPool2d,
    BlurConv1d,
    BlurConv2d,
    BlurInputConv1d,
    BlurInputConv2d,
    BlurMaxPool1d,
    BlurMaxPool2d,
    BlurPool1d,
    BlurPool2d,
)
from blurpool_algo.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # a sibling script, not a package: its arms, surgery and measurements

PARTS = ("numerics", "overhead", "throughput", "overhead_compiled")
#: Seconds each part needs at least on an H100/H200 (compiling ResNet-50 dominates the last); skipped if less is left.
ESTIMATES_S = {"numerics": 20, "overhead": 60, "throughput": 40, "overhead_compiled": 240}
SMOKE_ESTIMATES_S = dict.fromkeys(PARTS, 0)
#: Compiling ResNet-18 takes minutes on a CPU (and torch 2.7.0's Inductor fails on its batch-norm backward there).
SMOKE_SKIPS = {"overhead_compiled": "--smoke does not compile (minutes on a CPU); the eager overhead part ran"}
DEFAULT_BUDGET_S = 480
#: The largest error relative to the reference's largest magnitude: about 8 units in the last place of bf16 and fp16
#: (one rounding of the result, plus fp32 accumulations of a few hundred terms), 1e-5 for fp32 sums of that length.
TOLERANCES = {"float32": 1e-5, "bfloat16": 8 * 2.0**-8, "float16": 8 * 2.0**-11}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Composer's arms run where Composer is installed; the lent GPU machine may have torch only, and then the check
#: measures ours against the baseline (overhead.AVAILABLE_ARMS says which).
ARMS = tuple(a for a in ("baseline", "ours_first", "ours_after", "composer_first", "composer_after")
             if a in overhead.AVAILABLE_ARMS)  # fmt: skip
COMPILED_ARMS = tuple(a for a in ("baseline", "ours_first", "composer_first") if a in overhead.AVAILABLE_ARMS)
OVERHEAD_SCRIPT = Path(__file__).resolve().parent / "overhead.py"


@dataclass(frozen=True)
class Sizes:
    """What each part runs at: the GPU check's sizes, or ``--smoke``'s tiny ones."""

    dtypes: tuple[str, ...]
    arms: tuple[str, ...]
    numerics_batch: int
    numerics_channels: int
    model: str
    batch_size: int
    image_size: int
    repeats: int
    layer_repeats: int
    warmup_steps: int
    rounds: int
    steps_per_round: int


GPU_SIZES = Sizes(tuple(DTYPES), ARMS, 4, 32, "resnet50", 128, 224, 7, 21, 15, 3, 10)
# The smoke times one arm of each library (its cost grows with the arms, which are data to the code).
SMOKE_SIZES = Sizes(("float32", "bfloat16"), COMPILED_ARMS, 1, 2, "resnet18", 2, 32, 5, 5, 1, 1, 1)


# ------------------------------------------------------------------------------------------------------- numerics

#: Every layer kind: name -> (spatial dims, builder from a channel count). The convs cover each forward path: the
#: 3x3 strided conv with either blur order, and the 1x1 strided conv (a ResNet shortcut) that blurs at its stride.
LAYERS: dict[str, tuple[int, Callable[[int], nn.Module]]] = {
    "BlurPool2d": (2, lambda c: BlurPool2d(c, stride=2)),
    "BlurConv2d 3x3 blur_first": (2, lambda c: BlurConv2d(c, 2 * c, 3, stride=2, padding=1, blur_first=True)),
    "BlurConv2d 3x3 blur_after": (2, lambda c: BlurConv2d(c, 2 * c, 3, stride=2, padding=1, blur_first=False)),
    "BlurConv2d 1x1 blur_first": (2, lambda c: BlurConv2d(c, 2 * c, 1, stride=2, bias=False, blur_first=True)),
    "BlurInputConv2d": (2, lambda c: BlurInputConv2d(c, 2 * c, 3, padding=1, blur_stride=2)),
    "BlurMaxPool2d": (2, lambda c: BlurMaxPool2d(3, stride=2, padding=1)),
    "BlurAvgPool2d": (2, lambda c: BlurAvgPool2d(3, stride=2, padding=1)),
    "BlurPool1d": (1, lambda c: BlurPool1d(c, stride=2)),
    "BlurConv1d blur_first": (1, lambda c: BlurConv1d(c, 2 * c, 3, stride=2, padding=1, blur_first=True)),
    "BlurConv1d blur_after": (1, lambda c: BlurConv1d(c, 2 * c, 3, stride=2, padding=1, blur_first=False)),
    "BlurInputConv1d": (1, lambda c: BlurInputConv1d(c, 2 * c, 3, padding=1, blur_stride=2)),
    "BlurMaxPool1d": (1, lambda c: BlurMaxPool1d(3, stride=2, padding=1)),
    "BlurAvgPool1d": (1, lambda c: BlurAvgPool1d(3, stride=2, padding=1)),
}
#: Map shape per spatial dims: 256 and 64 samples per plane, each value k / 2**n, exact in bf16 and fp16.
PLANES = {2: (16, 16), 1: (64,)}


def distinct_input(batch: int, channels: int, dims: int) -> torch.Tensor:
    """Each (sample, channel) plane a permutation of ``n`` evenly spaced values in [-1, 1): exact in every dtype
    checked (``n`` <= 256 is a power of 2) and distinct, so a max pool has no ties for rounding to break."""
    shape = PLANES[dims]
    n = 1
    for side in shape:
        n *= side
    generator = torch.Generator().manual_seed(0)
    planes = torch.stack([torch.randperm(n, generator=generator) for _ in range(batch * channels)])
    return ((planes.double() - n / 2) / (n / 2)).reshape(batch, channels, *shape)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute difference over the largest reference magnitude (0 when both are 0)."""
    difference = (got.detach().to("cpu", torch.float64) - want).abs().max().item()
    scale = want.abs().max().item()
    return difference / scale if scale else difference


def check_layer(
    name: str, dtype_name: str, channels_last: bool, device: torch.device, batch: int, channels: int
) -> dict[str, Any]:
    """One layer kind forward and backward in ``dtype`` on ``device`` against float64 on the CPU."""
    dims, build = LAYERS[name]
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    module = build(channels).to(dtype)  # parameters rounded to the dtype once; the reference gets the same values
    reference = copy.deepcopy(module).to(torch.float64)
    x = distinct_input(batch, channels, dims).to(dtype)
    want_input = x.double().requires_grad_(True)
    want = reference(want_input)
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(want.shape, generator=generator, dtype=torch.float64).to(dtype)
    want.backward(grad.double())

    module = module.to(device)
    got_input = x.to(device)
    got_grad = grad.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
        got_input = got_input.contiguous(memory_format=torch.channels_last)
        got_grad = got_grad.contiguous(memory_format=torch.channels_last)
    got_input.requires_grad_(True)
    got = module(got_input)
    got.backward(got_grad)
    errors = {"output": relative_error(got, want), "input_grad": relative_error(got_input.grad, want_input.grad)}
    for (parameter_name, parameter), (_, expected) in zip(
        module.named_parameters(), reference.named_parameters(), strict=True
    ):
        errors[f"{parameter_name}_grad"] = relative_error(parameter.grad, expected.grad)
    worst = max(errors.values())
    return {
        "layer": name, "dtype": dtype_name, "memory_format": "channels_last" if channels_last else "contiguous",
        "output_dtype": str(got.dtype).removeprefix("torch."),
        "output_channels_last": got.dim() == 4 and got.is_contiguous(memory_format=torch.channels_last),
        "errors": errors, "max_error": worst, "tolerance": TOLERANCES[dtype_name],
        "passed": bool(worst <= TOLERANCES[dtype_name]),
    }  # fmt: skip


def run_numerics(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    # float32 must mean float32: TF32 convs and matmuls (on by default for cuDNN convs) would round inputs to 10 bits.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        checks = [
            check_layer(name, dtype, channels_last, device, sizes.numerics_batch, sizes.numerics_channels)
            for name, (dims, _) in LAYERS.items()
            for dtype in sizes.dtypes
            for channels_last in ((False, True) if dims == 2 else (False,))
        ]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    failed = [check for check in checks if not check["passed"]]
    return {
        "tolerances": {dtype: TOLERANCES[dtype] for dtype in sizes.dtypes}, "tf32": False,
        "checks": checks, "passed": len(checks) - len(failed), "failed": len(failed),
    }  # fmt: skip


def numerics_table(result: dict[str, Any]) -> str:
    rows = [f"  {'layer':<28}{'dtype':>10}{'format':>15}{'max error':>12}{'tolerance':>12}  verdict"]
    for check in result["checks"]:
        verdict = "pass" if check["passed"] else "FAIL"
        rows.append(
            f"  {check['layer']:<28}{check['dtype']:>10}{check['memory_format']:>15}"
            f"{check['max_error']:>12.2e}{check['tolerance']:>12.2e}  {verdict}"
        )
    rows.append(f"  {result['passed']} passed, {result['failed']} failed")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------- overhead


def overhead_argv(device: torch.device, sizes: Sizes, compiled: bool, json_path: Path) -> list[str]:
    """``benchmarks/overhead.py``'s arguments for this part (eager: every arm; compiled: the blur_first ones)."""
    arms = COMPILED_ARMS if compiled else sizes.arms
    argv = ["--models", sizes.model, "--device", str(device), "--amp", "--channels-last",
            "--batch-size", str(sizes.batch_size), "--image-size", str(sizes.image_size),
            "--repeats", str(sizes.repeats), "--layer-repeats", str(sizes.layer_repeats),
            "--arms", ",".join(arms), "--json", str(json_path)]  # fmt: skip
    return [*argv, "--compile"] if compiled else argv


def run_overhead(
    device: torch.device, sizes: Sizes, compiled: bool, json_path: Path, smoke: bool, timeout_s: float | None = None
) -> None:
    """Runs the overhead benchmark, which writes ``json_path`` itself: in this process, or with ``timeout_s`` in a
    child process killed when the time is up (the compiled run: compile times cannot be bounded from inside)."""
    argv = overhead_argv(device, sizes, compiled, json_path)
    if timeout_s is not None:
        # TimeoutExpired or CalledProcessError when it fails: the driver records the part as failed and goes on.
        subprocess.run([sys.executable, str(OVERHEAD_SCRIPT), *argv], check=True, timeout=timeout_s)
        return
    saved = overhead.SAMPLE_SECONDS
    if smoke:
        overhead.SAMPLE_SECONDS = 0.001  # one call per timing sample at the tiny sizes: the logic, not the figures
    try:
        overhead.main(argv)
    finally:
        overhead.SAMPLE_SECONDS = saved


# ----------------------------------------------------------------------------------------------------- throughput


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_throughput(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    """Steady-state training images/s per arm on random data held on the device: ``warmup_steps`` untimed steps per
    arm, then ``rounds`` timed rounds of ``steps_per_round`` steps, the arms interleaved in a rotating order."""
    torch.manual_seed(0)
    reference = build_model(sizes.model, num_classes=1000)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(sizes.batch_size, 3, sizes.image_size, sizes.image_size, generator=generator)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (sizes.batch_size,), generator=generator).to(device)
    steps: dict[str, Callable[[], torch.Tensor]] = {}
    for arm in sizes.arms:
        model = overhead.SURGERY[arm](copy.deepcopy(reference)).to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)

        def step(model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with overhead.autocast(device, True):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss.detach()

        steps[arm] = step
    peak: dict[str, int | None] = {}
    losses: dict[str, float] = {}
    for arm, step in steps.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(sizes.warmup_steps):
            losses[arm] = step().item()
        peak[arm] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    arms = sizes.arms
    rates: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_index in range(sizes.rounds):
        order = arms[round_index % len(arms) :] + arms[: round_index % len(arms)]
        for arm in order:
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(sizes.steps_per_round):
                loss = steps[arm]()
            _synchronize(device)
            rates[arm].append(sizes.steps_per_round * sizes.batch_size / (time.perf_counter() - started))
            losses[arm] = loss.item()
    baseline = statistics.median(rates["baseline"])
    return {
        "model": sizes.model, "batch_size": sizes.batch_size, "image_size": sizes.image_size, "amp": "bfloat16",
        "channels_last": True, "optimizer": "SGD(lr=0.1, momentum=0.9, weight_decay=5e-5)",
        "warmup_steps": sizes.warmup_steps, "rounds": sizes.rounds, "steps_per_round": sizes.steps_per_round,
        "arms": {
            arm: {
                "images_per_s": statistics.median(rates[arm]), "rounds_images_per_s": rates[arm],
                "ratio_to_baseline": statistics.median(rates[arm]) / baseline, "peak_memory_bytes": peak[arm],
                "last_loss": losses[arm],
            }
            for arm in arms
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- driver


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
        "composer": overhead.composer.__version__ if overhead.composer is not None else None,
    }  # fmt: skip
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def run(out: Path, smoke: bool, budget_s: float, parts: Sequence[str]) -> int:
    """Runs ``parts`` in order within ``budget_s``; writes each part's JSON and the summary into ``out``."""
    started = time.perf_counter()
    device = torch.device("cpu" if smoke else "cuda")
    sizes = SMOKE_SIZES if smoke else GPU_SIZES
    estimates = SMOKE_ESTIMATES_S if smoke else ESTIMATES_S
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "command": " ".join(["gpu_check.py", *sys.argv[1:]]) if __name__ == "__main__" else "gpu_check.run",
        "smoke": smoke, "budget_s": budget_s, "sizes": asdict(sizes), "environment": environment(device),
        "parts": {}, "numerics_failed": None, "total_s": 0.0, "finished": False,
    }  # fmt: skip
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for part in parts:
        left = budget_s - (time.perf_counter() - started)
        path = out / f"gpu_{part}.json"
        reason = SMOKE_SKIPS.get(part) if smoke else None
        if left < estimates[part]:
            reason = f"budget: {left:.0f} s left, the part needs about {estimates[part]} s"
        if reason:
            write_json_atomically(path, {"part": part, "skipped": reason})
            summary["parts"][part] = {"status": "skipped", "reason": reason, "file": path.name}
            print(f"{part}: skipped ({reason})", flush=True)
            continue
        part_started = time.perf_counter()
        print(f"\n== {part} ({left:.0f} s of the budget left)", flush=True)
        try:
            if part == "numerics":
                result = run_numerics(device, sizes)
                summary["numerics_failed"] = result["failed"]
                write_json_atomically(path, {"part": part, **result})
                print(numerics_table(result), flush=True)
            elif part == "throughput":
                result = run_throughput(device, sizes)
                write_json_atomically(path, {"part": part, **result})
                for arm, figures in result["arms"].items():
                    print(f"  {arm:<16}{figures['images_per_s']:>10.1f} images/s ({figures['ratio_to_baseline']:.3f}x)")
            else:
                compiled = part == "overhead_compiled"
                run_overhead(device, sizes, compiled, path, smoke, timeout_s=left if compiled else None)
            summary["parts"][part] = {"status": "done", "file": path.name}
        except Exception as error:  # recorded, and the next part still runs: one failure must not lose the rest
            traceback.print_exc()
            summary["parts"][part] = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
        summary["parts"][part]["seconds"] = time.perf_counter() - part_started
        summary["total_s"] = time.perf_counter() - started
        write_json_atomically(out / "gpu_summary.json", summary)
    summary["total_s"] = time.perf_counter() - started
    summary["finished"] = True
    write_json_atomically(out / "gpu_summary.json", summary)
    statuses = {part: entry["status"] for part, entry in summary["parts"].items()}
    print(f"\n{statuses}; {summary['total_s']:.0f} s; wrote {out}", flush=True)
    # Skipped parts are recorded, not errors: the budget and --smoke skip them by design.
    return 1 if "failed" in statuses.values() or summary["numerics_failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for the JSON files")
    parser.add_argument("--smoke", action="store_true", help="every part on the CPU at tiny sizes (tests the code)")
    parser.add_argument("--budget-s", type=int, default=DEFAULT_BUDGET_S, help="wall-clock budget in seconds")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    try:
        check_int("--budget-s", args.budget_s, minimum=1)
        unknown = [part for part in parts if part not in PARTS]
        if unknown or not parts:
            raise ValueError(f"--parts must be a comma-separated list from {', '.join(PARTS)}, got {args.parts!r}")
    except ValueError as error:
        parser.error(str(error))
    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available here (torch "
            f"{torch.__version__}); run it on a GPU machine, or with --smoke to check the code on the CPU",
            file=sys.stderr,
        )
        return 2
    return run(args.out, args.smoke, args.budget_s, parts)


if __name__ == "__main__":
    sys.exit(main())
