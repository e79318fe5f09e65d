"""The recipe's checks, one small function per section, each returning what it resolved or built.

:func:`blurpool_algo.recipe.validate_recipe` calls them in order; each raises a :class:`RecipeError` naming the key.
Number and choice rules come from :mod:`blurpool_algo.checks` (one message style); :func:`check_time` is the one
check of a time string.

Example:
    >>> check_time("max_duration", "90ep", ("ep", "ba"), zero_allowed=False)
    Time(90, TimeUnit.EPOCH)
    >>> check_time("max_duration", "0ba", ("ep", "ba"), zero_allowed=False)
    Traceback (most recent call last):
    ...
    blurpool_algo.recipe_checks.RecipeError: max_duration: '0ba' must be > 0
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from composer.core import Time
from composer.models import ComposerClassifier
from omegaconf import OmegaConf

from blurpool_algo import checks
from blurpool_algo.algorithm import BlurPool
from blurpool_algo.callbacks import ShiftConsistencyMonitor
from blurpool_algo.checkpoint_files import CheckpointError, check_checkpoint_file
from blurpool_algo.data import DataError, DataOptions, DatasetSpec, StreamingOptions, dataset_spec
from blurpool_algo.metrics import ConsistencyProtocol
from blurpool_algo.models import build_model, model_names, unknown_model_message
from blurpool_algo.surgery import child_name_roots, unmatched_exclude_patterns

if TYPE_CHECKING:
    from blurpool_algo.recipe import Recipe

__all__ = [
    "DEVICES",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULERS",
    "RecipeError",
    "check_data",
    "check_hardware",
    "check_model",
    "check_numbers",
    "check_resume",
    "check_saving",
    "check_time",
    "check_times",
    "checked",
    "consistency_protocol",
    "construct",
    "first_line",
    "instance_checks",
]

PRECISIONS = ("auto", "fp32", "amp_fp16", "amp_bf16")
DEVICES = ("auto", "cpu", "gpu", "mps")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("multistep", "cosine", "constant")


class RecipeError(ValueError):
    """A recipe problem found before any work started; ``str()`` is one line: ``file: key: what is wrong``."""

    def __init__(self, key: str, message: str, source: str | None = None) -> None:
        self.key, self.message, self.source = key, message, source
        super().__init__(f"{source + ': ' if source else ''}{key}: {message}")

    def with_source(self, source: str) -> RecipeError:
        return self if self.source else RecipeError(self.key, self.message, source)

    def located(self, path: str | os.PathLike[str], overrides: Sequence[str]) -> RecipeError:
        """This error naming ``command line`` if an override set its key (or a key above or below it), else the file."""
        overridden = [item.split("=", 1)[0] for item in overrides]
        from_command_line = any(
            self.key == key or self.key.startswith((key + ".", key + "[")) or key.startswith(self.key + ".")
            for key in overridden
        )
        return self.with_source("command line" if from_command_line else os.fspath(path))


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (OmegaConf's and YAML's run to several)."""
    text = getattr(exc, "msg", None) or str(exc)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


_Value = TypeVar("_Value")


def checked(key: str, check: Callable[..., _Value], value: Any, **rule: Any) -> _Value:
    """``check(key, value, **rule)`` from :mod:`blurpool_algo.checks`, its refusal as a RecipeError on ``key``."""
    try:
        return check(key, value, **rule)
    except checks.CheckError as error:
        raise RecipeError(key, error.requirement) from None


def construct(key: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> Any:
    """``factory(**options)``, its refusal (bad or unknown options, a missing package) as a RecipeError on ``key``."""
    try:
        return factory(**options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(key, first_line(exc)) from None
    except ImportError as exc:  # Composer's optional loggers need their own packages
        raise RecipeError(key, f"needs a package that is not installed: {first_line(exc)}") from None


def _value(recipe: Recipe, key: str) -> Any:
    return OmegaConf.select(OmegaConf.structured(recipe), key)


# ---------------------------------------------------------------------------------------------------- sizes, times


def check_numbers(recipe: Recipe, world_size: int) -> None:
    """Batch sizes and rates in their ranges; global batch sizes divisible by the world size."""
    # The data keys (and model.num_classes, the labels' range) are checked where they are used: DataOptions.
    for key in ("train_batch_size", "eval_batch_size"):
        checked(key, checks.check_int, getattr(recipe, key), minimum=1)
    for key in ("train_batch_size", "eval_batch_size"):
        if getattr(recipe, key) % world_size:
            raise RecipeError(
                key, f"global batch size {getattr(recipe, key)} is not divisible by the world size {world_size}"
            )
    checked("optimizer.name", checks.check_choice, recipe.optimizer.name, allowed=OPTIMIZERS)
    checked("scheduler.name", checks.check_choice, recipe.scheduler.name, allowed=SCHEDULERS)
    for key, inclusive in (
        ("optimizer.lr", False),
        ("optimizer.momentum", True),
        ("optimizer.weight_decay", True),
        ("scheduler.gamma", False),
    ):
        checked(key, checks.check_float, _value(recipe, key), minimum=0.0, inclusive=inclusive)


#: Where each time key may point: its allowed units, and whether zero is allowed (a warmup of 0ba is none).
_TIME_KEYS: dict[str, tuple[tuple[str, ...], bool]] = {
    "max_duration": (("ep", "ba", "sp"), False),
    "eval_interval": (("ep", "ba", "dur"), False),
    "save_interval": (("ep", "ba", "dur"), False),
    "scheduler.warmup": (("ep", "ba", "dur"), True),
}
_MILESTONE_RULE = (("ep", "ba", "dur"), True)
_TIME_EXAMPLES = {"ep": "90ep", "ba": "500ba", "sp": "1000sp", "dur": "0.5dur"}


def check_time(key: str, value: str, units: Sequence[str], zero_allowed: bool) -> Time:
    """Returns ``value`` as a Composer Time if it is a whole count in one of ``units`` (a fraction for ``dur``)."""
    time = None
    if isinstance(value, str) and value.strip().endswith(tuple(units)):
        try:
            time = Time.from_timestring(value)
        except (ValueError, TypeError):  # TypeError: a fractional count of epochs or batches ('1.5ep')
            time = None
    if time is None:
        examples = ", ".join(_TIME_EXAMPLES[unit] for unit in units)
        raise RecipeError(
            key, f"{value!r} is not a time this key takes; write a count with one of the units: {examples}"
        )
    if (time.value < 0 if zero_allowed else time.value <= 0) or (time.unit.value == "dur" and time.value > 1):
        bound = ">= 0" if zero_allowed else "> 0"
        raise RecipeError(key, f"{value!r} must be {bound}{' and at most 1dur' if time.unit.value == 'dur' else ''}")
    return time


def check_times(recipe: Recipe) -> dict[str, Time]:
    """Every time key as a Composer Time, milestones as ``scheduler.milestones[i]``."""
    times = {key: check_time(key, _value(recipe, key), *rule) for key, rule in _TIME_KEYS.items()}
    for index, milestone in enumerate(recipe.scheduler.milestones):
        key = f"scheduler.milestones[{index}]"
        times[key] = check_time(key, milestone, *_MILESTONE_RULE)
    return times


# ------------------------------------------------------------------------------------------ hardware, model, saving


def check_hardware(recipe: Recipe) -> tuple[str, str]:
    """``(device, precision)`` with ``auto`` resolved: a device the machine has, and a precision that device runs
    (Composer's errors come as tracebacks, later)."""
    checked("precision", checks.check_choice, recipe.precision, allowed=PRECISIONS)
    checked("device", checks.check_choice, recipe.device, allowed=DEVICES)
    available = {"gpu": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    device = recipe.device if recipe.device != "auto" else "gpu" if available["gpu"] else "cpu"
    if not available[device]:
        have = ", ".join(name for name, present in available.items() if present)
        raise RecipeError("device", f"{recipe.device!r} is not available on this machine; available: {have} (or auto)")
    precision = recipe.precision if recipe.precision != "auto" else "amp_fp16" if device == "gpu" else "fp32"
    if device != "gpu" and precision in ("amp_fp16", "amp_bf16"):
        raise RecipeError(
            "precision", f"{recipe.precision!r} needs a GPU; on {device} use fp32 (or auto, which picks it)"
        )
    return device, precision


def check_model(recipe: Recipe) -> None:
    if recipe.model.name not in model_names():
        raise RecipeError("model.name", unknown_model_message(recipe.model.name))


def check_saving(recipe: Recipe) -> str | None:
    """The checkpoint folder with ``{run_name}`` filled in (None: no checkpoints). Settings that would keep nothing,
    and a folder that cannot be written, are errors now."""
    if recipe.save_num_checkpoints_to_keep == 0 or recipe.save_num_checkpoints_to_keep < -1:
        raise RecipeError(
            "save_num_checkpoints_to_keep", f"{recipe.save_num_checkpoints_to_keep} is not a number of checkpoints "
            "to keep (0 would keep none); write -1 to keep them all, or N >= 1 to keep the newest N",
        )  # fmt: skip
    if not recipe.save_folder:
        return None
    folder = recipe.save_folder.replace("{run_name}", recipe.run_name) if recipe.run_name else recipe.save_folder
    # The nearest folder that exists must take a new file: a read-only file system, or a path that cannot exist,
    # fails now rather than at the first checkpoint, hours in. A placeholder Composer fills later ({rank}) stops the
    # walk at its parent. (A full disk still takes an empty file: that case is caught when a write fails.)
    existing = os.path.abspath(folder.split("{", 1)[0] or ".")
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise RecipeError(
            "save_folder", f"cannot write checkpoints under {existing}: {error.strerror or type(error).__name__}"
        ) from None
    return folder


def check_resume(recipe: Recipe, folder: str | None) -> None:
    """Resuming needs a run to find; a run's checkpoints are not overwritten unasked; ``load_path`` is a checkpoint
    file (its header and zip directory only, which is cheap: the Trainer's load passes the whole gate)."""
    if recipe.autoresume and not (recipe.save_folder and recipe.run_name):
        raise RecipeError("autoresume", "needs save_folder and run_name (to find the run's latest checkpoint)")
    replacing = recipe.run_name and folder and not (recipe.autoresume or recipe.save_overwrite)
    if replacing and "{" not in folder and os.path.isdir(folder) and any(os.scandir(folder)):
        raise RecipeError(
            "save_folder",
            f"{folder} already holds checkpoints of run {recipe.run_name!r}: set autoresume=true to resume it, "
            "save_overwrite=true to replace them, or another run_name",
        )
    if recipe.load_path and "://" not in recipe.load_path:
        try:
            check_checkpoint_file(recipe.load_path)
        except CheckpointError as error:
            raise RecipeError("load_path", str(error)) from None


# ------------------------------------------------------------------------------------------------------------- data


def check_data(recipe: Recipe, world_size: int) -> tuple[DatasetSpec, DataOptions]:
    """The recipe's dataset spec and options: the data usable, enough samples for a batch, no more classes than the
    model has outputs. The spec's errors carry their recipe key."""
    try:
        spec = dataset_spec(recipe.data.name)
        # StreamingOptions is DataOptions plus the shard keys: the other specs read the fields they know.
        options = StreamingOptions(
            remote=recipe.data.remote,
            local=recipe.data.local,
            shuffle_algo=recipe.data.shuffle_algo,
            predownload=recipe.data.predownload,
            cache_limit=recipe.data.cache_limit,
            validate_hash=recipe.data.validate_hash,
            download_timeout=recipe.data.download_timeout,
            root=recipe.data.root,
            num_workers=recipe.data.num_workers,
            seed=recipe.seed,
            num_classes=recipe.model.num_classes,
            synthetic_samples=recipe.data.synthetic_samples,
            image_size=recipe.data.image_size,
            max_bad_images=recipe.data.max_bad_images,
        )
        spec.check(options)
        train_size, classes = spec.train_size(options), spec.num_classes(options)
    except DataError as error:
        raise RecipeError(error.key, error.message) from None
    if train_size is not None and recipe.train_batch_size // world_size > train_size // world_size:
        raise RecipeError(
            "train_batch_size",
            f"{recipe.train_batch_size} is larger than the {train_size} training samples of {recipe.data.name}",
        )
    if classes is not None and classes > recipe.model.num_classes:
        raise RecipeError(
            "model.num_classes", f"{recipe.model.num_classes} is fewer than the {classes} classes in {recipe.data.name}"
        )
    return spec, options


def consistency_protocol(
    key: str | Mapping[str, str],
    spec: DatasetSpec,
    options: DataOptions,
    *,
    mode: str = "crop",
    max_shift: int | None = None,
    crop_size: int | None = None,
) -> ConsistencyProtocol:
    """The dataset's shift-consistency protocol for the given values (None: its defaults). A refusal is a
    RecipeError on ``key``, or on ``key[field]`` for the protocol field it concerns (a command-line flag each)."""
    try:
        return spec.consistency_protocol(options, mode=mode, max_shift=max_shift, crop_size=crop_size)
    except DataError as error:
        raise RecipeError(key if isinstance(key, str) else key[error.key], error.message) from None


# -------------------------------------------------------------------------------------------- the built instances


def _check_exclude_patterns(recipe: Recipe, patterns: Sequence[str]) -> None:
    """Every BlurPool exclude pattern must name a module of the recipe's model (built on the meta device: no
    weights, milliseconds), as the algorithm will match it; a typo would otherwise exclude nothing, silently."""
    with torch.device("meta"):
        network = build_model(recipe.model.name, num_classes=recipe.model.num_classes)
        model = ComposerClassifier(network, num_classes=recipe.model.num_classes)
    unmatched = unmatched_exclude_patterns(model, patterns, roots=child_name_roots(model))
    if unmatched:
        pattern, closest = unmatched[0]
        raise RecipeError(
            "algorithms.blurpool.exclude", f"pattern {pattern!r} matches no module of {recipe.model.name}"
            + (f"; closest names: {', '.join(closest)}" if closest else "")
            + " (a pattern excludes the modules it names and everything inside them, e.g. layer4 or layer4.0.*)",
        )  # fmt: skip


def instance_checks(
    recipe: Recipe, spec: DatasetSpec, options: DataOptions, parts: Sequence[Any]
) -> dict[str, ConsistencyProtocol]:
    """What only the recipe's model and data can tell about the built algorithms and callbacks: BlurPool's exclude
    patterns name modules of the model; a shift-consistency monitor's protocol fits the images. Returns each
    monitor's protocol by its recipe key (its loader serves images at the protocol's frame)."""
    protocols = {}
    for part in parts:
        instance = part.unclaimed
        if isinstance(instance, BlurPool) and instance.exclude:
            _check_exclude_patterns(recipe, instance.exclude)
        if isinstance(instance, ShiftConsistencyMonitor):
            protocols[part.key] = consistency_protocol(
                part.key, spec, options, mode=instance.mode, max_shift=instance.max_shift, crop_size=instance.crop_size
            )
    return protocols
