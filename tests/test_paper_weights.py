"""``models.from_antialiased_cnns``: the paper package's released weights give the paper's outputs here.

The reference is :mod:`paper_reference`: the paper's 23 networks written from a description of its package,
independent of ``blurpool_algo`` (torchvision's model restructured into the paper's layout, with a blur written by
hand). Its ``state_dict()`` is the released key layout. For each architecture and filter size 2 to 5 the test saves
that state dict the way the released files hold it, converts it with ``from_antialiased_cnns`` and compares outputs
in eval mode, and for one filter size per architecture in train mode too (dropout under the same seed, BatchNorm's
batch statistics and running-statistics updates). Controls: this package's default structure with the same weights
computes something else for the ResNets, AlexNet and MobileNetV2 (why ``structure='antialiased_cnns'`` exists), and
wrong weights are refused naming the key.

Cost: the weights of an architecture are made once and shared by its four filter sizes (only the blur filters
change), so each architecture's cases carry one ``xdist_group`` and run on one worker, back to back.
"""

from __future__ import annotations

import argparse
import re
from collections import OrderedDict

import pytest
import torch
import torchvision
from paper_reference import PAPER_ARCHITECTURES, RefBlur, family, paper_network, set_filter_size
from torch import nn

from blurpool_algo import models
from blurpool_algo.layers import FILTER_BUFFER, BlurMaxPool2d
from blurpool_algo.paper_weights import paper_layout

FILTER_SIZES = (2, 3, 4, 5)
#: Input sides, as small as the paper's reflection padding allows (a blur needs a map larger than its padding: 1 up
#: to filter size 3, 2 at sizes 4 and 5), and odd, so that every rounding of a subsampled size is exercised. ResNet,
#: DenseNet and MobileNetV2 leave their last blur about a 16th of the input; VGG's 2x2 max shrinks each map by one
#: first, and AlexNet has a stride-2 stem and three 3x3 max-pools.
INPUT_SIDE = {
    "resnet": (33, 49), "densenet": (33, 49), "mobilenet_v2": (33, 49), "vgg": (49, 65), "alexnet": (81, 97),
}  # fmt: skip
#: Train mode (batch statistics, dropout, running-statistics updates) at one filter size, 2 or 3 (the smaller inputs),
#: for the smallest member of each structure: basic and bottleneck blocks, grouped and wide bottlenecks, VGG with and
#: without BatchNorm, AlexNet, DenseNet, MobileNetV2. The larger members differ only in depth or width, which train
#: mode treats as eval mode does (the 23 x 4 eval comparisons cover every one).
TRAIN_SIZE = {
    "resnet18": 2, "resnet50": 3, "resnext50_32x4d": 2, "wide_resnet50_2": 3, "vgg11": 2, "vgg11_bn": 3,
    "alexnet": 2, "densenet121": 3, "mobilenet_v2": 2,
}  # fmt: skip
#: One case per family goes through a real file, where some keys are spelt as the paper's files may spell them.
FILE_CASES = {("resnet18", 4), ("densenet121", 3), ("mobilenet_v2", 2)}
#: Cases that let ``from_antialiased_cnns`` copy the tensors (its default); the others give them to the model
#: (``copy=False``), which saves copying 1.7 billion numbers over the 92 cases.
COPY_CASES = {("resnet18", 2), ("densenet121", 5), ("mobilenet_v2", 3), ("alexnet", 3), ("vgg11_bn", 5)}

CASES = [
    pytest.param(name, size, marks=pytest.mark.xdist_group(name), id=f"{name}-lpf{size}")
    for name in PAPER_ARCHITECTURES
    for size in FILTER_SIZES
]


#: The last reference network made (one at a time: the largest hold over 500 MB), and the large classifier weights
#: the VGGs and AlexNet share (filling VGG's 103-million-number first classifier layer once instead of eight times).
_LAST_REFERENCE: dict[str, nn.Module] = {}
_SHARED_CLASSIFIERS: dict[tuple[int, ...], nn.Parameter] = {}


@pytest.fixture(autouse=True, scope="module")
def _free_the_references():
    yield
    _LAST_REFERENCE.clear()
    _SHARED_CLASSIFIERS.clear()


def reference(name: str, filter_size: int) -> nn.Module:
    """The paper's network ``name`` with seeded weights (made once per architecture: its cases share them) and the
    filters of ``filter_size``, in eval mode."""
    if name not in _LAST_REFERENCE:
        _LAST_REFERENCE.clear()
        seed = sum(map(ord, name))
        _LAST_REFERENCE[name] = paper_network(name, filter_size=4, seed=seed, shared=_SHARED_CLASSIFIERS)
    return set_filter_size(_LAST_REFERENCE[name], filter_size).eval()


def images(name: str, filter_size: int, batch: int = 1) -> torch.Tensor:
    side = INPUT_SIDE[family(name)][filter_size > 3]
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))


def assert_same_outputs(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert torch.isfinite(expected).all() and scale > 1e-2  # well-scaled logits: the tolerance below is meaningful
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


def released(state: dict[str, torch.Tensor], name: str) -> dict:
    """A released file's dict: the state dict under 'state_dict', with what the paper's training script saved."""
    return {"state_dict": state, "epoch": 90, "arch": f"{name}_lpf", "best_acc1": torch.tensor(71.5)}


def paper_file_keys(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as some of the paper's files spell them: 'module.' (trained in DataParallel) on the ResNets, DenseNet's
    old 'norm.1' for 'norm1'."""
    if name.startswith("resnet"):
        return {f"module.{key}": value for key, value in state.items()}
    if name.startswith("densenet"):
        return {re.sub(r"(\.denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): v for key, v in state.items()}
    return state


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def torchvision_keys(name: str) -> set[str]:
    with torch.device("meta"):
        return set(torchvision.models.get_model(name, weights=None).state_dict())


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    statistics = ("running_mean", "running_var")
    return {key: value.clone() for key, value in model.state_dict().items() if key.endswith(statistics)}


# --------------------------------------------------------------------------------------------- the 92 conversions


def test_the_reference_covers_the_packages_architectures() -> None:
    assert PAPER_ARCHITECTURES == models.PAPER_MODELS


@pytest.mark.parametrize(("name", "filter_size"), CASES)
def test_released_weights_give_the_papers_outputs(name: str, filter_size: int, tmp_path) -> None:
    paper = reference(name, filter_size)
    state = paper.state_dict()
    if (name, filter_size) in FILE_CASES:
        path = tmp_path / f"{name}_lpf{filter_size}.pth"
        torch.save(released(paper_file_keys(name, state), name), path)
        model = models.from_antialiased_cnns(name, path, filter_size=filter_size)
    else:
        weights = released(state, name) if filter_size % 2 else state  # the file's dict, or the state dict itself
        copy = (name, filter_size) in COPY_CASES
        model = models.from_antialiased_cnns(name, weights, filter_size=filter_size, copy=copy)
        given = {storage(t) for key, t in state.items() if not key.endswith(".filt")}
        held = {storage(t) for key, t in model.state_dict().items() if not key.endswith(FILTER_BUFFER)}
        assert not held & given if copy else held == given
    assert model.training  # like every builder; the comparisons set the mode
    x = images(name, filter_size)
    with torch.no_grad():
        assert_same_outputs(model.eval()(x), paper(x))

    if filter_size != TRAIN_SIZE.get(name):
        return
    # Train mode: batch statistics, dropout under the same seed, and the same running-statistics updates.
    before = bn_buffers(paper)
    x = images(name, filter_size, batch=2)
    try:
        torch.manual_seed(7)
        expected = paper.train()(x)
        torch.manual_seed(7)
        assert_same_outputs(model.train()(x), expected)
        ours, theirs = model.state_dict(), paper.state_dict()
        for our_key, their_key in paper_layout(model).keys.items():
            if our_key.endswith(("running_mean", "running_var", "num_batches_tracked")):  # the weights stay
                torch.testing.assert_close(ours[our_key], theirs[their_key], rtol=1e-4, atol=1e-5, msg=our_key)
    finally:
        paper.load_state_dict(before, strict=False)


# ------------------------------------------------------------------------------------------------------- controls


@pytest.mark.parametrize(
    ("name", "train"),
    [
        pytest.param("resnet18", False, marks=pytest.mark.xdist_group("resnet18")),
        pytest.param("alexnet", False, marks=pytest.mark.xdist_group("alexnet")),
        pytest.param("mobilenet_v2", True, marks=pytest.mark.xdist_group("mobilenet_v2")),  # dropout: train mode only
    ],
)
def test_the_torchvision_structure_computes_something_else(name: str, train: bool) -> None:
    paper = reference(name, 4)
    ours = models.from_antialiased_cnns(name, paper.state_dict(), copy=False).state_dict()
    with torch.device("meta"):
        default = models.antialiased_model(name)  # structure="torchvision": the same parameter names and shapes
    keys = set(default.state_dict())
    default.load_state_dict({k: v for k, v in ours.items() if k in keys}, strict=True, assign=True)
    before = bn_buffers(paper)
    x = images(name, 4, batch=2 if train else 1)
    try:
        with torch.no_grad():
            torch.manual_seed(7)
            expected = paper.train(train)(x)
            torch.manual_seed(7)
            got = default.train(train)(x)
    finally:
        paper.load_state_dict(before, strict=False)
        paper.eval()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() > 1e-2 * expected.abs().max()


def test_the_released_structure_differs_where_the_description_says() -> None:
    # Only these three families differ from the torchvision structure, whose keys test_models checks for all 23.
    with torch.device("meta"):
        resnet = models.resnet18(structure="antialiased_cnns")
        alexnet = models.alexnet(structure="antialiased_cnns", filter_size=3)
        mobilenet = models.mobilenet_v2(structure="antialiased_cnns")
        unstrided = models.alexnet(structure="antialiased_cnns", strided_stem=False)
    for name, model in [("resnet18", resnet), ("alexnet", alexnet), ("mobilenet_v2", mobilenet)]:
        keys = set(model.state_dict())
        assert keys - {key for key in keys if key.endswith(FILTER_BUFFER)} == torchvision_keys(name)
    assert isinstance(resnet.maxpool, BlurMaxPool2d)
    assert (resnet.maxpool.kernel_size, resnet.maxpool.stride, resnet.maxpool.padding) == (2, 2, 0)
    assert alexnet.features[0].stride == (2, 2)
    assert alexnet.features[1][1].stride == [2, 2] and alexnet.features[1][1].filter_size == 3
    assert isinstance(mobilenet.classifier[0], nn.Identity)
    # strided_stem=False is the torchvision structure's unstrided stem: the conv at stride 1, a stride-4 blur after.
    assert unstrided.features[0].stride == (1, 1) and unstrided.features[1][1].stride == [4, 4]


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_the_unstrided_stem_is_the_packages_pool_only_false(name: str) -> None:
    # The package's pool_only=False: the stem conv at stride 1, then a blur before the stem's max-pool.
    paper = paper_network(name, filter_size=4, seed=1)
    converted = models.from_antialiased_cnns(name, paper.state_dict(), copy=False).state_dict()
    if name == "resnet18":
        paper.conv1.stride = (1, 1)
        paper.maxpool = nn.Sequential(RefBlur(64, 4), nn.MaxPool2d(kernel_size=2, stride=1), RefBlur(64, 4))
    else:
        paper.features.conv0.stride = (1, 1)
        stem = list(paper.features.named_children())
        stem.insert(3, ("ds0", RefBlur(64, 4)))  # conv0, norm0, relu0, ds0, max0, pool0, ...
        paper.features = nn.Sequential(OrderedDict(stem))
    with torch.device("meta"):
        model = models.antialiased_model(name, structure="antialiased_cnns", strided_stem=False)
    model = model.to_empty(device="cpu")  # the filters are computed on load: ours has one more than the weights
    model.load_state_dict({k: v for k, v in converted.items() if not k.endswith(FILTER_BUFFER)}, strict=True)
    x = images(name, 4)
    with torch.no_grad():
        assert_same_outputs(model.eval()(x), paper(x))


def test_a_bad_structure_is_refused() -> None:
    with pytest.raises(ValueError, match="structure must be one of 'torchvision', 'antialiased_cnns'"):
        models.antialiased_model("resnet18", structure="paper")


# ------------------------------------------------------------------------------------------------ refused weights


def _set(state: dict, key: str, value) -> dict:
    return {**state, key: value}


def _without(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def _other_filter_size(state: dict) -> dict:
    return {key: (RefBlur(v.shape[0], 3).filt if key.endswith(".filt") else v) for key, v in state.items()}


REFUSALS = {
    "filter_size": (_other_filter_size, ["maxpool.1.filt", "filter_size=3"]),
    "missing": (lambda s: _without(s, "layer2.0.conv2.1.weight"), ["missing", "layer2.0.conv2.1.weight"]),
    "unexpected": (lambda s: _set(s, "layer2.0.conv2.2.weight", s["layer2.0.conv2.1.weight"]),
                   ["unexpected", "layer2.0.conv2.2.weight"]),
    "shape": (lambda s: _set(s, "fc.weight", torch.zeros(10, 512)), ["fc.weight", "(10, 512)", "(1000, 512)"]),
    "not_binomial": (lambda s: _set(s, "layer3.0.downsample.0.filt", s["layer3.0.downsample.0.filt"] * 2),
                     ["layer3.0.downsample.0.filt", "not a binomial filter"]),
    "not_a_tensor": (lambda s: _set(s, "layer1.0.bn1.bias", [0.0] * 64), ["not tensors", "layer1.0.bn1.bias"]),
    "torchvision_layout": (lambda s: models.from_antialiased_cnns("resnet18", s).state_dict(),
                           ["layer2.0.conv2.1.weight", "layer2.0.conv2.weight", "models.resnet18(weights=...)"]),
}  # fmt: skip


@pytest.mark.xdist_group("resnet18")
@pytest.mark.parametrize("kind", REFUSALS)
def test_wrong_weights_are_refused_naming_the_key(kind: str) -> None:
    edit, named = REFUSALS[kind]
    weights = edit(reference("resnet18", 4).state_dict())
    with pytest.raises(ValueError, match=r"^weights do not fit the paper's resnet18 \(filter_size=4\)") as error:
        models.from_antialiased_cnns("resnet18", {"state_dict": weights}, filter_size=4)
    for text in named:
        assert text in str(error.value)


@pytest.mark.xdist_group("resnet18")
def test_other_num_classes_is_a_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"fc\.weight: \(1000, 512\) in the weights, \(10, 512\) expected"):
        models.from_antialiased_cnns("resnet18", reference("resnet18", 4).state_dict(), num_classes=10)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([1, 2, 3], "weights hold no state dict"),
        ({"epoch": 3, "arch": "resnet18_lpf"}, "weights hold no state dict"),
        ({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, "could run code"),  # the checkpoint gate
    ],
    ids=["a_list", "no_tensors", "unsafe_pickle"],
)
def test_a_file_without_a_state_dict_is_refused(content, message: str, tmp_path) -> None:
    path = tmp_path / "resnet18_lpf4.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        models.from_antialiased_cnns("resnet18", path)


@pytest.mark.parametrize(
    ("options", "named"),
    [({"name": "resnet19"}, "name"), ({"filter_size": 0}, "filter_size"), ({"num_classes": 0}, "num_classes")],
)
def test_bad_options_are_refused(options: dict, named: str, tmp_path) -> None:
    arguments = {"name": "resnet18", "weights": tmp_path / "missing.pth"} | options
    with pytest.raises(ValueError, match=f"^{named} must be"):
        models.from_antialiased_cnns(**arguments)
