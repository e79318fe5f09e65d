"""Model builders by name: torchvision's classification architectures, plus a small ResNet for the CPU quickstart.

Nothing here downloads weights: every model starts from random initialisation (``weights=None``).
"""

from __future__ import annotations

import difflib
import functools

import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

__all__ = ["build_model", "model_names", "resnet10", "unknown_model_message"]


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
