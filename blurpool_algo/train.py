"""Train and evaluate a recipe.

    python run.py -f yamls/quickstart_blurpool.yaml [key=value ...]
    composer -n 8 run.py -f yamls/resnet50_blurpool.yaml data.root=/data/imagenet
    python -m blurpool_algo.train -f ...   (the same, where the repository's run.py is not at hand)

Exit codes: 0 trained; 3 trained to the end but diverged (NaN or infinite outputs: the summary says so and reports
no accuracy or consistency); 2 the recipe or a checkpoint was refused before any training (one line on stderr); 1 the
run failed (a full disk gets one line saying how to resume). The work lives in blurpool_algo.recipe and
blurpool_algo.trainer; this module only parses arguments and reports.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys

#: The exit code of a run that trained to the end but diverged (non-finite outputs); its summary says so.
DIVERGED_EXIT = 3
#: Set for a run's process: it then dies with its parent (the A/B runner sets it, so a launcher's ranks die with
#: the launcher, and the launcher with the runner).
DIE_WITH_PARENT_ENV = "BLURPOOL_ALGO_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

#: The flag that opts in to unpickling a checkpoint the user trusts (the recipe key ``trust_checkpoint``).
TRUST_FLAG_HELP = (
    "unpickle checkpoints without the safe loader's allowlist (same as trust_checkpoint=true): only for files you trust"
)


def die_with_parent(parent: int) -> None:
    """Asks Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``), then checks the parent
    is still ``parent`` (it may have died before the request). A no-op outside Linux.

    A SIGKILL of the A/B runner reaches no handler of its; with this, the run it started dies with it instead of
    training on unseen beside the run a rerun starts.
    """
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get(DIE_WITH_PARENT_ENV):
        die_with_parent(os.getppid())  # under a launcher, the parent is the launcher, which dies with the runner
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-f", "--file", required=True, help="recipe YAML, e.g. yamls/quickstart_blurpool.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/data/imagenet seed=3")
    parser.add_argument("--summary-json", help="also write the run's summary (with its history) to this JSON file")
    parser.add_argument(
        "--diagonal-stability", action="store_true", help="measure the diagonal stability curve after training"
    )
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_FLAG_HELP)
    # Intermixed: overrides may come before or after the flags.
    args = parser.parse_intermixed_args(argv)
    overrides = [*args.overrides, *(["trust_checkpoint=true"] if args.trust_checkpoint else [])]

    # Imported here, not at the top: the request to die with the parent above must come before the seconds that
    # importing Composer and torch take (the runner may be killed meanwhile), and `--help` stays instant.
    from composer.utils import dist

    from blurpool_algo.recipe import RecipeError, load_recipe
    from blurpool_algo.summary import write_summary_json
    from blurpool_algo.trainer import full_disk_explanation, run_recipe

    try:
        recipe = load_recipe(args.file, overrides)
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = run_recipe(recipe, stability=args.diagonal_stability)
    except RecipeError as error:
        print(f"error: {error.located(args.file, overrides)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:
        full = full_disk_explanation(recipe, error)
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 1
    if dist.get_global_rank() == 0:
        if args.summary_json:
            write_summary_json(summary, args.summary_json)
        print(f"\nsummary: {summary}", flush=True)
    return DIVERGED_EXIT if summary.diverged else 0


if __name__ == "__main__":
    sys.exit(main())
