"""Recipes: a typed, validated schema (OmegaConf structured configs), and the Trainer it describes.

A recipe is a YAML file plus dotted ``key=value`` overrides. :func:`load_recipe` merges them onto the schema and checks
everything that can be checked before work starts (types, unknown keys, names of models, algorithms, callbacks and
loggers, data paths, batch sizes against the world size, checkpoint paths); any problem is a :class:`RecipeError`
naming the key and the file. :func:`run_recipe` builds the Composer Trainer, trains, evaluates and returns a summary.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from composer import Trainer
from composer.core import Algorithm, Callback, Time
from composer.core.precision import get_precision_context
from composer.loggers import FileLogger, LoggerDestination, MLFlowLogger, TensorboardLogger, WandBLogger
from composer.models import ComposerClassifier
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    MultiStepWithWarmupScheduler,
)
from composer.utils import dist, reproducibility
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blurpool_algo import checkpoints, data
from blurpool_algo.algorithm import BlurPool
from blurpool_algo.callbacks import ShiftConsistencyMonitor, ThroughputMonitor, network_of
from blurpool_algo.metrics import (
    DiagonalStability,
    NonFiniteLogitsError,
    diagonal_stability,
    plot_diagonal_stability,
    shift_consistency,
)
from blurpool_algo.models import build_model, model_names, unknown_model_message
from blurpool_algo.surgery import child_name_roots, unmatched_exclude_patterns

__all__ = [
    "Evaluation",
    "Recipe",
    "RecipeError",
    "RunSummary",
    "build_trainer",
    "evaluate_recipe",
    "load_recipe",
    "run_recipe",
]


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


# ----------------------------------------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    #: A torchvision classification architecture (``resnet50``, ...) or ``resnet10`` (small, for CPU runs).
    name: str = MISSING
    num_classes: int = 1000


@dataclass
class DataConfig:
    #: ``imagenet`` (an ImageFolder tree), ``mnist5k`` (embedded, offline) or ``synthetic`` (tests only).
    name: str = MISSING
    #: For imagenet: the folder holding ``train/`` and ``val/``.
    root: str | None = None
    #: DataLoader workers per rank.
    num_workers: int = 8
    #: Training crop size (imagenet: evaluation is Resize(256/224 x this) + CenterCrop(this)); None = the dataset's.
    image_size: int | None = None
    #: Samples in the synthetic training set.
    synthetic_samples: int = 64
    #: imagenet: unreadable images (truncated, not an image) skipped with a warning before the run stops; 0 = none.
    max_bad_images: int = data.DEFAULT_MAX_BAD_IMAGES


@dataclass
class OptimizerConfig:
    #: ``sgd`` (torch.optim.SGD) or ``adamw`` (torch.optim.AdamW).
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False


@dataclass
class SchedulerConfig:
    #: ``multistep`` (step decay at ``milestones`` by ``gamma``), ``cosine`` or ``constant``; all with ``warmup``.
    name: str = "multistep"
    milestones: list[str] = field(default_factory=lambda: ["30ep", "60ep"])
    gamma: float = 0.1
    warmup: str = "0ba"


@dataclass
class Recipe:
    """Every key a recipe may hold. Batch sizes are global: each of N ranks gets 1/N of them."""

    seed: int = 17
    run_name: str | None = None
    max_duration: str = MISSING
    train_batch_size: int = MISSING
    eval_batch_size: int = MISSING
    eval_interval: str = "1ep"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    #: Algorithm name -> its options: ``blurpool`` (this package) and Composer's by module name (``channels_last``,
    #: ``label_smoothing``, ``ema``, ``progressive_resizing``, ...).
    algorithms: dict[str, Any] = field(default_factory=dict)
    #: Callback name -> its options: ``shift_consistency_monitor`` and ``throughput_monitor`` (this package's), and
    #: Composer's by module name (``speed_monitor``, ``lr_monitor``, ...).
    callbacks: dict[str, Any] = field(default_factory=dict)
    #: Logger name -> its options: ``file``, ``tensorboard``, ``wandb``, ``mlflow``.
    loggers: dict[str, Any] = field(default_factory=dict)
    #: ``auto`` (amp_fp16 on GPU, fp32 on CPU), ``fp32``, ``amp_fp16``, ``amp_bf16``.
    precision: str = "auto"
    #: ``auto`` (gpu if available, else cpu), ``cpu``, ``gpu``, ``mps``.
    device: str = "auto"
    save_folder: str | None = None
    save_interval: str = "1ep"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    load_path: str | None = None
    autoresume: bool = False
    #: Unpickle checkpoints without the safe loader's allowlist: only for files you trust (``--trust-checkpoint``).
    trust_checkpoint: bool = False
    progress_bar: bool = True


PRECISIONS = ("auto", "fp32", "amp_fp16", "amp_bf16")
DEVICES = ("auto", "cpu", "gpu", "mps")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("multistep", "cosine", "constant")
LOGGERS: dict[str, type[LoggerDestination]] = {
    "file": FileLogger,
    "tensorboard": TensorboardLogger,
    "wandb": WandBLogger,
    "mlflow": MLFlowLogger,
}


@functools.cache
def _composer_classes(package: str, base: type) -> dict[str, type]:
    """Composer's algorithms or callbacks by the name of the module that defines them (``channels_last``, ...)."""
    module = importlib.import_module(package)
    found = {}
    for obj in vars(module).values():
        if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__.startswith(package + "."):
            found[obj.__module__[len(package) + 1 :].split(".")[0]] = obj
    return found


def algorithm_registry() -> dict[str, Callable[..., Algorithm]]:
    """Algorithm names a recipe may use; ``blurpool`` is this package's, never Composer's."""
    return {**_composer_classes("composer.algorithms", Algorithm), "blurpool": BlurPool}


def callback_registry() -> dict[str, Callable[..., Callback]]:
    """Callback names a recipe may use: Composer's, and this package's two monitors."""
    return {
        **_composer_classes("composer.callbacks", Callback),
        "shift_consistency_monitor": ShiftConsistencyMonitor,
        "throughput_monitor": ThroughputMonitor,
    }


# ---------------------------------------------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "msg", None) or str(exc)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


#: The recipe's sections that map names to options (or hold sub-keys): a list or a scalar there is a recipe error.
_SECTIONS: tuple[str, ...] = ("model", "data", "optimizer", "scheduler", "algorithms", "callbacks", "loggers")


def _merge(base: DictConfig, layer: Any, source: str) -> DictConfig:
    for section in _SECTIONS:
        value = layer.get(section) if isinstance(layer, DictConfig) else None
        if value is not None and not isinstance(value, DictConfig):
            raise RecipeError(
                section, f"must be a mapping of names to options (e.g. {section}: {{name: {{...}}}}), got {value!r}",
                source,
            )  # fmt: skip
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise RecipeError(getattr(exc, "full_key", None) or "<recipe>", _first_line(exc), source) from None


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Reads a recipe file, applies dotted overrides (``data.root=/x``), and validates the result.

    Raises:
        RecipeError: naming the file (or ``command line``) and the key, for anything wrong.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise RecipeError("-f", f"recipe file not found: {source}")
    try:
        layer = OmegaConf.load(source)
    except Exception as exc:  # YAML syntax errors come in several exception types
        raise RecipeError("<yaml>", f"cannot parse: {_first_line(exc)}", source) from None
    if not isinstance(layer, DictConfig):
        raise RecipeError("<yaml>", "a recipe must be a mapping of keys to values", source)
    config = _merge(OmegaConf.structured(Recipe), layer, source)
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise RecipeError(bad[0], "overrides must look like key=value (e.g. data.root=/data/imagenet)", "command line")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise RecipeError("<override>", _first_line(exc), "command line") from None
    config = _merge(config, dotlist, "command line")
    try:
        recipe: Recipe = OmegaConf.to_object(config)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "<recipe>"
        raise RecipeError(key, re.sub(r"^Structured config of type `\w+` has ", "", _first_line(exc)), source) from None
    try:
        validate_recipe(recipe)
    except RecipeError as exc:
        raise exc.located(source, overrides) from None
    return recipe


# ------------------------------------------------------------------------------------------------------- validation


def _check_choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise RecipeError(key, f"{value!r} is not one of {', '.join(allowed)}")


#: Where each time key may point: its allowed units, and whether zero is allowed (a warmup of 0ba is none).
_TIME_KEYS: dict[str, tuple[tuple[str, ...], bool]] = {
    "max_duration": (("ep", "ba", "sp"), False),
    "eval_interval": (("ep", "ba", "dur"), False),
    "save_interval": (("ep", "ba", "dur"), False),
    "scheduler.warmup": (("ep", "ba", "dur"), True),
    "scheduler.milestones": (("ep", "ba", "dur"), True),
}


_TIME_EXAMPLES = {"ep": "90ep", "ba": "500ba", "sp": "1000sp", "dur": "0.5dur"}


def _check_time(key: str, value: str, units: Sequence[str], zero_allowed: bool) -> Time:
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


def _options(key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(key, f"expected a mapping of options (or {{}}), got {value!r}")
    return dict(value)


def _construct(key: str, factory: Callable[..., Any], options: Mapping[str, Any]) -> Any:
    try:
        return factory(**options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(key, _first_line(exc)) from None
    except ImportError as exc:  # Composer's optional loggers need their own packages
        raise RecipeError(key, f"needs a package that is not installed: {_first_line(exc)}") from None


def _named_objects(section: str, entries: Mapping[str, Any], registry: Mapping[str, Callable[..., Any]]) -> list[Any]:
    objects = []
    for name, value in entries.items():
        if name not in registry:
            raise RecipeError(f"{section}.{name}", f"unknown {section[:-1]} {name!r}; allowed: {', '.join(registry)}")
        objects.append(_construct(f"{section}.{name}", registry[name], _options(f"{section}.{name}", value)))
    return objects


def validate_recipe(recipe: Recipe) -> None:
    """Checks what the schema's types cannot: names, choices, paths, time strings, sizes against the world size."""
    for key in ("train_batch_size", "eval_batch_size", "model.num_classes", "data.synthetic_samples"):
        value = OmegaConf.select(OmegaConf.structured(recipe), key)
        if value < 1:
            raise RecipeError(key, f"must be >= 1, got {value}")
    if recipe.data.num_workers < 0:
        raise RecipeError("data.num_workers", f"must be >= 0, got {recipe.data.num_workers}")
    if recipe.data.image_size is not None and recipe.data.image_size < 8:
        raise RecipeError("data.image_size", f"must be >= 8 (or null), got {recipe.data.image_size}")
    world_size = dist.get_world_size()
    for key in ("train_batch_size", "eval_batch_size"):
        if getattr(recipe, key) % world_size:
            raise RecipeError(
                key, f"global batch size {getattr(recipe, key)} is not divisible by the world size {world_size}"
            )
    for key in ("max_duration", "eval_interval", "save_interval", "scheduler.warmup"):
        _check_time(key, OmegaConf.select(OmegaConf.structured(recipe), key), *_TIME_KEYS[key])
    for index, milestone in enumerate(recipe.scheduler.milestones):
        _check_time(f"scheduler.milestones[{index}]", milestone, *_TIME_KEYS["scheduler.milestones"])
    _check_choice("precision", recipe.precision, PRECISIONS)
    _check_choice("device", recipe.device, DEVICES)
    _check_hardware(recipe)
    _check_choice("optimizer.name", recipe.optimizer.name, OPTIMIZERS)
    _check_choice("scheduler.name", recipe.scheduler.name, SCHEDULERS)
    for key, low, low_allowed in (
        ("optimizer.lr", 0.0, False),
        ("optimizer.momentum", 0.0, True),
        ("optimizer.weight_decay", 0.0, True),
        ("scheduler.gamma", 0.0, False),
    ):
        value = OmegaConf.select(OmegaConf.structured(recipe), key)
        if not math.isfinite(value) or value < low or (value == low and not low_allowed):
            raise RecipeError(key, f"must be a finite number {'>=' if low_allowed else '>'} {low:g}, got {value!r}")
    if recipe.data.max_bad_images < 0:
        raise RecipeError("data.max_bad_images", f"must be >= 0 (0: any unreadable image stops the run), got "
                          f"{recipe.data.max_bad_images}")  # fmt: skip
    _check_saving(recipe)
    if recipe.model.name not in model_names():
        raise RecipeError("model.name", unknown_model_message(recipe.model.name))
    _check_choice("data.name", recipe.data.name, data.DATASETS)
    try:
        data.check_data(recipe.data.name, recipe.data.root)
    except ValueError as exc:
        message = str(exc)
        key = "data.root" if message.startswith("data.root") else "data.name"
        message = message.removeprefix(key).lstrip(": ")
        if key == "data.root" and recipe.data.root is None:
            message += " (give data.root=/path/to/imagenet on the command line, or export IMAGENET_ROOT)"
        raise RecipeError(key, message) from None
    train_size = {"synthetic": recipe.data.synthetic_samples, "mnist5k": data.MNIST5K_TRAIN_SIZE}.get(recipe.data.name)
    if train_size is not None and recipe.train_batch_size // world_size > train_size // world_size:
        raise RecipeError(
            "train_batch_size",
            f"{recipe.train_batch_size} is larger than the {train_size} training samples of {recipe.data.name}",
        )
    classes = data.num_classes(recipe.data.name, recipe.data.root)
    if classes is not None and classes > recipe.model.num_classes:
        raise RecipeError(
            "model.num_classes", f"{recipe.model.num_classes} is fewer than the {classes} classes in {recipe.data.name}"
        )
    for algorithm in _named_objects("algorithms", recipe.algorithms, algorithm_registry()):
        if isinstance(algorithm, BlurPool) and algorithm.exclude:
            _check_exclude_patterns(recipe, algorithm.exclude)
    for callback in _named_objects("callbacks", recipe.callbacks, callback_registry()):
        if isinstance(callback, ShiftConsistencyMonitor):
            _check_consistency_size(
                "callbacks.shift_consistency_monitor", recipe, callback.mode, callback.max_shift, callback.crop_size
            )
    _named_objects("loggers", recipe.loggers, LOGGERS)
    if recipe.autoresume and not (recipe.save_folder and recipe.run_name):
        raise RecipeError("autoresume", "needs save_folder and run_name (to find the run's latest checkpoint)")
    if recipe.run_name and recipe.save_folder and not (recipe.autoresume or recipe.save_overwrite):
        folder = recipe.save_folder.replace("{run_name}", recipe.run_name)
        if "{" not in folder and os.path.isdir(folder) and any(os.scandir(folder)):
            raise RecipeError(
                "save_folder",
                f"{folder} already holds checkpoints of run {recipe.run_name!r}: set autoresume=true to resume it, "
                "save_overwrite=true to replace them, or another run_name",
            )
    if recipe.load_path and "://" not in recipe.load_path:
        try:
            # The header and the zip directory only (cheap); the Trainer's load passes the whole gate.
            checkpoints.check_checkpoint_file(recipe.load_path)
        except checkpoints.CheckpointError as error:
            raise RecipeError("load_path", str(error)) from None


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


def _check_hardware(recipe: Recipe) -> None:
    """A device the machine has, and a precision that device runs (Composer's errors come as tracebacks, later)."""
    available = {"gpu": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if not available[_device(recipe)]:
        have = ", ".join(name for name, present in available.items() if present)
        raise RecipeError("device", f"{recipe.device!r} is not available on this machine; available: {have} (or auto)")
    if _device(recipe) != "gpu" and _precision(recipe, _device(recipe)) in ("amp_fp16", "amp_bf16"):
        raise RecipeError(
            "precision", f"{recipe.precision!r} needs a GPU; on {_device(recipe)} use fp32 (or auto, which picks it)"
        )


def save_folder(recipe: Recipe) -> str | None:
    """The recipe's checkpoint folder with ``{run_name}`` filled in (None: no checkpoints)."""
    if not recipe.save_folder:
        return None
    return recipe.save_folder.replace("{run_name}", recipe.run_name) if recipe.run_name else recipe.save_folder


def _check_saving(recipe: Recipe) -> None:
    """Checkpoint settings that would keep nothing, and a folder that cannot be written, are errors now."""
    if recipe.save_num_checkpoints_to_keep == 0 or recipe.save_num_checkpoints_to_keep < -1:
        raise RecipeError(
            "save_num_checkpoints_to_keep", f"{recipe.save_num_checkpoints_to_keep} is not a number of checkpoints "
            "to keep (0 would keep none); write -1 to keep them all, or N >= 1 to keep the newest N",
        )  # fmt: skip
    folder = save_folder(recipe)
    if folder is None:
        return
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


def _default_crop(recipe: Recipe, margin: int) -> int:
    """The crop side a model of ``recipe`` sees in training, or what a fixed-size dataset leaves after ``margin``."""
    available = data.consistency_image_size(recipe.data.name, recipe.data.image_size)
    if available is not None:
        return available - margin
    return data.MNIST5K_SIZE if recipe.data.name == "mnist5k" else recipe.data.image_size or 224


def _consistency_side(recipe: Recipe, mode: str, max_shift: int, crop_size: int | None) -> int:
    """Side of the images a shift-consistency measurement of ``recipe``'s data needs."""
    if mode == "crop":
        return (crop_size or _default_crop(recipe, max_shift)) + max_shift
    # Circular shifts need no margin: the images are rolled at the crop size.
    return crop_size or _default_crop(recipe, 0)


def _check_consistency_size(key: str, recipe: Recipe, mode: str, max_shift: int, crop_size: int | None) -> None:
    side = _consistency_side(recipe, mode, max_shift, crop_size)
    available = data.consistency_image_size(recipe.data.name, recipe.data.image_size)
    what = "crop_size + max_shift" if mode == "crop" else "crop_size"
    if available is not None and side > available:
        raise RecipeError(key, f"{what} = {side} px exceeds the {available} px images of {recipe.data.name}")
    if recipe.data.name == "mnist5k" and side < 28:
        raise RecipeError(key, f"{what} = {side} px is smaller than the 28 px mnist5k digits")
    if mode == "crop" and side - max_shift < 1:
        raise RecipeError(key, f"max_shift {max_shift} leaves no crop of the {side} px images")


# ----------------------------------------------------------------------------------------------------- construction


def _device(recipe: Recipe) -> str:
    if recipe.device != "auto":
        return recipe.device
    return "gpu" if torch.cuda.is_available() else "cpu"


def _precision(recipe: Recipe, device: str) -> str:
    if recipe.precision != "auto":
        return recipe.precision
    return "amp_fp16" if device == "gpu" else "fp32"


def _optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = recipe.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov
        )
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def _scheduler(recipe: Recipe):
    sched = recipe.scheduler
    if sched.name == "multistep":
        return MultiStepWithWarmupScheduler(t_warmup=sched.warmup, milestones=list(sched.milestones), gamma=sched.gamma)
    if sched.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=sched.warmup)
    return ConstantWithWarmupScheduler(t_warmup=sched.warmup)


def _data_options(recipe: Recipe) -> dict[str, Any]:
    """The recipe's data keys as the keyword arguments of :mod:`blurpool_algo.data`'s loader builders."""
    return {
        "root": recipe.data.root,
        "num_workers": recipe.data.num_workers,
        "seed": recipe.seed,
        "num_classes": recipe.model.num_classes,
        "synthetic_samples": recipe.data.synthetic_samples,
        "image_size": recipe.data.image_size,
        "max_bad_images": recipe.data.max_bad_images,
    }


def _consistency_loader(recipe: Recipe, side: int) -> torch.utils.data.DataLoader:
    """This rank's validation images at ``side`` px, for shift-consistency measurements."""
    batch_size = recipe.eval_batch_size // dist.get_world_size()
    return data.build_consistency_dataloader(
        recipe.data.name, side=side, batch_size=batch_size, **_data_options(recipe)
    )


def build_trainer(recipe: Recipe) -> Trainer:
    """The Composer Trainer a validated recipe describes (model, data, optimizer, schedule, algorithms, ...).

    Every checkpoint it loads (``load_path``, or the save folder's latest with ``autoresume``) passes the checkpoint
    gate (:mod:`blurpool_algo.checkpoints`): safe unpickling unless ``trust_checkpoint``, literal algorithm
    descriptions, and weights that match the recipe's model key for key and shape for shape (blur filters aside).
    With ``autoresume``, checkpoints left partial by a crash are first set aside, so the run resumes from the last
    complete one.

    Raises:
        RecipeError: a checkpoint the gate refuses (key ``load_path``, or ``autoresume`` for the save folder's).
    """
    world_size = dist.get_world_size()
    device = _device(recipe)
    # The Trainer seeds itself, but the model is built before it: without this its initial weights would depend on
    # whatever the process did before (and the two arms of an A/B would not start from the same weights).
    reproducibility.seed_all(recipe.seed)
    local_ranks = dist.get_local_world_size()
    if device == "cpu" and local_ranks > 1:
        # Each CPU rank would otherwise start one thread per core, oversubscribing the machine local_ranks times.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    network = build_model(recipe.model.name, num_classes=recipe.model.num_classes)
    model = ComposerClassifier(network, num_classes=recipe.model.num_classes)
    train_loader, eval_loader = data.build_dataloaders(
        recipe.data.name,
        train_batch_size=recipe.train_batch_size // world_size,
        eval_batch_size=recipe.eval_batch_size // world_size,
        **_data_options(recipe),
    )
    callbacks = _named_objects("callbacks", recipe.callbacks, callback_registry())
    for callback in callbacks:
        if isinstance(callback, ShiftConsistencyMonitor) and callback.dataloader is None:
            # The Trainer's eval images are centre crops at the crop size: the measurement needs its own loader of
            # images prepared at crop_size + max_shift (ImageNet: Resize 256 + CenterCrop 256).
            side = _consistency_side(recipe, callback.mode, callback.max_shift, callback.crop_size)
            callback.dataloader = _consistency_loader(recipe, side)
    folder = save_folder(recipe)
    if recipe.autoresume and folder is not None and dist.get_global_rank() == 0:
        # Before the Trainer looks for the latest checkpoint; the other ranks learn its path from rank 0 (Composer
        # broadcasts it), so they never see the folder before this.
        checkpoints.recover_save_folder(folder)
    gate = checkpoints.composer_load_gate(
        model, trusted=recipe.trust_checkpoint, what=f"the recipe's {recipe.model.name}"
    )
    try:
        with gate:
            return Trainer(
                run_name=recipe.run_name,
                model=model,
                train_dataloader=train_loader,
                eval_dataloader=eval_loader,
                eval_interval=recipe.eval_interval,
                max_duration=recipe.max_duration,
                optimizers=_optimizer(recipe, model),
                schedulers=_scheduler(recipe),
                algorithms=_named_objects("algorithms", recipe.algorithms, algorithm_registry()),
                callbacks=callbacks,
                loggers=_named_objects("loggers", recipe.loggers, LOGGERS),
                precision=_precision(recipe, device),
                device=device,
                seed=recipe.seed,
                save_folder=recipe.save_folder,
                save_interval=recipe.save_interval,
                save_num_checkpoints_to_keep=recipe.save_num_checkpoints_to_keep,
                save_overwrite=recipe.save_overwrite,
                load_path=recipe.load_path,
                autoresume=recipe.autoresume,
                progress_bar=recipe.progress_bar,
                log_to_console=not recipe.progress_bar,
            )
    except checkpoints.CheckpointError as error:
        in_folder = folder is not None and os.path.realpath(error.path).startswith(os.path.realpath(folder) + os.sep)
        raise RecipeError("autoresume" if recipe.autoresume and in_folder else "load_path", str(error)) from None


@dataclass
class RunSummary:
    """What a finished run reports (the same on every rank).

    Attributes:
        run_name: Composer's run name.
        accuracy: final top-1 accuracy in percent, reduced over ranks.
        wall_time: seconds from building the Trainer to the end of the final evaluation.
        algorithms: class names of the run's algorithms.
        shift_consistency: mode -> the last consistency (percent) of each ShiftConsistencyMonitor.
        throughput: the ThroughputMonitor's fit summary (``samples_per_sec``, ``peak_memory_bytes``, ...), if any.
        diverged: the model's outputs went non-finite (a NaN or infinite final training loss, or NaN/inf logits in a
            shift-consistency measurement): its accuracy and consistency mean nothing, and are not reported.
        diverged_at_batch: the first batch at which that was seen.
    """

    run_name: str
    accuracy: float
    wall_time: float
    algorithms: list[str]
    shift_consistency: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    #: Logged key -> ``[batch, value]`` pairs over training, for :data:`HISTORY_KEYS` (the A/B runner plots them).
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    #: The diagonal stability curve at the end of training, when asked for (``run_recipe(..., stability=True)``).
    stability: DiagonalStability | None = None
    diverged: bool = False
    diverged_at_batch: int | None = None
    #: Unreadable image files the run's loaders skipped (``data.max_bad_images``), training and evaluation trees.
    bad_images: int = 0

    def __str__(self) -> str:
        return describe_run(asdict(self))


def describe_run(summary: Mapping[str, Any]) -> str:
    """One line for a run summary (a :class:`RunSummary` as a dict, as its JSON holds it): run.py and the A/B print
    it. A diverged run shows no accuracy or consistency, which would be numbers of a model with no meaning."""
    if summary.get("diverged"):
        parts = [f"DIVERGED at batch {summary.get('diverged_at_batch')} (non-finite outputs): no accuracy or "
                 "consistency reported"]  # fmt: skip
    else:
        parts = [f"top-1 accuracy {summary['accuracy']:.2f} %"]
        parts += [
            f"{mode} consistency {value:.2f} %" for mode, value in (summary.get("shift_consistency") or {}).items()
        ]
    throughput = summary.get("throughput") or {}
    if "samples_per_sec" in throughput:
        parts.append(f"{throughput['samples_per_sec']:.0f} samples/s")
    if throughput.get("peak_memory_bytes"):
        parts.append(f"peak memory {throughput['peak_memory_bytes'] / 2**20:.0f} MiB")
    parts.append(f"wall time {summary['wall_time']:.1f} s")
    if summary.get("bad_images"):
        parts.append(f"{summary['bad_images']} unreadable images skipped")
    return f"{summary['run_name']}: {', '.join(parts)}, algorithms: {', '.join(summary['algorithms']) or 'none'}"


#: The logged series a run's summary keeps: eval top-1 (fraction), windowed throughput, shift consistency.
HISTORY_KEYS: tuple[str, ...] = (
    "metrics/eval/MulticlassAccuracy",
    "throughput/samples_per_sec",
    "metrics/shift_consistency/crop",
    "metrics/shift_consistency/circular",
)


class _History(LoggerDestination):
    """Keeps the :data:`HISTORY_KEYS` series only: an InMemoryLogger would hold every key of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, list[list[float]]] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for key in HISTORY_KEYS:
            if key in metrics:
                self.series.setdefault(key, []).append([float(step or 0), float(metrics[key])])


def _final_stability(trainer: Trainer) -> DiagonalStability | None:
    """The diagonal curve on the first ShiftConsistencyMonitor's loader and protocol (None without a monitor)."""
    monitor = next((c for c in trainer.state.callbacks if isinstance(c, ShiftConsistencyMonitor)), None)
    if monitor is None or monitor.dataloader is None or monitor.mode != "crop":
        return None
    with get_precision_context(trainer.state.precision, trainer.state.precision_config):
        return diagonal_stability(
            network_of(trainer.state.model),
            monitor.dataloader,
            max_shift=monitor.max_shift,
            crop_size=monitor.crop_size,
            num_batches=monitor.num_batches,
        )


def _top1(trainer: Trainer) -> float:
    metrics = trainer.state.eval_metrics.get("eval", {})
    accuracy = metrics.get("MulticlassAccuracy")
    if accuracy is None or not getattr(accuracy, "_update_count", 0):
        trainer.eval()
        accuracy = trainer.state.eval_metrics["eval"]["MulticlassAccuracy"]
    return 100.0 * float(accuracy.compute())


def run_recipe(
    recipe: Recipe, *, trainer_hook: Callable[[Trainer], None] | None = None, stability: bool = False
) -> RunSummary:
    """Trains and evaluates a validated recipe; returns the summary (the same on every rank).

    ``trainer_hook`` runs on the built Trainer before ``fit`` (tests use it to attach loggers). ``stability`` adds
    the diagonal stability curve after training, on the recipe's shift-consistency protocol (crop mode).
    """
    started = time.perf_counter()
    trainer = build_trainer(recipe)
    history = _History()
    trainer.logger.destinations = (*trainer.logger.destinations, history)
    if trainer_hook is not None:
        trainer_hook(trainer)
    trainer.fit()
    callbacks = trainer.state.callbacks
    diverged, diverged_at_batch = _divergence(trainer)
    loaders = [trainer.state.train_dataloader, *(e.dataloader.dataloader for e in trainer.state.evaluators)]
    summary = RunSummary(
        run_name=trainer.state.run_name,
        accuracy=_top1(trainer),
        wall_time=time.perf_counter() - started,
        algorithms=[type(a).__name__ for a in trainer.state.algorithms],
        # A diverged model's consistency means nothing (NaN logits would all agree): none is reported.
        shift_consistency={
            c.mode: c.last_value
            for c in callbacks
            if isinstance(c, ShiftConsistencyMonitor) and c.last_value is not None and not diverged
        },
        throughput=next((dict(c.summary) for c in callbacks if isinstance(c, ThroughputMonitor) and c.summary), {}),
        history=history.series,
        diverged=diverged,
        diverged_at_batch=diverged_at_batch,
        bad_images=sum(data.bad_image_count(loader) for loader in loaders if loader is not None),
    )
    if stability and not diverged:
        summary.stability = _final_stability(trainer)
    trainer.close()
    return summary


def _divergence(trainer: Trainer) -> tuple[bool, int | None]:
    """Whether the run diverged, and the first batch where that was seen (a monitor's NaN logits, or the loss)."""
    monitors = [c for c in trainer.state.callbacks if isinstance(c, ShiftConsistencyMonitor) and c.diverged]
    if monitors:
        return True, min(m.diverged_at_batch or 0 for m in monitors)
    loss = trainer.state.loss
    losses = list(loss.values()) if isinstance(loss, Mapping) else loss if isinstance(loss, list | tuple) else [loss]
    if any(torch.is_tensor(value) and not bool(torch.isfinite(value).all()) for value in losses):
        return True, int(trainer.state.timestamp.batch)
    return False, None


def write_summary_json(summary: RunSummary, path: str | os.PathLike[str]) -> None:
    """Writes ``summary`` as JSON under a temporary name, then renames it: the file appears whole or not at all."""
    payload = asdict(summary)
    _write_json_atomically(os.fspath(path), payload)


# ------------------------------------------------------------------------------------------------------- evaluation


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


def consistency_protocol(recipe: Recipe, max_shift: int | None = None, crop_size: int | None = None) -> tuple[int, int]:
    """``(max_shift, crop_size)`` for measuring a recipe's model: given values, else the recipe's
    ``shift_consistency_monitor``, else the dataset's (imagenet: 32 and the training crop, mnist5k: 8 and 36)."""
    options = _options("callbacks.shift_consistency_monitor", recipe.callbacks.get("shift_consistency_monitor"))
    if max_shift is None:
        # The paper's 32 px at 224 px; mnist5k trains with shifts of up to 4 px either way, a range of 8.
        dataset_default = {"imagenet": 32, "mnist5k": 2 * data.MNIST5K_MAX_SHIFT}.get(recipe.data.name)
        available = data.consistency_image_size(recipe.data.name, recipe.data.image_size)
        max_shift = options.get("max_shift") or dataset_default or max(1, (available or 32) // 8)
    for key, value in (("max_shift", max_shift), ("crop_size", crop_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecipeError(f"--{key.replace('_', '-')}", f"must be an int >= 1, got {value!r}", "command line")
    if crop_size is None:
        crop_size = options.get("crop_size") or _default_crop(recipe, max_shift)
    try:
        _check_consistency_size("--crop-size", recipe, "crop", max_shift, crop_size)
    except RecipeError as error:
        raise error.with_source("command line") from None
    return max_shift, crop_size


def _write_json_atomically(path: str, payload: Any) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or ".")
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


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
    ``crop_size + max_shift`` (ImageNet: Resize 256 + CenterCrop 256). Runs on every rank; rank 0 writes
    ``evaluation.json`` and ``diagonal_stability.png`` to ``out`` (each whole or not at all).

    Raises:
        RecipeError: no checkpoint, or one the checkpoint gate refuses (unreadable, incomplete, unsafe, or weights
            that do not fit the recipe's model).
    """
    if not recipe.load_path:
        raise RecipeError("load_path", "evaluation needs a checkpoint: add load_path=/path/to/checkpoint.pt")
    max_shift, crop_size = consistency_protocol(recipe, max_shift, crop_size)
    if out is not None:
        os.makedirs(out, exist_ok=True)
    # The checkpoint gate makes the load strict and safe; its refusals are RecipeErrors naming load_path.
    trainer = build_trainer(recipe)
    try:
        accuracy = _top1(trainer)
        loader = _consistency_loader(recipe, crop_size + max_shift)
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
        _write_json_atomically(os.path.join(out, "evaluation.json"), payload)
    return evaluation
