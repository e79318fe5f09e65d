"""What an A/B/n is before anything runs: the arms (a name and a recipe each, the first the reference), every
recipe resolved with the overrides, the seeds, where it goes, and the fingerprint a rerun must match to resume it.

:func:`make_plan` checks everything a run could refuse (the arms, each recipe with every seed's overrides, the output
folder, a previous A/B in it) before the first run starts; :class:`ABError` says what is wrong, with the exit code.

Example:
    >>> parse_seeds("3"), parse_seeds("1,5,9")
    ([17, 18, 19], [1, 5, 9])
    >>> parse_seeds("1,1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    blurpool_algo.ab_plan.ABError: --seeds must be a count >= 1 or a list of distinct seeds >= 0 (...), got '1,1'
    >>> list(parse_arms(["baseline=A.yaml", "blurpool=B.yaml", "aps=C.yaml"]).items())[2]
    ('aps', PosixPath('C.yaml'))
    >>> list(parse_arms(None, baseline="A.yaml", treatment="B.yaml"))  # --baseline A --treatment B
    ['baseline', 'treatment']
    >>> parse_arms(["a=A.yaml", "a=B.yaml"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    blurpool_algo.ab_plan.ABError: --arm names must be unique, got 'a' twice
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import blurpool_algo
from blurpool_algo.checks import check_int, fail
from blurpool_algo.recipe import Recipe, RecipeError, load_recipe, recipe_parts

__all__ = [
    "ARMS",
    "FIRST_SEED",
    "SEEDS_HINT",
    "ABError",
    "Plan",
    "arm_differences",
    "effective_options",
    "make_plan",
    "parse_arms",
    "parse_seeds",
]

#: The arms' names of ``--baseline A --treatment B`` (the same as ``--arm baseline=A --arm treatment=B``).
ARMS: tuple[str, ...] = ("baseline", "treatment")
#: An arm's name: it names files (``runs/<arm>-seed<S>.json``), checkpoint folders and run names.
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ARM_NAME_HINT = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
#: ``--seeds 3`` means three seeds from the schema's default seed up (the recipes' own seed, 17).
FIRST_SEED: int = Recipe.seed
SEEDS_HINT = f"3: seeds {FIRST_SEED}, {FIRST_SEED + 1}, {FIRST_SEED + 2}; 1,5,9: those seeds"


class ABError(RuntimeError):
    """An A/B that cannot start (exit code 2) or finish (exit code 1); ``str()`` says what to do."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Plan:
    """One A/B/n: the arms (name -> recipe, in order; the first is the reference every other arm is compared to),
    the seeds, the overrides for every arm, where it goes."""

    arms: dict[str, Path]
    seeds: list[int]
    overrides: list[str]
    out: Path
    nproc: int = 1
    command: str = ""
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Arm -> algorithm name -> every option of the algorithm as built, defaults included.
    algorithm_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def arm_names(self) -> list[str]:
        """The arms in order, the reference first."""
        return list(self.arms)

    @property
    def reference(self) -> str:
        """The arm every other arm is compared to: the first."""
        return self.arm_names[0]

    @property
    def others(self) -> list[str]:
        """The arms compared to the reference, in order."""
        return self.arm_names[1:]

    def recipe(self, arm: str) -> Path:
        return self.arms[arm]

    def run_json(self, arm: str, seed: int) -> Path:
        return self.out / "runs" / f"{arm}-seed{seed}.json"

    def run_overrides(self, arm: str, seed: int) -> list[str]:
        """The overrides of one (arm, seed) run: the shared ones, then its seed, name and checkpoint folder."""
        extra = [f"seed={seed}", f"run_name={self.out.name}-{arm}-seed{seed}", "progress_bar=false"]
        if self.resolved[arm].get("save_folder"):
            # Checkpoints under --out, resumed after an interruption in the middle of a run.
            extra += [f"save_folder={self.out / 'checkpoints' / f'{arm}-seed{seed}'}", "autoresume=true"]
        return [*self.overrides, *extra]

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a rerun to resume this A/B rather than mix two different ones: the arms (names, in
        order), the resolved recipes, the algorithms' effective options (a changed package default changes them), the
        package version, the overrides, seeds and process count."""
        return {
            "arms": self.arm_names,
            "recipes": self.resolved,
            "algorithm_options": self.algorithm_options,
            "package_version": blurpool_algo.__version__,  # read now: a test stands in another release
            "overrides": self.overrides,
            "seeds": self.seeds,
            "nproc": self.nproc,
        }


def parse_seeds(text: str) -> list[int]:
    """``'3'`` -> three seeds from :data:`FIRST_SEED` up; ``'1,5,9'`` -> those seeds."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) == 1 and values[0] >= 1:
        return [FIRST_SEED + i for i in range(values[0])]
    if len(values) > 1 and len(set(values)) == len(values) and min(values) >= 0:
        return values
    raise ABError(str(fail("--seeds", "a count >= 1 or a list of distinct seeds >= 0", text, SEEDS_HINT)))


def parse_arms(
    specs: Sequence[str] | None, baseline: str | None = None, treatment: str | None = None
) -> dict[str, Path]:
    """The arms, name -> recipe in order, from ``--arm NAME=RECIPE`` values or from ``--baseline``/``--treatment``
    (``{'baseline': A, 'treatment': B}``); the two styles do not mix, and there are at least two arms."""
    legacy = [flag for flag, value in (("--baseline", baseline), ("--treatment", treatment)) if value is not None]
    if specs and legacy:
        raise ABError(
            f"give the arms either as --arm NAME=RECIPE (repeated) or as --baseline A --treatment B, not both "
            f"(got --arm and {' and '.join(legacy)})"
        )
    if not specs:
        if len(legacy) != 2:
            missing = "no arms" if not legacy else f"{'--treatment' if baseline else '--baseline'} is missing"
            raise ABError(
                f"{missing}: give --baseline A --treatment B, or two or more --arm NAME=RECIPE (e.g. --arm "
                "baseline=yamls/quickstart_baseline.yaml --arm blurpool=yamls/quickstart_blurpool.yaml)"
            )
        return dict(zip(ARMS, (Path(baseline), Path(treatment)), strict=True))  # type: ignore[arg-type]
    arms: dict[str, Path] = {}
    for spec in specs:
        name, equals, path = spec.partition("=")
        if not equals or not path:
            raise ABError(str(fail("--arm", "NAME=RECIPE", spec, "e.g. --arm aps=yamls/quickstart_aps.yaml")))
        if not ARM_NAME.fullmatch(name):
            raise ABError(str(fail("--arm names", ARM_NAME_HINT, name, "they name the arm's files and runs")))
        if name in arms:
            raise ABError(f"--arm names must be unique, got {name!r} twice")
        arms[name] = Path(path)
    if len(arms) < 2:
        raise ABError(f"an A/B needs at least two arms (the first is the reference), got only --arm {specs[0]}")
    return arms


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    text = repr(value)
    # An object without a repr of its own shows its address, which differs in every process: name its type instead.
    return type(value).__qualname__ if " at 0x" in text else text


def effective_options(algorithm: Any) -> dict[str, Any]:
    """Each constructor argument of ``algorithm`` as the built object holds it (defaults included), JSON-ready."""
    parameters = inspect.signature(type(algorithm).__init__).parameters
    return {
        name: _jsonable(getattr(algorithm, name)) for name in parameters if name != "self" and hasattr(algorithm, name)
    }


def _resolved(path: Path, overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The recipe as resolved (every key, defaults included), and its algorithms' effective options."""
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as error:
        raise ABError(f"{error}") from None
    # The algorithms as validation built them (``algorithms.<name>``): what a run of the recipe would use.
    options = {part.key.split(".", 1)[1]: effective_options(part.build()) for part in recipe_parts(recipe).algorithms}
    return OmegaConf.to_container(OmegaConf.structured(recipe)), options  # type: ignore[return-value]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        # An empty section (``algorithms: {}``) is no key; an entry with all defaults (``blurpool: {}``) is one.
        return flat or ({prefix.rstrip("."): {}} if prefix.count(".") > 1 else {})
    return {prefix.rstrip("."): tree}


def arm_differences(plan: Plan, arm: str | None = None) -> list[str]:
    """The recipe keys whose values differ between ``arm`` (default: the second) and the reference (``seed`` and
    ``run_name`` aside), as ``key: reference value -> arm value``."""
    base, treat = (_flatten(plan.resolved[name]) for name in (plan.reference, arm or plan.others[0]))
    keys = sorted(set(base) | set(treat))
    return [
        f"{key}: {base.get(key, '(absent)')!r} -> {treat.get(key, '(absent)')!r}"
        for key in keys
        if base.get(key, "(absent)") != treat.get(key, "(absent)") and key not in ("seed", "run_name")
    ]


def make_plan(args: argparse.Namespace) -> Plan:
    """Checks the arms, every recipe (with the overrides and every seed) and the output folder, before any run.

    ``args`` holds ``arm`` (the ``--arm`` values, or None) or ``baseline`` and ``treatment``; ``seeds``, ``out``,
    ``nproc``, ``overrides`` and ``argv`` (for the command line the report shows)."""
    arms = parse_arms(getattr(args, "arm", None), getattr(args, "baseline", None), getattr(args, "treatment", None))
    seeds = parse_seeds(args.seeds)
    try:
        nproc = check_int("--nproc", args.nproc, minimum=1, hint="processes per run")
    except ValueError as error:
        raise ABError(str(error)) from None
    plan = Plan(
        arms=arms,
        seeds=seeds,
        overrides=list(args.overrides),
        out=Path(args.out),
        nproc=nproc,
        command=shlex.join(["python", "-m", "blurpool_algo.ab", *args.argv]),
    )
    for arm in plan.arm_names:
        plan.resolved[arm], plan.algorithm_options[arm] = _resolved(plan.recipe(arm), plan.overrides)
        for seed in plan.seeds:  # an override may interact with the seed-specific keys
            _resolved(plan.recipe(arm), plan.run_overrides(arm, seed))
        # Set per run: not part of what the arms share.
        del plan.resolved[arm]["seed"], plan.resolved[arm]["run_name"]
    if plan.out.exists() and not plan.out.is_dir():
        raise ABError(f"--out {plan.out} exists and is not a folder")
    marker = plan.out / "ab.json"
    if marker.exists():
        previous = json.loads(marker.read_text())
        previous.setdefault("arms", list(ARMS))  # a folder of a two-arm A/B written before the arms were recorded
        current = json.loads(json.dumps(plan.fingerprint()))
        changed = [key for key in current if previous.get(key) != current[key]]
        if changed:
            raise ABError(
                f"--out {plan.out} holds an A/B with other {', '.join(changed)} (a changed arm, recipe, override, "
                "seed or package default would mix two experiments in one report); resume it with its own command "
                f"and package version (its arms: {', '.join(previous['arms'])}), or choose another --out"
            )
    return plan
