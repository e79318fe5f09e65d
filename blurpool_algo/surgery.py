"""Model surgery: replace a model's subsampling layers by their anti-aliased versions, in place.

:func:`apply_blurpool` checks the options and the model, then walks the model with the rules of the chosen placement
(:mod:`blurpool_algo.rules` is the engine, :mod:`blurpool_algo.layer_rules` and :mod:`blurpool_algo.resnet_rules` the
rules) and returns a :class:`BlurPoolReport` that lists every candidate it saw, replaced or skipped, with the reason.
It creates no new parameters: a replaced conv keeps its ``weight`` and ``bias`` Parameter objects, so optimizers built
before the surgery stay valid.

Exclude patterns (:mod:`blurpool_algo.exclusion`) are fnmatch patterns of module names. A pattern that matches a
module's name excludes that module and everything under it (``'layer4'`` is all of layer4); a pattern that matches no
module name at all is reported (:attr:`BlurPoolReport.unmatched_exclude`) and warned about, naming the closest names.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from blurpool_algo import layers
from blurpool_algo.checks import fail
from blurpool_algo.exclusion import Exclusion, child_name_roots, unmatched_exclude_patterns
from blurpool_algo.layer_rules import CIRCULAR_PADDING, CONV_PLACEMENT, PAPER_PLACEMENT
from blurpool_algo.options import PLACEMENTS, BlurPoolOptions, validate_options
from blurpool_algo.resnet_rules import RESNET_RULES
from blurpool_algo.rules import Decision, ReasonCode, Rule, Site, SurgeryContext, walk

__all__ = [
    "PLACEMENTS",
    "PLACEMENT_RULES",
    "BlurPoolOptions",
    "BlurPoolReport",
    "ModuleDecision",
    "apply_blurpool",
    "apply_blurpool_options",
    "child_name_roots",
    "unmatched_exclude_patterns",
    "validate_options",
]

#: Each placement's rules, in the order the walker asks them. Network-specific structure rules go first.
PLACEMENT_RULES: dict[str, tuple[Rule, ...]] = {
    "conv": CONV_PLACEMENT,
    "after_activation": (*RESNET_RULES, *PAPER_PLACEMENT),
}

#: Where Composer keeps its own BlurPool layers; a model holding one was anti-aliased by Composer's surgery already.
#: Matched by module name, so this module imports no Composer code.
COMPOSER_BLURPOOL_MODULE = "composer.algorithms.blurpool"


@dataclass(frozen=True)
class ModuleDecision:
    """What the surgery did with one candidate module: ``code`` says why (compare it), ``reason`` in words."""

    name: str
    original: str
    replacement: str | None
    reason: str
    code: ReasonCode
    #: The values in ``reason`` (``pattern`` of an exclusion, ``stride`` ...), as data.
    details: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, site: Site, decision: Decision) -> ModuleDecision:
        shared = f" (shared: also {', '.join(site.names[1:])})" if len(site.names) > 1 else ""
        replacement = type(decision.blur).__name__ if decision.blur is not None else None
        return cls(site.name, type(site.module).__name__, replacement, decision.reason + shared, decision.code,
                   dict(decision.details))  # fmt: skip


@dataclass
class BlurPoolReport:
    """Every candidate module the surgery saw: the replaced ones, and the skipped ones with the reason."""

    options: BlurPoolOptions
    replaced: list[ModuleDecision] = field(default_factory=list)
    skipped: list[ModuleDecision] = field(default_factory=list)
    #: Exclude patterns (as the user wrote them) that matched no module name, so excluded nothing.
    unmatched_exclude: tuple[str, ...] = ()
    #: Under ``circular_padding``: the plain convs and pools made to pad circularly (the blur layers are built so).
    circular: list[ModuleDecision] = field(default_factory=list)

    def _count(self, *classes: type[nn.Module]) -> int:
        names = {cls.__name__ for cls in classes}
        return sum(d.replacement in names for d in self.replaced)

    # Each count takes a layer kind's 2-D and 1-D classes together.

    @property
    def num_blurconv_layers(self) -> int:
        return self._count(layers.BlurConv2d, layers.BlurConv1d)

    @property
    def num_blurmaxpool_layers(self) -> int:
        return self._count(layers.BlurMaxPool2d, layers.BlurMaxPool1d)

    @property
    def num_bluravgpool_layers(self) -> int:
        return self._count(layers.BlurAvgPool2d, layers.BlurAvgPool1d)

    @property
    def num_blurpool2d_layers(self) -> int:
        """Blurs placed after an activation (the paper's placement) as their own module (``BlurPool2d``, and
        ``BlurPool1d`` in 1-D networks)."""
        return self._count(layers.BlurPool2d, layers.BlurPool1d)

    @property
    def num_blurinputconv_layers(self) -> int:
        """Blurs placed after an activation (the paper's placement) inside the next conv."""
        return self._count(layers.BlurInputConv2d, layers.BlurInputConv1d)

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    @property
    def changed(self) -> bool:
        return bool(self.replaced)

    def counts(self) -> dict[str, int]:
        """Counts under the names the algorithm logs (``blurpool/<name>``)."""
        return {
            "num_blurconv_layers": self.num_blurconv_layers,
            "num_blurmaxpool_layers": self.num_blurmaxpool_layers,
            "num_bluravgpool_layers": self.num_bluravgpool_layers,
            "num_blurpool2d_layers": self.num_blurpool2d_layers,
            "num_blurinputconv_layers": self.num_blurinputconv_layers,
            "num_skipped_layers": len(self.skipped),
        }

    def __str__(self) -> str:
        lines = [f"BlurPool surgery: {self.num_replaced} replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {d.name}: {d.original} -> {d.replacement} ({d.reason})" for d in self.replaced]
        lines += [f"  skipped  {d.name}: {d.original} ({d.reason})" for d in self.skipped]
        lines += [f"  exclude pattern {p!r} matched no module name" for p in self.unmatched_exclude]
        lines += [f"  circular {d.name}: {d.original} ({d.reason})" for d in self.circular if d.replacement]
        return "\n".join(lines)


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_model(model: Any) -> None:
    """Refuses a model the surgery cannot change correctly in place; raises ``ValueError`` saying what to do instead."""
    if not isinstance(model, nn.Module):
        raise fail("model", "a torch.nn.Module", type(model).__name__)
    if isinstance(model, DistributedDataParallel | nn.DataParallel):
        raise ValueError(
            f"apply_blurpool got a {type(model).__name__}-wrapped model; apply it to the plain model before wrapping "
            "(Composer's Trainer does this for you at Event.INIT)"
        )
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(
            "apply_blurpool got a torch.compile'd model, whose compiled graphs would not see the new layers; "
            "apply it to the plain model, then compile"
        )
    composer_layers = []
    for name, module in model.named_modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule") or type(module).__name__.startswith(
            "FSDP"
        ):
            raise ValueError(
                f"apply_blurpool got a model with FSDP-wrapped module {name or '<root>'!r}; apply it before sharding"
            )
        if isinstance(module, torch.jit.ScriptModule):
            # Its compiled code calls the layers it was scripted with: swapping attributes would change nothing.
            where = f"submodule {name!r}" if name else "the model itself"
            raise ValueError(
                f"apply_blurpool got a TorchScript module ({where}, from torch.jit.script or trace), whose compiled "
                "code would not see new layers; apply it to the plain module, then script"
            )
        if type(module).__module__.startswith(COMPOSER_BLURPOOL_MODULE):
            composer_layers.append(name)
    if composer_layers:
        raise ValueError(
            f"the model already holds Composer's BlurPool layers ({_preview(composer_layers)}): anti-aliasing it again "
            "would blur twice; use one BlurPool (Composer's or this one) on the plain model"
        )


def apply_blurpool(
    model: nn.Module,
    *,
    replace_convs: bool = True,
    replace_maxpools: bool = True,
    replace_avgpools: bool = False,
    blur_first: bool = True,
    min_channels: int = 16,
    filter_size: int = 3,
    pad_mode: str = "zeros",
    exclude: Sequence[str] = (),
    placement: str = "conv",
    sampling: str = "fixed",
    circular_padding: bool = False,
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> BlurPoolReport:
    """Replaces, in place, the subsampling layers of ``model`` by anti-aliased ones.

    * ``nn.Conv2d`` with a stride > 1 and ``in_channels >= min_channels`` -> :class:`BlurConv2d`.
    * ``nn.MaxPool2d`` with a stride > 1 -> :class:`BlurMaxPool2d`.
    * ``nn.AvgPool2d`` with a stride > 1 -> :class:`BlurAvgPool2d` (only with ``replace_avgpools=True``).
    * Their 1-D forms alike: ``nn.Conv1d``, ``nn.MaxPool1d``, ``nn.AvgPool1d`` -> ``BlurConv1d``, ``BlurMaxPool1d``,
      ``BlurAvgPool1d`` (in the paper's placement, ``Conv1d -> BatchNorm1d -> activation`` runs get a ``BlurPool1d``).

    Only these exact classes are replaced: subclasses (a "same"-padding conv, say) and pools with
    ``return_indices=True`` are skipped and reported, never swapped for something that behaves differently. Applying
    it twice changes nothing the second time. A module shared at several places is replaced by one new module at all
    of them. With the defaults, the result computes what ``composer.algorithms.BlurPool()`` computes.

    Args:
        model: the model to modify, not yet wrapped in DDP/FSDP nor compiled.
        replace_convs: replace strided convolutions.
        replace_maxpools: replace strided max pools.
        replace_avgpools: replace strided average pools.
        blur_first: for convs, blur then the strided conv (True), or the conv at stride 1 then blur-subsample (False).
        min_channels: convs with fewer input channels are left alone (the RGB stem, typically).
        filter_size: binomial filter size, >= 1 (3 = [1, 2, 1]/4; the paper's default is 4).
        pad_mode: the blur's padding, one of ``'zeros'``, ``'reflect'``, ``'replicate'``, ``'circular'``.
        exclude: fnmatch patterns of module names (as in ``named_modules()``) to leave alone: a pattern that matches
            a module's name excludes that module and everything under it (``"layer4"``, ``"layer4.*"``: all of
            layer4; ``"layer4.0"``: its first block). A pattern that matches no module name excludes nothing: it is
            listed in :attr:`BlurPoolReport.unmatched_exclude` and warned about (``UserWarning``), with the closest
            names.
        placement: ``'conv'`` (the blur sits at the strided conv, before or after it as ``blur_first`` says;
            Composer's two modes), or ``'after_activation'`` (the paper's: the conv runs at stride 1, then its BN and
            activation, then the blur subsamples; ``blur_first`` does not apply). The paper's placement needs the
            structure: a conv followed by BatchNorm and an activation in an ``nn.Sequential``, or a torchvision ResNet
            block or stem. Strided convs elsewhere are reported as skipped. Strided unpadded 1x1 convs (shortcuts)
            blur first, then run at stride 1, and average pools become a :class:`BlurPool2d`, as in the paper.
        sampling: how every blur layer subsamples: ``'fixed'`` (every stride-th sample, starting at the first) or
            ``'adaptive'`` (adaptive polyphase sampling, APS: per sample, of the ``stride**2`` polyphase components the
            one of largest l2 norm over channels and space; ties go to the first). Same layers, same state-dict keys.
        circular_padding: ``True`` makes every padding in the network circular: every ``nn.Conv2d`` (stride 1 too)
            gets ``padding_mode='circular'``, every blur pads circularly, and every max-pool pads circularly instead
            of with -inf. With ``sampling='adaptive'`` and a global pool at the end, the network is then exactly
            invariant to circular shifts (``torch.roll``) of its input. Convs the surgery otherwise leaves alone
            (the RGB stem under ``min_channels``, excluded ones) are padded circularly too.
        optimizers: accepted for Composer's functional-API signature. The surgery reuses every Parameter object, so
            existing optimizers need no update; they are only checked to be optimizers.

    Returns:
        A :class:`BlurPoolReport` of what was replaced and what was skipped, and why.

    Raises:
        ValueError: on a bad option, or a model that is DDP/FSDP-wrapped, compiled, scripted (TorchScript), or that
            holds Composer's BlurPool layers already (it would be blurred twice).

    Example:
        >>> import torchvision
        >>> report = apply_blurpool(torchvision.models.resnet18())
        >>> report.num_blurmaxpool_layers, report.num_blurconv_layers
        (1, 6)
    """
    options = validate_options(
        replace_convs=replace_convs, replace_maxpools=replace_maxpools, replace_avgpools=replace_avgpools,
        blur_first=blur_first, min_channels=min_channels, filter_size=filter_size, pad_mode=pad_mode, exclude=exclude,
        placement=placement, sampling=sampling, circular_padding=circular_padding,
    )  # fmt: skip
    if optimizers is not None:
        optimizer_list = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if not all(isinstance(o, torch.optim.Optimizer) for o in optimizer_list):
            raise fail("optimizers", "a torch.optim.Optimizer, a sequence of them, or None", optimizers)
    return apply_blurpool_options(model, options)


def apply_blurpool_options(
    model: nn.Module, options: BlurPoolOptions, *, name_roots: Sequence[str] = ("",)
) -> BlurPoolReport:
    """:func:`apply_blurpool` with options already validated, exclude patterns matched relative to ``name_roots``.

    For callers that hold a :class:`BlurPoolOptions` (from :func:`validate_options`), such as the Composer algorithm,
    which passes :func:`child_name_roots` so that names as the wrapped network spells them match. Each pattern that
    matches no module name under any root is warned about once, as written.

    Raises:
        ValueError: when ``options`` is not a ``BlurPoolOptions``, on bad ``name_roots``, and on a model that
            :func:`apply_blurpool` refuses.
    """
    if not isinstance(options, BlurPoolOptions):
        raise fail("options", "a BlurPoolOptions (see validate_options)", type(options).__name__)
    exclusion = Exclusion(options.exclude, name_roots)
    _check_model(model)
    # Before the surgery: the paper's placement adds modules (an activation's slot becomes a Sequential), and the
    # user wrote the patterns against the model as it was.
    unmatched = unmatched_exclude_patterns(model, options.exclude, exclusion.roots)
    for pattern, closest in unmatched:
        warnings.warn(_unmatched_warning(model, pattern, closest, exclusion.roots), UserWarning, stacklevel=3)
    context = SurgeryContext.of(model, options, exclusion)
    report = BlurPoolReport(options=options, unmatched_exclude=tuple(pattern for pattern, _ in unmatched))
    for site, decision in walk(PLACEMENT_RULES[options.placement], context):
        (report.replaced if decision.blur is not None else report.skipped).append(ModuleDecision.of(site, decision))
    if options.circular_padding:
        # A second walk over the model as the first left it: the plain convs and pools that still pad.
        context = SurgeryContext.of(model, options, exclusion)
        report.circular = [ModuleDecision.of(site, decision) for site, decision in walk(CIRCULAR_PADDING, context)]
    return report


def _unmatched_warning(model: nn.Module, pattern: str, closest: list[str], roots: Sequence[str]) -> str:
    children = [name for name, _ in model.named_children()]
    hint = (
        f"closest names: {', '.join(map(repr, closest))}"
        if closest
        else f"no name is close; the model's children: {_preview(children, 8) or 'none'}"
    )
    under = f" (relative to the model or to {', '.join(r for r in roots if r)})" if any(roots) else ""
    return f"exclude pattern {pattern!r} matches no module name{under}, so it excludes nothing; {hint}"
