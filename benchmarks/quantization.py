"""What int8 quantization costs a blurred model in accuracy: top-1 of the float model, its FX-quantized and its
PT2E-quantized versions on the quickstart's evaluation digits.

    python benchmarks/quantization.py --train                         # train the conv and paper arms, then measure
    python benchmarks/quantization.py --checkpoint conv=runs/q/conv/latest-rank0.pt --arms conv
    python benchmarks/quantization.py --train --arms baseline,conv,aps,paper --json runs/quantization.json
    python benchmarks/quantization.py --train max_duration=1ep        # overrides go to every arm's recipe

Arms (the quickstart's resnet10 on the embedded mnist5k digits): ``conv`` is ``yamls/quickstart_blurpool.yaml`` (the
conv placement, Composer's defaults), ``paper`` the same recipe in the paper's placement (``after_activation``, the
4-tap filter, reflect padding), ``aps`` ``yamls/quickstart_aps.yaml`` (adaptive sampling, circular padding) and
``baseline`` ``yamls/quickstart_baseline.yaml`` (no blur: how much quantization costs without one).

Each arm's float model is the recipe's network with its BlurPool surgery, loaded strictly from a checkpoint through
:func:`blurpool_algo.models.load_weights` (the safe unpickler of the checkpoint gate; a Composer checkpoint or a
state dict). ``--checkpoint ARM=PATH`` names one; ``--train`` trains the arms without one (``run_recipe`` with
``autoresume``, checkpoints in ``--train-dir/<arm>``: a rerun reuses a finished run). Both flows calibrate on the same
``--calibration-images`` training images (augmented as in training, drawn with ``--seed``):

* ``fx``: ``prepare_fx`` / ``convert_fx`` with torch's x86 default qconfig mapping (per-channel int8 weights,
  activations observed by histogram), circularly padded ``nn.Conv2d`` left in float (torch's quantized conv refuses
  that padding); runs torch's int8 kernels.
* ``pt2e``: ``torch.export.export_for_training`` (dynamic batch) + ``prepare_pt2e`` / ``convert_pt2e`` with the
  ``X86InductorQuantizer``'s default config; the converted graph computes the int8 numerics with quantize /
  dequantize ops (what ``torch.compile`` lowers to int8 kernels).

Reported per arm and flow: top-1, the difference to float, the share of evaluation images whose predicted class
matches the float model's, the quantized convs, and the seconds the flow took. A flow that fails is reported with its
error and the script exits 1; bad flags exit 2 with a one-line error. ``--json`` writes everything, atomically.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.ao.quantization.quantizer.x86_inductor_quantizer as x86_inductor
from torch import nn
from torch.ao.quantization import QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
from torch.utils.data import DataLoader, Dataset, Subset

from blurpool_algo.checks import check_choice, check_int, fail
from blurpool_algo.files import write_json_atomically
from blurpool_algo.models import build_model, load_weights
from blurpool_algo.recipe import Recipe, RecipeError, load_recipe, recipe_parts
from blurpool_algo.surgery import apply_blurpool_options
from blurpool_algo.trainer import run_recipe

ROOT = Path(__file__).resolve().parent.parent
#: The paper's placement, filter and padding, as overrides of the quickstart's BlurPool recipe.
PAPER_OVERRIDES = (
    "algorithms.blurpool.placement=after_activation",
    "algorithms.blurpool.filter_size=4",
    "algorithms.blurpool.pad_mode=reflect",
)
#: Arm -> (recipe file, overrides that make the arm from it).
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "baseline": ("yamls/quickstart_baseline.yaml", ()),
    "conv": ("yamls/quickstart_blurpool.yaml", ()),
    "aps": ("yamls/quickstart_aps.yaml", ()),
    "paper": ("yamls/quickstart_blurpool.yaml", PAPER_OVERRIDES),
}
DEFAULT_ARMS = ("conv", "paper")
FLOWS = ("fx", "pt2e")
#: The checkpoint name Composer keeps pointing at a run's latest checkpoint (rank 0).
LATEST = "latest-rank0.pt"
#: Calibration batch size: the observers see the calibration images in batches of this many.
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class Settings:
    arms: tuple[str, ...]
    flows: tuple[str, ...]
    checkpoints: dict[str, str]
    train: bool
    train_dir: Path
    calibration_images: int
    seed: int
    threads: int | None
    overrides: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ the float model


def arm_recipe(arm: str, overrides: Sequence[str], extra: Sequence[str] = ()) -> Recipe:
    path, own = ARMS[arm]
    return load_recipe(ROOT / path, [*own, *overrides, *extra])


def float_model(recipe: Recipe, checkpoint: str | Path) -> nn.Module:
    """The recipe's network with its BlurPool surgery, loaded strictly from ``checkpoint`` (safe unpickling)."""
    torch.manual_seed(recipe.seed)
    network = build_model(recipe.model.name, num_classes=recipe.model.num_classes)
    blurpool = [part for part in recipe_parts(recipe).algorithms if part.key == "algorithms.blurpool"]
    if blurpool:
        # The options the recipe validated; exclude patterns are relative to the network, as in training.
        apply_blurpool_options(network, blurpool[0].build().options)
    return load_weights(network, checkpoint).eval()


def train_arm(arm: str, settings: Settings) -> Path:
    """Trains the arm's recipe into ``train_dir/<arm>`` (resuming, or skipping a finished run) and returns the
    latest checkpoint."""
    folder = settings.train_dir / arm
    extra = [f"save_folder={folder}", f"run_name=quantization-{arm}", "autoresume=true", "progress_bar=false"]
    summary = run_recipe(arm_recipe(arm, settings.overrides, extra))
    if summary.diverged:
        raise RuntimeError(f"{arm}: training diverged at batch {summary.diverged_at_batch}")
    print(f"{arm}: trained, top-1 {summary.accuracy:.2f} % ({summary.wall_time:.0f} s)", flush=True)
    return folder / LATEST


# ---------------------------------------------------------------------------------------------------- the data


def calibration_batches(recipe: Recipe, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` training images (drawn and augmented with ``seed``), in batches of :data:`CALIBRATION_BATCH`."""
    parts = recipe_parts(recipe)
    train, _ = parts.dataset.datasets(parts.data_options, eval_batch_size=recipe.eval_batch_size)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(train), generator=generator)[:count].tolist()
    torch.manual_seed(seed)  # the training augmentation draws from the global generator
    loader = DataLoader(Subset(train, indices), batch_size=CALIBRATION_BATCH)
    return [images for images, _ in loader]


def evaluation_set(recipe: Recipe) -> Dataset:
    parts = recipe_parts(recipe)
    return parts.dataset.datasets(parts.data_options, eval_batch_size=recipe.eval_batch_size)[1]


def predictions(model: nn.Module, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, labels) over ``dataset``."""
    predicted, labels = [], []
    with torch.no_grad():
        for images, targets in DataLoader(dataset, batch_size=batch_size):
            predicted.append(model(images).argmax(dim=1))
            labels.append(torch.as_tensor(targets))
    return torch.cat(predicted), torch.cat(labels)


# --------------------------------------------------------------------------------------------------- the flows


def fx_qconfig_mapping(model: nn.Module) -> QConfigMapping:
    """x86's default mapping with circularly padded ``nn.Conv2d`` and ``nn.Conv1d`` left in float (torch's quantized
    conv modules refuse ``padding_mode='circular'``; the blur layers pad in their forward and need nothing)."""
    mapping = get_default_qconfig_mapping("x86")
    for name, module in model.named_modules():
        if type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "circular":
            mapping.set_module_name(name, None)
    return mapping


def fx_quantize(model: nn.Module, batches: list[torch.Tensor]) -> tuple[nn.Module, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices for the FX flow
        prepared = prepare_fx(copy.deepcopy(model), fx_qconfig_mapping(model), (batches[0],))
        with torch.no_grad():
            for batch in batches:
                prepared(batch)
        quantized = convert_fx(prepared)
    functional = (torch.ops.quantized.conv2d, torch.ops.quantized.conv2d_relu)
    convs = sum(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in quantized.modules())
    return quantized, convs + sum(node.target in functional for node in quantized.graph.nodes)


def pt2e_quantize(model: nn.Module, batches: list[torch.Tensor]) -> tuple[nn.Module, int]:
    quantizer = x86_inductor.X86InductorQuantizer()
    quantizer.set_global(x86_inductor.get_default_x86_inductor_quantization_config())
    # A dynamic batch: the calibration and evaluation batches differ in size.
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export_for_training(
            copy.deepcopy(model), (batches[0],), dynamic_shapes=({0: batch},)
        ).module()
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for images in batches:
                prepared(images)
        quantized = convert_pt2e(prepared)
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    convs = [node for node in quantized.graph.nodes if node.target == torch.ops.aten.conv2d.default]
    return quantized, sum(node.args[1].target == dequantize for node in convs)


QUANTIZE: dict[str, Callable[[nn.Module, list[torch.Tensor]], tuple[nn.Module, int]]] = {
    "fx": fx_quantize,
    "pt2e": pt2e_quantize,
}


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def top1(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((predicted == labels).float().mean())


def measure_arm(arm: str, checkpoint: Path, settings: Settings) -> dict[str, Any]:
    recipe = arm_recipe(arm, settings.overrides)
    model = float_model(recipe, checkpoint)
    batches = calibration_batches(recipe, settings.calibration_images, settings.seed)
    dataset = evaluation_set(recipe)
    reference, labels = predictions(model, dataset, recipe.eval_batch_size)
    result: dict[str, Any] = {
        "recipe": ARMS[arm][0],
        "overrides": [*ARMS[arm][1], *settings.overrides],
        "checkpoint": str(checkpoint),
        "evaluation_images": len(labels),
        "float": {"top1": top1(reference, labels)},
    }
    print(f"{arm}: float top-1 {result['float']['top1']:.2f} % on {len(labels)} images", flush=True)
    for flow in settings.flows:
        started = time.perf_counter()
        try:
            quantized, convs = QUANTIZE[flow](model, batches)
            predicted, _ = predictions(quantized, dataset, recipe.eval_batch_size)
        except Exception as error:  # a flow torch cannot run on this model is a result, not the end of the run
            result[flow] = {"error": one_line(error)}
            print(f"{arm}: {flow} FAILED: {result[flow]['error']}", flush=True)
            continue
        accuracy = top1(predicted, labels)
        result[flow] = {
            "top1": accuracy,
            "top1_change": accuracy - result["float"]["top1"],
            "agreement": 100.0 * float((predicted == reference).float().mean()),
            "quantized_convs": convs,
            "seconds": time.perf_counter() - started,
        }
        print(
            f"{arm}: {flow} top-1 {accuracy:.2f} % ({result[flow]['top1_change']:+.2f}), same class as float on "
            f"{result[flow]['agreement']:.2f} %, {convs} int8 convs, {result[flow]['seconds']:.1f} s",
            flush=True,
        )
    return result


def table(results: dict[str, dict[str, Any]], flows: Sequence[str]) -> str:
    header = f"{'arm':<10}{'float':>9}" + "".join(f"{flow:>18}{'agree':>9}" for flow in flows)
    rows = ["top-1 % on the evaluation set (change to float); agree: same class as float, %", header]
    for arm, result in results.items():
        cells = f"{arm:<10}{result['float']['top1']:>9.2f}"
        for flow in flows:
            entry = result[flow]
            if "error" in entry:
                cells += f"{'failed':>18}{'-':>9}"
            else:
                cells += f"{entry['top1']:>9.2f} ({entry['top1_change']:+5.2f}){entry['agreement']:>9.2f}"
        rows.append(cells)
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------------------- CLI


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def check_settings(args: argparse.Namespace) -> Settings:
    """Refuses, before any work, flags that name nothing or leave an arm without weights."""
    if not args.arms:
        raise fail("--arms", f"a comma-separated list from {', '.join(ARMS)}", "")
    for arm in args.arms:
        check_choice("--arms", arm, tuple(ARMS))
    if not args.flows:
        raise fail("--flows", f"a comma-separated list from {', '.join(FLOWS)}", "")
    for flow in args.flows:
        check_choice("--flows", flow, FLOWS)
    checkpoints: dict[str, str] = {}
    for item in args.checkpoint:
        arm, _, path = item.partition("=")
        if not path:
            raise fail("--checkpoint", "ARM=PATH", item)
        check_choice("--checkpoint", arm, args.arms, hint="an arm given in --arms")
        if arm in checkpoints:
            raise fail("--checkpoint", "one file per arm", item, hint=f"{arm} has two")
        if not Path(path).is_file():
            raise fail("--checkpoint", "an existing checkpoint file", item)
        checkpoints[arm] = path
    missing = [arm for arm in args.arms if arm not in checkpoints]
    if missing and not args.train:
        raise fail("--checkpoint", "ARM=PATH for every arm, or --train", f"none for {', '.join(missing)}")
    check_int("--calibration-images", args.calibration_images, minimum=1)
    check_int("--seed", args.seed, minimum=0)
    if args.threads is not None:
        check_int("--threads", args.threads, minimum=1)
    bad = [item for item in args.overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise fail("overrides", "key=value (e.g. max_duration=2ep)", bad[0])
    return Settings(
        arms=args.arms, flows=args.flows, checkpoints=checkpoints, train=args.train, train_dir=args.train_dir,
        calibration_images=args.calibration_images, seed=args.seed, threads=args.threads,
        overrides=tuple(args.overrides),
    )  # fmt: skip


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", type=_csv, default=DEFAULT_ARMS, help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--flows", type=_csv, default=FLOWS, help=f"comma-separated, from {', '.join(FLOWS)}")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="ARM=PATH", help="an arm's weights")
    parser.add_argument("--train", action="store_true", help="train the arms that have no --checkpoint")
    parser.add_argument("--train-dir", type=Path, default=Path("runs/quantization"), help="checkpoints of --train")
    parser.add_argument("--calibration-images", type=int, default=512, help="training images the observers see")
    parser.add_argument("--seed", type=int, default=0, help="draws the calibration images")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write every number here (atomically)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every arm's recipe")
    args = parser.parse_intermixed_args(argv)
    try:
        settings = check_settings(args)
        for arm in settings.arms:  # every recipe loads (names, files, data) before anything trains
            arm_recipe(arm, settings.overrides)
    except (ValueError, RecipeError) as error:
        parser.error(str(error).splitlines()[0])  # exits with code 2, the usage line above the message
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> int:
    settings, json_path = parse_settings(argv)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; arms {', '.join(settings.arms)}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for arm in settings.arms:
        checkpoint = Path(settings.checkpoints[arm]) if arm in settings.checkpoints else train_arm(arm, settings)
        results[arm] = measure_arm(arm, checkpoint, settings)
    print("\n" + table(results, settings.flows))
    if json_path is not None:
        payload = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "settings": {**settings.__dict__, "train_dir": str(settings.train_dir)},
            "environment": {
                "python": platform.python_version(), "torch": torch.__version__,
                "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
            },
            "results": results,
        }  # fmt: skip
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(json_path, payload)
        print(f"\nwrote {json_path}")
    failed = [f"{arm}/{flow}" for arm, result in results.items() for flow in settings.flows if "error" in result[flow]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
