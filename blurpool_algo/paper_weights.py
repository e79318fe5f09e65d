"""The paper's released weights (the ``antialiased-cnns`` package, Zhang 2019) converted for this package's models.

The paper's package nests each blur in an ``nn.Sequential`` beside the layer it feeds, so its state dicts name
parameters differently from torchvision's (its ``layer2.0.conv2.1.weight`` is torchvision's ``layer2.0.conv2.weight``),
and they hold each blur's filter as a buffer named ``filt``. This module knows, per family, where the paper's network
keeps each tensor of ours (:func:`paper_layout`: explicit renames of module paths, read off the model's structure,
never a match by position or shape), and converts a released state dict into one that loads strictly into the model
``models.antialiased_model(name, structure='antialiased_cnns')`` builds (:func:`convert_paper_state_dict`). Their
filters are checked to be the binomial filter of the expected size, then dropped: our blur layers compute their own.

``models.from_antialiased_cnns`` is the entry point; this module builds no model, so it does not import ``models``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models import VGG, AlexNet, DenseNet, MobileNetV2, ResNet
from torchvision.models.densenet import _Transition
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock

from blurpool_algo.filters import binomial_filter_2d
from blurpool_algo.layers import FILTER_BUFFER, BlurPool2d

__all__ = [
    "PAPER_FILTER_BUFFER",
    "PaperLayout",
    "convert_paper_state_dict",
    "paper_layout",
    "released_state_dict",
]

#: The name of the paper's blur buffer (``<module>.filt`` in its state dicts).
PAPER_FILTER_BUFFER = "filt"

#: BatchNorm's step counter: files saved before PyTorch 0.4.1 lack it, and it changes no output (momentum is set).
_OPTIONAL_LEAF = "num_batches_tracked"

_NO_STATE_DICT = (
    "weights hold no state dict: expected the paper's state dict (names to tensors), the dict of its released files "
    "({'state_dict': ...}), or a path to such a file"
)


@dataclass(frozen=True)
class PaperLayout:
    """Where the paper's network keeps each tensor of one of our models.

    Attributes:
        keys: our state-dict key -> the paper's, for every parameter and buffer except our blur filters.
        filters: the paper's filter keys (``...filt``) -> the channel count each filters.
        aliases: an older spelling of one of the paper's keys -> the current one (DenseNet's ``norm.1`` style).
    """

    keys: dict[str, str]
    filters: dict[str, int]
    aliases: dict[str, str] = field(default_factory=dict)


def _renamed(model: nn.Module, modules: Mapping[str, str]) -> dict[str, str]:
    """Each state-dict key of ``model`` (blur filters aside) -> the same key with its module path renamed by
    ``modules`` (paths not in it keep their name)."""
    keys = {}
    for key in model.state_dict():
        path, _, leaf = key.rpartition(".")
        if leaf != FILTER_BUFFER:
            keys[key] = f"{modules.get(path, path)}.{leaf}"
    return keys


def _resnet(model: ResNet) -> PaperLayout:
    """ResNet, ResNeXt, Wide ResNet: ``maxpool = Sequential(MaxPool2d(2, 1), BlurPool)``; in a block with a stride,
    the conv after the activation (``BasicBlock.conv2``, ``Bottleneck.conv3``) is ``Sequential(BlurPool, conv)`` and
    the shortcut is ``Sequential(BlurPool, conv1x1, BatchNorm)``."""
    modules: dict[str, str] = {}
    filters = {"maxpool.1.filt": model.conv1.out_channels}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for index, block in enumerate(getattr(model, stage)):
            if block.stride == 1:  # torchvision's blocks keep their stride as an attribute
                continue
            prefix = f"{stage}.{index}"
            consumer = "conv2" if isinstance(block, BasicBlock) else "conv3"
            modules[f"{prefix}.{consumer}"] = f"{prefix}.{consumer}.1"
            filters[f"{prefix}.{consumer}.0.filt"] = getattr(block, consumer).in_channels
            modules[f"{prefix}.downsample.0"] = f"{prefix}.downsample.1"
            modules[f"{prefix}.downsample.1"] = f"{prefix}.downsample.2"
            filters[f"{prefix}.downsample.0.filt"] = block.downsample[0].in_channels
    return PaperLayout(_renamed(model, modules), filters)


def _blurs_after(layer: nn.Module) -> bool:
    """Whether the paper puts a BlurPool right after ``layer`` in a ``features`` list: after each max-pool (its
    max at stride 1), and after an activation whose slot holds ``Sequential(activation, BlurPool2d)`` here."""
    ends_in_blur = isinstance(layer, nn.Sequential) and len(layer) == 2 and isinstance(layer[1], BlurPool2d)
    return isinstance(layer, nn.MaxPool2d) or ends_in_blur


def _features(model: VGG | AlexNet) -> PaperLayout:
    """VGG and AlexNet: each blur is one more slot of ``features``, so every later index moves up by one."""
    modules, filters, shift, channels = {}, {}, 0, 0
    for index, layer in enumerate(model.features):
        modules[f"features.{index}"] = f"features.{index + shift}"
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else channels
        if _blurs_after(layer):
            shift += 1
            filters[f"features.{index + shift}.filt"] = channels
    return PaperLayout(_renamed(model, modules), filters)


_DENSE_LAYER_KEY = re.compile(r"(.*\.denselayer\d+\.)(norm|conv)([12])\.(\w+)")


def _densenet(model: DenseNet) -> PaperLayout:
    """DenseNet: torchvision's keys; the stem's ``max0`` (no parameters) is followed by the blur ``pool0``, and each
    transition's ``pool`` is the blur. Old files spell ``denselayerN.norm1`` as ``denselayerN.norm.1``."""
    keys = _renamed(model, {})
    filters = {"features.pool0.filt": model.features.conv0.out_channels}
    for name, child in model.features.named_children():
        if isinstance(child, _Transition):
            filters[f"features.{name}.pool.filt"] = child.conv.out_channels
    aliases = {}
    for theirs in keys.values():
        match = _DENSE_LAYER_KEY.fullmatch(theirs)
        if match:
            prefix, kind, number, leaf = match.groups()
            aliases[f"{prefix}{kind}.{number}.{leaf}"] = theirs
    return PaperLayout(keys, filters, aliases)


def _mobilenet(model: MobileNetV2) -> PaperLayout:
    """MobileNetV2: in a block with a stride, the blur is one more slot of ``conv`` after the depthwise
    ConvBNReLU6, so the pointwise conv and its BatchNorm move up by one; the classifier is ``Sequential(Linear)``."""
    modules = {"classifier.1": "classifier.0"}
    filters = {}
    for index, block in enumerate(model.features):
        if not isinstance(block, InvertedResidual) or block.stride == 1:
            continue
        prefix = f"features.{index}.conv"
        depthwise = len(block.conv) - 3  # [expanding ConvBNReLU6,] depthwise ConvBNReLU6, pointwise conv, BatchNorm
        filters[f"{prefix}.{depthwise + 1}.filt"] = block.conv[depthwise][0].out_channels
        for later in range(depthwise + 1, len(block.conv)):
            modules[f"{prefix}.{later}"] = f"{prefix}.{later + 1}"
    return PaperLayout(_renamed(model, modules), filters)


def paper_layout(model: nn.Module) -> PaperLayout:
    """Where the paper's network keeps each tensor of ``model``, one of ``models.antialiased_model(name,
    structure='antialiased_cnns')`` (any device, meta included).

    Raises:
        ValueError: for a model of another family.
    """
    if isinstance(model, ResNet):
        return _resnet(model)
    if isinstance(model, VGG | AlexNet):
        return _features(model)
    if isinstance(model, DenseNet):
        return _densenet(model)
    if isinstance(model, MobileNetV2):
        return _mobilenet(model)
    raise ValueError(f"the paper's package has no {type(model).__name__}; allowed: ResNet, VGG, AlexNet, DenseNet, "
                     "MobileNetV2 (the families of models.PAPER_MODELS)")  # fmt: skip


def released_state_dict(loaded: Any) -> dict[str, Any]:
    """The state dict in what a released file holds: the dict itself, or its ``'state_dict'`` entry (the paper's
    files also keep ``'epoch'``, ``'arch'``, ``'optimizer'`` ...), without the ``'module.'`` prefix a model trained
    in ``DataParallel`` gives every key.

    Raises:
        ValueError: when ``loaded`` holds no state dict.
    """
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(key, str) for key in loaded):
        raise ValueError(_NO_STATE_DICT)
    if not any(torch.is_tensor(value) for value in loaded.values()):
        raise ValueError(_NO_STATE_DICT)
    if all(key.startswith("module.") for key in loaded):
        return {key.removeprefix("module."): value for key, value in loaded.items()}
    return dict(loaded)


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f' and {len(names) - limit} more' if len(names) > limit else ''}]"


def _filter_problem(key: str, value: Tensor, channels: int, filter_size: int) -> str | None:
    """What is wrong with the paper's filter ``value`` at ``key``, if anything: it must be the size-``filter_size``
    binomial filter, one ``(1, k, k)`` row per channel."""
    shape = tuple(value.shape)
    if value.dim() != 4 or shape[0] != channels or shape[1] != 1 or shape[2] != shape[3] or not shape[2]:
        return f"{key}: shape {shape}, expected ({channels}, 1, {filter_size}, {filter_size})"
    size = shape[2]
    if not value.is_meta:  # a meta tensor (a structure-only test) has no values to compare
        binomial = binomial_filter_2d(size, dtype=torch.float64, device=value.device)
        if not value.is_floating_point() or not torch.allclose(value.double(), binomial.expand_as(value), atol=1e-6):
            return f"{key}: not a binomial filter (a corrupted or foreign file?)"
    if size != filter_size:
        return f"{key} holds a binomial filter of size {size}: the weights were trained with filter_size={size}"
    return None


def convert_paper_state_dict(
    name: str,
    model: nn.Module,
    state: Mapping[str, Any],
    *,
    filter_size: int,
    clone: bool,
) -> dict[str, Tensor]:
    """``state``, a state dict of the paper's ``name`` network, as a state dict of ``model`` (built by
    ``models.antialiased_model(name, structure='antialiased_cnns', filter_size=filter_size)``, on any device).

    Every tensor is checked before anything is converted: each of ``model``'s keys must be there under the paper's
    name, with its shape (``num_batches_tracked`` may be missing: old files lack it, and it is filled with 0); the
    paper's filters must be the binomial filter of ``filter_size``; nothing else may be there. The filters are
    dropped and ours given in their place (the same binomial, in the dtype and device of theirs). ``clone`` copies
    the tensors, so that the model shares none with the caller.

    Raises:
        ValueError: one error naming, in the paper's names, every missing, unexpected or mis-shaped key, and every
            filter of another size (with the ``filter_size`` the weights were trained with).
    """
    layout = paper_layout(model)
    ours = model.state_dict()
    canonical = {layout.aliases.get(key, key): key for key in state}  # the paper's current name -> as given
    duplicated = sorted(key for key in state if key in layout.aliases and layout.aliases[key] in state)
    filter_problems = [
        problem
        for key, channels in layout.filters.items()
        if key in canonical and torch.is_tensor(state[canonical[key]])
        and (problem := _filter_problem(key, state[canonical[key]], channels, filter_size)) is not None
    ]  # fmt: skip
    missing = [theirs for our_key, theirs in layout.keys.items()
               if theirs not in canonical and not our_key.endswith(_OPTIONAL_LEAF)]  # fmt: skip
    missing += [key for key in layout.filters if key not in canonical]
    known = set(layout.keys.values()) | set(layout.filters)
    unexpected = sorted({key for key, given in canonical.items() if key not in known} | set(duplicated))
    not_tensors = sorted(given for given in state if not torch.is_tensor(state[given]))
    mismatched = [
        f"{theirs}: {tuple(state[canonical[theirs]].shape)} in the weights, {tuple(ours[our_key].shape)} expected"
        for our_key, theirs in layout.keys.items()
        if theirs in canonical and torch.is_tensor(state[canonical[theirs]])
        and state[canonical[theirs]].shape != ours[our_key].shape
    ]  # fmt: skip
    problems = [f"filters: {_preview(filter_problems, 3)}"] if filter_problems else []
    problems += [f"{label} {_preview(names)}" for label, names in (
        ("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched),
        ("not tensors", not_tensors))
        if names]  # fmt: skip
    if problems:
        hint = (
            "; no key ends in '.filt', so these are not the paper's weights (torchvision-layout weights load with "
            f"models.{name}(weights=...))"
            if not any(key.endswith(f".{PAPER_FILTER_BUFFER}") for key in canonical)
            else ""
        )
        raise ValueError(f"weights do not fit the paper's {name} (filter_size={filter_size}): "
                         f"{'; '.join(problems)}{hint}")  # fmt: skip

    converted: dict[str, Tensor] = {}
    for our_key, theirs in layout.keys.items():
        if theirs in canonical:
            tensor = state[canonical[theirs]]
            converted[our_key] = tensor.detach().clone() if clone else tensor
    example = state[canonical[next(iter(layout.filters))]]
    for our_key, tensor in ours.items():
        if our_key.rpartition(".")[2] == FILTER_BUFFER:
            binomial = binomial_filter_2d(filter_size, dtype=example.dtype, device=example.device)
            converted[our_key] = binomial.expand_as(tensor).contiguous()
        elif our_key not in converted:  # an optional step counter the file lacks
            converted[our_key] = torch.zeros((), dtype=torch.long, device=example.device)
    return converted
