"""Evaluate a checkpoint: top-1, crop and circular shift consistency, and the diagonal stability plot.

    python -m blurpool_algo.evaluate -f yamls/quickstart_blurpool.yaml load_path=runs/x/checkpoints/latest-rank0.pt
    composer -n 8 -m blurpool_algo.evaluate -f yamls/resnet50_blurpool.yaml load_path=ep90.pt data.root=/data/imagenet

The recipe gives the model (with its algorithms, so a BlurPool checkpoint gets its blurred layers), the data and the
precision; the checkpoint's weights must match that model exactly. The shift protocol defaults to the recipe's
shift_consistency_monitor options, else the dataset's own (its spec's defaults). The work is evaluate_recipe's;
main only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from composer.core.precision import get_precision_context
from composer.utils import dist

from blurpool_algo import checks
from blurpool_algo.callbacks import network_of
from blurpool_algo.files import write_json_atomically
from blurpool_algo.metrics import (
    ConsistencyProtocol,
    DiagonalStability,
    NonFiniteLogitsError,
    diagonal_stability,
    plot_diagonal_stability,
    shift_consistency,
)
from blurpool_algo.recipe import Recipe, RecipeError, load_recipe, recipe_parts
from blurpool_algo.recipe_checks import checked
from blurpool_algo.recipe_checks import consistency_protocol as checked_protocol
from blurpool_algo.train import TRUST_FLAG_HELP
from blurpool_algo.trainer import build_trainer, consistency_loader, top1_accuracy

__all__ = ["Evaluation", "consistency_protocol", "evaluate_recipe", "main"]


@dataclass
class Evaluation:
    """What :func:`evaluate_recipe` measured for a checkpoint (percentages; the same on every rank)."""

    checkpoint: str
    accuracy: float
    crop_consistency: float
    circular_consistency: float
    max_shift: int
    crop_size: int
    seed: int
    num_images: int
    stability: DiagonalStability
    plot: str | None = None

    def __str__(self) -> str:
        curve = self.stability
        return "\n".join(
            [
                f"checkpoint: {self.checkpoint}",
                f"top-1 accuracy: {self.accuracy:.2f} %",
                f"crop consistency: {self.crop_consistency:.2f} % ({self.crop_size} px crops, offsets in "
                f"[0, {self.max_shift}), seed {self.seed}, {self.num_images} images)",
                f"circular consistency: {self.circular_consistency:.2f} % (shifts in [-{self.max_shift}, "
                f"{self.max_shift}))",
                f"diagonal stability: accuracy {min(curve.accuracy):.2f}..{max(curve.accuracy):.2f} %, "
                f"P(true class) {min(curve.true_class_probability):.3f}..{max(curve.true_class_probability):.3f} "
                f"over offsets 0..{self.max_shift}",
                *([f"plot: {self.plot}"] if self.plot else []),
            ]
        )


def _flag(name: str, value: int | None, minimum: int, *, allow_none: bool = False) -> None:
    """A command-line option of the evaluation, checked; a refusal names the flag (``--num-batches``)."""
    flag = "--" + name.replace("_", "-")
    try:
        checked(flag, checks.check_int, value, minimum=minimum, allow_none=allow_none)
    except RecipeError as error:
        raise error.with_source("command line") from None


#: The protocol fields the evaluation takes as command-line flags (its mode is always crop), for naming a refusal.
_PROTOCOL_FLAGS = {"max_shift": "--max-shift", "crop_size": "--crop-size"}


def consistency_protocol(
    recipe: Recipe, max_shift: int | None = None, crop_size: int | None = None
) -> ConsistencyProtocol:
    """The crop protocol for measuring a recipe's model: given values, else the recipe's ``shift_consistency_monitor``
    options, else the dataset's defaults."""
    parts = recipe_parts(recipe)
    monitor = [part for part in parts.callbacks if part.key == "callbacks.shift_consistency_monitor"]
    options = monitor[0].options if monitor else {}
    try:
        return checked_protocol(
            _PROTOCOL_FLAGS,
            parts.dataset,
            parts.data_options,
            max_shift=options.get("max_shift") if max_shift is None else max_shift,
            crop_size=options.get("crop_size") if crop_size is None else crop_size,
        )
    except RecipeError as error:
        raise error.with_source("command line") from None


def evaluate_recipe(
    recipe: Recipe,
    *,
    out: str | os.PathLike[str] | None = None,
    max_shift: int | None = None,
    crop_size: int | None = None,
    num_batches: int | None = None,
    seed: int = 0,
    step: int = 1,
) -> Evaluation:
    """Top-1, crop and circular consistency and the diagonal stability curve of ``recipe.load_path``.

    The model is the recipe's (its algorithms applied, so a BlurPool checkpoint gets its blurred layers), and the
    checkpoint's weights must match it exactly. Consistency uses the validation set prepared at
    ``crop_size + max_shift`` (the dataset spec's consistency loader). Runs on every rank; rank 0 writes
    ``evaluation.json`` and ``diagonal_stability.png`` to ``out`` (each whole or not at all).

    Raises:
        RecipeError: a bad option (named as its command-line flag), no checkpoint, or one the checkpoint gate refuses
            (unreadable, incomplete, unsafe, or weights that do not fit the recipe's model).
    """
    _flag("num_batches", num_batches, 1, allow_none=True)
    _flag("step", step, 1)
    _flag("seed", seed, 0)
    if not recipe.load_path:
        raise RecipeError("load_path", "evaluation needs a checkpoint: add load_path=/path/to/checkpoint.pt")
    protocol = consistency_protocol(recipe, max_shift, crop_size)
    max_shift, crop_size = protocol.max_shift, protocol.crop_size
    if out is not None:
        os.makedirs(out, exist_ok=True)
    # The checkpoint gate makes the load strict and safe; its refusals are RecipeErrors naming load_path.
    trainer = build_trainer(recipe)
    try:
        accuracy = top1_accuracy(trainer)
        loader = consistency_loader(recipe, protocol)
        network = network_of(trainer.state.model)
        common = {"max_shift": max_shift, "crop_size": crop_size, "num_batches": num_batches}
        with get_precision_context(trainer.state.precision, trainer.state.precision_config):
            crop = shift_consistency(network, loader, mode="crop", seed=seed, **common)
            circular = shift_consistency(network, loader, mode="circular", seed=seed, **common)
            stability = diagonal_stability(network, loader, step=step, **common)
    except NonFiniteLogitsError as error:
        raise RecipeError("load_path", f"{recipe.load_path} holds a diverged model: {error}") from None
    finally:
        trainer.close()
    evaluation = Evaluation(
        checkpoint=recipe.load_path,
        accuracy=accuracy,
        crop_consistency=crop,
        circular_consistency=circular,
        max_shift=max_shift,
        crop_size=crop_size,
        seed=seed,
        num_images=stability.num_images,
        stability=stability,
    )
    if out is not None and dist.get_global_rank() == 0:
        label = os.path.splitext(os.path.basename(recipe.load_path))[0]
        evaluation.plot = str(plot_diagonal_stability({label: stability}, os.path.join(out, "diagonal_stability.png")))
        payload = {key: value for key, value in vars(evaluation).items() if key != "stability"}
        payload["diagonal_stability"] = vars(stability)
        write_json_atomically(os.path.join(out, "evaluation.json"), payload)
    return evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blurpool_algo.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-f", "--file", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("overrides", nargs="*", help="dotted overrides; load_path=CHECKPOINT is required")
    parser.add_argument("--out", help="folder for evaluation.json and diagonal_stability.png (default: none written)")
    parser.add_argument("--max-shift", type=int, help="shift range in pixels (default: the recipe's protocol)")
    parser.add_argument("--crop-size", type=int, help="crop side in pixels (default: the recipe's protocol)")
    parser.add_argument("--num-batches", type=int, help="batches per rank to measure (default: the whole val set)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random shifts (default 0)")
    parser.add_argument("--step", type=int, default=1, help="offset step of the diagonal stability curve (default 1)")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_FLAG_HELP)
    # Intermixed: overrides may come before or after the flags.
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *(["trust_checkpoint=true"] if args.trust_checkpoint else [])]
    options = {name: getattr(args, name) for name in ("out", "max_shift", "crop_size", "num_batches", "seed", "step")}
    try:
        evaluation = evaluate_recipe(load_recipe(args.file, overrides), **options)
    except RecipeError as error:
        print(f"error: {error.located(args.file, overrides)}", file=sys.stderr)
        return 2
    if dist.get_global_rank() == 0:
        print(f"\n{evaluation}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
