"""Train and evaluate a recipe.

    python run.py -f yamls/quickstart_blurpool.yaml [key=value ...]
    composer -n 8 run.py -f yamls/resnet50_blurpool.yaml data.root=/data/imagenet
    python -m blurpool_algo.train -f ...   (the same, where the repository's run.py is not at hand)

All the work lives in blurpool_algo.config; this module only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--file", required=True, help="recipe YAML, e.g. yamls/quickstart_blurpool.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/imagenet seed=3")
    parser.add_argument("--summary-json", help="also write the run's summary (with its history) to this JSON file")
    parser.add_argument(
        "--diagonal-stability", action="store_true", help="measure the diagonal stability curve after training"
    )
    # Intermixed: overrides may come before or after the flags.
    args = parser.parse_intermixed_args(argv)

    from composer.utils import dist

    from blurpool_algo.config import RecipeError, load_recipe, run_recipe, write_summary_json

    try:
        recipe = load_recipe(args.file, args.overrides)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = run_recipe(recipe, stability=args.diagonal_stability)
    if dist.get_global_rank() == 0:
        if args.summary_json:
            write_summary_json(summary, args.summary_json)
        print(f"\nsummary: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
