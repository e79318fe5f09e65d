"""Model surgery: replace a model's subsampling layers by their anti-aliased versions, in place.

``apply_blurpool`` decides which modules are replaced and by what, and returns a :class:`BlurPoolReport` that lists
every candidate it saw, replaced or skipped, with the reason. It creates no new parameters: a replaced conv keeps its
``weight`` and ``bias`` Parameter objects, so optimizers built before the surgery stay valid.

Exclude patterns are fnmatch patterns of module names. A pattern that matches a module's name excludes that module and
everything under it (``'layer4'`` is all of layer4); a pattern that matches no module name at all is reported
(:attr:`BlurPoolReport.unmatched_exclude`) and warned about, naming the closest names, since a typo would otherwise
exclude nothing in silence. Names are matched relative to *roots*: the model itself (``''``) and, for the Composer
algorithm, each of the ComposerModel's children (so ``'layer4'`` names ``module.layer4``).
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blurpool_algo.filters import validate_filter_size, validate_pad_mode
from blurpool_algo.layers import BlurAvgPool2d, BlurConv2d, BlurInputConv2d, BlurMaxPool2d, BlurPool2d

__all__ = [
    "PLACEMENTS",
    "BlurPoolOptions",
    "BlurPoolReport",
    "ModuleDecision",
    "apply_blurpool",
    "apply_blurpool_options",
    "child_name_roots",
    "unmatched_exclude_patterns",
    "validate_options",
]

#: The layer classes this surgery produces; a model holding them has been (partly) anti-aliased already.
BLUR_LAYER_TYPES: tuple[type[nn.Module], ...] = (BlurConv2d, BlurMaxPool2d, BlurAvgPool2d, BlurInputConv2d, BlurPool2d)

#: Where a strided conv's blur goes: at the conv (``blur_first`` picks before or after it, Composer's two modes), or
#: after the conv's BatchNorm and activation (the paper's placement).
PLACEMENTS: tuple[str, ...] = ("conv", "after_activation")

#: How a skipped-module reason starts when the paper's placement does not recognize a strided conv's surroundings.
UNRECOGNIZED = "structure not recognized"

#: Where Composer keeps its own BlurPool layers; a model holding one was anti-aliased by Composer's surgery already.
#: Matched by module name, so this module imports no Composer code.
COMPOSER_BLURPOOL_MODULE = "composer.algorithms.blurpool"

#: Activations after which the paper's placement puts the blur.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish,
)  # fmt: skip


@dataclass(frozen=True)
class BlurPoolOptions:
    """Validated surgery options; the defaults reproduce ``composer.algorithms.BlurPool()``."""

    replace_convs: bool = True
    replace_maxpools: bool = True
    replace_avgpools: bool = False
    blur_first: bool = True
    min_channels: int = 16
    filter_size: int = 3
    pad_mode: str = "zeros"
    exclude: tuple[str, ...] = ()
    placement: str = "conv"


def validate_options(**options: Any) -> BlurPoolOptions:
    """Checks surgery options and returns them frozen; raises ``ValueError`` naming the bad one and what is allowed."""
    known = BlurPoolOptions.__dataclass_fields__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown BlurPool option(s) {unknown}; allowed: {sorted(known)}")
    for name in ("replace_convs", "replace_maxpools", "replace_avgpools", "blur_first"):
        if name in options and not isinstance(options[name], bool):
            raise ValueError(f"{name} must be True or False, got {options[name]!r}")
    min_channels = options.get("min_channels", 16)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 0:
        raise ValueError(f"min_channels must be an int >= 0, got {min_channels!r}")
    validate_filter_size(options.get("filter_size", 3))
    validate_pad_mode(options.get("pad_mode", "zeros"))
    options["exclude"] = _check_exclude(options.get("exclude", ()))
    placement = options.get("placement", "conv")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(map(repr, PLACEMENTS))}, got {placement!r}")
    opts = BlurPoolOptions(**options)
    if not (opts.replace_convs or opts.replace_maxpools or opts.replace_avgpools):
        raise ValueError(
            "nothing to replace: at least one of replace_convs, replace_maxpools, replace_avgpools must be True"
        )
    return opts


def _check_exclude(exclude: Any) -> tuple[str, ...]:
    """Exclude patterns as a tuple; one string is one pattern."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    patterns = tuple(exclude) if isinstance(exclude, Iterable) else None
    if patterns is None or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(f"exclude must be a sequence of non-empty module-name patterns (fnmatch), got {exclude!r}")
    return patterns


def _check_roots(roots: Any) -> tuple[str, ...]:
    names = None if isinstance(roots, str) or not isinstance(roots, Iterable) else tuple(roots)
    if names is None or not all(isinstance(r, str) for r in names):
        raise ValueError(f"roots must be a sequence of module names ('' = the model itself), got {roots!r}")
    return tuple(dict.fromkeys(names))


def _relative_names(name: str, roots: Sequence[str]) -> Iterator[str]:
    """``name`` as each root it lies strictly under spells it (a root's own name only from the model's root ``''``)."""
    for root in roots:
        if not root:
            yield name
        elif name.startswith(root + "."):
            yield name[len(root) + 1 :]


def child_name_roots(model: nn.Module) -> tuple[str, ...]:
    """The roots the Composer algorithm matches exclude patterns under: the model itself and each direct child.

    A ComposerClassifier holds the user's network as ``module``; with these roots ``'layer4'`` and ``'module.layer4'``
    both name its ``layer4``. Pass the result as ``roots`` to :func:`unmatched_exclude_patterns` to check patterns the
    way ``BlurPool`` will apply them.
    """
    return ("", *(name for name, _ in model.named_children()))


def unmatched_exclude_patterns(
    model: nn.Module, patterns: str | Iterable[str], roots: Sequence[str] = ("",)
) -> list[tuple[str, list[str]]]:
    """The exclude patterns that match no module name of ``model``, each with the closest module names.

    A pattern matches when it fnmatches the name of any module (containers included, as ``named_modules()`` spells
    them) relative to any of ``roots``. No weights are read, so a model built on the meta device will do: this is the
    check to run on a recipe before training, and the one ``apply_blurpool`` warns with.

    Args:
        model: the model whose module names the patterns should match.
        patterns: fnmatch patterns, or one pattern as a string.
        roots: module names the patterns are relative to; ``''`` is the model itself. The Composer algorithm uses
            :func:`child_name_roots` (the model and each of its direct children).

    Returns:
        ``[(pattern, closest_names), ...]`` in the order of ``patterns``, for the patterns that match nothing;
        ``closest_names`` (at most 3, by ``difflib.get_close_matches``, relative to a root) may be empty.

    Raises:
        ValueError: on an empty or non-string pattern, or ``roots`` that is not a sequence of strings.
    """
    patterns, roots = _check_exclude(patterns), _check_roots(roots)
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    relative = list(dict.fromkeys(r for name in names for r in _relative_names(name, roots)))
    return [
        (pattern, difflib.get_close_matches(pattern, relative, n=3))
        for pattern in patterns
        if not any(fnmatch.fnmatchcase(name, pattern) for name in relative)
    ]


class _Exclusion:
    """Which modules the exclude patterns leave alone: a matched module and everything under it, under any root."""

    def __init__(self, patterns: Sequence[str], roots: Sequence[str]) -> None:
        self.patterns = patterns
        self.roots = roots

    def _match(self, name: str) -> tuple[str, str] | None:
        """(pattern, the matched module): ``name`` itself if a pattern matches it, else the nearest container."""
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):
            prefix = ".".join(parts[:depth])
            for pattern in self.patterns:
                if any(fnmatch.fnmatchcase(r, pattern) for r in _relative_names(prefix, self.roots)):
                    return pattern, prefix
        return None

    def reason(self, name: str, *others: str) -> str | None:
        """Why module ``name`` (also reachable, or also changed, as ``others``) is excluded, or None."""
        for candidate in (name, *others):
            found = self._match(candidate)
            if found is None:
                continue
            pattern, matched = found
            if matched == name:
                return f"name matches exclude pattern {pattern!r}"
            if name.startswith(matched + "."):
                return f"inside {matched!r}, which matches exclude pattern {pattern!r}"
            return f"{matched!r} matches exclude pattern {pattern!r}"
        return None


@dataclass(frozen=True)
class ModuleDecision:
    """What the surgery did with one candidate module."""

    name: str
    original: str
    replacement: str | None
    reason: str


@dataclass
class BlurPoolReport:
    """Every candidate module the surgery saw: the replaced ones, and the skipped ones with the reason."""

    options: BlurPoolOptions
    replaced: list[ModuleDecision] = field(default_factory=list)
    skipped: list[ModuleDecision] = field(default_factory=list)
    #: Exclude patterns (as the user wrote them) that matched no module name, so excluded nothing.
    unmatched_exclude: tuple[str, ...] = ()

    def _count(self, cls: type[nn.Module]) -> int:
        return sum(d.replacement == cls.__name__ for d in self.replaced)

    @property
    def num_blurconv_layers(self) -> int:
        return self._count(BlurConv2d)

    @property
    def num_blurmaxpool_layers(self) -> int:
        return self._count(BlurMaxPool2d)

    @property
    def num_bluravgpool_layers(self) -> int:
        return self._count(BlurAvgPool2d)

    @property
    def num_blurpool2d_layers(self) -> int:
        """Blurs placed after an activation (the paper's placement) as their own module."""
        return self._count(BlurPool2d)

    @property
    def num_blurinputconv_layers(self) -> int:
        """Blurs placed after an activation (the paper's placement) inside the next conv."""
        return self._count(BlurInputConv2d)

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
        return "\n".join(lines)


def _preview(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_model(model: Any) -> None:
    """Refuses a model the surgery cannot change correctly in place; raises ``ValueError`` saying what to do instead."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
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


def _reference_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None, None


def _max_stride(module: nn.Module) -> int:
    stride = module.stride if module.stride is not None else module.kernel_size  # type: ignore[union-attr]
    return max(stride) if isinstance(stride, Sequence) else int(stride)


def _decide(
    module: nn.Module, names: list[str], opts: BlurPoolOptions, exclusion: _Exclusion, dtype, device
) -> tuple[nn.Module | None, str]:
    """Returns (replacement or None, reason)."""
    if isinstance(module, BLUR_LAYER_TYPES):
        return None, "already anti-aliased"
    kind = type(module)
    base = next((b for b in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d) if isinstance(module, b)), None)
    if base is not None and kind is not base:
        return None, f"subclass of nn.{base.__name__} ({kind.__qualname__}) whose forward may differ; not replaced"
    if kind is nn.Conv2d and not opts.replace_convs:
        return None, "replace_convs=False"
    if kind is nn.MaxPool2d and not opts.replace_maxpools:
        return None, "replace_maxpools=False"
    if kind is nn.AvgPool2d and not opts.replace_avgpools:
        return None, "replace_avgpools=False"
    if _max_stride(module) <= 1:
        return None, "stride 1: no subsampling to anti-alias"
    excluded = exclusion.reason(*names)
    if excluded is not None:
        return None, excluded
    if kind is nn.Conv2d:
        conv: nn.Conv2d = module  # type: ignore[assignment]
        if conv.in_channels < opts.min_channels:
            return None, f"in_channels {conv.in_channels} < min_channels {opts.min_channels}"
        new = BlurConv2d.from_conv(
            conv, blur_first=opts.blur_first, filter_size=opts.filter_size, pad_mode=opts.pad_mode
        )
        return new, f"stride {tuple(conv.stride)}, blur_first={opts.blur_first}"
    if kind is nn.MaxPool2d:
        pool: nn.MaxPool2d = module  # type: ignore[assignment]
        if pool.return_indices:
            return None, "return_indices=True: the indices of a blurred max have no meaning"
        new = BlurMaxPool2d.from_maxpool(
            pool, filter_size=opts.filter_size, pad_mode=opts.pad_mode, dtype=dtype, device=device
        )
        return new, f"stride {pool.stride}"
    avg: nn.AvgPool2d = module  # type: ignore[assignment]
    new = BlurAvgPool2d.from_avgpool(
        avg, filter_size=opts.filter_size, pad_mode=opts.pad_mode, dtype=dtype, device=device
    )
    return new, f"stride {avg.stride}"


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
    optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
) -> BlurPoolReport:
    """Replaces, in place, the subsampling layers of ``model`` by anti-aliased ones.

    * ``nn.Conv2d`` with a stride > 1 and ``in_channels >= min_channels`` -> :class:`BlurConv2d`.
    * ``nn.MaxPool2d`` with a stride > 1 -> :class:`BlurMaxPool2d`.
    * ``nn.AvgPool2d`` with a stride > 1 -> :class:`BlurAvgPool2d` (only with ``replace_avgpools=True``).

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
    opts = validate_options(
        replace_convs=replace_convs, replace_maxpools=replace_maxpools, replace_avgpools=replace_avgpools,
        blur_first=blur_first, min_channels=min_channels, filter_size=filter_size, pad_mode=pad_mode, exclude=exclude,
        placement=placement,
    )  # fmt: skip
    if optimizers is not None:
        optimizer_list = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if not all(isinstance(o, torch.optim.Optimizer) for o in optimizer_list):
            raise ValueError("optimizers must be a torch.optim.Optimizer, a sequence of them, or None")
    return apply_blurpool_options(model, opts)


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
        raise ValueError(f"options must be a BlurPoolOptions (see validate_options), got {type(options).__name__}")
    roots = _check_roots(name_roots)
    _check_model(model)
    # Before the surgery: the paper's placement adds modules (an activation's slot becomes a Sequential), and the
    # user wrote the patterns against the model as it was.
    unmatched = unmatched_exclude_patterns(model, options.exclude, roots)
    for pattern, closest in unmatched:
        children = [name for name, _ in model.named_children()]
        hint = (
            f"closest names: {', '.join(map(repr, closest))}"
            if closest
            else f"no name is close; the model's children: {_preview(children, 8) or 'none'}"
        )
        under = f" (relative to the model or to {', '.join(r for r in roots if r)})" if any(roots) else ""
        warnings.warn(
            f"exclude pattern {pattern!r} matches no module name{under}, so it excludes nothing; {hint}",
            UserWarning,
            stacklevel=3,
        )
    exclusion = _Exclusion(options.exclude, roots)
    dtype, device = _reference_dtype_device(model)
    if options.placement == "after_activation":
        report = _AfterActivation(model, options, exclusion, dtype, device).run()
    else:
        report = _replace_at_the_conv(model, options, exclusion, dtype, device)
    report.unmatched_exclude = tuple(pattern for pattern, _ in unmatched)
    return report


def _replace_at_the_conv(
    model: nn.Module, opts: BlurPoolOptions, exclusion: _Exclusion, dtype, device
) -> BlurPoolReport:
    """``placement='conv'``: each candidate is replaced in place by its anti-aliased version (or skipped)."""
    # Every place a candidate sits: (parent, attribute name, full name); a shared module has several.
    places: dict[int, list[tuple[nn.Module, str, str]]] = {}
    modules: dict[int, nn.Module] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if isinstance(child, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
                full_name = f"{parent_name}.{child_name}" if parent_name else child_name
                places.setdefault(id(child), []).append((parent, child_name, full_name))
                modules[id(child)] = child

    report = BlurPoolReport(options=opts)
    for key, occurrences in places.items():
        names = list(dict.fromkeys(name for _, _, name in occurrences))
        module = modules[key]
        replacement, reason = _decide(module, names, opts, exclusion, dtype, device)
        shared = f" (shared: also {', '.join(names[1:])})" if len(names) > 1 else ""
        if replacement is None:
            report.skipped.append(ModuleDecision(names[0], type(module).__name__, None, reason + shared))
            continue
        for parent, attribute, _ in occurrences:
            setattr(parent, attribute, replacement)
        report.replaced.append(
            ModuleDecision(names[0], type(module).__name__, type(replacement).__name__, reason + shared)
        )
    return report


# ------------------------------------------------------------------------------------------ the paper's placement


class _AfterActivation:
    """One pass of the paper's placement over a model (see :func:`apply_blurpool`, ``placement='after_activation'``)."""

    def __init__(self, model: nn.Module, opts: BlurPoolOptions, exclusion: _Exclusion, dtype, device) -> None:
        self.model = model
        self.opts = opts
        self.exclusion = exclusion
        self.dtype = dtype
        self.device = device
        self.report = BlurPoolReport(options=opts)
        self.done: set[int] = set()  # modules a rule has dealt with (replaced, moved, or skipped with a reason)

    def _conv_refusal(self, conv: nn.Conv2d, name: str, *changed: str) -> str | None:
        """Why the strided conv ``name`` stays as it is (None: it may change), ``changed`` naming other modules the
        change would replace (an excluded one vetoes it too)."""
        if not self.opts.replace_convs:
            return "replace_convs=False"
        excluded = self.exclusion.reason(name, *changed)
        if excluded is not None:
            return excluded
        if conv.in_channels < self.opts.min_channels:
            return (
                f"in_channels {conv.in_channels} < min_channels {self.opts.min_channels} "
                "(the paper keeps the stem conv strided)"
            )
        return None

    def _skip(self, module: nn.Module, name: str, reason: str) -> None:
        self.done.add(id(module))
        self.report.skipped.append(ModuleDecision(name, type(module).__name__, None, reason))

    def _blur(self, channels: int, stride: tuple[int, int]) -> BlurPool2d:
        return BlurPool2d(channels, stride, self.opts.filter_size, self.opts.pad_mode, device=self.device,
                          dtype=self.dtype)  # fmt: skip

    @staticmethod
    def _is_strided_conv(module: nn.Module) -> bool:
        return type(module) is nn.Conv2d and max(module.stride) > 1

    def sequence(self, parent: nn.Module, prefix: str, keys: list[str]) -> None:
        """Strided conv [-> BatchNorm2d] -> activation, consecutive in ``keys`` (run in that order by ``parent``)."""
        for index, key in enumerate(keys):
            conv = parent._modules[key]
            if not self._is_strided_conv(conv) or id(conv) in self.done:
                continue
            follower = index + 1
            if follower < len(keys) and isinstance(parent._modules[keys[follower]], nn.BatchNorm2d):
                follower += 1
            if follower >= len(keys) or type(parent._modules[keys[follower]]) not in ACTIVATIONS:
                continue
            name = f"{prefix}{key}"
            refusal = self._conv_refusal(conv, name)
            if refusal is not None:
                self._skip(conv, name, refusal)
                continue
            stride = tuple(conv.stride)
            activation_key = keys[follower]
            activation = parent._modules[activation_key]
            conv.stride = (1, 1)
            setattr(parent, activation_key, nn.Sequential(activation, self._blur(conv.out_channels, stride)))
            self.done.add(id(conv))
            self.report.replaced.append(ModuleDecision(
                name, "Conv2d", "BlurPool2d",
                f"stride {stride} moved after the activation: the conv at stride 1 -> "
                f"{' -> '.join(type(parent._modules[k]).__name__ for k in keys[index + 1 : follower + 1])} -> "
                f"BlurPool2d ({prefix}{activation_key}.1)",
            ))  # fmt: skip

    def resnet_block(self, block: nn.Module, prefix: str) -> None:
        """torchvision's BasicBlock (conv1 strided, then bn1, relu, conv2) and Bottleneck (conv2, bn2, relu, conv3)."""
        from torchvision.models.resnet import BasicBlock

        strided_key, consumer_key = ("conv1", "conv2") if isinstance(block, BasicBlock) else ("conv2", "conv3")
        conv, consumer = block._modules[strided_key], block._modules[consumer_key]
        if not self._is_strided_conv(conv) or id(conv) in self.done:
            return
        name = f"{prefix}{strided_key}"
        refusal = self._conv_refusal(conv, name, f"{prefix}{consumer_key}")
        if refusal is None and type(consumer) is not nn.Conv2d:
            refusal = (
                f"{prefix}{consumer_key} is a {type(consumer).__name__}, not the nn.Conv2d that would take the blur"
            )
        if refusal is not None:
            self._skip(conv, name, refusal)
            return
        stride = tuple(conv.stride)
        conv.stride = (1, 1)
        block._modules[consumer_key] = BlurInputConv2d.from_conv(
            consumer, blur_stride=stride, filter_size=self.opts.filter_size, pad_mode=self.opts.pad_mode
        )
        self.done.add(id(conv))
        self.report.replaced.append(ModuleDecision(
            name, "Conv2d", "BlurInputConv2d",
            f"stride {stride} moved after the activation: the conv at stride 1 -> BN -> ReLU -> blur inside "
            f"{prefix}{consumer_key}",
        ))  # fmt: skip

    def shortcut(self, conv: nn.Conv2d, name: str, parent: nn.Module, key: str) -> None:
        """A strided unpadded 1x1 conv: blur, then the conv at stride 1 (the paper's shortcut)."""
        refusal = self._conv_refusal(conv, name)
        if refusal is not None:
            self._skip(conv, name, refusal)
            return
        parent._modules[key] = BlurConv2d.from_conv(
            conv, blur_first=True, filter_size=self.opts.filter_size, pad_mode=self.opts.pad_mode
        )
        self.done.add(id(conv))
        self.report.replaced.append(ModuleDecision(
            name, "Conv2d", "BlurConv2d", f"stride {tuple(conv.stride)}: blur, then the 1x1 conv at stride 1",
        ))  # fmt: skip

    def pool(self, pool: nn.Module, name: str, parent: nn.Module, key: str, keys: list[str]) -> None:
        kind = type(pool)
        enabled = self.opts.replace_maxpools if kind is nn.MaxPool2d else self.opts.replace_avgpools
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        if max(_pairs(stride)) <= 1:
            return
        if not enabled:
            self._skip(pool, name, f"replace_{'max' if kind is nn.MaxPool2d else 'avg'}pools=False")
            return
        excluded = self.exclusion.reason(name)
        if excluded is not None:
            self._skip(pool, name, excluded)
            return
        if kind is nn.MaxPool2d:
            if pool.return_indices:
                self._skip(pool, name, "return_indices=True: the indices of a blurred max have no meaning")
                return
            new: nn.Module = BlurMaxPool2d.from_maxpool(
                pool, filter_size=self.opts.filter_size, pad_mode=self.opts.pad_mode, dtype=self.dtype,
                device=self.device,
            )  # fmt: skip
            reason = f"stride {stride}: the max at stride 1, then blur-subsample"
        else:
            # The paper replaces the average pool by the blur itself; a BlurPool2d needs the channel count, which
            # the conv before the pool in the same sequence gives.
            earlier = [parent._modules[k] for k in keys[: keys.index(key)]]
            channels = next((m.out_channels for m in reversed(earlier) if isinstance(m, nn.Conv2d)), None)
            if channels is None:
                self._skip(pool, name, "no conv before this average pool in its sequence gives the channel count")
                return
            new = self._blur(channels, _pairs(stride))
            reason = f"stride {stride}: the average pool becomes the blur-subsample (the paper's)"
        parent._modules[key] = new
        self.done.add(id(pool))
        self.report.replaced.append(ModuleDecision(name, kind.__name__, type(new).__name__, reason))

    def run(self) -> BlurPoolReport:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        containers = list(self.model.named_modules())
        for name, module in containers:
            prefix = f"{name}." if name else ""
            if isinstance(module, BLUR_LAYER_TYPES):
                continue
            if type(module) in (BasicBlock, Bottleneck):
                self.resnet_block(module, prefix)
            elif type(module) is ResNet:
                self.sequence(module, prefix, ["conv1", "bn1", "relu"])  # the order ResNet's forward runs them
            elif isinstance(module, nn.Sequential):
                self.sequence(module, prefix, list(module._modules))
        for name, parent in containers:
            prefix = f"{name}." if name else ""
            keys = list(parent._modules)
            for key in keys:
                child = parent._modules[key]
                child_name = f"{prefix}{key}"
                if id(child) in self.done or isinstance(child, BLUR_LAYER_TYPES):
                    continue
                if type(child) in (nn.MaxPool2d, nn.AvgPool2d):
                    self.pool(child, child_name, parent, key, keys)
                elif self._is_strided_conv(child):
                    if child.kernel_size == (1, 1) and child.padding in ((0, 0), "valid"):
                        self.shortcut(child, child_name, parent, key)
                    else:
                        refusal = self._conv_refusal(child, child_name) or (
                            f"{UNRECOGNIZED}: the paper's placement needs this conv followed by BatchNorm and an "
                            "activation in an nn.Sequential, or in a torchvision ResNet block "
                            "(placement='conv' anti-aliases any strided conv)"
                        )
                        self._skip(child, child_name, refusal)
        return self.report


def _pairs(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, Sequence) else (int(value), int(value))  # type: ignore[return-value]
