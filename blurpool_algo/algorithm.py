"""The Composer algorithm: anti-alias the model's subsampling layers at ``Event.INIT``.

Checkpoints: Composer records each algorithm as ``(type(algo).__qualname__, {'repr': repr(algo)})`` and, when a
checkpoint is loaded into a Trainer that lacks a ``required_on_load`` algorithm, rebuilds it with
``eval("composer.algorithms." + repr)``. A plain ``BlurPool(...)`` repr would therefore rebuild *Composer's* BlurPool
(a different surgery) from our checkpoints. This algorithm's repr is fully qualified, ``blurpool_algo.BlurPool(...)``,
and importing this module makes ``composer.algorithms.blurpool_algo`` name this package, so the autoload rebuilds this
algorithm; in a process that never imported ``blurpool_algo`` the rebuild fails and Composer warns, naming it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence

import composer.algorithms
from composer.algorithms import BlurPool as ComposerBlurPool
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from blurpool_algo.exclusion import child_name_roots
from blurpool_algo.options import OPTION_NAMES, BlurPoolOptions, validate_options
from blurpool_algo.rules import Reason
from blurpool_algo.surgery import BlurPoolReport, apply_blurpool_options

__all__ = ["BlurPool"]

log = logging.getLogger(__name__)

_PACKAGE = __name__.split(".")[0]


def _register_for_checkpoint_autoload() -> None:
    """Makes ``composer.algorithms.<package>`` resolve to this package (see the module docstring)."""
    if not hasattr(composer.algorithms, _PACKAGE):
        setattr(composer.algorithms, _PACKAGE, sys.modules[_PACKAGE])


class BlurPool(Algorithm):
    """Anti-aliases a model's strided convolutions and pools (Zhang, ICML 2019) at ``Event.INIT``.

    Each strided ``nn.Conv2d`` / ``nn.MaxPool2d`` (and, optionally, ``nn.AvgPool2d``) is replaced by a layer that
    low-pass filters with a binomial filter before subsampling, so that a small shift of the input changes the
    prediction less. The defaults compute exactly what ``composer.algorithms.BlurPool()`` computes, while keeping
    the model's parameters, state-dict keys, dtype, padding mode and ``torch.compile`` graph intact.

    Runs on ``Event.INIT``, before the optimizer sees the model; the surgery reuses every Parameter object, so the
    optimizer stays valid. Logs the replaced-layer counts as hyperparameters and warns with ``NoEffectWarning`` when
    nothing was replaced.

    Args:
        replace_convs: replace strided ``nn.Conv2d`` layers by :class:`~blurpool_algo.BlurConv2d`.
        replace_maxpools: replace strided ``nn.MaxPool2d`` layers by :class:`~blurpool_algo.BlurMaxPool2d`.
        blur_first: blur before the strided conv (True, cheap) or run the conv at stride 1 and blur-subsample its
            output (False, about ``stride**2`` times the conv's compute, closer to the paper).
        min_channels: skip convs with fewer input channels (keeps the RGB stem conv as it is).
        filter_size: binomial filter size, >= 1: 3 is ``[1, 2, 1]/4`` (Composer's), 4 the paper's default.
        pad_mode: the blur's padding: ``'zeros'`` (Composer's), ``'reflect'`` (the paper's), ``'replicate'``,
            ``'circular'``.
        replace_avgpools: also replace strided ``nn.AvgPool2d`` layers by :class:`~blurpool_algo.BlurAvgPool2d`.
        exclude: fnmatch patterns of module names to leave alone, e.g. ``['layer4']``; a pattern that matches a
            module excludes it and everything under it. Names are those of your network (``model.module`` of a
            ComposerClassifier) or of the whole ComposerModel (``module.layer4``). A pattern that matches no module
            name is warned about once at ``Event.INIT``, with the closest names, and listed in
            ``report.unmatched_exclude``.
        placement: ``'conv'`` (Composer's: the blur sits at the strided conv, as ``blur_first`` says) or
            ``'after_activation'`` (the paper's: the conv runs at stride 1, then its BatchNorm and activation, then
            the blur subsamples; ``blur_first`` does not apply). The paper's placement is recognized in
            ``nn.Sequential`` conv -> BN -> activation runs and in torchvision's ResNet blocks; other strided convs
            are left alone, listed in :attr:`report` and named in a warning.
        sampling: ``'fixed'`` (every stride-th sample, as above) or ``'adaptive'`` (APS: per sample, the polyphase
            component of largest l2 norm; ties go to the first). See :func:`~blurpool_algo.apply_blurpool`.
        circular_padding: make every padding of the network circular (all ``nn.Conv2d`` layers, the blurs, the
            max-pools), under which ``sampling='adaptive'`` makes a network exactly invariant to circular shifts.

    Example:
        .. code-block:: python

            from composer import Trainer
            trainer = Trainer(model=model, algorithms=[BlurPool(blur_first=True)], ...)
    """

    def __init__(
        self,
        replace_convs: bool = True,
        replace_maxpools: bool = True,
        blur_first: bool = True,
        min_channels: int = 16,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        replace_avgpools: bool = False,
        exclude: Sequence[str] = (),
        placement: str = "conv",
        sampling: str = "fixed",
        circular_padding: bool = False,
    ) -> None:
        #: The validated options, frozen; each is also a plain attribute (``algo.blur_first``), like Composer's.
        self.options: BlurPoolOptions = validate_options(
            replace_convs=replace_convs, replace_maxpools=replace_maxpools, blur_first=blur_first,
            min_channels=min_channels, filter_size=filter_size, pad_mode=pad_mode, replace_avgpools=replace_avgpools,
            exclude=exclude, placement=placement, sampling=sampling, circular_padding=circular_padding,
        )  # fmt: skip
        self.replace_convs = self.options.replace_convs
        self.replace_maxpools = self.options.replace_maxpools
        self.blur_first = self.options.blur_first
        self.min_channels = self.options.min_channels
        self.filter_size = self.options.filter_size
        self.pad_mode = self.options.pad_mode
        self.replace_avgpools = self.options.replace_avgpools
        self.exclude = self.options.exclude
        self.placement = self.options.placement
        self.sampling = self.options.sampling
        self.circular_padding = self.options.circular_padding
        #: The report of the last surgery this algorithm did (None before ``Event.INIT``).
        self.report: BlurPoolReport | None = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self.options, name)!r}" for name in OPTION_NAMES)
        return f"{_PACKAGE}.{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlurPool) and other.options == self.options

    def __hash__(self) -> int:
        return hash(self.options)

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        assert state.model is not None, "BlurPool needs state.model at Event.INIT"
        # Composer's BlurPool replaces the same layers: beside it, every subsampling layer would be blurred twice, or
        # one surgery would silently win. Either order lands here, since this check runs before any surgery of ours.
        composers = [a for a in state.algorithms if isinstance(a, ComposerBlurPool)]
        if composers:
            raise ValueError(
                f"{self!r} cannot run beside Composer's BlurPool (composer.algorithms.BlurPool) in one Trainer: both "
                "anti-alias the same layers, so they would be blurred twice; pass only one of them in algorithms"
            )
        # In a Trainer the network sits inside the ComposerModel (``module.layer4...``); users write names relative
        # to their network (``layer4``), so patterns are matched relative to the model and to each of its children.
        self.report = apply_blurpool_options(state.model, self.options, name_roots=child_name_roots(state.model))
        counts = self.report.counts()
        log.info("Applied %r to %s.\n%s", self, type(state.model).__name__, self.report)
        logger.log_hyperparameters(
            {
                f"blurpool/{name}": value
                for name, value in {
                    **counts,
                    # Composer's name for the max-pool count, so dashboards built on its BlurPool keep working.
                    "num_blurpool_layers": counts["num_blurmaxpool_layers"],
                }.items()
            }
        )
        unplaced = [d.name for d in self.report.skipped if d.code is Reason.UNRECOGNIZED]
        if unplaced:
            warnings.warn(
                f"{self!r}: the paper's placement does not recognize the structure around {', '.join(unplaced)}; "
                "these strided convs were left as they are (placement='conv' anti-aliases any strided conv)",
                stacklevel=2,
            )
        if not self.report.changed:
            warnings.warn(
                NoEffectWarning(
                    f"{self!r} replaced no layer of {type(state.model).__name__}: it has no strided nn.Conv2d with "
                    f">= {self.options.min_channels} input channels"
                    + (" in a structure the paper's placement recognizes" if self.options.placement != "conv" else "")
                    + f" and no strided pool of an enabled kind. Skipped modules:\n{self.report}"
                ),
                stacklevel=2,
            )


_register_for_checkpoint_autoload()
