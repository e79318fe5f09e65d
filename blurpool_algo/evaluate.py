"""Evaluate a checkpoint: top-1, crop and circular shift consistency, and the diagonal stability plot.

    python -m blurpool_algo.evaluate -f yamls/quickstart_blurpool.yaml load_path=runs/x/checkpoints/latest-rank0.pt
    composer -n 8 -m blurpool_algo.evaluate -f yamls/resnet50_blurpool.yaml load_path=ep90.pt data.root=/data/imagenet

The recipe gives the model (with its algorithms, so a BlurPool checkpoint gets its blurred layers), the data and the
precision; the checkpoint's weights must match that model exactly. The shift protocol defaults to the recipe's
shift_consistency_monitor options (ImageNet: 224 px crops, shifts up to 32). All the work lives in
blurpool_algo.config; this file only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import sys

from blurpool_algo.train import TRUST_FLAG_HELP


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

    from composer.utils import dist

    from blurpool_algo.config import RecipeError, evaluate_recipe, load_recipe

    try:
        recipe = load_recipe(args.file, overrides)
        for flag in ("num_batches", "step"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise RecipeError(f"--{flag.replace('_', '-')}", f"must be >= 1, got {value}", "command line")
        if args.seed < 0:
            raise RecipeError("--seed", f"must be >= 0, got {args.seed}", "command line")
        evaluation = evaluate_recipe(
            recipe,
            out=args.out,
            max_shift=args.max_shift,
            crop_size=args.crop_size,
            num_batches=args.num_batches,
            seed=args.seed,
            step=args.step,
        )
    except RecipeError as error:
        print(f"error: {error.located(args.file, overrides)}", file=sys.stderr)
        return 2
    if dist.get_global_rank() == 0:
        print(f"\n{evaluation}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
