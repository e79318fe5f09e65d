"""Surgery rules for torchvision's ResNets (and ResNeXt, Wide ResNet), for the paper's placement.

A ResNet block's ``forward`` calls its members by name, so no module can be added between them: the strided conv runs
at stride 1, and the conv after the activation (``BasicBlock.conv2``, ``Bottleneck.conv3``) becomes a
:class:`~blurpool_algo.layers.BlurInputConv2d`, which blur-subsamples what it receives first. The stem
(``conv1 -> bn1 -> relu``) is a run like those in an ``nn.Sequential``. The shortcut's strided 1x1 conv and the
stem's max-pool are left to the generic rules (:mod:`blurpool_algo.layer_rules`).
"""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from blurpool_algo.layer_rules import activation_runs, blur_options, conv_padding_mode, is_strided_conv
from blurpool_algo.layers import BlurInputConv2d, conv_copy
from blurpool_algo.rules import Change, Decision, Outcome, Place, ReasonCode, Rule, Site, SurgeryContext, refuse

__all__ = ["RESNET_RULES", "ResNetReason", "resnet_block", "resnet_stem"]


class ResNetReason(ReasonCode):
    """Why a ResNet block's strided conv was, or was not, given the paper's placement."""

    BLUR_INTO_NEXT_CONV = (
        "blur_into_next_conv",
        "stride {stride} moved after the activation: the conv at stride 1 -> BN -> ReLU -> blur inside {consumer}",
    )
    CONSUMER_NOT_CONV = (
        "consumer_not_conv",
        "{consumer} is a {kind}, not the nn.Conv2d that would take the blur",
    )


#: Each block type's strided conv and the conv that runs after its BatchNorm and ReLU.
_BLOCK_CONVS: dict[type[nn.Module], tuple[str, str]] = {
    BasicBlock: ("conv1", "conv2"),
    Bottleneck: ("conv2", "conv3"),
}


def resnet_block(site: Site, context: SurgeryContext) -> Outcome:
    """A strided ``BasicBlock``/``Bottleneck``: the conv at stride 1, the blur inside the next conv."""
    block = site.module
    if type(block) not in _BLOCK_CONVS:
        return None
    strided_key, consumer_key = _BLOCK_CONVS[type(block)]
    conv, consumer = block._modules[strided_key], block._modules[consumer_key]
    if not is_strided_conv(conv):
        return ()
    consumer_name = site.child_name(consumer_key)
    refused = context.conv_refusal(context.site(conv), consumer_name)
    if refused is None and type(consumer) is not nn.Conv2d:
        refused = refuse(conv, ResNetReason.CONSUMER_NOT_CONV, consumer=consumer_name, kind=type(consumer).__name__)
    if refused is not None:
        return refused
    stride = tuple(conv.stride)
    blurred = BlurInputConv2d.from_conv(
        consumer, blur_stride=stride, padding_mode=conv_padding_mode(context), **blur_options(context)
    )
    return Decision(
        conv, ResNetReason.BLUR_INTO_NEXT_CONV, {"stride": stride, "consumer": consumer_name}, blur=blurred,
        changes=(Change(conv, conv_copy(conv, stride=1)),
                 Change(consumer, blurred, Place(block, consumer_key, consumer_name))),
    )  # fmt: skip


def resnet_stem(site: Site, context: SurgeryContext) -> Outcome:
    """The stem ``conv1 -> bn1 -> relu``, in the order ``ResNet.forward`` runs them."""
    if type(site.module) is not ResNet:
        return None
    return activation_runs(site, context, ["conv1", "bn1", "relu"])


#: The rules to put in front of the generic paper-placement rules.
RESNET_RULES: tuple[Rule, ...] = (resnet_block, resnet_stem)
