"""Recipes: the typed schema (OmegaConf structured configs), loading, and per-section validation.

A recipe is a YAML file plus dotted ``key=value`` overrides. :func:`load_recipe` merges them onto the schema and checks
everything that can be checked before work starts (types, unknown keys, names of models, algorithms, callbacks and
loggers, data paths, batch sizes against the world size, checkpoint paths); any problem is a :class:`RecipeError`
naming the key and the file. Validation keeps what it built (:class:`RecipeParts`: the algorithms, callbacks and
loggers, the data options, the resolved device, precision and times), and :func:`blurpool_algo.trainer.build_trainer`
uses those parts instead of building them again.

Example:
    >>> error = RecipeError("optimizer.lr", "must be a finite number > 0, got -0.1")
    >>> str(error.with_source("recipe.yaml"))
    'recipe.yaml: optimizer.lr: must be a finite number > 0, got -0.1'
    >>> str(error.located("recipe.yaml", ["optimizer.lr=-0.1"]))
    'command line: optimizer.lr: must be a finite number > 0, got -0.1'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from composer.core import Algorithm, Callback, Time
from composer.loggers import FileLogger, LoggerDestination, MLFlowLogger, TensorboardLogger, WandBLogger
from composer.utils import dist
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from blurpool_algo import data
from blurpool_algo.algorithm import BlurPool
from blurpool_algo.callbacks import ShiftConsistencyMonitor, ThroughputMonitor
from blurpool_algo.data import DataOptions, DatasetSpec
from blurpool_algo.metrics import ConsistencyProtocol
from blurpool_algo.recipe_checks import (
    RecipeError,
    check_data,
    check_hardware,
    check_model,
    check_numbers,
    check_resume,
    check_saving,
    check_times,
    construct,
    first_line,
    instance_checks,
)

__all__ = [
    "LOGGERS",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Part",
    "Recipe",
    "RecipeError",
    "RecipeParts",
    "SchedulerConfig",
    "algorithm_registry",
    "callback_registry",
    "load_recipe",
    "recipe_parts",
    "validate_recipe",
]


# ----------------------------------------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    #: A torchvision classification architecture (``resnet50``, ...) or ``resnet10`` (small, for CPU runs).
    name: str = MISSING
    num_classes: int = 1000


@dataclass
class DataConfig:
    #: A dataset of :mod:`blurpool_algo.data`'s registry (``data.DATASETS``).
    name: str = MISSING
    #: For a dataset read from a folder: the folder (its spec says what it must hold).
    root: str | None = None
    #: DataLoader workers per rank.
    num_workers: int = 8
    #: Training crop size (or the side of generated images); None = the dataset's.
    image_size: int | None = None
    #: Samples in the generated (synthetic) training set.
    synthetic_samples: int = 64
    #: Folder datasets: unreadable images skipped with a warning before the run stops; 0 = none.
    max_bad_images: int = data.DEFAULT_MAX_BAD_IMAGES
    #: ``streaming_imagenet``: the MDS shards (a local folder or an s3://, gs://, oci:// URL) holding train/, val/.
    remote: str | None = None
    #: ``streaming_imagenet``: the cache folder shards are copied or downloaded into; null = read a local remote.
    local: str | None = None
    #: ``streaming_imagenet``: streaming's shuffle algorithm (py1e, py1br, py1b, py1s, py2s, naive).
    shuffle_algo: str = "py1e"
    #: ``streaming_imagenet``: samples per rank downloaded ahead; null = 8 x the per-rank batch.
    predownload: int | None = None
    #: ``streaming_imagenet``: most bytes the cache holds (e.g. "200gb"), evicting shards; null = no limit.
    cache_limit: str | None = None
    #: ``streaming_imagenet``: hash each shard against its index (sha1, xxh64); null = sizes only.
    validate_hash: str | None = None
    #: ``streaming_imagenet``: seconds per shard download before streaming retries.
    download_timeout: float = 60.0


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

    # Not a field (no annotation): what validating this recipe built, beside a copy of the values it was built from.
    # Set by validate_recipe, read by recipe_parts; dataclasses.asdict and OmegaConf never see it.
    _validated = None


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
        raise RecipeError(getattr(exc, "full_key", None) or "<recipe>", first_line(exc), source) from None


def load_recipe(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Recipe:
    """Reads a recipe file, applies dotted overrides (``data.root=/x``), and validates the result.

    The recipe comes back with the parts validation built (:func:`recipe_parts`), for the Trainer to use.

    Raises:
        RecipeError: naming the file (or ``command line``) and the key, for anything wrong.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise RecipeError("-f", f"recipe file not found: {source}")
    try:
        layer = OmegaConf.load(source)
    except Exception as exc:  # YAML syntax errors come in several exception types
        raise RecipeError("<yaml>", f"cannot parse: {first_line(exc)}", source) from None
    if not isinstance(layer, DictConfig):
        raise RecipeError("<yaml>", "a recipe must be a mapping of keys to values", source)
    config = _merge(OmegaConf.structured(Recipe), layer, source)
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise RecipeError(bad[0], "overrides must look like key=value (e.g. data.root=/data/imagenet)", "command line")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise RecipeError("<override>", first_line(exc), "command line") from None
    config = _merge(config, dotlist, "command line")
    try:
        recipe: Recipe = OmegaConf.to_object(config)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "<recipe>"
        raise RecipeError(key, re.sub(r"^Structured config of type `\w+` has ", "", first_line(exc)), source) from None
    try:
        validate_recipe(recipe)
    except RecipeError as exc:
        raise exc.located(source, overrides) from None
    return recipe


# ------------------------------------------------------------------------------------------------------------ parts

_Built = TypeVar("_Built")


@dataclass
class Part(Generic[_Built]):
    """One checked entry of ``algorithms``, ``callbacks`` or ``loggers``: its constructor and options.

    Validation builds each entry once to check it and keeps that instance; the first Trainer takes it. Algorithms and
    callbacks hold state (a monitor's measurements, a dataloader), and a Trainer owns what it is given, so a second
    Trainer from the same recipe (an evaluation, a test) gets a new instance instead of sharing the first's.
    """

    key: str
    factory: Callable[..., _Built]
    options: dict[str, Any]
    unclaimed: _Built | None = field(default=None, repr=False, compare=False)

    def build(self) -> _Built:
        """The instance validation built, the first time; a new one, from the same checked options, after that."""
        built, self.unclaimed = self.unclaimed, None
        return built if built is not None else self.factory(**self.options)


@dataclass(frozen=True)
class RecipeParts:
    """What validating a recipe built, for the Trainer (:func:`blurpool_algo.trainer.build_trainer`) to use.

    Attributes:
        algorithms, callbacks, loggers: one :class:`Part` per recipe entry, in the recipe's order.
        times: each time key (``max_duration``, ``eval_interval``, ``save_interval``, ``scheduler.warmup``,
            ``scheduler.milestones[i]``) as a Composer Time.
        device: ``cpu``, ``gpu`` or ``mps`` (``auto`` resolved on this machine).
        precision: ``fp32``, ``amp_fp16`` or ``amp_bf16`` (``auto`` resolved for the device).
        save_folder: the checkpoint folder with ``{run_name}`` filled in, or None (no checkpoints).
        dataset: the dataset's spec (:func:`blurpool_algo.data.dataset_spec`), which builds its loaders.
        data_options: the checked dataset options the spec's loaders take.
        protocols: the shift-consistency protocol of each ``ShiftConsistencyMonitor`` entry, by its key.
    """

    algorithms: tuple[Part[Algorithm], ...]
    callbacks: tuple[Part[Callback], ...]
    loggers: tuple[Part[LoggerDestination], ...]
    times: Mapping[str, Time]
    device: str
    precision: str
    save_folder: str | None
    dataset: DatasetSpec
    data_options: DataOptions
    protocols: Mapping[str, ConsistencyProtocol]

    @property
    def milestones(self) -> list[Time]:
        return [time for key, time in self.times.items() if key.startswith("scheduler.milestones[")]


def _parts(section: str, entries: Mapping[str, Any], registry: Mapping[str, Callable[..., Any]]) -> tuple[Part, ...]:
    """Each entry of a named section, checked: a known name, options that are a mapping, a constructor that takes
    them. Builds each once; the instance waits in its Part for the first Trainer."""
    parts = []
    for name, value in entries.items():
        key = f"{section}.{name}"
        if name not in registry:
            raise RecipeError(key, f"unknown {section[:-1]} {name!r}; allowed: {', '.join(registry)}")
        if value is not None and not isinstance(value, Mapping):
            raise RecipeError(key, f"expected a mapping of options (or {{}}), got {value!r}")
        options = dict(value or {})
        parts.append(Part(key, registry[name], options, construct(key, registry[name], options)))
    return tuple(parts)


def validate_recipe(recipe: Recipe) -> RecipeParts:
    """Checks what the schema's types cannot, section by section, and returns (and keeps on ``recipe``) what the
    checks built: names, choices, paths, time strings, sizes against the world size, the algorithms, callbacks and
    loggers themselves.

    Raises:
        RecipeError: naming the key (without a source: :func:`load_recipe` adds the file or ``command line``).
    """
    world_size = dist.get_world_size()
    check_numbers(recipe, world_size)
    times = check_times(recipe)
    device, precision = check_hardware(recipe)
    folder = check_saving(recipe)
    check_model(recipe)
    dataset, data_options = check_data(recipe, world_size)
    algorithms = _parts("algorithms", recipe.algorithms, algorithm_registry())
    callbacks = _parts("callbacks", recipe.callbacks, callback_registry())
    loggers = _parts("loggers", recipe.loggers, LOGGERS)
    protocols = instance_checks(recipe, dataset, data_options, (*algorithms, *callbacks))
    check_resume(recipe, folder)
    parts = RecipeParts(
        algorithms, callbacks, loggers, times, device, precision, folder, dataset, data_options, protocols
    )
    recipe._validated = (dataclasses.asdict(recipe), parts)
    return parts


def recipe_parts(recipe: Recipe) -> RecipeParts:
    """The parts validating ``recipe`` built, if its values are still those it was validated with; else (a recipe
    changed after loading, or built by hand) it is validated now, and any problem is a :class:`RecipeError`."""
    kept = recipe._validated
    if kept is not None and kept[0] == dataclasses.asdict(recipe):
        return kept[1]
    return validate_recipe(recipe)
