"""The paper's released networks (the ``antialiased-cnns`` package), written for the tests from a description of that
package, independent of ``blurpool_algo``: torchvision's own model, restructured into the paper's layout, with a blur
written here by hand (reflection padding, then a depthwise conv with a binomial filter from a table).

What the description says, family by family (the blur is :class:`RefBlur`, at stride 2, its buffer named ``filt``):

* ResNet, ResNeXt, Wide ResNet: the 7x7 stem conv keeps its stride 2; ``maxpool = Sequential(MaxPool2d(2, stride=1),
  blur)``. In a block with a stride, the strided conv runs at stride 1 and the conv after its ReLU becomes
  ``Sequential(blur, conv)`` (``BasicBlock.conv2``, ``Bottleneck.conv3``); the shortcut becomes ``Sequential(blur,
  1x1 conv at stride 1, BatchNorm)``.
* VGG: every max-pool becomes two slots, ``MaxPool2d(2, stride=1)`` and a blur.
* AlexNet: ``conv(3, 64, 11, stride 2, padding 2), ReLU, blur, MaxPool(3, stride 1), blur, conv(64, 192, 5, p 2),
  ReLU, MaxPool(3, 1), blur, conv(192, 384, 3, p 1), ReLU, conv(384, 256, 3, p 1), ReLU, conv(256, 256, 3, p 1),
  ReLU, MaxPool(3, 1), blur``; torchvision's average pool and classifier.
* DenseNet: the stem ends in ``max0 = MaxPool2d(3, stride 1, padding 1)`` and ``pool0 = blur``; each transition's
  ``pool`` is a blur.
* MobileNetV2: in a block with a stride, the depthwise conv runs at stride 1 and a blur follows its ConvBNReLU6 as one
  more slot of ``conv``; the classifier is ``Sequential(Linear)``, without dropout.

The state dict of such a network IS the released key layout. :func:`paper_network` builds one on the meta device,
materialises it and fills it with cheap seeded values (:func:`fill_`); :func:`set_filter_size` swaps every blur's
filter, so that one set of weights serves every filter size.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.densenet import _Transition
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock

#: The 23 architectures of the paper's package, by hand.
PAPER_ARCHITECTURES = (
    "alexnet",
    "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
    "densenet121", "densenet161", "densenet169", "densenet201",
    "mobilenet_v2",
)  # fmt: skip

#: The paper's filters by size: binomial rows, normalised to sum 1 in 2-D (written out, not computed).
BINOMIAL_ROWS = {2: (1.0, 1.0), 3: (1.0, 2.0, 1.0), 4: (1.0, 3.0, 3.0, 1.0), 5: (1.0, 4.0, 6.0, 4.0, 1.0)}
#: Reflection padding before and after, per axis: (k - 1) // 2 and ceil((k - 1) / 2).
PADS = {2: (0, 1), 3: (1, 1), 4: (1, 2), 5: (2, 2)}


class RefBlur(nn.Module):
    """The paper's BlurPool by hand: reflect-pad, then a depthwise conv with the binomial filter at the stride."""

    def __init__(self, channels: int, filter_size: int, stride: int = 2) -> None:
        super().__init__()
        self.channels, self.stride = channels, stride
        self.set_filter_size(filter_size)

    def set_filter_size(self, filter_size: int) -> None:
        row = torch.tensor(BINOMIAL_ROWS[filter_size], dtype=torch.float64)
        square = torch.outer(row, row)
        square = (square / square.sum()).float()
        self.filter_size = filter_size
        self.register_buffer("filt", square.expand(self.channels, 1, filter_size, filter_size).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = PADS[self.filter_size]
        padded = F.pad(x, (before, after, before, after), mode="reflect")
        return F.conv2d(padded, self.filt, stride=self.stride, groups=x.shape[1])


def family(name: str) -> str:
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "resnet"
    return name.rstrip("_bn0123456789") if name.startswith(("vgg", "densenet")) else name


def _resnet(model: nn.Module, k: int) -> None:
    model.maxpool = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=1), RefBlur(model.conv1.out_channels, k))
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            basic = isinstance(block, BasicBlock)
            strided = block.conv1 if basic else block.conv2
            if strided.stride == (1, 1):
                continue
            strided.stride = (1, 1)
            consumer = "conv2" if basic else "conv3"
            conv = getattr(block, consumer)
            setattr(block, consumer, nn.Sequential(RefBlur(conv.in_channels, k), conv))
            shortcut, norm = block.downsample
            shortcut.stride = (1, 1)
            block.downsample = nn.Sequential(RefBlur(shortcut.in_channels, k), shortcut, norm)


def _vgg(model: nn.Module, k: int) -> None:
    layers: list[nn.Module] = []
    channels = 3
    for layer in model.features:
        if isinstance(layer, nn.MaxPool2d):
            layers += [nn.MaxPool2d(kernel_size=2, stride=1), RefBlur(channels, k)]
        else:
            layers.append(layer)
            channels = layer.out_channels if isinstance(layer, nn.Conv2d) else channels
    model.features = nn.Sequential(*layers)


def _alexnet(model: nn.Module, k: int) -> None:
    model.features = nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=2, padding=2), nn.ReLU(inplace=True), RefBlur(64, k),
        nn.MaxPool2d(kernel_size=3, stride=1), RefBlur(64, k),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=1), RefBlur(192, k),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=1), RefBlur(256, k),
    )  # fmt: skip


def _densenet(model: nn.Module, k: int) -> None:
    old = model.features
    stem = old.conv0.out_channels
    layers = OrderedDict(conv0=old.conv0, norm0=old.norm0, relu0=old.relu0)
    layers.update(max0=nn.MaxPool2d(kernel_size=3, stride=1, padding=1), pool0=RefBlur(stem, k))
    for name, child in old.named_children():
        if name in layers:
            continue
        if isinstance(child, _Transition):
            child.pool = RefBlur(child.conv.out_channels, k)
        layers[name] = child
    model.features = nn.Sequential(layers)


def _mobilenet(model: nn.Module, k: int) -> None:
    for block in model.features:
        if not isinstance(block, InvertedResidual) or block.stride == 1:
            continue
        *head, project, norm = block.conv
        depthwise = head[-1][0]
        depthwise.stride = (1, 1)
        block.conv = nn.Sequential(*head, RefBlur(depthwise.out_channels, k), project, norm)
    model.classifier = nn.Sequential(model.classifier[1])


_RESTRUCTURE = {"resnet": _resnet, "vgg": _vgg, "alexnet": _alexnet, "densenet": _densenet, "mobilenet_v2": _mobilenet}


def paper_structure(name: str, filter_size: int = 4, num_classes: int = 1000) -> nn.Module:
    """The paper's network ``name`` on the meta device (no memory, no values)."""
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        _RESTRUCTURE[family(name)](model, filter_size)
    return model


#: Length of the pool of random values :func:`fill_` tiles from: a prime, so that no weight's rows line up with it.
POOL_SIZE = 1_000_003


#: Linear weights this large (VGG's and AlexNet's classifiers: 103 million numbers in VGG's first) may be shared.
SHARED_SIZE = 4_000_000


@torch.no_grad()
def fill_(model: nn.Module, seed: int, shared: dict[tuple[int, ...], nn.Parameter] | None = None) -> nn.Module:
    """Fills every parameter and buffer of ``model`` with seeded values, cheaply: slices of one pool of uniform values
    in [-1, 1], consecutive tensors at consecutive offsets (so no two hold the same values), each scaled to its role:
    conv and linear weights by ``sqrt(6 / fan_in)`` (activations keep their scale through ReLUs), biases by 0.1,
    BatchNorm weights in [0.5, 1.5], biases and running means in [-0.2, 0.2], running variances in [0.5, 1.5]. The
    blurs get their filters back (see :func:`set_filter_size`).

    ``shared``: a Linear weight of :data:`SHARED_SIZE` numbers or more takes the Parameter of its shape held there (a
    classifier an earlier network filled), or, filled, goes there: the VGGs' classifiers are the same shapes."""
    pool = torch.empty(POOL_SIZE).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed))
    offset = 0
    for module in model.modules():
        ranges = {}
        if isinstance(module, nn.Conv2d | nn.Linear):
            bound = math.sqrt(6.0 / (module.weight[0].numel()))
            ranges = {"weight": (-bound, bound), "bias": (-0.1, 0.1)}
            shape = tuple(module.weight.shape)
            if shared is not None and isinstance(module, nn.Linear) and module.weight.numel() >= SHARED_SIZE:
                if shape in shared:
                    module.weight = shared[shape]
                    del ranges["weight"]
                else:
                    shared[shape] = module.weight
        elif isinstance(module, nn.BatchNorm2d):
            ranges = {"weight": (0.5, 1.5), "bias": (-0.2, 0.2), "running_mean": (-0.2, 0.2), "running_var": (0.5, 1.5)}
            module.num_batches_tracked.zero_()
        for leaf, (low, high) in ranges.items():
            tensor = getattr(module, leaf)
            if tensor is None:
                continue
            flat, half, middle = tensor.view(-1), (high - low) / 2, (high + low) / 2
            start = 0
            while start < flat.numel():
                take = min(flat.numel() - start, POOL_SIZE - offset)
                chunk = torch.mul(pool[offset : offset + take], half, out=flat[start : start + take])
                if middle:
                    chunk.add_(middle)
                start, offset = start + take, (offset + take) % POOL_SIZE
    for module in model.modules():
        if isinstance(module, RefBlur):
            module.set_filter_size(module.filter_size)
    return model


def set_filter_size(model: nn.Module, filter_size: int) -> nn.Module:
    """Gives every blur of ``model`` the filter of ``filter_size`` (the weights stay)."""
    for module in model.modules():
        if isinstance(module, RefBlur):
            module.set_filter_size(filter_size)
    return model


def paper_network(
    name: str,
    filter_size: int,
    seed: int = 0,
    num_classes: int = 1000,
    shared: dict[tuple[int, ...], nn.Parameter] | None = None,
) -> nn.Module:
    """The paper's network ``name`` on the CPU, filled by :func:`fill_` (``shared``: see there), in eval mode."""
    model = paper_structure(name, filter_size, num_classes).to_empty(device="cpu")
    return fill_(model, seed, shared).eval()
