"""Tests of the paper's anti-aliased model builders in ``blurpool_algo.models`` and their weight loading.

References are independent of this package: torchvision's own, unmodified models (parameter names and shapes,
state-dict keys, stage output shapes), blur-layer counts and positions worked out by hand from torchvision's model
definitions, and, for values, a ResNet-18 forward written out by hand from torchvision's submodules with a
hand-written ``[1, 3, 3, 1]/8`` blur.

Almost everything runs on the meta device: models are built without initialising weights, strict state-dict loads
still check keys and shapes, and a forward still computes shapes. Real tensors are used only where values matter.
Tests over every architecture are parametrized with ``scope="module"`` so pytest runs each architecture's tests back
to back, and the cached meta models are built once per worker.
"""

from __future__ import annotations

import collections
import functools
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from blurpool_algo import models
from blurpool_algo.layers import BlurAvgPool2d, BlurConv2d, BlurInputConv2d, BlurMaxPool2d, BlurPool2d
from blurpool_algo.surgery import apply_blurpool

BLUR_TYPES = (BlurPool2d, BlurConv2d, BlurInputConv2d, BlurMaxPool2d, BlurAvgPool2d)

# The paper's 23 ImageNet architectures (Zhang 2019, Table 1 / the released models), written out by hand.
RESNETS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2",
]  # fmt: skip
VGGS = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
DENSENETS = ["densenet121", "densenet161", "densenet169", "densenet201"]
ALL_MODELS = ["alexnet", *VGGS, *RESNETS, *DENSENETS, "mobilenet_v2"]


def family(name: str) -> str:
    if name in RESNETS:
        return "resnet"
    if name in VGGS:
        return "vgg"
    if name in DENSENETS:
        return "densenet"
    return name  # alexnet, mobilenet_v2


# The stem: the first conv of each torchvision model, and its stride (read from torchvision's model definitions).
# VGG has no strided conv at all: every subsampling is a max-pool.
STEM = {
    "resnet": ("conv1", (2, 2)),  # Conv2d(3, 64, 7, stride=2, padding=3)
    "densenet": ("features.conv0", (2, 2)),  # Conv2d(3, 64 or 96, 7, stride=2, padding=3)
    "mobilenet_v2": ("features.0.0", (2, 2)),  # Conv2dNormActivation(3, 32, stride=2): conv, BN, ReLU6
    "alexnet": ("features.0", (4, 4)),  # Conv2d(3, 64, 11, stride=4, padding=2)
    "vgg": ("features.0", (1, 1)),  # Conv2d(3, 64, 3, padding=1)
}

# Blur layers per architecture with the paper's default strided stem, counted by hand from torchvision's models:
# * ResNet/ResNeXt/Wide ResNet: the stem max-pool (MaxPool2d(3, 2, 1)) -> 1 BlurMaxPool2d; the first block of layer2,
#   layer3 and layer4 has a strided 3x3 conv (BasicBlock.conv1 / Bottleneck.conv2), whose blur goes into the next conv
#   -> 3 BlurInputConv2d, and a strided 1x1 shortcut (downsample.0) -> 3 BlurConv2d. layer1 never subsamples.
# * AlexNet: features has 3 MaxPool2d(3, stride=2); the stride-4 stem conv stays strided.
# * VGG: 5 MaxPool2d(2, 2) in features (one after each conv stage), no strided conv.
# * DenseNet: pool0 (MaxPool2d(3, 2, 1)) -> 1 BlurMaxPool2d; 3 transitions, each ending in AvgPool2d(2, 2), whose
#   average becomes the blur -> 3 BlurPool2d.
# * MobileNetV2: inverted-residual settings (t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
#   (6,160,3,2) (6,320,1,1): 4 stages start with a stride-2 depthwise conv -> 4 BlurPool2d after its ReLU6.
EXPECTED_BLURS = {
    "resnet": {"BlurMaxPool2d": 1, "BlurInputConv2d": 3, "BlurConv2d": 3},
    "alexnet": {"BlurMaxPool2d": 3},
    "vgg": {"BlurMaxPool2d": 5},
    "densenet": {"BlurMaxPool2d": 1, "BlurPool2d": 3},
    "mobilenet_v2": {"BlurPool2d": 4},
}
# strided_stem=False: the stem conv runs at stride 1 and a BlurPool2d follows its activation (VGG has no strided stem).
EXTRA_STEM_BLUR = {"resnet": 1, "alexnet": 1, "vgg": 0, "densenet": 1, "mobilenet_v2": 1}

# MobileNetV2's strided inverted residuals (features index: expanded channels = input channels * 6), from the settings
# above: features[1] is the t=1 block, so the stride-2 blocks are 2 (16*6), 4 (24*6), 7 (32*6) and 14 (96*6).
MOBILENET_STRIDED = {2: 96, 4: 144, 7: 192, 14: 576}
# DenseNet-121 (growth 32, blocks 6-12-24-16, 64 stem channels): the transitions halve 64+6*32=256, 128+12*32=512
# and 256+24*32=1024 channels.
DENSENET121_TRANSITIONS = {"features.transition1": 128, "features.transition2": 256, "features.transition3": 512}

# At 97 px DenseNet's spatial sizes: stem conv 49, pool0 25, then every transition halves. A blur-subsample gives
# ceil(n / 2) (13, 7, 4) where torchvision's AvgPool2d(2, 2) gives floor(n / 2) (12, 6, 3); the paper's BlurPool rounds
# up the same way. Every other stage of every model matches torchvision at 97 px (and every stage at 224 px).
DENSENET_97_SIZES = {
    "features.transition1": 13, "features.denseblock2": 13, "features.transition2": 7, "features.denseblock3": 7,
    "features.transition3": 4, "features.denseblock4": 4, "features.norm5": 4, "features": 4,
}  # fmt: skip

# The paper's filter, [1, 3, 3, 1] / 8 per axis, and its padding: 1 before, 2 after.
TAPS4 = [1.0, 3.0, 3.0, 1.0]
TAPS3 = [1.0, 2.0, 1.0]
PADS4 = (1, 2, 1, 2)

by_name = pytest.mark.parametrize("name", ALL_MODELS, ids=ALL_MODELS, scope="module")


# --------------------------------------------------------------------------------------------------------- helpers


@functools.cache
def meta_model(name: str, strided_stem: bool = True) -> nn.Module:
    """The builder's model on the meta device; shared, so tests must not modify it."""
    with torch.device("meta"):
        return getattr(models, name)(strided_stem=strided_stem)


@functools.cache
def meta_reference(name: str) -> nn.Module:
    """torchvision's own model on the meta device; shared, so tests must not modify it."""
    with torch.device("meta"):
        return torchvision.models.get_model(name, weights=None)


def fresh_meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return getattr(models, name)(**kwargs)


def blur_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, BLUR_TYPES)}


def blur_counts(model: nn.Module) -> dict[str, int]:
    return dict(collections.Counter(type(m).__name__ for m in blur_layers(model).values()))


def structure(model: nn.Module) -> list[tuple[str, type, str]]:
    """Every module's name, exact type and settings (extra_repr holds strides, kernels, filter sizes, pad modes)."""
    return [(name, type(module), module.extra_repr()) for name, module in model.named_modules()]


def _shape_only_batch_norm(input, running_mean, running_var, weight=None, bias=None, *args, **kwargs):
    """F.batch_norm for shape tests: BatchNorm keeps its input's shape (the surgery never touches it), and on the meta
    device its Python decomposition is ~85% of a forward's time. The channel count is still checked."""
    channels = (running_mean if running_mean is not None else weight).shape[0]
    assert input.shape[1] == channels, f"BatchNorm of {channels} channels got {tuple(input.shape)}"
    return input


def stage_shapes(model: nn.Module, size: int) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """Output shape and the output shapes of every module at most two names deep (stages, blocks), on meta.

    Deeper modules are internals that the paper's placement changes (a conv now at stride 1); the blocks and stages
    must still hand on what torchvision's do.
    """
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name):
        return lambda module, inputs, output: shapes.__setitem__(name, tuple(output.shape))

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n and n.count(".") <= 1]
    try:
        with torch.no_grad(), mock.patch.object(F, "batch_norm", _shape_only_batch_norm):
            out = model(torch.empty(2, 3, size, size, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return tuple(out.shape), shapes


def filter_2d(taps: list[float], dtype=torch.float32) -> torch.Tensor:
    row = torch.tensor(taps, dtype=torch.float64)
    row = row / row.sum()
    return (row[:, None] * row[None, :]).to(dtype)


def ref_blur(x: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """The paper's blur-subsample, by hand: reflect-pad (1, 2, 1, 2), depthwise [1,3,3,1]/8 filter, keep every 2nd."""
    channels = x.shape[1]
    weight = filter_2d(TAPS4, x.dtype).expand(channels, 1, 4, 4)
    return F.conv2d(F.pad(x, PADS4, mode="reflect"), weight, groups=channels)[..., ::stride, ::stride]


def conv_at_stride_one(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias, 1, conv.padding, conv.dilation, conv.groups)


def ref_strided_basic_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock with stride 2, the paper's way: conv1 at stride 1 -> BN -> ReLU -> blur -> conv2;
    the shortcut blurs first, then its 1x1 conv runs at stride 1."""
    out = block.relu(block.bn1(conv_at_stride_one(block.conv1, x)))
    out = block.bn2(block.conv2(ref_blur(out)))
    identity = block.downsample[1](conv_at_stride_one(block.downsample[0], ref_blur(x)))
    return block.relu(out + identity)


def ref_resnet18(tv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's ResNet-18 forward with the paper's anti-aliasing written in by hand."""
    x = tv.relu(tv.bn1(tv.conv1(x)))  # the stem conv stays strided
    x = ref_blur(F.max_pool2d(x, kernel_size=3, stride=1, padding=1))  # max at stride 1, then blur-subsample
    x = tv.layer1(x)
    for layer in (tv.layer2, tv.layer3, tv.layer4):
        x = layer[1](ref_strided_basic_block(layer[0], x))
    return tv.fc(torch.flatten(tv.avgpool(x), 1))


def seeded_resnet18(seed: int) -> nn.Module:
    """A torchvision ResNet-18 with seeded weights and random (not identity) BatchNorm statistics and affines."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, low, high in [
                    (module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 1.5),
                    (module.weight, 0.5, 1.5), (module.bias, -0.2, 0.2),
                ]:  # fmt: skip
                    tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    return model.eval()


def assert_state_equal(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def assert_paper_filters(model: nn.Module, taps: list[float] = TAPS4) -> None:
    expected = filter_2d(taps)
    layers = blur_layers(model)
    assert layers
    for name, layer in layers.items():
        assert layer.blur_filter.shape[1:] == (1, len(taps), len(taps)), name
        for row in layer.blur_filter:
            torch.testing.assert_close(row[0], expected.to(row.dtype), rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------------- parameters, keys and strict loads


def test_paper_models_are_the_23_architectures() -> None:
    assert sorted(models.PAPER_MODELS) == sorted(ALL_MODELS)
    assert len(set(models.PAPER_MODELS)) == len(models.PAPER_MODELS) == 23
    for name in ALL_MODELS:
        assert callable(getattr(models, name)) and getattr(models, name).__name__ == name


@by_name
def test_parameters_and_keys_match_torchvision(name: str) -> None:
    model, reference = meta_model(name), meta_reference(name)

    # Same parameters in the same order (optimizer state is saved by position), same shapes, same count.
    ours = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    theirs = [(n, tuple(p.shape)) for n, p in reference.named_parameters()]
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())

    # The state dict is torchvision's plus one blur filter per blur layer.
    keys = list(model.state_dict())
    filters = [k for k in keys if k.endswith(".blur_filter")]
    assert [k for k in keys if not k.endswith(".blur_filter")] == list(reference.state_dict())
    assert sorted(filters) == sorted(f"{n}.blur_filter" for n in blur_layers(model))

    # A torchvision state dict loads strictly (meta tensors still check keys and shapes).
    result = model.load_state_dict(reference.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


# --------------------------------------------------------------------------------------------------------- shapes


@by_name
def test_output_and_stage_shapes_match_torchvision(name: str) -> None:
    model, reference = meta_model(name), meta_reference(name)

    out, shapes = stage_shapes(model, 224)
    ref_out, ref_shapes = stage_shapes(reference, 224)
    assert out == ref_out == (2, 1000)
    assert shapes == ref_shapes

    # An odd size (AlexNet needs at least 63 px): the network runs, and every stage subsamples like torchvision's,
    # except DenseNet's transitions, where the blur rounds up (see DENSENET_97_SIZES).
    out, shapes = stage_shapes(model, 97)
    ref_out, ref_shapes = stage_shapes(reference, 97)
    assert out == ref_out == (2, 1000)
    assert shapes.keys() == ref_shapes.keys()
    for stage, shape in shapes.items():
        expected = ref_shapes[stage]
        if family(name) == "densenet" and stage in DENSENET_97_SIZES:
            expected = (*expected[:2], DENSENET_97_SIZES[stage], DENSENET_97_SIZES[stage])
        assert shape == expected, stage


# ---------------------------------------------------------------------------------------- where subsampling happens


def _strided(module: nn.Module) -> bool:
    stride = module.stride if module.stride is not None else module.kernel_size
    return max(stride if isinstance(stride, tuple | list) else (stride,)) > 1


@by_name
@pytest.mark.parametrize("strided_stem", [True, False], ids=["strided_stem", "blurred_stem"], scope="module")
def test_no_naively_strided_layer_is_left(name: str, strided_stem: bool) -> None:
    model = meta_model(name, strided_stem)
    stem_name, stem_stride = STEM[family(name)]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs[0][0] == stem_name  # the hand-written stem is torchvision's first conv

    for conv_name, conv in convs:
        if max(conv.stride) == 1:
            continue
        # A strided conv is either the kept stem or a BlurConv2d (which blurs before it subsamples).
        is_kept_stem = strided_stem and conv_name == stem_name and type(conv) is nn.Conv2d
        assert is_kept_stem or type(conv) is BlurConv2d, f"{conv_name} subsamples without a blur: {conv}"
        if type(conv) is BlurConv2d:
            assert conv.blur_first and conv.filter_size > 1, conv_name
    stem = model.get_submodule(stem_name)
    assert tuple(stem.stride) == (stem_stride if strided_stem else (1, 1))
    if not strided_stem:
        assert not [n for n, m in convs if type(m) is nn.Conv2d and max(m.stride) > 1]

    plain_pools = [n for n, m in model.named_modules() if type(m) in (nn.MaxPool2d, nn.AvgPool2d) and _strided(m)]
    assert plain_pools == []


@by_name
@pytest.mark.parametrize("strided_stem", [True, False], ids=["strided_stem", "blurred_stem"], scope="module")
def test_blur_layer_counts(name: str, strided_stem: bool) -> None:
    expected = dict(EXPECTED_BLURS[family(name)])
    if not strided_stem and EXTRA_STEM_BLUR[family(name)]:
        expected["BlurPool2d"] = expected.get("BlurPool2d", 0) + EXTRA_STEM_BLUR[family(name)]
    model = meta_model(name, strided_stem)
    assert blur_counts(model) == expected
    # The paper's filter and padding by default, everywhere.
    assert {(layer.filter_size, layer.pad_mode) for layer in blur_layers(model).values()} == {(4, "reflect")}


def test_resnet50_blur_positions() -> None:
    model = meta_model("resnet50")
    assert type(model.maxpool) is BlurMaxPool2d
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    assert type(model.conv1) is nn.Conv2d and model.conv1.stride == (2, 2)
    for layer in ("layer2", "layer3", "layer4"):
        block = model.get_submodule(f"{layer}.0")
        # The Bottleneck's strided conv2 runs at stride 1; BN and ReLU follow; conv3 blurs its input by 2 first.
        assert type(block.conv2) is nn.Conv2d and block.conv2.stride == (1, 1)
        assert type(block.conv3) is BlurInputConv2d
        assert tuple(block.conv3.blur_stride) == (2, 2) and block.conv3.stride == (1, 1)
        assert block.conv3.in_channels == block.conv2.out_channels
        # The shortcut: blur, then the 1x1 conv (BlurConv2d keeps the conv's stride-2 setting, blurring at it).
        shortcut = block.downsample[0]
        assert type(shortcut) is BlurConv2d and shortcut.kernel_size == (1, 1) and shortcut.blur_first
        assert shortcut.stride == (2, 2)
        # Later blocks in the stage do not subsample.
        for later in model.get_submodule(layer)[1:]:
            assert not blur_layers(later)
    assert not blur_layers(model.layer1)
    for layer in blur_layers(model).values():
        assert (layer.filter_size, layer.pad_mode) == (4, "reflect")


def test_mobilenet_v2_blur_positions() -> None:
    model = meta_model("mobilenet_v2")
    for index, channels in MOBILENET_STRIDED.items():
        depthwise = model.features[index].conv[1]  # Conv2dNormActivation: conv, BN, activation
        conv, activation = depthwise[0], depthwise[2]
        assert conv.groups == conv.out_channels == channels and conv.stride == (1, 1)
        assert type(activation) is nn.Sequential and len(activation) == 2
        assert type(activation[0]) is nn.ReLU6 and type(activation[1]) is BlurPool2d
        assert activation[1].channels == channels and tuple(activation[1].stride) == (2, 2)
    others = [i for i in range(1, 18) if i not in MOBILENET_STRIDED]
    assert all(not blur_layers(model.features[i]) for i in others)
    for layer in blur_layers(model).values():
        assert (layer.filter_size, layer.pad_mode) == (4, "reflect")


def test_densenet121_blur_positions() -> None:
    model = meta_model("densenet121")
    assert type(model.features.pool0) is BlurMaxPool2d
    for name, channels in DENSENET121_TRANSITIONS.items():
        transition = model.get_submodule(name)
        assert transition.conv.out_channels == channels
        assert type(transition.pool) is BlurPool2d
        assert transition.pool.channels == channels and tuple(transition.pool.stride) == (2, 2)
    for layer in blur_layers(model).values():
        assert (layer.filter_size, layer.pad_mode) == (4, "reflect")


# Where strided_stem=False puts the stem's blur: after the stem's activation, subsampling by the stem's stride. The
# last item: the stages (at most two names deep) before the blur, which now run at stride 1, with their size at 224 px
# (a 7x7 conv with padding 3 keeps 224; AlexNet's 11x11 with padding 2 gives 224 + 4 - 10 = 218).
UNSTRIDED_STEM = {
    "resnet18": ("conv1", "relu", nn.ReLU, 64, (2, 2), {"conv1": 224, "bn1": 224}),
    "alexnet": ("features.0", "features.1", nn.ReLU, 64, (4, 4), {"features.0": 218}),
    "densenet121": (
        "features.conv0", "features.relu0", nn.ReLU, 64, (2, 2), {"features.conv0": 224, "features.norm0": 224},
    ),
    "mobilenet_v2": ("features.0.0", "features.0.2", nn.ReLU6, 32, (2, 2), {}),  # features.0 holds all three
}  # fmt: skip


@pytest.mark.parametrize("name", list(UNSTRIDED_STEM), ids=list(UNSTRIDED_STEM))
def test_unstrided_stem_blurs_after_its_activation(name: str) -> None:
    conv_name, activation_name, activation_type, channels, stride, full_resolution = UNSTRIDED_STEM[name]
    model = meta_model(name, strided_stem=False)
    assert type(model.get_submodule(conv_name)) is nn.Conv2d
    assert model.get_submodule(conv_name).stride == (1, 1)
    slot = model.get_submodule(activation_name)
    assert type(slot) is nn.Sequential and [type(m) for m in slot] == [activation_type, BlurPool2d]
    assert slot[1].channels == channels and tuple(slot[1].stride) == stride
    out, shapes = stage_shapes(model, 224)
    ref_out, ref_shapes = stage_shapes(meta_reference(name), 224)
    assert out == ref_out
    # The new Sequential's children (resnet's relu.0, relu.1) are at most two names deep too; torchvision has none.
    assert ref_shapes.keys() <= shapes.keys()
    assert all(n.startswith(f"{activation_name}.") for n in shapes.keys() - ref_shapes.keys())
    for stage, ref_shape in ref_shapes.items():
        if stage in full_resolution:
            size = full_resolution[stage]
            assert shapes[stage] == (*ref_shape[:2], size, size), stage
        else:
            assert shapes[stage] == ref_shape, stage


# --------------------------------------------------------------------------------------------------------- values


def test_resnet18_computes_the_hand_written_paper_forward() -> None:
    # float32: CPU depthwise convs in float64 are pathologically slow with several threads.
    tv = seeded_resnet18(seed=0)
    model = models.resnet18().eval()
    model.load_state_dict(tv.state_dict(), strict=True)
    assert_paper_filters(model)
    # 64 px: the smallest map a blur sees is 4x4 (layer4's input), large enough for reflect padding of 2.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, expected, baseline = model(x), ref_resnet18(tv, x), tv(x)
        assert expected.abs().max() > 0.1  # O(1) logits: the tolerances below are tight relative to them
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # The reference is not vacuous: the blur changes the network's output.
        assert (out - baseline).abs().max() > 1e-2

        # The pieces on their own: the stem max-pool, and one stride-2 BasicBlock.
        stem = tv.relu(tv.bn1(tv.conv1(x)))
        pooled = ref_blur(F.max_pool2d(stem, 3, 1, 1))
        torch.testing.assert_close(model.maxpool(stem), pooled, rtol=1e-6, atol=1e-6)
        features = tv.layer1(pooled)
        torch.testing.assert_close(
            model.layer2[0](features), ref_strided_basic_block(tv.layer2[0], features), rtol=1e-5, atol=1e-5
        )


def test_resnet50_weights_from_a_file_and_a_plain_load(tmp_path) -> None:
    torch.manual_seed(3)
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path / "resnet50.pt"
    torch.save(state, path)

    def zero_all_but_filters(model: nn.Module) -> None:
        with torch.no_grad():
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if not name.endswith("blur_filter"):
                    tensor.zero_()

    model = models.resnet50(weights=str(path))
    assert_state_equal(model, state)
    assert_paper_filters(model)
    assert set(model.state_dict()) - set(state) == {f"{n}.blur_filter" for n in blur_layers(model)}

    # A plain, strict load_state_dict writes every value too.
    zero_all_but_filters(model)
    result = model.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_state_equal(model, state)

    # And load_weights with a path object.
    zero_all_but_filters(model)
    assert models.load_weights(model, path) is model
    assert_state_equal(model, state)
    assert_paper_filters(model)


# --------------------------------------------------------------------------------------------------- load_weights


def test_load_weights_takes_a_composer_checkpoint() -> None:
    source = seeded_resnet18(seed=5)
    state = source.state_dict()
    checkpoint = {
        "state": {"model": {f"module.{k}": v for k, v in state.items()}, "optimizers": {}, "timestamp": {}},
        "rng": [],
    }
    model = models.resnet18()
    assert models.load_weights(model, checkpoint) is model
    assert_state_equal(model, state)
    assert_paper_filters(model)


# Loading a meta state dict without a num_batches_tracked into a meta model makes torch warn about a no-op copy.
@pytest.mark.filterwarnings("ignore:for .*num_batches_tracked")
@pytest.mark.parametrize(
    ("target", "source", "kind", "key"),
    [
        ("resnet18", "resnet34", "Unexpected", "layer1.2.conv1.weight"),  # resnet34 has 3 blocks in layer1
        ("resnet34", "resnet18", "Missing", "layer1.2.conv1.weight"),
        ("vgg11", "vgg11_bn", "Unexpected", "features.1.running_mean"),  # vgg11_bn's features.1 is a BatchNorm
    ],
    ids=["extra_keys", "missing_keys", "vgg_bn"],
)
def test_load_weights_of_another_architecture_fails(target: str, source: str, kind: str, key: str) -> None:
    with pytest.raises(ValueError, match=kind) as error:
        models.load_weights(fresh_meta_model(target), meta_reference(source).state_dict())
    assert key in str(error.value)


def test_load_weights_refuses_a_blurred_state_dict_into_a_plain_model() -> None:
    # Strictness both ways: the blur filters are optional in an anti-aliased model, unexpected in a plain one.
    with torch.device("meta"):
        plain = torchvision.models.resnet18(weights=None)
    with pytest.raises(ValueError, match=r"maxpool\.blur_filter"):
        models.load_weights(plain, meta_model("resnet18").state_dict())


def test_load_weights_from_a_missing_path_fails(tmp_path) -> None:
    path = tmp_path / "no_such_checkpoint.pt"
    with pytest.raises(ValueError) as error:
        models.load_weights(fresh_meta_model("resnet18"), path)
    assert str(path) in str(error.value)
    with pytest.raises(ValueError) as error:
        fresh_meta_model("resnet18", weights=str(path))
    assert str(path) in str(error.value)


class _RunsCommand:
    """Unpickling it runs a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_load_weights_from_a_file_goes_through_the_checkpoint_gate(tmp_path) -> None:
    # A real Composer checkpoint also pickles numpy RNG states: the gate's allowlist takes them, nothing else.
    import numpy as np

    path = tmp_path / "ep1.pt"
    state_dict = torchvision.models.resnet18().state_dict()
    torch.save({"state": {"model": state_dict}, "rng": [{"numpy": np.random.get_state()}]}, path)
    models.load_weights(fresh_meta_model("resnet18"), path)
    marker = tmp_path / "ran"
    torch.save({"state": {"model": state_dict}, "extra": _RunsCommand(f"touch {marker}")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"posix\.system.*weights_only=False"):
        models.load_weights(fresh_meta_model("resnet18"), tmp_path / "evil.pt")
    assert not marker.exists()
    checkpoint = torch.load(tmp_path / "evil.pt", weights_only=False)  # the user's own opt-in: the payload runs
    assert marker.exists()
    models.load_weights(fresh_meta_model("resnet18"), checkpoint)  # and the dict itself loads


@pytest.mark.parametrize(
    "weights", [42, {"conv1.weight": [1.0, 2.0]}, {"state": {"model": {"module.x": "not a tensor"}}}],
    ids=["int", "list_values", "composer_non_tensor"],
)  # fmt: skip
def test_load_weights_without_a_state_dict_fails(weights) -> None:
    with pytest.raises(ValueError, match="state dict"):
        models.load_weights(fresh_meta_model("resnet18"), weights)


def test_num_classes_changes_the_classifier() -> None:
    model = fresh_meta_model("resnet18", num_classes=10)
    assert model.fc.out_features == 10 and model.fc.weight.shape == (10, 512)
    assert fresh_meta_model("mobilenet_v2", num_classes=10).classifier[-1].out_features == 10
    thousand = meta_reference("resnet18").state_dict()
    with pytest.raises(ValueError, match=r"fc\.weight"):
        models.load_weights(model, thousand)
    with pytest.raises(ValueError, match=r"fc\.weight"):
        fresh_meta_model("resnet18", num_classes=10, weights=thousand)


# ----------------------------------------------------------------------------------------------- copy_params_buffers


def test_copy_params_buffers_copies_a_baseline_by_name() -> None:
    source = seeded_resnet18(seed=7)
    torch.manual_seed(8)
    target = models.resnet18()
    weight = target.conv1.weight
    assert not torch.equal(weight, source.conv1.weight)

    assert models.copy_params_buffers(source, target) is target
    assert target.conv1.weight is weight  # in place: the same Parameter objects
    assert_state_equal(target, source.state_dict())
    assert_paper_filters(target)  # the blur filters, absent from the source, are untouched


def _drop_fc_bias(model: nn.Module) -> None:
    model.fc.bias = None


def _add_buffer(model: nn.Module) -> None:
    model.register_buffer("extra", torch.zeros(3))


def _resize_fc(model: nn.Module) -> None:
    model.fc = nn.Linear(512, 10)


@pytest.mark.parametrize(
    ("edit", "key"),
    [(_drop_fc_bias, "fc.bias"), (_add_buffer, "extra"), (_resize_fc, "fc.weight")],
    ids=["missing", "unexpected", "shape_mismatch"],
)
def test_copy_params_buffers_refuses_a_mismatch_and_copies_nothing(edit, key: str) -> None:
    source = seeded_resnet18(seed=7)
    edit(source)
    torch.manual_seed(8)
    target = models.resnet18()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert not torch.equal(before["conv1.weight"], source.conv1.weight)

    with pytest.raises(ValueError) as error:
        models.copy_params_buffers(source, target)
    assert key in str(error.value)
    # Nothing was copied: conv1 comes first in name order, so a copy-then-check would have changed it.
    assert_state_equal(target, before)


# --------------------------------------------------------------------------------------------------------- options

FAMILY_EXAMPLES = ["alexnet", "vgg11_bn", "resnet50", "densenet121", "mobilenet_v2"]


@pytest.mark.parametrize("name", FAMILY_EXAMPLES, ids=FAMILY_EXAMPLES)
def test_filter_size_and_pad_mode_reach_every_blur(name: str) -> None:
    model = fresh_meta_model(name, filter_size=3, pad_mode="zeros", strided_stem=False)
    layers = blur_layers(model)
    expected_count = sum(EXPECTED_BLURS[family(name)].values()) + EXTRA_STEM_BLUR[family(name)]
    assert len(layers) == expected_count
    for layer_name, layer in layers.items():
        assert (layer.filter_size, layer.pad_mode) == (3, "zeros"), layer_name
        assert layer.blur_filter.shape[-2:] == (3, 3), layer_name


def test_filter_size_values_on_real_tensors() -> None:
    assert_paper_filters(models.resnet18(filter_size=3), TAPS3)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"filter_size": 0}, "filter_size"),
        ({"filter_size": True}, "filter_size"),
        ({"pad_mode": "mirror"}, "pad_mode"),
        ({"strided_stem": "yes"}, "strided_stem"),
        ({"strided_stem": 1}, "strided_stem"),
    ],
    ids=["filter_size_0", "filter_size_bool", "pad_mode_mirror", "strided_stem_str", "strided_stem_int"],
)
def test_bad_options_are_refused(options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        fresh_meta_model("resnet18", **options)
    with torch.device("meta"), pytest.raises(ValueError, match=named):
        models.antialiased_model("mobilenet_v2", **options)


@pytest.mark.parametrize("name", ["resnet5", "resnet10", "vit_b_16", ""], ids=["typo", "resnet10", "vit", "empty"])
def test_unknown_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError) as error:
        models.antialiased_model(name)
    message = str(error.value)
    assert repr(name) in message and "resnet50" in message  # names the bad one, lists the allowed ones


# ------------------------------------------------------------------------------------- the algorithm and idempotence


@pytest.mark.parametrize("name", FAMILY_EXAMPLES, ids=FAMILY_EXAMPLES)
def test_algorithm_surgery_equals_the_builder(name: str) -> None:
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    report = apply_blurpool(
        model, placement="after_activation", filter_size=4, pad_mode="reflect", replace_avgpools=True
    )
    assert structure(model) == structure(meta_model(name))
    assert report.num_replaced == sum(EXPECTED_BLURS[family(name)].values())


@by_name
@pytest.mark.parametrize("strided_stem", [True, False], ids=["strided_stem", "blurred_stem"], scope="module")
def test_paper_surgery_twice_changes_nothing(name: str, strided_stem: bool) -> None:
    # The shared cached model, to save a build: if the surgery does change it, the cache is dropped so that no other
    # test sees the changed model.
    model = meta_model(name, strided_stem)
    before = structure(model)
    try:
        report = apply_blurpool(
            model, placement="after_activation", filter_size=4, pad_mode="reflect", replace_avgpools=True,
            min_channels=16 if strided_stem else 0,
        )  # fmt: skip
    finally:
        after = structure(model)
        if after != before:
            meta_model.cache_clear()
    assert report.replaced == []
    assert after == before
