"""Surgery rules for ``torch.nn``'s layers, and the two placements' rule lists built from them.

``placement='conv'`` (Composer's): every ``nn.Conv2d``, ``nn.MaxPool2d`` and ``nn.AvgPool2d`` is a candidate, reported
replaced or skipped: a strided conv becomes a :class:`~blurpool_algo.layers.BlurConv2d` (blur before or after the
conv, as ``blur_first`` says), a strided pool a ``BlurMaxPool2d`` / ``BlurAvgPool2d``. Their 1-D forms
(``nn.Conv1d``, ``nn.MaxPool1d``, ``nn.AvgPool1d``) are candidates too, handled by the same rules: each layer class
and what it becomes is data (:data:`ANTI_ALIASED`, :data:`NORMS`, :data:`BLURS`).

``placement='after_activation'`` (the paper's): a strided conv runs at stride 1, then its BatchNorm and activation,
then a blur subsamples. :func:`conv_norm_activation_runs` finds that run in an ``nn.Sequential``; other networks add
their own structure rules in front (:mod:`blurpool_algo.resnet_rules` for torchvision's ResNets). Strided unpadded
1x1 convs (shortcuts) blur first and run at stride 1; max-pools become ``BlurMaxPool2d``; average pools become the
blur itself; any other strided conv is reported as not recognized. Only subsampling modules are reported.

Every blur layer takes ``options.sampling`` and the blurs' padding (``options.blur_pad_mode``). ``circular_padding``
is one more pass (:data:`CIRCULAR_PADDING`, run after the placement's rules): every conv and pool with padding that
the placement left as a plain ``torch.nn`` layer gets a circularly padded copy; the blur layers are built circular.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from blurpool_algo.layers import (
    BlurAvgPool1d,
    BlurAvgPool2d,
    BlurConv1d,
    BlurConv2d,
    BlurInputConv1d,
    BlurInputConv2d,
    BlurMaxPool1d,
    BlurMaxPool2d,
    BlurPool1d,
    BlurPool2d,
    conv_copy,
)
from blurpool_algo.rules import (
    Change,
    CircularReason,
    Decision,
    Outcome,
    Place,
    Reason,
    Rule,
    Site,
    SurgeryContext,
    max_stride,
    refuse,
    replace,
)

__all__ = [
    "ACTIVATIONS",
    "ANTI_ALIASED",
    "BLURS",
    "BLUR_LAYER_TYPES",
    "CIRCULAR_PADDING",
    "CONV_PLACEMENT",
    "NORMS",
    "PAPER_PLACEMENT",
    "activation_runs",
    "blur_options",
    "conv_norm_activation_runs",
    "is_strided_conv",
    "strided_only",
]

#: Each ``torch.nn`` layer class the surgery anti-aliases, and the class it becomes (same Parameters, same keys).
ANTI_ALIASED: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: BlurConv2d, nn.MaxPool2d: BlurMaxPool2d, nn.AvgPool2d: BlurAvgPool2d,
    nn.Conv1d: BlurConv1d, nn.MaxPool1d: BlurMaxPool1d, nn.AvgPool1d: BlurAvgPool1d,
}  # fmt: skip
CONVS = (nn.Conv2d, nn.Conv1d)
MAX_POOLS = (nn.MaxPool2d, nn.MaxPool1d)
AVG_POOLS = (nn.AvgPool2d, nn.AvgPool1d)

#: The paper's placement, by the conv's class: the BatchNorm that may follow it, and the blur after the activation.
NORMS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: nn.BatchNorm2d, nn.Conv1d: nn.BatchNorm1d}
BLURS: dict[type[nn.Module], type[BlurPool2d | BlurPool1d]] = {nn.Conv2d: BlurPool2d, nn.Conv1d: BlurPool1d}

#: The layer classes the surgery produces; a model holding them has been (partly) anti-aliased already.
BLUR_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    *ANTI_ALIASED.values(), BlurInputConv2d, BlurInputConv1d, *BLURS.values(),
)  # fmt: skip

#: The layer kinds ``placement='conv'`` reports on, whatever their stride.
CANDIDATES: tuple[type[nn.Module], ...] = tuple(ANTI_ALIASED)

#: Activations after which the paper's placement puts the blur.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish,
)  # fmt: skip


def blur_options(context: SurgeryContext) -> dict[str, Any]:
    """The keyword arguments every blur layer the surgery builds takes from the options."""
    options = context.options
    return {"filter_size": options.filter_size, "pad_mode": options.blur_pad_mode, "sampling": options.sampling}


def conv_padding_mode(context: SurgeryContext) -> str | None:
    """The padding mode of the convs the surgery builds: ``'circular'`` under ``circular_padding``, else the conv's."""
    return "circular" if context.options.circular_padding else None


def pool_padding_mode(context: SurgeryContext) -> str:
    """The padding of the pools the surgery builds: ``'circular'`` under ``circular_padding``, else the pool's own."""
    return "circular" if context.options.circular_padding else "zeros"


def is_strided_conv(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` or ``nn.Conv1d`` itself (no subclass, whose forward may differ) that subsamples."""
    return type(module) in CONVS and max(module.stride) > 1


def strided_only(rule: Rule) -> Rule:
    """``rule`` for modules that subsample; others pass to the next rule (the paper's placement reports only
    subsampling layers)."""

    def for_strided(site: Site, context: SurgeryContext) -> Outcome:
        if isinstance(site.module, CANDIDATES) and max_stride(site.module) <= 1:
            return None
        return rule(site, context)

    for_strided.__name__ = for_strided.__qualname__ = f"strided_only({rule.__name__})"
    return for_strided


# ------------------------------------------------------------------------------------------- placement='conv' rules


def already_anti_aliased(site: Site, context: SurgeryContext) -> Outcome:
    """A blur layer this surgery made: reported, never blurred twice (a second surgery changes nothing)."""
    if isinstance(site.module, BLUR_LAYER_TYPES) and isinstance(site.module, CANDIDATES):
        return refuse(site.module, Reason.ALREADY_ANTI_ALIASED)
    return None


def subclass_of_a_candidate(site: Site, context: SurgeryContext) -> Outcome:
    """A subclass of a conv or pool: reported, never swapped for a layer whose forward may differ."""
    base = next((base for base in CANDIDATES if isinstance(site.module, base)), None)
    if base is not None and type(site.module) is not base:
        return refuse(site.module, Reason.SUBCLASS, base=base.__name__, kind=type(site.module).__qualname__)
    return None


def blur_at_the_conv(site: Site, context: SurgeryContext) -> Outcome:
    """A conv -> :class:`BlurConv2d` (``BlurConv1d``), the blur before or after it as ``blur_first`` says."""
    conv = site.module
    if type(conv) not in CONVS:
        return None
    blur_first = context.options.blur_first
    return context.conv_refusal(site) or replace(
        conv,
        ANTI_ALIASED[type(conv)].from_conv(conv, blur_first=blur_first, padding_mode=conv_padding_mode(context),
                                           **blur_options(context)),
        Reason.BLURRED_CONV, stride=tuple(conv.stride), blur_first=blur_first,
    )  # fmt: skip


def blur_max_pool(site: Site, context: SurgeryContext) -> Outcome:
    """A max pool -> :class:`BlurMaxPool2d` (``BlurMaxPool1d``): the max at stride 1, then blur-subsample (both
    placements)."""
    pool = site.module
    if type(pool) not in MAX_POOLS:
        return None
    refused = context.refusal(site, "replace_maxpools")
    if refused is None and pool.return_indices:
        refused = refuse(pool, Reason.RETURN_INDICES)
    return refused or replace(
        pool,
        ANTI_ALIASED[type(pool)].from_maxpool(pool, dtype=context.dtype, device=context.device,
                                              padding_mode=pool_padding_mode(context), **blur_options(context)),
        Reason.BLURRED_POOL, stride=pool.stride,
    )  # fmt: skip


def blur_avg_pool(site: Site, context: SurgeryContext) -> Outcome:
    """An average pool -> :class:`BlurAvgPool2d` (``BlurAvgPool1d``): the average at stride 1, then blur-subsample."""
    pool = site.module
    if type(pool) not in AVG_POOLS:
        return None
    return context.refusal(site, "replace_avgpools") or replace(
        pool,
        ANTI_ALIASED[type(pool)].from_avgpool(pool, dtype=context.dtype, device=context.device,
                                              padding_mode=pool_padding_mode(context), **blur_options(context)),
        Reason.BLURRED_POOL, stride=pool.stride,
    )  # fmt: skip


# ---------------------------------------------------------------------------- placement='after_activation' rules


def _blur(conv_type: type[nn.Module], channels: int, stride: int | Sequence[int], context: SurgeryContext) -> nn.Module:
    """The blur module (``BlurPool2d`` / ``BlurPool1d``) for the maps a conv of ``conv_type`` makes."""
    kwargs = blur_options(context)
    return BLURS[conv_type](channels, stride, kwargs.pop("filter_size"), kwargs.pop("pad_mode"),
                            device=context.device, dtype=context.dtype, **kwargs)  # fmt: skip


def activation_runs(site: Site, context: SurgeryContext, keys: Sequence[str]) -> list[Decision]:
    """Strided conv [-> BatchNorm2d] -> activation, consecutive among ``keys`` of the container ``site`` (which runs
    them in that order): the conv runs at stride 1 and the activation's slot becomes ``Sequential(activation,
    BlurPool2d)`` (1-D: ``Conv1d [-> BatchNorm1d] -> activation``, ``BlurPool1d``). A structure rule for another
    container calls it with the keys its forward runs in order."""
    parent = site.module
    decisions = []
    for index, key in enumerate(keys):
        conv = parent._modules[key]
        if not is_strided_conv(conv):
            continue
        follower = index + 1
        if follower < len(keys) and isinstance(parent._modules[keys[follower]], NORMS[type(conv)]):
            follower += 1
        if follower >= len(keys) or type(parent._modules[keys[follower]]) not in ACTIVATIONS:
            continue
        refused = context.conv_refusal(context.site(conv))
        if refused is not None:
            decisions.append(refused)
            continue
        activation_key = keys[follower]
        activation = parent._modules[activation_key]
        blur = _blur(type(conv), conv.out_channels, conv.stride, context)
        path = " -> ".join(type(parent._modules[k]).__name__ for k in keys[index + 1 : follower + 1])
        slot = Place(parent, activation_key, site.child_name(activation_key))
        changes = (Change(conv, conv_copy(conv, stride=1)), Change(activation, nn.Sequential(activation, blur), slot))
        details = {"stride": tuple(conv.stride), "path": path, "blur": f"{slot.name}.1", "kind": type(blur).__name__}
        decisions.append(Decision(conv, Reason.BLUR_AFTER_ACTIVATION, details, blur=blur, changes=changes))
    return decisions


def conv_norm_activation_runs(site: Site, context: SurgeryContext) -> Outcome:
    """:func:`activation_runs` over an ``nn.Sequential``'s children."""
    if not isinstance(site.module, nn.Sequential):
        return None
    return activation_runs(site, context, list(site.module._modules))


def average_becomes_blur(site: Site, context: SurgeryContext) -> Outcome:
    """A strided average pool -> :class:`BlurPool2d` (``BlurPool1d``; the paper's), with the channels of the conv
    before it."""
    pool = site.module
    if type(pool) not in AVG_POOLS or max_stride(pool) <= 1:
        return None
    refused = context.refusal(site, "replace_avgpools")
    if refused is not None:
        return refused
    place = site.places[0]
    keys = list(place.parent._modules)
    earlier = [place.parent._modules[k] for k in keys[: keys.index(place.key)]]
    conv_type = CONVS[AVG_POOLS.index(type(pool))]  # the conv of the pool's dimension
    channels = next((m.out_channels for m in reversed(earlier) if isinstance(m, conv_type)), None)
    if channels is None:
        return refuse(pool, Reason.NO_CHANNEL_COUNT)
    return replace(pool, _blur(conv_type, channels, pool.stride, context), Reason.AVERAGE_BECOMES_BLUR,
                   stride=pool.stride)  # fmt: skip


def blur_before_the_shortcut(site: Site, context: SurgeryContext) -> Outcome:
    """A strided unpadded 1x1 conv (a shortcut): blur at its stride, then the conv at stride 1."""
    conv = site.module
    if not (is_strided_conv(conv) and set(conv.kernel_size) == {1} and not _pads(conv.padding)):
        return None
    return context.conv_refusal(site) or replace(
        conv,
        ANTI_ALIASED[type(conv)].from_conv(conv, blur_first=True, padding_mode=conv_padding_mode(context),
                                           **blur_options(context)),
        Reason.BLURRED_SHORTCUT, stride=tuple(conv.stride),
    )  # fmt: skip


def unrecognized_strided_conv(site: Site, context: SurgeryContext) -> Outcome:
    """A strided conv no rule before this one placed: reported, left as it is."""
    if not is_strided_conv(site.module):
        return None
    return context.conv_refusal(site) or refuse(site.module, Reason.UNRECOGNIZED)


# ------------------------------------------------------------------------------------------- circular_padding rules


def _pads(padding: Any) -> bool:
    """Whether a conv's or pool's ``padding`` pads at all."""
    return padding not in (0, (0,), (0, 0), "valid")


def circular_conv(site: Site, context: SurgeryContext) -> Outcome:
    """A plain conv that pads, not circularly -> a copy with ``padding_mode='circular'`` (same Parameters)."""
    conv = site.module
    if type(conv) not in CONVS or not _pads(conv.padding) or conv.padding_mode == "circular":
        return None
    return context.excluded(site) or replace(
        conv, conv_copy(conv, padding_mode="circular"), CircularReason.CIRCULAR_CONV, padding=conv.padding,
        was=conv.padding_mode,
    )  # fmt: skip


def circular_pool(site: Site, context: SurgeryContext) -> Outcome:
    """A plain max or average pool that pads -> a :class:`BlurMaxPool2d` / :class:`BlurAvgPool2d` with
    ``filter_size=1`` (no blur, the pool's own stride and sampling) that pads circularly."""
    pool = site.module
    if type(pool) not in (*MAX_POOLS, *AVG_POOLS) or not _pads(pool.padding):
        return None
    refused = context.excluded(site)
    if refused is None and getattr(pool, "return_indices", False):
        refused = refuse(pool, Reason.RETURN_INDICES)
    if refused is not None:
        return refused
    kwargs = {"filter_size": 1, "dtype": context.dtype, "device": context.device, "padding_mode": "circular"}
    cls = ANTI_ALIASED[type(pool)]
    new = cls.from_maxpool(pool, **kwargs) if type(pool) in MAX_POOLS else cls.from_avgpool(pool, **kwargs)
    return replace(pool, new, CircularReason.CIRCULAR_POOL, padding=pool.padding)


#: ``circular_padding=True``: the pass after the placement's rules, over what those left as plain layers.
CIRCULAR_PADDING: tuple[Rule, ...] = (circular_conv, circular_pool)

#: ``placement='conv'``: every candidate reported, in the order of the checks the method card lists.
CONV_PLACEMENT: tuple[Rule, ...] = (
    already_anti_aliased, subclass_of_a_candidate, blur_at_the_conv, blur_max_pool, blur_avg_pool,
)  # fmt: skip

#: ``placement='after_activation'`` for any network; structure rules for particular networks go in front.
PAPER_PLACEMENT: tuple[Rule, ...] = (
    conv_norm_activation_runs, strided_only(blur_max_pool), average_becomes_blur, blur_before_the_shortcut,
    unrecognized_strided_conv,
)  # fmt: skip
