"""Model builders by name: torchvision's classification architectures, a small ResNet for the CPU quickstart, and the
paper's anti-aliased ImageNet models.

The anti-aliased builders (:data:`PAPER_MODELS`: ``alexnet``, ``vgg11`` ... ``mobilenet_v2``, the 23 architectures of
the paper's table) transform torchvision's own model with the paper's placement: each strided conv runs at stride 1,
then its BatchNorm and activation, then a blur subsamples; shortcut 1x1 convs blur first and run at stride 1; max-pools
take their max at stride 1, then blur-subsample; DenseNet's average pools become the blur. Parameters keep
torchvision's names and shapes, so torchvision checkpoints load with a plain, strict ``load_state_dict``.

``structure='antialiased_cnns'`` builds, still with torchvision's parameter names, the networks the paper's own package
released (its ResNet stem pool, AlexNet stem and MobileNetV2 classifier), and :func:`from_antialiased_cnns` loads that
package's weight files into them (the key conversion is :mod:`blurpool_algo.paper_weights`).

Nothing here downloads weights: a model starts from random initialisation, or from a local file or state dict.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from blurpool_algo.checkpoint_files import CheckpointError, load_checkpoint_file
from blurpool_algo.checks import check_bool, check_choice, check_int, fail
from blurpool_algo.filters import validate_filter_size
from blurpool_algo.layers import FILTER_BUFFER, BlurPool2d, conv_copy
from blurpool_algo.paper_weights import convert_paper_state_dict, released_state_dict
from blurpool_algo.surgery import apply_blurpool

#: The paper's anti-aliased architectures (Zhang 2019, Table 1 and the released models): torchvision names.
PAPER_MODELS: tuple[str, ...] = (
    "alexnet",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "mobilenet_v2",
)  # fmt: skip

__all__ = [
    "PAPER_MODELS",
    "STRUCTURES",
    "antialiased_model",
    "build_model",
    "copy_params_buffers",
    "from_antialiased_cnns",
    "load_weights",
    "model_names",
    "resnet10",
    "unknown_model_message",
    *PAPER_MODELS,
]


def resnet10(*, num_classes: int = 1000) -> ResNet:
    """A ResNet with one BasicBlock per stage, built from torchvision's own ResNet class.

    Small enough to train for a few epochs on two CPU cores, with every kind of subsampling BlurPool anti-aliases: a
    strided stem conv, a max-pool, and strided 3x3 and 1x1 (shortcut) convs at the start of stages 2 to 4.
    """
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


_EXTRA_BUILDERS = {"resnet10": resnet10}


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


def model_names() -> tuple[str, ...]:
    """Every name :func:`build_model` accepts, sorted."""
    return tuple(sorted({*_torchvision_names(), *_EXTRA_BUILDERS}))


def build_model(name: str, *, num_classes: int) -> nn.Module:
    """Builds a randomly initialised classification model by name.

    Args:
        name: a torchvision classification architecture (``torchvision.models.list_models(torchvision.models)``,
            e.g. ``'resnet50'``), or ``'resnet10'``.
        num_classes: size of the classifier's output.

    Raises:
        ValueError: for an unknown name, listing a few close ones.
    """
    if name in _EXTRA_BUILDERS:
        return _EXTRA_BUILDERS[name](num_classes=num_classes)
    if name not in _torchvision_names():
        raise ValueError(unknown_model_message(name))
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def unknown_model_message(name: str) -> str:
    """The error for an unknown model name, with the closest allowed names."""
    close = difflib.get_close_matches(name, model_names(), n=5, cutoff=0.5) or ["resnet18", "resnet50", "resnet10"]
    return f"unknown model {name!r}; allowed: torchvision classification models or resnet10, e.g. {', '.join(close)}"


# ------------------------------------------------------------------------------------ the paper's anti-aliased models

Weights = str | os.PathLike | Mapping[str, torch.Tensor]
_WEIGHTS_OPT_IN = "if you trust the file, pass torch.load(path, weights_only=False) as weights instead of the path"


def _read_weights(weights: Weights) -> Any:
    """``weights`` itself when it is a mapping; else what the file at that path holds, through the checkpoint gate."""
    if isinstance(weights, Mapping):
        return weights
    if not isinstance(weights, str | os.PathLike):
        raise fail("weights", "a file path or a state dict", type(weights).__name__)
    if not os.path.isfile(weights):
        raise ValueError(f"weights: {os.fspath(weights)!r} is not a file (a path to a state dict, or the dict)")
    # The checkpoint gate: torch's safe unpickler with the allowlist a full Composer checkpoint needs.
    try:
        return load_checkpoint_file(weights, opt_in=_WEIGHTS_OPT_IN)
    except CheckpointError as error:
        raise ValueError(f"weights: {error}") from None


def _state_dict_from(weights: Weights) -> Mapping[str, torch.Tensor]:
    state = _read_weights(weights)
    if isinstance(state, Mapping) and isinstance(state.get("state"), Mapping) and "model" in state["state"]:
        # A Composer checkpoint: the network's keys sit under state.model with the ComposerModel's "module." prefix.
        state = {k.removeprefix("module."): v for k, v in state["state"]["model"].items()}
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError("weights hold no state dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, weights: Weights) -> nn.Module:
    """Loads ``weights`` (a state dict, a file holding one, or a Composer checkpoint) into ``model``, strictly.

    The blur filters may be missing from the weights (a baseline's); every other key must match.

    Raises:
        ValueError: naming the missing and unexpected keys, or what ``weights`` is instead of a state dict.
    """
    try:
        model.load_state_dict(_state_dict_from(weights), strict=True)
    except RuntimeError as error:
        raise ValueError(f"weights do not fit {type(model).__name__}: {str(error).strip()}") from None
    return model


def copy_params_buffers(source: nn.Module, target: nn.Module) -> nn.Module:
    """Copies every parameter and buffer of ``source`` into the same-named one of ``target``, in place.

    Matches by name, never by shape or position: a baseline model and its anti-aliased version share every name but
    the blur filters, which ``target`` keeps. Kept for code written against the paper's package; a plain
    ``target.load_state_dict(source.state_dict())`` does the same.

    Raises:
        ValueError: when a name is in one model and not the other (blur filters aside), or shapes differ; nothing is
            copied then.
    """
    sources = dict(source.named_parameters()) | dict(source.named_buffers())
    targets = dict(target.named_parameters()) | dict(target.named_buffers())
    filters = {name for name in targets if name.rsplit(".", 1)[-1] == FILTER_BUFFER}
    missing = sorted(set(targets) - set(sources) - filters)
    unexpected = sorted(set(sources) - set(targets))
    mismatched = [f"{n}: {tuple(sources[n].shape)} vs {tuple(targets[n].shape)}"
                  for n in sorted(set(sources) & set(targets)) if sources[n].shape != targets[n].shape]  # fmt: skip
    if missing or unexpected or mismatched:
        raise ValueError(
            f"cannot copy {type(source).__name__} into {type(target).__name__}: missing in source {missing}, "
            f"unexpected in source {unexpected}, shape mismatches {mismatched}"
        )
    with torch.no_grad():
        for name, tensor in sources.items():
            targets[name].copy_(tensor)
    return target


def _check_paper_name(name: Any) -> None:
    close = difflib.get_close_matches(name, PAPER_MODELS, n=3, cutoff=0.5) if isinstance(name, str) else []
    check_choice("name", name, PAPER_MODELS, hint=f"did you mean {', '.join(close)}?" if close else "")


#: The builders' ``structure`` choices: torchvision's network with the paper's placement, or the exact networks the
#: paper's package (``antialiased-cnns``) released.
STRUCTURES: tuple[str, ...] = ("torchvision", "antialiased_cnns")


def _released_structure_before_surgery(model: nn.Module) -> None:
    """The paper's released networks where they differ from torchvision's before any blur is placed: the ResNets
    pool their stem with an unpadded 2x2 max (which the surgery then takes at stride 1 before the blur, as the paper
    does), and MobileNetV2's classifier has no dropout (an ``nn.Identity`` keeps torchvision's ``classifier.1``)."""
    if isinstance(model, torchvision.models.ResNet):
        model.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)
    elif isinstance(model, torchvision.models.MobileNetV2):
        model.classifier[0] = nn.Identity()


def _released_alexnet_stem(model: torchvision.models.AlexNet, filter_size: int, pad_mode: str) -> None:
    """The released AlexNet's stem: the 11x11 conv at stride 2 (not 4), its ReLU, then a blur subsampling by 2 (in
    the ReLU's slot, so that no parameter moves)."""
    conv = model.features[0]
    model.features[0] = conv_copy(conv, stride=2)
    blur = BlurPool2d(conv.out_channels, 2, filter_size, pad_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    model.features[1] = nn.Sequential(model.features[1], blur.train(conv.training))


def antialiased_model(
    name: str,
    *,
    filter_size: int = 4,
    pad_mode: str = "reflect",
    num_classes: int = 1000,
    weights: Weights | None = None,
    strided_stem: bool = True,
    structure: str = "torchvision",
) -> nn.Module:
    """Builds one of the paper's anti-aliased models (:data:`PAPER_MODELS`) from torchvision's.

    Args:
        name: a torchvision name from :data:`PAPER_MODELS`.
        filter_size: binomial filter size, >= 1 (the paper's default: 4, ``[1, 3, 3, 1]/8``).
        pad_mode: the blur's padding (the paper's: ``'reflect'``; tiny maps fall back to replicate, never crash).
        num_classes: size of the classifier's output.
        weights: a state dict, or the path of a file holding one (torchvision's, a baseline's, a Composer
            checkpoint's), loaded strictly after the transformation. Nothing is downloaded. For the paper's own
            released files, see :func:`from_antialiased_cnns`.
        strided_stem: keep the first conv strided, as the paper does to save compute; False blurs it too.
        structure: ``'torchvision'``: torchvision's network with the paper's placement. ``'antialiased_cnns'``: the
            networks the paper's package released, computed exactly: the ResNets' stem takes an unpadded 2x2 max at
            stride 1 before its blur (not torchvision's padded 3x3), AlexNet's 11x11 stem conv runs at stride 2, then
            its ReLU and a blur subsampling by 2 (with ``strided_stem=True``; False is as for ``'torchvision'``), and
            MobileNetV2's classifier has no dropout. Parameter names and shapes are torchvision's either way.

    Raises:
        ValueError: for a name outside :data:`PAPER_MODELS`, a bad option, or weights that do not fit.
    """
    _check_paper_name(name)
    check_bool("strided_stem", strided_stem)
    released = check_choice("structure", structure, STRUCTURES) == "antialiased_cnns"
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if released:
        _released_structure_before_surgery(model)
    apply_blurpool(
        model, placement="after_activation", filter_size=filter_size, pad_mode=pad_mode, replace_avgpools=True,
        min_channels=16 if strided_stem else 0,
    )  # fmt: skip
    if released and strided_stem and isinstance(model, torchvision.models.AlexNet):
        _released_alexnet_stem(model, filter_size, pad_mode)
    if weights is not None:
        load_weights(model, weights)
    return model


def from_antialiased_cnns(
    name: str, weights: Weights, *, filter_size: int = 4, num_classes: int = 1000, copy: bool = True
) -> nn.Module:
    """The paper's released network ``name`` with the weights of its package (``antialiased-cnns``), computing what
    the paper's model computes with them, with torchvision's parameter names (``structure='antialiased_cnns'``).

    Args:
        name: one of :data:`PAPER_MODELS`, as the paper's package names it.
        weights: the paper's state dict, the dict its released files hold (``{'state_dict': ...}``; keys prefixed
            with ``'module.'`` too), or the path of such a file (read through the checkpoint gate: tensors and plain
            values only).
        filter_size: the filter size the weights were trained with (the ``lpf`` number of the file name, 2 to 5).
        num_classes: size of the classifier's output.
        copy: copy the tensors of a mapping, so that the model shares none with the caller (the default). False
            makes them the model's own, as ``load_state_dict(assign=True)`` does: no second copy in memory (a VGG's
            weights are over 500 MB), and the caller's tensors then change when the model trains. A path's tensors
            are never copied (nobody else holds them).

    Returns:
        The model, on the device of the weights, in training mode like every builder (``.eval()`` for inference).
        It is built on the meta device and takes the tensors without a random initialisation first.

    Raises:
        ValueError: for a bad option or unreadable weights, and one error naming, as the paper's file names them,
            every missing, unexpected or mis-shaped key and every filter of another size than ``filter_size``.

    Example:
        >>> paper_state = {"fc.weight": torch.zeros(1000, 512)}  # a truncated file, say
        >>> from_antialiased_cnns("resnet18", paper_state)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: weights do not fit the paper's resnet18 (filter_size=4): missing [conv1.weight, bn1.weight, ...
    """
    _check_paper_name(name)
    validate_filter_size(filter_size)
    check_int("num_classes", num_classes, minimum=1)
    check_bool("copy", copy)
    state = released_state_dict(_read_weights(weights))
    with torch.device("meta"):  # the structure only: the weights' own tensors become the parameters
        model = antialiased_model(name, filter_size=filter_size, num_classes=num_classes, structure="antialiased_cnns")
    converted = convert_paper_state_dict(
        name, model, state, filter_size=filter_size, clone=copy and isinstance(weights, Mapping)
    )
    model.load_state_dict(converted, strict=True, assign=True)
    left = [key for key, tensor in model.state_dict().items() if tensor.is_meta]
    if left:  # every tensor was checked above: this would be a bug here, never the caller's
        raise RuntimeError(f"from_antialiased_cnns left tensors on the meta device: {left[:5]}")
    return model


#: A builder's signature: :func:`antialiased_model`'s options, the name fixed.
_BUILDER_SIGNATURE = inspect.signature(antialiased_model).replace(
    parameters=[p for p in inspect.signature(antialiased_model).parameters.values() if p.name != "name"]
)


def _paper_builder(name: str) -> Callable[..., nn.Module]:
    def build(**options: Any) -> nn.Module:
        return antialiased_model(name, **options)

    build.__signature__ = _BUILDER_SIGNATURE  # type: ignore[attr-defined]
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"Anti-aliased torchvision ``{name}`` with the paper's placement; see :func:`antialiased_model`.\n\n"
        f"    ``{name}(weights=path)`` starts from a local state dict (a baseline's, a checkpoint's).\n\n"
        f"    Example:\n"
        f"        >>> with torch.device('meta'):  # the structure only: no memory, no weights\n"
        f"        ...     model = {name}()\n"
        f"        >>> any(key.endswith(FILTER_BUFFER) for key, _ in model.named_buffers())\n"
        f"        True\n"
    )
    return build


alexnet = _paper_builder("alexnet")
vgg11 = _paper_builder("vgg11")
vgg13 = _paper_builder("vgg13")
vgg16 = _paper_builder("vgg16")
vgg19 = _paper_builder("vgg19")
vgg11_bn = _paper_builder("vgg11_bn")
vgg13_bn = _paper_builder("vgg13_bn")
vgg16_bn = _paper_builder("vgg16_bn")
vgg19_bn = _paper_builder("vgg19_bn")
resnet18 = _paper_builder("resnet18")
resnet34 = _paper_builder("resnet34")
resnet50 = _paper_builder("resnet50")
resnet101 = _paper_builder("resnet101")
resnet152 = _paper_builder("resnet152")
resnext50_32x4d = _paper_builder("resnext50_32x4d")
resnext101_32x8d = _paper_builder("resnext101_32x8d")
wide_resnet50_2 = _paper_builder("wide_resnet50_2")
wide_resnet101_2 = _paper_builder("wide_resnet101_2")
densenet121 = _paper_builder("densenet121")
densenet161 = _paper_builder("densenet161")
densenet169 = _paper_builder("densenet169")
densenet201 = _paper_builder("densenet201")
mobilenet_v2 = _paper_builder("mobilenet_v2")
