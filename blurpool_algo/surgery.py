"""Model surgery: replace a model's subsampling layers by their anti-aliased versions, in place.

``apply_blurpool`` decides which modules are replaced and by what, and returns a :class:`BlurPoolReport` that lists
every candidate it saw, replaced or skipped, with the reason. It creates no new parameters: a replaced conv keeps its
``weight`` and ``bias`` Parameter objects, so optimizers built before the surgery stay valid.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blurpool_algo.filters import validate_filter_size, validate_pad_mode
from blurpool_algo.layers import BlurAvgPool2d, BlurConv2d, BlurMaxPool2d

__all__ = ["BlurPoolOptions", "BlurPoolReport", "ModuleDecision", "apply_blurpool", "validate_options"]

#: The layer classes this surgery produces; a model holding them has been (partly) anti-aliased already.
BLUR_LAYER_TYPES: tuple[type[nn.Module], ...] = (BlurConv2d, BlurMaxPool2d, BlurAvgPool2d)


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
    exclude = options.get("exclude", ())
    if isinstance(exclude, str):
        exclude = (exclude,)
    if not isinstance(exclude, Iterable) or not all(isinstance(p, str) and p for p in exclude):
        raise ValueError(f"exclude must be a sequence of non-empty module-name patterns (fnmatch), got {exclude!r}")
    options["exclude"] = tuple(exclude)
    opts = BlurPoolOptions(**options)
    if not (opts.replace_convs or opts.replace_maxpools or opts.replace_avgpools):
        raise ValueError(
            "nothing to replace: at least one of replace_convs, replace_maxpools, replace_avgpools must be True"
        )
    return opts


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
            "num_skipped_layers": len(self.skipped),
        }

    def __str__(self) -> str:
        lines = [f"BlurPool surgery: {self.num_replaced} replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {d.name}: {d.original} -> {d.replacement} ({d.reason})" for d in self.replaced]
        lines += [f"  skipped  {d.name}: {d.original} ({d.reason})" for d in self.skipped]
        return "\n".join(lines)


def _refuse_wrapped(model: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

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
    for name, module in model.named_modules():
        if type(module).__name__ in ("FullyShardedDataParallel", "FSDPModule") or type(module).__name__.startswith(
            "FSDP"
        ):
            raise ValueError(
                f"apply_blurpool got a model with FSDP-wrapped module {name or '<root>'!r}; apply it before sharding"
            )


def _reference_dtype_device(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return None, None


def _max_stride(module: nn.Module) -> int:
    stride = module.stride if module.stride is not None else module.kernel_size  # type: ignore[union-attr]
    return max(stride) if isinstance(stride, Sequence) else int(stride)


def _decide(module: nn.Module, names: list[str], opts: BlurPoolOptions, dtype, device) -> tuple[nn.Module | None, str]:
    """Returns (replacement or None, reason)."""
    excluded = [p for p in opts.exclude if any(fnmatch.fnmatchcase(n, p) for n in names)]
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
    if excluded:
        return None, f"name matches exclude pattern {excluded[0]!r}"
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
        exclude: fnmatch patterns of module names (as in ``named_modules()``) to leave alone, e.g. ``["layer4.*"]``.
        optimizers: accepted for Composer's functional-API signature. The surgery reuses every Parameter object, so
            existing optimizers need no update; they are only checked to be optimizers.

    Returns:
        A :class:`BlurPoolReport` of what was replaced and what was skipped, and why.

    Raises:
        ValueError: on a bad option, or a model that is DDP/FSDP-wrapped or compiled.

    Example:
        >>> import torchvision
        >>> report = apply_blurpool(torchvision.models.resnet18())
        >>> report.num_blurmaxpool_layers, report.num_blurconv_layers
        (1, 6)
    """
    opts = validate_options(
        replace_convs=replace_convs, replace_maxpools=replace_maxpools, replace_avgpools=replace_avgpools,
        blur_first=blur_first, min_channels=min_channels, filter_size=filter_size, pad_mode=pad_mode, exclude=exclude,
    )  # fmt: skip
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizers is not None:
        optimizer_list = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if not all(isinstance(o, torch.optim.Optimizer) for o in optimizer_list):
            raise ValueError("optimizers must be a torch.optim.Optimizer, a sequence of them, or None")
    _refuse_wrapped(model)
    dtype, device = _reference_dtype_device(model)

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
        replacement, reason = _decide(module, names, opts, dtype, device)
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
