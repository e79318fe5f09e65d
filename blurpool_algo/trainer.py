"""The Composer Trainer a validated recipe describes, and a run of it: train, evaluate, summarise.

:func:`build_trainer` assembles the Trainer from the parts validation built (:func:`blurpool_algo.recipe.recipe_parts`):
nothing is constructed twice, and every checkpoint it loads passes the checkpoint gate. :func:`run_recipe` trains,
evaluates, measures circular consistency beside the recipe's crop consistency, and returns a
:class:`~blurpool_algo.summary.RunSummary`.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from composer import Trainer
from composer.core.precision import get_precision_context
from composer.loggers import LoggerDestination
from composer.models import ComposerClassifier
from composer.optim import (
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    MultiStepWithWarmupScheduler,
)
from composer.utils import dist, reproducibility

from blurpool_algo import checkpoints
from blurpool_algo.callbacks import ShiftConsistencyMonitor, ThroughputMonitor, network_of
from blurpool_algo.data import DataError, bad_image_count
from blurpool_algo.metrics import (
    ConsistencyProtocol,
    DiagonalStability,
    NonFiniteLogitsError,
    diagonal_stability,
    shift_consistency,
)
from blurpool_algo.models import build_model
from blurpool_algo.recipe import Recipe, RecipeError, RecipeParts, recipe_parts
from blurpool_algo.resume import recover_save_folder, room_for_a_checkpoint
from blurpool_algo.summary import HISTORY_KEYS, RunSummary

__all__ = ["build_trainer", "consistency_loader", "full_disk_explanation", "run_recipe", "top1_accuracy"]


def _optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = recipe.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov
        )
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def _scheduler(recipe: Recipe, parts: RecipeParts):
    warmup = parts.times["scheduler.warmup"]
    if recipe.scheduler.name == "multistep":
        return MultiStepWithWarmupScheduler(t_warmup=warmup, milestones=parts.milestones, gamma=recipe.scheduler.gamma)
    if recipe.scheduler.name == "cosine":
        return CosineAnnealingWithWarmupScheduler(t_warmup=warmup)
    return ConstantWithWarmupScheduler(t_warmup=warmup)


def consistency_loader(recipe: Recipe, protocol: ConsistencyProtocol) -> torch.utils.data.DataLoader:
    """This rank's validation images at the protocol's frame size, for shift-consistency measurements."""
    parts = recipe_parts(recipe)
    batch_size = recipe.eval_batch_size // dist.get_world_size()
    return parts.dataset.consistency_loader(parts.data_options, protocol, batch_size=batch_size)


def build_trainer(recipe: Recipe) -> Trainer:
    """The Composer Trainer a validated recipe describes (model, data, optimizer, schedule, algorithms, ...).

    Its algorithms, callbacks and loggers are those validation built (a second Trainer of the same recipe gets new
    ones: a Trainer owns their state). Every checkpoint it loads (``load_path``, or the save folder's latest with
    ``autoresume``) passes the checkpoint gate (:mod:`blurpool_algo.checkpoints`): safe unpickling unless
    ``trust_checkpoint``, literal algorithm descriptions, and weights that match the recipe's model key for key and
    shape for shape (blur filters aside). With ``autoresume``, checkpoints left partial by a crash are first set
    aside, so the run resumes from the last complete one.

    Raises:
        RecipeError: a checkpoint the gate refuses (key ``load_path``, or ``autoresume`` for the save folder's).
    """
    parts = recipe_parts(recipe)
    world_size = dist.get_world_size()
    # The Trainer seeds itself, but the model is built before it: without this its initial weights would depend on
    # whatever the process did before (and the two arms of an A/B would not start from the same weights).
    reproducibility.seed_all(recipe.seed)
    local_ranks = dist.get_local_world_size()
    if parts.device == "cpu" and local_ranks > 1:
        # Each CPU rank would otherwise start one thread per core, oversubscribing the machine local_ranks times.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    network = build_model(recipe.model.name, num_classes=recipe.model.num_classes)
    model = ComposerClassifier(network, num_classes=recipe.model.num_classes)
    try:
        train_loader, eval_loader = parts.dataset.loaders(
            parts.data_options,
            train_batch_size=recipe.train_batch_size // world_size,
            eval_batch_size=recipe.eval_batch_size // world_size,
        )
    except DataError as error:
        raise RecipeError(error.key, error.message) from None
    callbacks = []
    for part in parts.callbacks:
        callback = part.build()
        if part.key in parts.protocols and callback.dataloader is None:
            # The Trainer's eval images are centre crops at the crop size: the measurement needs its own loader of
            # images prepared at the protocol's frame (crop_size + max_shift in crop mode).
            callback.dataloader = consistency_loader(recipe, parts.protocols[part.key])
        callbacks.append(callback)
    folder = parts.save_folder
    if recipe.autoresume and folder is not None and dist.get_global_rank() == 0:
        # Before the Trainer looks for the latest checkpoint; the other ranks learn its path from rank 0 (Composer
        # broadcasts it), so they never see the folder before this.
        recover_save_folder(folder)
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
                eval_interval=parts.times["eval_interval"],
                max_duration=parts.times["max_duration"],
                optimizers=_optimizer(recipe, model),
                schedulers=_scheduler(recipe, parts),
                algorithms=[part.build() for part in parts.algorithms],
                callbacks=callbacks,
                loggers=[part.build() for part in parts.loggers],
                precision=parts.precision,
                device=parts.device,
                seed=recipe.seed,
                save_folder=recipe.save_folder,
                save_interval=parts.times["save_interval"],
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


class _History(LoggerDestination):
    """Keeps the :data:`HISTORY_KEYS` series only: an InMemoryLogger would hold every key of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, list[list[float]]] = {}

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        for key in HISTORY_KEYS:
            if key in metrics:
                self.series.setdefault(key, []).append([float(step or 0), float(metrics[key])])


def _crop_monitor(trainer: Trainer) -> ShiftConsistencyMonitor | None:
    """The first ShiftConsistencyMonitor if it measures in crop mode on a loader of its own (else None)."""
    monitor = next((c for c in trainer.state.callbacks if isinstance(c, ShiftConsistencyMonitor)), None)
    if monitor is None or monitor.dataloader is None or monitor.mode != "crop":
        return None
    return monitor


def _final_stability(trainer: Trainer) -> DiagonalStability | None:
    """The diagonal curve on the first ShiftConsistencyMonitor's loader and protocol (None without a monitor)."""
    monitor = _crop_monitor(trainer)
    if monitor is None:
        return None
    with get_precision_context(trainer.state.precision, trainer.state.precision_config):
        return diagonal_stability(
            network_of(trainer.state.model),
            monitor.dataloader,
            max_shift=monitor.max_shift,
            crop_size=monitor.crop_size,
            num_batches=monitor.num_batches,
        )


def _final_circular_consistency(trainer: Trainer) -> float | None:
    """Circular consistency on the crop monitor's loader, shift range, crop size and seed (None without one).

    The crop monitor's images are framed at ``crop_size + max_shift``; circular mode centre-crops them to
    ``crop_size`` and rolls that by two shifts in ``[-max_shift, max_shift)`` per axis: the same images and shift
    range as the crop number, with the content wrapping around instead of entering from the frame. Raises
    :class:`~blurpool_algo.metrics.NonFiniteLogitsError` for non-finite logits.
    """
    monitor = _crop_monitor(trainer)
    if monitor is None:
        return None
    with get_precision_context(trainer.state.precision, trainer.state.precision_config):
        return shift_consistency(
            network_of(trainer.state.model),
            monitor.dataloader,
            mode="circular",
            max_shift=monitor.max_shift,
            crop_size=monitor.crop_size,
            seed=monitor.seed,
            offsets=monitor.offsets,
            num_batches=monitor.num_batches,
        )


def top1_accuracy(trainer: Trainer) -> float:
    """The Trainer's eval top-1 in percent, reduced over ranks (evaluating first if it has not evaluated yet)."""
    metrics = trainer.state.eval_metrics.get("eval", {})
    accuracy = metrics.get("MulticlassAccuracy")
    if accuracy is None or not getattr(accuracy, "_update_count", 0):
        trainer.eval()
        accuracy = trainer.state.eval_metrics["eval"]["MulticlassAccuracy"]
    return 100.0 * float(accuracy.compute())


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


def run_recipe(
    recipe: Recipe, *, trainer_hook: Callable[[Trainer], None] | None = None, stability: bool = False
) -> RunSummary:
    """Trains and evaluates a validated recipe; returns the summary (the same on every rank).

    ``trainer_hook`` runs on the built Trainer before ``fit`` (tests use it to attach loggers). ``stability`` adds
    the diagonal stability curve after training, on the recipe's shift-consistency protocol (crop mode).

    With a crop-mode ``shift_consistency_monitor`` (and no circular one), circular consistency is measured after
    training on the monitor's images, shift range, crop size and seed (one more pass of two forward passes per
    image), and reported as ``shift_consistency['circular']`` beside the monitor's ``'crop'``. A diverged run
    reports neither; non-finite logits in the circular measurement mark the run diverged.
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
        accuracy=top1_accuracy(trainer),
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
        bad_images=sum(bad_image_count(loader) for loader in loaders if loader is not None),
    )
    if not diverged and "circular" not in summary.shift_consistency:
        try:
            circular = _final_circular_consistency(trainer)
        except NonFiniteLogitsError:
            # Every rank raises it together (the counts agree across ranks first): the model's outputs went
            # non-finite, so no consistency of it is reported, as for a monitor that saw it.
            summary.diverged, summary.diverged_at_batch = True, int(trainer.state.timestamp.batch)
            summary.shift_consistency, circular = {}, None
        if circular is not None:
            summary.shift_consistency["circular"] = circular
    if stability and not summary.diverged:
        summary.stability = _final_stability(trainer)
    trainer.close()
    return summary


def full_disk_explanation(recipe: Recipe, error: BaseException) -> str | None:
    """A one-line explanation if ``error`` came from a full disk under the recipe's save folder, else None."""
    folder = recipe_parts(recipe).save_folder
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = error.filename or folder or "the disk"
    elif folder is not None:
        free, needed = room_for_a_checkpoint(folder)
        if free >= needed:
            return None
        where = folder
    else:
        return None
    return (
        f"no space left on the disk holding {where}; free space, then rerun the same command (with autoresume=true "
        "it resumes from the last complete checkpoint, setting the partial one aside)"
    )
