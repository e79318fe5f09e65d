"""What anti-aliasing costs: this project's BlurPool against Composer's built-in one and the un-blurred baseline.

    python benchmarks/overhead.py                    # CPU, channels_last, batch 8 at 160 px; resnet50, resnet18,
                                                     # mobilenet_v2
    python benchmarks/overhead.py --models resnet50 --device cuda --batch-size 64 --image-size 224 --compile
    python benchmarks/overhead.py --no-channels-last --json runs/overhead.json
    python benchmarks/overhead.py --models resnet50 --device cuda --amp --batch-size 128 --image-size 224  # bf16 AMP

Everything runs in one process, the arms interleaved within each repetition, and every figure is the median (and min)
of ``--repeats`` (at least 5) timings, so that drift on a shared machine hits every arm alike. For each model:

* Whole model: a train step (forward, cross-entropy, backward, SGD step) and an inference forward (eval mode,
  ``torch.inference_mode``) per arm (under bf16 autocast with ``--amp``, as mixed-precision training runs), and the
  training memory: on CPU, the bytes of activations autograd saves for the
  backward (distinct storages, parameters and buffers left out: what the batch adds to the peak); on CUDA, the
  allocator's peak during a train step above what was allocated before it.
* Per layer: forward + backward of each replaced module (compiled on its own with ``--compile``) on the input the
  baseline model really feeds it (captured by a hook, same shape and memory format), with a random output gradient:
  the original layer, and each arm's replacement.
  ``added`` is replacement minus original, and its sum over the layers isolates the anti-aliasing's cost from
  whole-step noise.

Arms: ``baseline`` (torchvision's model), ``ours_first`` / ``ours_after`` (:func:`blurpool_algo.apply_blurpool`
with ``blur_first`` True / False) and ``composer_first`` / ``composer_after`` (Composer's ``apply_blurpool``, same
settings: 3-tap filter, zero padding, ``min_channels=16``); ``aps_first`` / ``aps_after`` the same with
``sampling='adaptive'``, ``aps_naive`` ``aps_first``'s function with every conv at stride 1 then the phase kept (what
choosing the phase on the input saves), ``aps_circular`` ``aps_first`` with ``circular_padding=True`` (its per-layer
figures cover the blurred layers only; circular stride-1 convs show in the whole step). Weights are random and shared
by every arm: time does not depend on them.

Prints one table per model of times and ratios to the baseline, then the per-layer table, then the issue's targets
(ResNet-50: added layer time of ``ours_first`` at most half of ``composer_first``'s, ``ours_after`` no slower than
``composer_after``, and training memory no higher than Composer's). ``--json`` writes all of it, atomically.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from blurpool_algo import BlurConv2d, apply_blurpool
from blurpool_algo.checks import check_choice, check_int, fail
from blurpool_algo.files import write_json_atomically
from blurpool_algo.layers import choose_phase, select_phase
from blurpool_algo.layers.blur import blur_subsample
from blurpool_algo.models import build_model, model_names, unknown_model_message

try:  # Composer's arms; a machine with torch only (the lent GPU machine has no Composer) measures the others
    import composer
    from composer.algorithms.blurpool import apply_blurpool as composer_apply_blurpool
except ImportError:
    composer = None

ARMS: dict[str, str] = {
    "baseline": "torchvision's model, no anti-aliasing",
    "ours_first": "blurpool_algo.apply_blurpool(blur_first=True)",
    "ours_after": "blurpool_algo.apply_blurpool(blur_first=False)",
    "composer_first": "composer.algorithms.blurpool.apply_blurpool(blur_first=True)",
    "composer_after": "composer.algorithms.blurpool.apply_blurpool(blur_first=False)",
    "ours_paper": "blurpool_algo.apply_blurpool(placement='after_activation'): the paper's placement",
    "aps_first": "blurpool_algo.apply_blurpool(sampling='adaptive', blur_first=True): phase chosen on the blurred "
    "input, the conv at its stride from that phase",
    "aps_naive": "aps_first computed the naive way: every blurred conv at stride 1, then the chosen phase kept",
    "aps_after": "blurpool_algo.apply_blurpool(sampling='adaptive', blur_first=False)",
    "aps_circular": "aps_first with circular_padding=True (every conv and pool pads circularly)",
}
#: The arms this machine can run: Composer's need Composer installed.
AVAILABLE_ARMS: tuple[str, ...] = tuple(arm for arm in ARMS if composer is not None or not arm.startswith("composer"))
DEFAULT_MODELS = ("resnet50", "resnet18", "mobilenet_v2")
MIN_REPEATS = 5
MIN_IMAGE_SIZE = 32
#: Target length of one per-layer timing sample: long enough that timer resolution and scheduler ticks average out.
SAMPLE_SECONDS = 0.025


def _composer_surgery(model: nn.Module, blur_first: bool) -> nn.Module:
    composer_apply_blurpool(model, replace_convs=True, replace_maxpools=True, blur_first=blur_first, min_channels=16)
    return model


def _ours_surgery(model: nn.Module, blur_first: bool, placement: str = "conv") -> nn.Module:
    # The same filter and padding in every arm (Composer's: 3 taps, zeros), so that only the placement differs.
    apply_blurpool(model, blur_first=blur_first, placement=placement, replace_avgpools=placement != "conv")
    return model


class NaiveAdaptiveConv2d(BlurConv2d):
    """The reference for ``aps_first``'s claim that an adaptive strided conv need not run at stride 1: blur, the conv
    at stride 1, then the phase chosen on the blurred input kept (the same outputs wherever the grid stays inside the
    map, at about ``stride**2`` times the conv's work)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        blurred = blur_subsample(input, self.blur_filter, [1, 1], self.blur_pads, self.pad_mode, True)
        dense = F.conv2d(blurred, self.weight, self.bias, 1, self.padding, self.dilation, self.groups)
        return select_phase(dense, choose_phase(blurred, self.blur_stride, self.pad_mode), self.blur_stride)


def _aps_surgery(model: nn.Module, blur_first: bool, naive: bool = False, circular: bool = False) -> nn.Module:
    apply_blurpool(model, blur_first=blur_first, sampling="adaptive", circular_padding=circular)
    if naive:
        for module in model.modules():
            if type(module) is BlurConv2d:
                module.__class__ = NaiveAdaptiveConv2d  # same parameters and buffers, the naive forward
    return model


SURGERY: dict[str, Callable[[nn.Module], nn.Module]] = {
    "baseline": lambda model: model,
    "ours_first": lambda model: _ours_surgery(model, True),
    "ours_after": lambda model: _ours_surgery(model, False),
    "composer_first": lambda model: _composer_surgery(model, True),
    "composer_after": lambda model: _composer_surgery(model, False),
    "ours_paper": lambda model: _ours_surgery(model, True, placement="after_activation"),
    "aps_first": lambda model: _aps_surgery(model, True),
    "aps_naive": lambda model: _aps_surgery(model, True, naive=True),
    "aps_after": lambda model: _aps_surgery(model, False),
    "aps_circular": lambda model: _aps_surgery(model, True, circular=True),
}


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    arms: tuple[str, ...]
    device: str
    channels_last: bool
    compile: bool
    amp: bool
    inductor_cpu_threads: int | None
    batch_size: int
    image_size: int
    repeats: int
    layer_repeats: int
    per_layer: bool
    whole_model: bool


# ----------------------------------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    started = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - started


def _summary(seconds: Sequence[float]) -> dict[str, Any]:
    values = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(values), "min_ms": min(values), "values_ms": values}


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Times every run once per repetition, in a rotating order, after one warm-up call each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repetition in range(repeats):
        # Rotating the order keeps any arm from always running right after the same neighbour (caches, turbo).
        order = names[repetition % len(names) :] + names[: repetition % len(names)]
        for name in order:
            times[name].append(_timed(runs[name], device))
    return {name: _summary(values) for name, values in times.items()}


# ------------------------------------------------------------------------------------------------------ whole model


def _inputs(settings: Settings, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(settings.batch_size, 3, settings.image_size, settings.image_size, generator=generator)
    labels = torch.randint(0, 1000, (settings.batch_size,), generator=generator)
    if settings.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(device), labels.to(device)


def _prepare(model: nn.Module, settings: Settings, device: torch.device) -> nn.Module:
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast on ``device`` when ``amp`` (bf16 needs no loss scaling), else a disabled context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images, labels, amp: bool = False
) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(images.device, amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()  # outside autocast, as torch's AMP recipe has it: the backward runs in the forward's dtypes
        optimizer.step()

    return step


def _inference(model: nn.Module, images, amp: bool = False) -> Callable[[], None]:
    def forward() -> None:
        model.eval()
        with torch.inference_mode(), autocast(images.device, amp):
            model(images)
        model.train()

    return forward


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: bool = False) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one training forward.

    Parameters and buffers are left out: they exist whatever the batch. This is what a training step adds to memory on
    top of the model, measured exactly and without an allocator (CPU has none that reports a peak).
    """
    persistent = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in persistent:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast(images.device, amp):
        loss = F.cross_entropy(model(images), labels)
    del loss
    return sum(storages.values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The CUDA allocator's peak during ``step``, above what was allocated when it started."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_model(name: str, settings: Settings, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = build_model(name, num_classes=1000)
    images, labels = _inputs(settings, device)
    models = {arm: _prepare(SURGERY[arm](copy.deepcopy(reference)), settings, device) for arm in settings.arms}
    memory: dict[str, int] = {}
    train_runs: dict[str, Callable[[], None]] = {}
    inference_runs: dict[str, Callable[[], None]] = {}
    for arm, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        # Memory is measured eagerly: saved-tensor hooks see what autograd keeps; a compiled graph keeps the same.
        if device.type == "cuda":
            step = _train_step(model, optimizer, images, labels, settings.amp)
            step()
            memory[arm] = cuda_peak_bytes(step, device)
        else:
            memory[arm] = saved_activation_bytes(model, images, labels, settings.amp)
        runnable = torch.compile(model) if settings.compile else model
        train_runs[arm] = _train_step(runnable, optimizer, images, labels, settings.amp)
        inference_runs[arm] = _inference(runnable, images, settings.amp)
    train = interleaved(train_runs, settings.repeats, device)
    inference = interleaved(inference_runs, settings.repeats, device)
    return {
        arm: {"train_step": train[arm], "inference": inference[arm], "memory_bytes": memory[arm]}
        for arm in settings.arms
    }


# -------------------------------------------------------------------------------------------------------- per layer


def _maybe_compiled(module: nn.Module, settings: Settings) -> nn.Module:
    """The module itself, or with ``--compile`` the module compiled on its own (graph breaks allowed: Composer's have
    them), so that Inductor may fuse each layer's blur, padding and subsampling."""
    return torch.compile(module) if settings.compile else module


def _changed(original: nn.Module, module: nn.Module) -> bool:
    """Replaced by another class, or (the paper's placement) the same conv moved to another stride."""
    return type(original) is not type(module) or getattr(original, "stride", None) != getattr(module, "stride", None)


def _replaced_names(baseline: nn.Module, others: dict[str, nn.Module]) -> list[str]:
    """Names of modules that any arm changed, in the baseline's order."""
    baseline_modules = dict(baseline.named_modules())
    changed: set[str] = set()
    for model in others.values():
        for module_name, module in model.named_modules():
            original = baseline_modules.get(module_name)
            if original is not None and _changed(original, module):
                changed.add(module_name)
    return [module_name for module_name in baseline_modules if module_name in changed]


def _captured_inputs(
    model: nn.Module, names: list[str], images: torch.Tensor, amp: bool = False
) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[layer].register_forward_pre_hook(
            lambda _module, args, layer=layer: captured.setdefault(layer, args[0].detach().clone())
        )
        for layer in names
        if layer in modules
    ]
    try:
        with torch.no_grad(), autocast(images.device, amp):  # under AMP the layers see what autocast feeds them
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _layer_run(module: nn.Module, layer_input: torch.Tensor, calls: int, amp: bool = False) -> Callable[[], None]:
    """``calls`` forward + backward passes of ``module`` on a copy of ``layer_input``, with a fixed output gradient."""
    x = layer_input.clone().requires_grad_(True)
    with torch.no_grad(), autocast(x.device, amp):
        output_gradient = torch.randn_like(module(x))  # randn_like keeps the output's memory format (and dtype)

    def run() -> None:
        for _ in range(calls):
            for parameter in module.parameters():
                parameter.grad = None
            x.grad = None
            with autocast(x.device, amp):
                output = module(x)
            output.backward(output_gradient)

    return run


def _calls_per_sample(module: nn.Module, layer_input: torch.Tensor, device: torch.device, amp: bool = False) -> int:
    """How many passes make one timing sample last about ``SAMPLE_SECONDS`` (one pass is too short to time well)."""
    run = _layer_run(module, layer_input, 1, amp)
    run()
    single = min(_timed(run, device) for _ in range(3))
    return max(1, round(SAMPLE_SECONDS / max(single, 1e-6)))


def measure_layers(name: str, settings: Settings, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    reference = build_model(name, num_classes=1000)
    images, _ = _inputs(settings, device)
    baseline = _prepare(copy.deepcopy(reference), settings, device).train()
    blurred = {
        arm: _prepare(SURGERY[arm](copy.deepcopy(reference)), settings, device).train()
        for arm in settings.arms
        if arm != "baseline"
    }
    names = _replaced_names(baseline, blurred)
    # Each arm's layers get what that arm's own model feeds them: the paper's placement moves subsampling between
    # layers, so its layers see other shapes than the baseline's.
    inputs = {"original": _captured_inputs(baseline, names, images, settings.amp)}
    inputs.update({arm: _captured_inputs(model, names, images, settings.amp) for arm, model in blurred.items()})
    layers = []
    totals = {arm: 0.0 for arm in blurred}
    totals_of_minima = {arm: 0.0 for arm in blurred}
    for layer in names:
        candidates = {"original": dict(baseline.named_modules())[layer]}
        candidates.update({arm: dict(model.named_modules())[layer] for arm, model in blurred.items()})
        for module in candidates.values():
            for part in module.modules():
                if getattr(part, "inplace", False):
                    part.inplace = False  # an in-place activation cannot run on the timing's leaf input
        runnables = {key: _maybe_compiled(module, settings) for key, module in candidates.items()}
        calls = _calls_per_sample(runnables["original"], inputs["original"][layer], device, settings.amp)
        runs = {key: _layer_run(module, inputs[key][layer], calls, settings.amp) for key, module in runnables.items()}
        timings = {
            key: {k: v / calls if k != "values_ms" else [t / calls for t in v] for k, v in timing.items()}
            for key, timing in interleaved(runs, settings.layer_repeats, device).items()
        }
        original_ms = timings["original"]["median_ms"]
        original_min_ms = timings["original"]["min_ms"]
        entry = {
            "name": layer,
            "module": type(candidates["original"]).__name__,
            "input_shape": list(inputs["original"][layer].shape),
            "calls_per_sample": calls,
            "original_ms": original_ms,
            "original_min_ms": original_min_ms,
            "arms": {},
        }
        for arm in blurred:
            replaced = _changed(candidates["original"], candidates[arm])
            added = timings[arm]["median_ms"] - original_ms if replaced else 0.0
            added_min = timings[arm]["min_ms"] - original_min_ms if replaced else 0.0
            entry["arms"][arm] = {
                "ms": timings[arm]["median_ms"], "min_ms": timings[arm]["min_ms"], "added_ms": added,
                "added_min_ms": added_min, "replaced": replaced,
            }  # fmt: skip
            totals[arm] += added
            totals_of_minima[arm] += added_min
        layers.append(entry)
    return {"layers": layers, "added_ms": totals, "added_min_ms": totals_of_minima}


# ---------------------------------------------------------------------------------------------------------- output


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def model_table(name: str, arms: dict[str, Any]) -> str:
    baseline = arms.get("baseline")
    rows = [
        f"{name}: median ms (ratio to baseline)",
        f"  {'arm':<16}{'train step':>22}{'inference':>22}{'train memory MiB':>26}",
    ]
    for arm, result in arms.items():
        cells = []
        for key in ("train_step", "inference"):
            value = result[key]["median_ms"]
            ratio = _ratio(value, baseline[key]["median_ms"]) if baseline else float("nan")
            cells.append(f"{value:>12.1f} ({ratio:5.3f}x)")
        memory = result["memory_bytes"] / 2**20
        memory_ratio = _ratio(result["memory_bytes"], baseline["memory_bytes"]) if baseline else float("nan")
        cells.append(f"{memory:>16.1f} ({memory_ratio:5.3f}x)")
        rows.append(f"  {arm:<16}" + "".join(f"{cell:>22}" for cell in cells[:2]) + f"{cells[2]:>26}")
    return "\n".join(rows)


def layer_table(name: str, per_layer: dict[str, Any]) -> str:
    arms = list(per_layer["added_ms"])
    header = f"  {'layer':<22}{'input':>20}{'original':>10}" + "".join(f"{arm:>16}" for arm in arms)
    rows = [f"{name}: forward+backward per replaced layer, median ms (added over the original)", header]
    for entry in per_layer["layers"]:
        shape = "x".join(str(s) for s in entry["input_shape"])
        cells = "".join(
            f"{entry['arms'][arm]['ms']:>7.2f} ({entry['arms'][arm]['added_ms']:+5.2f})"
            if entry["arms"][arm]["replaced"]
            else f"{'-':>16}"
            for arm in arms
        )
        rows.append(f"  {entry['name']:<22}{shape:>20}{entry['original_ms']:>10.2f}{cells}")
    totals = "".join(f"{per_layer['added_ms'][arm]:>+16.2f}" for arm in arms)
    rows.append(f"  {'added, all layers':<52}{totals}")
    minima = "".join(f"{per_layer['added_min_ms'][arm]:>+16.2f}" for arm in arms)
    rows.append(f"  {'the same from the min times':<52}{minima}")
    return "\n".join(rows)


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, on whatever ResNet-50 results there are; each with its numbers and verdict."""
    checks = []
    resnet = results.get("resnet50", {})
    added = resnet.get("per_layer", {}).get("added_ms", {})
    minima = resnet.get("per_layer", {}).get("added_min_ms", added)
    for ours, builtin, factor, wording in (
        ("ours_first", "composer_first", 0.5, "half of composer_first's"),
        ("ours_after", "composer_after", 1.0, "composer_after's"),
    ):
        if {ours, builtin} <= set(added):
            checks.append({
                "target": f"{ours} added layer time <= {wording}",
                "ours_ms": added[ours], "composer_ms": added[builtin],
                "ratio_of_min_times": _ratio(minima[ours], minima[builtin]),
                "ratio": _ratio(added[ours], added[builtin]),
                "met": added[ours] <= factor * added[builtin],
            })  # fmt: skip
    arms = resnet.get("arms", {})
    for ours, builtin in (("ours_first", "composer_first"), ("ours_after", "composer_after")):
        if ours in arms and builtin in arms:
            mine, theirs = arms[ours]["memory_bytes"], arms[builtin]["memory_bytes"]
            checks.append({
                "target": f"{ours} training memory <= {builtin}'s",
                "ours_bytes": mine, "composer_bytes": theirs, "ratio": _ratio(mine, theirs), "met": mine <= theirs,
            })  # fmt: skip
    return checks


def _environment(device: torch.device) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "composer": composer.__version__ if composer is not None else None,
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ------------------------------------------------------------------------------------------------------------- CLI


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def check_device(text: str) -> torch.device:
    """``--device`` as a torch device: the CPU, or a CUDA device that this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise fail("--device", "cpu, cuda or cuda:N", text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("--device", "cpu", text, hint="no CUDA device is available here")
    return device


def check_options(args: argparse.Namespace) -> torch.device:
    """Refuses, before any work, options that would measure nothing or noise; returns the device."""
    if not args.models:
        raise fail("--models", "a comma-separated list of torchvision classification model names", "")
    unknown = [model for model in args.models if model not in model_names()]
    if unknown:
        raise ValueError(f"--models: {unknown_model_message(unknown[0])}")  # the models' own rule and close names
    if not args.arms:
        raise fail("--arms", f"a comma-separated list from {', '.join(ARMS)}", "")
    for arm in args.arms:
        check_choice("--arms", arm, tuple(ARMS))
        if arm not in AVAILABLE_ARMS:
            raise fail("--arms", f"one of {', '.join(AVAILABLE_ARMS)}", arm, hint="Composer is not installed here")
    for flag, value in (("--repeats", args.repeats), ("--layer-repeats", args.layer_repeats)):
        check_int(flag, value, minimum=MIN_REPEATS, hint="medians of fewer are noise")
    check_int("--batch-size", args.batch_size, minimum=1)
    check_int("--image-size", args.image_size, minimum=MIN_IMAGE_SIZE, hint="ImageNet models subsample by 32")
    if args.inductor_cpu_threads is not None:
        check_int("--inductor-cpu-threads", args.inductor_cpu_threads, minimum=1)
        if not args.compile:
            raise fail("--inductor-cpu-threads", "left out without --compile", args.inductor_cpu_threads)
    if not (args.per_layer or args.whole_model):
        raise ValueError("--no-per-layer and --no-whole-model together leave nothing to measure")
    return check_device(args.device)


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_csv, default=DEFAULT_MODELS, help="comma-separated torchvision model names")
    parser.add_argument(
        "--arms", type=_csv, default=AVAILABLE_ARMS, help=f"comma-separated, from {', '.join(AVAILABLE_ARMS)}"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=False,
        help="bf16 autocast around every forward (the inputs the layers are timed on are captured under it too)",
    )  # fmt: skip
    parser.add_argument(
        "--inductor-cpu-threads", type=int, default=None,
        help="threads of Inductor's generated CPU kernels (default: Inductor's own); torch 2.7.0 fails to compile "
        "ResNet-50's batch-norm backward on CPU with more than 1",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=7, help=f"whole-model repetitions, >= {MIN_REPEATS}")
    parser.add_argument("--layer-repeats", type=int, default=21, help=f"per-layer repetitions, >= {MIN_REPEATS}")
    parser.add_argument("--per-layer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--whole-model", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, help="also write every number here (atomically)")
    args = parser.parse_args(argv)
    try:
        device = check_options(args)
    except ValueError as error:
        parser.error(str(error))  # exits with code 2, the usage line above the message
    arms = args.arms if "baseline" in args.arms else ("baseline", *args.arms)
    settings = Settings(
        models=args.models, arms=arms, device=str(device), channels_last=args.channels_last, compile=args.compile,
        amp=args.amp,
        inductor_cpu_threads=args.inductor_cpu_threads, batch_size=args.batch_size, image_size=args.image_size,
        repeats=args.repeats, layer_repeats=args.layer_repeats, per_layer=args.per_layer, whole_model=args.whole_model,
    )  # fmt: skip
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_settings(argv)
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if settings.compile:
        # Every arm and layer compiles the same forward code with other shapes and modules; past the default limit
        # of 8 recompilations per code object, dynamo would silently run the rest eagerly.
        torch._dynamo.config.cache_size_limit = 512
        torch._dynamo.config.accumulated_cache_size_limit = 4096
        if settings.inductor_cpu_threads is not None:
            from torch._inductor import config as inductor_config  # Inductor loaded only for --compile

            inductor_config.cpp.threads = settings.inductor_cpu_threads
    environment = _environment(device)
    print(
        f"{environment['processor']}, {environment['torch_threads']} threads"
        + (f", {environment['gpu']}" if "gpu" in environment else "")
        + f"; torch {environment['torch']}, composer {environment['composer']}; device {settings.device}, "
        f"channels_last={settings.channels_last}, compile={settings.compile}, amp={settings.amp}"
        + (f" (Inductor CPU threads {settings.inductor_cpu_threads})" if settings.inductor_cpu_threads else "")
        + f", batch {settings.batch_size} at "
        f"{settings.image_size} px, repeats {settings.repeats} (layers {settings.layer_repeats})",
        flush=True,
    )
    results: dict[str, Any] = {}
    for name in settings.models:
        results[name] = {}
        if settings.whole_model:
            results[name]["arms"] = measure_model(name, settings, device)
            print("\n" + model_table(name, results[name]["arms"]), flush=True)
        if settings.per_layer:
            results[name]["per_layer"] = measure_layers(name, settings, device)
            print("\n" + layer_table(name, results[name]["per_layer"]), flush=True)
    targets = check_targets(results)
    if targets:
        print("\ntargets (ResNet-50):")
        for check in targets:
            from_minima = (
                f" (from the min times: {check['ratio_of_min_times']:.3f})" if "ratio_of_min_times" in check else ""
            )
            verdict = "met    " if check["met"] else "NOT MET"
            print(f"  {verdict}  {check['target']}: ratio {check['ratio']:.3f}{from_minima}")
    if json_path is not None:
        payload = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "settings": settings.__dict__,
            "arms": {arm: ARMS[arm] for arm in settings.arms},
            "environment": environment,
            "results": results,
            "targets": targets,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(json_path, payload)
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
