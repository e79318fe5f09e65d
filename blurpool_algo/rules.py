"""The surgery engine: what a rule is given, what it returns, and the one walker that applies an ordered list of rules.

A *rule* is a callable ``rule(site, context)``. The walker offers it a :class:`Site` (a module and every place it sits
in the model) and a :class:`SurgeryContext` (the options, the exclude patterns, the dtype and device of new layers,
every other module's site). The rule returns:

* ``None``: not mine, ask the next rule;
* a :class:`Decision`, or a sequence of them (a structure such as a ResNet block or a conv -> BatchNorm -> activation
  run decides for its members): each one replaces modules (its :class:`Change` s) or refuses, with a reason code.

The walker visits every module once, containers before what they hold, and asks the rules in order; the first rule
that answers decides. A module that a decision names or replaces is never offered again, so structure rules put
before single-module rules take precedence. Rules build new modules and never change one in place; the walker puts
each new module at every place the old one sat (or at the one place a :class:`Change` names).

Reason codes are members of a :class:`ReasonCode` enum, each with its prose beside it: callers compare codes, people
read the text. The generic codes are :class:`Reason`; a rule module may define its own ``ReasonCode`` subclass.
Torch only: no Composer, and nothing here knows a particular network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from blurpool_algo.exclusion import Exclusion
from blurpool_algo.options import BlurPoolOptions

__all__ = [
    "Change",
    "CircularReason",
    "Decision",
    "Place",
    "Reason",
    "ReasonCode",
    "Rule",
    "Site",
    "SurgeryContext",
    "max_stride",
    "refuse",
    "replace",
    "walk",
]


class ReasonCode(Enum):
    """Base of every reason enum: a member's value is a stable code (``'excluded'``); :meth:`message` its prose."""

    def __new__(cls, code: str, template: str) -> ReasonCode:
        member = object.__new__(cls)
        member._value_ = code
        member.template = template  # type: ignore[attr-defined]
        return member

    def message(self, **details: Any) -> str:
        """The prose of this reason with ``details`` filled in (``Reason.DISABLED.message(option='replace_convs')``).

        Example:
            >>> Reason.FEW_CHANNELS.message(in_channels=3, min_channels=16)
            'in_channels 3 < min_channels 16'
        """
        return self.template.format(**details)  # type: ignore[attr-defined]


class Reason(ReasonCode):
    """The reasons of the engine's checks and of the rules for ``torch.nn`` layers."""

    # Refusals.
    ALREADY_ANTI_ALIASED = "already_anti_aliased", "already anti-aliased"
    SUBCLASS = "subclass", "subclass of nn.{base} ({kind}) whose forward may differ; not replaced"
    DISABLED = "disabled", "{option}=False"
    UNSTRIDED = "unstrided", "stride 1: no subsampling to anti-alias"
    EXCLUDED = "excluded", "name matches exclude pattern {pattern!r}"
    INSIDE_EXCLUDED = "inside_excluded", "inside {matched!r}, which matches exclude pattern {pattern!r}"
    PARTNER_EXCLUDED = "partner_excluded", "{matched!r} matches exclude pattern {pattern!r}"
    FEW_CHANNELS = "few_channels", "in_channels {in_channels} < min_channels {min_channels}"
    RETURN_INDICES = "return_indices", "return_indices=True: the indices of a blurred max have no meaning"
    NO_CHANNEL_COUNT = "no_channel_count", "no conv before this average pool in its sequence gives the channel count"
    UNRECOGNIZED = (
        "unrecognized",
        "structure not recognized: the paper's placement needs this conv followed by BatchNorm and an activation in "
        "an nn.Sequential, or in a torchvision ResNet block (placement='conv' anti-aliases any strided conv)",
    )
    # Replacements.
    BLURRED_CONV = "blurred_conv", "stride {stride}, blur_first={blur_first}"
    BLURRED_POOL = "blurred_pool", "stride {stride}"
    BLURRED_SHORTCUT = "blurred_shortcut", "stride {stride}: blur, then the 1x1 conv at stride 1"
    BLUR_AFTER_ACTIVATION = (
        "blur_after_activation",
        "stride {stride} moved after the activation: the conv at stride 1 -> {path} -> {kind} ({blur})",
    )
    AVERAGE_BECOMES_BLUR = (
        "average_becomes_blur",
        "stride {stride}: the average pool becomes the blur-subsample (the paper's)",
    )


class CircularReason(ReasonCode):
    """What ``circular_padding=True`` changed besides the blur layers (reported in ``BlurPoolReport.circular``)."""

    CIRCULAR_CONV = "circular_conv", "padding {padding}: padding_mode {was!r} -> 'circular'"
    CIRCULAR_POOL = "circular_pool", "padding {padding}: padded circularly, then pooled without padding"


#: Exclusion reasons, for callers that ask "was it excluded?" rather than how.
EXCLUSIONS: frozenset[ReasonCode] = frozenset({Reason.EXCLUDED, Reason.INSIDE_EXCLUDED, Reason.PARTNER_EXCLUDED})


@dataclass(frozen=True, eq=False)
class Place:
    """One place a module sits: ``parent``'s child ``key``, named ``name`` in the model."""

    parent: nn.Module
    key: str
    name: str


@dataclass(frozen=True, eq=False)
class Site:
    """A module and every place it sits in the model (a shared module sits at several; the model itself at none)."""

    module: nn.Module
    places: tuple[Place, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The module's names, first the one ``named_modules()`` gives."""
        return tuple(dict.fromkeys(place.name for place in self.places))

    @property
    def name(self) -> str:
        return self.places[0].name if self.places else ""

    def child_name(self, key: str) -> str:
        """The name of this module's child ``key`` (under this module's first name)."""
        return f"{self.name}.{key}" if self.name else key


@dataclass(frozen=True, eq=False)
class Change:
    """Put ``new`` where ``old`` sits: at ``place`` only, or at every place ``old`` sits when ``place`` is None."""

    old: nn.Module
    new: nn.Module
    place: Place | None = None


@dataclass(frozen=True, eq=False)
class Decision:
    """What a rule decided for ``module``: the ``changes`` that anti-alias it, adding ``blur`` (a replacement), or
    none (a refusal); ``code`` and ``details`` say why."""

    module: nn.Module
    code: ReasonCode
    details: Mapping[str, Any] = field(default_factory=dict)
    blur: nn.Module | None = None
    changes: tuple[Change, ...] = ()

    @property
    def reason(self) -> str:
        return self.code.message(**self.details)


def refuse(module: nn.Module, code: ReasonCode, **details: Any) -> Decision:
    """A decision to leave ``module`` as it is, for reason ``code``."""
    return Decision(module, code, details)


def replace(module: nn.Module, new: nn.Module, code: ReasonCode, **details: Any) -> Decision:
    """A decision to put ``new`` (an anti-aliased layer) at every place ``module`` sits."""
    return Decision(module, code, details, blur=new, changes=(Change(module, new),))


#: What a rule returns: see the module docstring.
Outcome = Decision | Sequence[Decision] | None
Rule = Callable[[Site, "SurgeryContext"], Outcome]


def max_stride(module: nn.Module) -> int:
    """A conv's or pool's largest stride (a pool's stride defaults to its kernel size)."""
    stride = module.stride if module.stride is not None else module.kernel_size  # type: ignore[union-attr]
    return max(stride) if isinstance(stride, Sequence) else int(stride)


@dataclass(frozen=True)
class SurgeryContext:
    """What every rule may read besides its site: the options, the exclusion, the dtype and device of new layers that
    have no weight to follow, and the site of every module (for structure rules, which decide for their members)."""

    options: BlurPoolOptions
    exclusion: Exclusion
    dtype: torch.dtype | None
    device: torch.device | None
    sites: Mapping[int, Site]

    @classmethod
    def of(cls, model: nn.Module, options: BlurPoolOptions, exclusion: Exclusion | None = None) -> SurgeryContext:
        """The context for a surgery on ``model`` (``exclusion`` defaults to ``options.exclude`` under the model's
        root); new layers without a weight to follow (pools, blurs) take the dtype and device of the model's first
        float tensor."""
        first_float = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
        return cls(
            options, exclusion if exclusion is not None else Exclusion(options.exclude),
            first_float.dtype if first_float is not None else None,
            first_float.device if first_float is not None else None,
            {id(site.module): site for site in sites_of(model)},
        )  # fmt: skip

    def site(self, module: nn.Module) -> Site:
        """``module``'s site, as the model held it when the surgery began."""
        return self.sites[id(module)]

    def excluded(self, site: Site, *others: str) -> Decision | None:
        """A refusal if an exclude pattern names ``site`` (by any of its names), a container of it, or one of
        ``others`` (other modules the change would replace)."""
        found = self.exclusion.match(*site.names, *others)
        if found is None:
            return None
        name = site.name
        code = (
            Reason.EXCLUDED
            if found.matched == name
            else Reason.INSIDE_EXCLUDED
            if name.startswith(found.matched + ".")
            else Reason.PARTNER_EXCLUDED
        )
        return refuse(site.module, code, pattern=found.pattern, matched=found.matched)

    def refusal(self, site: Site, option: str, *others: str) -> Decision | None:
        """The checks every replacement passes, in this order: the kind is enabled (``option``), the module
        subsamples, no exclude pattern names it (or ``others``)."""
        if not getattr(self.options, option):
            return refuse(site.module, Reason.DISABLED, option=option)
        if max_stride(site.module) <= 1:
            return refuse(site.module, Reason.UNSTRIDED)
        return self.excluded(site, *others)

    def conv_refusal(self, site: Site, *others: str) -> Decision | None:
        """:meth:`refusal` for a conv, then ``min_channels``."""
        conv: nn.Conv2d = site.module  # type: ignore[assignment]
        refused = self.refusal(site, "replace_convs", *others)
        if refused is None and conv.in_channels < self.options.min_channels:
            refused = refuse(conv, Reason.FEW_CHANNELS, in_channels=conv.in_channels,
                             min_channels=self.options.min_channels)  # fmt: skip
        return refused


def sites_of(model: nn.Module) -> list[Site]:
    """Every module of ``model`` with all its places, containers before what they hold (the model itself first)."""
    places: dict[int, list[Place]] = {id(model): []}
    modules: dict[int, nn.Module] = {id(model): model}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for key, child in parent._modules.items():
            if child is not None:
                name = f"{parent_name}.{key}" if parent_name else key
                places.setdefault(id(child), []).append(Place(parent, key, name))
                modules.setdefault(id(child), child)
    return [Site(modules[key], tuple(found)) for key, found in places.items()]


def walk(rules: Iterable[Rule], context: SurgeryContext) -> list[tuple[Site, Decision]]:
    """Offers every module of the model ``context`` was made for (:meth:`SurgeryContext.of`) to ``rules`` in order,
    applies each decision's changes, and returns the decisions with the site of the module each names, in the order
    they were taken.

    The model itself is offered only as a container: the surgery changes what a model holds, never the model.

    Example (a rule of one's own, with its own reason code):
        >>> from blurpool_algo.options import validate_options
        >>> class Why(ReasonCode):
        ...     NO_DROPOUT = "no_dropout", "dropout p={p} removed"
        >>> def drop_dropout(site, context):
        ...     if type(site.module) is not nn.Dropout:
        ...         return None  # not mine: the next rule is asked
        ...     return replace(site.module, nn.Identity(), Why.NO_DROPOUT, p=site.module.p)
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        >>> taken = walk([drop_dropout], SurgeryContext.of(model, validate_options()))
        >>> [(site.name, decision.code.value, decision.reason) for site, decision in taken]
        [('1', 'no_dropout', 'dropout p=0.5 removed')]
        >>> model[1]
        Identity()
    """
    rules = tuple(rules)
    decided: set[int] = set()  # modules a decision named or replaced
    taken: list[tuple[Site, Decision]] = []
    for site in context.sites.values():
        if id(site.module) in decided or (not site.places and not site.module._modules):
            continue
        outcome = next((found for rule in rules if (found := rule(site, context)) is not None), None)
        for decision in (outcome,) if isinstance(outcome, Decision) else outcome or ():
            if id(decision.module) in decided:
                continue  # decided already, under another name or by a structure it also belongs to
            decided.add(id(decision.module))
            for change in decision.changes:
                decided.add(id(change.old))
                for place in (change.place,) if change.place is not None else context.site(change.old).places:
                    setattr(place.parent, place.key, change.new)
            taken.append((context.site(decision.module), decision))
    return taken
