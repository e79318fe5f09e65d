"""Tests of ``blurpool_algo.surgery.apply_blurpool``: which modules are replaced, by what, and what stays intact.

References are independent of this package: Composer's built-in BlurPool (``composer.algorithms.blurpool``), the
unmodified torchvision model, torch's own layers and model invariants (parameter identity, state-dict keys, modes).
"""

from __future__ import annotations

import copy
import functools
import socket
import warnings

import composer.algorithms.blurpool as composer_blurpool
import pytest
import torch
import torch.distributed as dist
import torchvision
from composer.algorithms.blurpool import blurpool_layers as composer_layers
from torch import nn

from blurpool_algo import (
    BlurAvgPool2d,
    BlurConv2d,
    BlurInputConv2d,
    BlurMaxPool2d,
    BlurPool2d,
    BlurPoolReport,
    apply_blurpool,
    rules,
    surgery,
)
from blurpool_algo.exclusion import Exclusion
from blurpool_algo.resnet_rules import ResNetReason
from blurpool_algo.rules import EXCLUSIONS, Decision, Reason, ReasonCode, Site, SurgeryContext

BLUR_TYPES = (BlurConv2d, BlurMaxPool2d, BlurAvgPool2d)
COMPOSER_BLUR_TYPES = (composer_layers.BlurConv2d, composer_layers.BlurMaxPool2d)
CANDIDATE_TYPES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)

#: What Composer's documentation and source say its BlurPool does to torchvision's ResNet-50.
RESNET50_CONVS = {f"layer{i}.0.{name}" for i in (2, 3, 4) for name in ("conv2", "downsample.0")}
RESNET50_MAXPOOLS = {"maxpool"}


# --------------------------------------------------------------------------------------------------------- helpers


@functools.cache
def _baseline(arch: str, seed: int = 0) -> nn.Module:
    """A seeded torchvision model (no weights) whose BatchNorm statistics are calibrated on one random batch.

    With torchvision's default init and running_var = 1, MobileNetV2's activations shrink ~10x per block (its logits
    are ~1e-9), which would make any output comparison vacuous; calibrated statistics keep every model's outputs O(1).
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one batch, the running stats are that batch's
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(seed + 1000)))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def make_model(arch: str, seed: int = 0) -> nn.Module:
    return copy.deepcopy(_baseline(arch, seed))


def make_input(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def blurred_names(model: nn.Module, types=BLUR_TYPES) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, types)}


def candidate_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, CANDIDATE_TYPES)}


def structure(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def binomial_row(n: int) -> list[int]:
    row = [1]
    for _ in range(n):
        row = [a + b for a, b in zip([0, *row], [*row, 0], strict=True)]
    return row


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SameConv(nn.Conv2d):
    """A conv subclass with its own forward ("same"-style padding computed at call time), as users write them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


class SharedConvModel(nn.Module):
    """One strided conv registered under two names (``a`` and ``b``), plus in two containers (``seq1``, ``seq2``)."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.a = conv
        self.b = conv
        other = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.seq1 = nn.Sequential(other, nn.ReLU())
        self.seq2 = nn.Sequential(nn.Identity(), other)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq2(self.seq1(self.b(self.a(x))))


# ------------------------------------------------------------------------------------------------ Composer parity


@pytest.mark.parametrize("blur_first", [True, False])
def test_resnet50_matches_composer(blur_first: bool) -> None:
    baseline = make_model("resnet50")
    ours, theirs = copy.deepcopy(baseline), copy.deepcopy(baseline)
    report = apply_blurpool(ours, blur_first=blur_first)
    composer_blurpool.apply_blurpool(theirs, blur_first=blur_first)

    # Exactly Composer's placement: 1 BlurMaxPool2d + 6 BlurConv2d.
    assert blurred_names(ours, BlurMaxPool2d) == RESNET50_MAXPOOLS
    assert blurred_names(ours, BlurConv2d) == RESNET50_CONVS
    assert blurred_names(theirs, composer_layers.BlurMaxPool2d) == RESNET50_MAXPOOLS
    assert blurred_names(theirs, composer_layers.BlurConv2d) == RESNET50_CONVS
    assert (report.num_blurmaxpool_layers, report.num_blurconv_layers, report.num_bluravgpool_layers) == (1, 6, 0)
    assert {d.name for d in report.replaced} == RESNET50_CONVS | RESNET50_MAXPOOLS
    assert all(ours.get_submodule(n).blur_first is blur_first for n in RESNET50_CONVS)

    # The RGB stem is skipped because 3 < min_channels.
    stem = next(d for d in report.skipped if d.name == "conv1")
    assert stem.code is Reason.FEW_CHANNELS and "min_channels" in stem.reason
    assert type(ours.conv1) is nn.Conv2d

    x = make_input(1, 3, 64, 64)
    with torch.no_grad():
        out_ours, out_theirs, out_base = ours(x), theirs(x), baseline(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-4)
    # The comparison is not vacuous: blurring changes the network's output.
    assert (out_ours - out_base).abs().max() > 1e-2


@pytest.mark.parametrize("blur_first", [True, False])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_matches_composer_outputs(arch: str, blur_first: bool) -> None:
    baseline = make_model(arch)
    ours, theirs = copy.deepcopy(baseline), copy.deepcopy(baseline)
    report = apply_blurpool(ours, blur_first=blur_first)
    composer_blurpool.apply_blurpool(theirs, blur_first=blur_first)

    names_ours, names_theirs = blurred_names(ours), blurred_names(theirs, COMPOSER_BLUR_TYPES)
    assert names_ours == names_theirs
    assert names_ours, "the surgery replaced nothing"
    for name in names_ours:
        assert type(ours.get_submodule(name)).__name__ == type(theirs.get_submodule(name)).__name__
    assert {d.name for d in report.replaced} == names_ours
    if arch == "mobilenet_v2":
        # MobileNetV2's strided convs are depthwise (groups == channels).
        assert any(ours.get_submodule(n).groups > 1 for n in names_ours)

    x = make_input(2, 3, 64, 64, seed=3)
    with torch.no_grad():
        out_ours, out_theirs, out_base = ours(x), theirs(x), baseline(x)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-4)
    assert (out_ours - out_base).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------------- report


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_report_lists_every_candidate(arch: str) -> None:
    model = make_model(arch)
    original_types = {name: type(module).__name__ for name, module in model.named_modules()}
    candidates = candidate_names(model)
    report = apply_blurpool(model)

    assert isinstance(report, BlurPoolReport)
    replaced = [d.name for d in report.replaced]
    skipped = [d.name for d in report.skipped]
    assert len(replaced) + len(skipped) == len(candidates)
    assert set(replaced) | set(skipped) == candidates
    assert not set(replaced) & set(skipped)
    assert set(replaced) == blurred_names(model)
    for decision in report.replaced + report.skipped:
        assert isinstance(decision.reason, str) and decision.reason.strip()
        assert decision.original == original_types[decision.name]
    for decision in report.replaced:
        assert decision.replacement == type(model.get_submodule(decision.name)).__name__
    assert all(d.replacement is None for d in report.skipped)

    counts = report.counts()
    assert set(counts) == {
        "num_blurconv_layers",
        "num_blurmaxpool_layers",
        "num_bluravgpool_layers",
        "num_blurpool2d_layers",
        "num_blurinputconv_layers",
        "num_skipped_layers",
    }
    assert counts["num_blurpool2d_layers"] == counts["num_blurinputconv_layers"] == 0  # the paper's placement only
    assert counts["num_blurconv_layers"] == len(blurred_names(model, BlurConv2d))
    assert counts["num_blurmaxpool_layers"] == len(blurred_names(model, BlurMaxPool2d))
    assert counts["num_bluravgpool_layers"] == len(blurred_names(model, BlurAvgPool2d))
    assert counts["num_skipped_layers"] == len(candidates) - len(blurred_names(model))
    assert report.num_replaced == len(replaced) and report.changed

    text = str(report)
    for name in candidates:
        assert name in text


# ------------------------------------------------------------------------------------ parameters and state dicts


@pytest.mark.parametrize(
    "options",
    [{}, {"blur_first": False}, {"min_channels": 0, "filter_size": 4, "pad_mode": "reflect"}],
    ids=["defaults", "blur_last", "stem_fs4_reflect"],
)
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_state_dict_and_parameters(arch: str, options: dict) -> None:
    model = make_model(arch)
    baseline_keys = set(model.state_dict())
    param_ids = [id(p) for p in model.parameters()]
    param_names = [n for n, _ in model.named_parameters()]

    report = apply_blurpool(model, **options)
    replaced = {d.name for d in report.replaced}
    assert replaced

    assert set(model.state_dict()) == baseline_keys | {f"{name}.blur_filter" for name in replaced}
    assert [id(p) for p in model.parameters()] == param_ids
    assert [n for n, _ in model.named_parameters()] == param_names

    # A baseline checkpoint (other weights) loads strictly, and gives what blurring that baseline gives.
    other = make_model(arch, seed=1)
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (name, p), (_, q) in zip(model.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    apply_blurpool(other, **options)
    x = make_input(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)

    # A blurred checkpoint round-trips into a blurred model but refuses to load strictly into a baseline one.
    copy.deepcopy(model).load_state_dict(model.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        make_model(arch).load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("as_sequence", [False, True], ids=["optimizer", "list"])
def test_optimizer_built_before_surgery_still_updates(as_sequence: bool) -> None:
    model = make_model("resnet18").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = apply_blurpool(model, optimizers=[opt] if as_sequence else opt)
    assert report.num_blurconv_layers == 6

    conv = model.layer2[0].conv1
    assert isinstance(conv, BlurConv2d)
    optimized = {id(p) for group in opt.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}

    before = conv.weight.detach().clone()
    x = make_input(2, 3, 64, 64)
    model(x).square().mean().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(conv.weight.detach(), before)
    torch.testing.assert_close(conv.weight.detach(), before - 0.1 * conv.weight.grad)


# --------------------------------------------------------------------------------------------- exact classes only


def test_only_exact_classes_with_stride_are_replaced() -> None:
    model = nn.ModuleDict(
        {
            "same_conv": SameConv(16, 16, 3, stride=2),
            "indices_pool": nn.MaxPool2d(2, return_indices=True),
            "conv_s1": nn.Conv2d(16, 16, 3, padding=1),
            "maxpool_s1": nn.MaxPool2d(3, stride=1, padding=1),
            "avgpool_s1": nn.AvgPool2d(3, stride=1, padding=1),
            "plain_conv": nn.Conv2d(16, 16, 3, stride=2, padding=1),
        }
    )
    before = dict(model.items())
    report = apply_blurpool(model, replace_avgpools=True)

    assert [d.name for d in report.replaced] == ["plain_conv"]
    assert isinstance(model["plain_conv"], BlurConv2d)
    codes = {d.name: d.code for d in report.skipped}
    assert codes == {
        "same_conv": Reason.SUBCLASS,
        "indices_pool": Reason.RETURN_INDICES,
        "conv_s1": Reason.UNSTRIDED,
        "maxpool_s1": Reason.UNSTRIDED,
        "avgpool_s1": Reason.UNSTRIDED,
    }
    assert "SameConv" in next(d.reason for d in report.skipped if d.name == "same_conv")  # the prose names the class
    for name in codes:
        assert model[name] is before[name]

    # Composer's version does blur a stride-1 max pool; ours must not.
    reference = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1))
    composer_blurpool.apply_blurpool(reference)
    assert isinstance(reference[0], composer_layers.BlurMaxPool2d)


# --------------------------------------------------------------------------------------------------------- options


def test_replace_convs_false() -> None:
    model = make_model("resnet50")
    report = apply_blurpool(model, replace_convs=False)
    assert blurred_names(model) == RESNET50_MAXPOOLS
    skipped = {d.name: d for d in report.skipped}
    assert all(skipped[n].code is Reason.DISABLED for n in RESNET50_CONVS)
    assert all(skipped[n].details == {"option": "replace_convs"} for n in RESNET50_CONVS)
    assert "replace_convs=False" in skipped["layer2.0.conv2"].reason


def test_replace_maxpools_false() -> None:
    model = make_model("resnet50")
    report = apply_blurpool(model, replace_maxpools=False)
    assert blurred_names(model) == RESNET50_CONVS
    assert type(model.maxpool) is nn.MaxPool2d
    maxpool = next(d for d in report.skipped if d.name == "maxpool")
    assert maxpool.code is Reason.DISABLED and maxpool.details == {"option": "replace_maxpools"}


@pytest.mark.parametrize("replace_avgpools", [False, True])
def test_replace_avgpools(replace_avgpools: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(16, 8, 3)).eval()
    baseline = copy.deepcopy(model)
    report = apply_blurpool(model, replace_avgpools=replace_avgpools)
    x = make_input(2, 3, 33, 30)
    with torch.no_grad():
        out, ref = model(x), baseline(x)
    assert out.shape == ref.shape
    if replace_avgpools:
        assert isinstance(model[2], BlurAvgPool2d)
        assert report.counts()["num_bluravgpool_layers"] == 1
        assert not torch.allclose(out, ref)
    else:
        assert type(model[2]) is nn.AvgPool2d
        avgpool = next(d for d in report.skipped if d.name == "2")
        assert avgpool.code is Reason.DISABLED and avgpool.details == {"option": "replace_avgpools"}
        assert torch.equal(out, ref)


def test_min_channels_zero_replaces_stem() -> None:
    model = make_model("resnet50")
    report = apply_blurpool(model, min_channels=0)
    assert blurred_names(model, BlurConv2d) == RESNET50_CONVS | {"conv1"}
    assert report.num_blurconv_layers == 7
    x = make_input(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)


@pytest.mark.parametrize("exclude", [["layer4.*"], "layer4.*", ("layer4.0.conv2", "layer4.0.downsample*")])
def test_exclude(exclude) -> None:
    model = make_model("resnet50")
    report = apply_blurpool(model, exclude=exclude)
    layer4 = {n for n in RESNET50_CONVS if n.startswith("layer4")}
    assert blurred_names(model) == (RESNET50_CONVS - layer4) | RESNET50_MAXPOOLS
    assert not blurred_names(model.layer4)
    codes = {d.name: d.code for d in report.skipped}
    assert all(codes[n] in EXCLUSIONS for n in layer4)


def _changed_names(before: nn.Module, after: nn.Module) -> set[str]:
    """Names whose module class or stride the surgery changed (the paper's placement also restrides convs)."""
    old = dict(before.named_modules())
    return {
        name
        for name, module in after.named_modules()
        if name not in old
        or type(module) is not type(old[name])
        or getattr(module, "stride", None) != getattr(old[name], "stride", None)
    }


@pytest.mark.parametrize("placement", ["conv", "after_activation"])
def test_exclude_a_container_name_excludes_everything_under_it(placement: str) -> None:
    # A user who writes "layer4" means all of layer4; "layer4.0" one block. The reference: the same surgery without
    # exclude, minus every change under the excluded container.
    baseline = make_model("resnet18")
    everything = copy.deepcopy(baseline)
    apply_blurpool(everything, placement=placement, min_channels=0)
    all_changes = _changed_names(baseline, everything)
    assert any(n.startswith("layer4.") for n in all_changes) and any(n.startswith("layer3.") for n in all_changes)
    for pattern, container in (("layer4", "layer4"), ("layer4.*", "layer4"), ("layer4.0", "layer4.0"),
                               ("l*4", "layer4")):  # fmt: skip
        model = copy.deepcopy(baseline)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a pattern that matches a module must not warn
            report = apply_blurpool(model, placement=placement, min_channels=0, exclude=[pattern])
        inside = {n for n in all_changes if n == container or n.startswith(container + ".")}
        assert inside, pattern
        assert _changed_names(baseline, model) == all_changes - inside, pattern
        assert report.unmatched_exclude == (), pattern
        excluded = [d for d in report.skipped if d.code in EXCLUSIONS]
        assert excluded and all(d.name.startswith(container + ".") for d in excluded), pattern
        assert all(d.details["pattern"] == pattern and repr(pattern) in d.reason for d in excluded), pattern


def test_exclude_pattern_that_matches_no_module_warns_with_the_closest_names() -> None:
    baseline = make_model("resnet18")
    reference = copy.deepcopy(baseline)
    expected = apply_blurpool(reference)
    model = copy.deepcopy(baseline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_blurpool(model, exclude=["layr4.*", "layer3", "nothing_here"])
    messages = [str(w.message) for w in caught if "matches no module name" in str(w.message)]
    assert all(issubclass(w.category, UserWarning) and w.filename == __file__ for w in caught)  # points at the call
    assert len(messages) == len(caught) == 2  # one per pattern that matches nothing; "layer3" matches
    typo = next(m for m in messages if "'layr4.*'" in m)
    assert "'layer4" in typo  # the closest names
    assert "'nothing_here'" in next(m for m in messages if m is not typo)
    # The report holds the patterns as data, and the typo excluded nothing: layer4 is blurred as without exclude.
    assert report.unmatched_exclude == ("layr4.*", "nothing_here")
    assert "layr4.*" in str(report)
    blurred = blurred_names(model)
    assert blurred == {n for n in blurred_names(reference) if not n.startswith("layer3.")}
    assert any(n.startswith("layer4.") for n in blurred)
    assert expected.unmatched_exclude == ()


def test_unmatched_exclude_patterns_on_a_meta_model() -> None:
    # What recipe validation calls before any weight exists: a model built on the meta device.
    with torch.device("meta"):
        network = torchvision.models.resnet18(num_classes=10)
        wrapper = nn.ModuleDict({"module": network, "metrics": nn.ModuleDict()})  # a ComposerModel's shape
    patterns = ["layer4", "layr4.*", "fc", "layer4.1.conv2", "*.downsample.0", "module.layer4.*", "conv9"]
    unmatched = surgery.unmatched_exclude_patterns(network, patterns)
    assert [p for p, _ in unmatched] == ["layr4.*", "module.layer4.*", "conv9"]
    closest = dict(unmatched)
    assert closest["layr4.*"] and all(isinstance(n, str) for n in closest["layr4.*"])
    assert all(n.startswith("layer4") for n in closest["layr4.*"])
    assert "conv1" in closest["conv9"]
    # Relative to the wrapper itself and to each of its children: names as the network spells them match too.
    roots = ("", "module", "metrics")
    assert [p for p, _ in surgery.unmatched_exclude_patterns(wrapper, patterns, roots=roots)] == ["layr4.*", "conv9"]
    assert [p for p, _ in surgery.unmatched_exclude_patterns(wrapper, patterns)] == [
        "layer4", "layr4.*", "fc", "layer4.1.conv2", "conv9",
    ]  # fmt: skip
    assert surgery.unmatched_exclude_patterns(network, "layer4") == []  # one pattern, as apply_blurpool takes it
    for bad in (dict(patterns=[""]), dict(patterns=[3]), dict(patterns=["fc"], roots="module")):
        with pytest.raises(ValueError, match=r"exclude|roots"):
            surgery.unmatched_exclude_patterns(network, **bad)


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("filter_size", [2, 4, 5])
def test_filter_size_and_pad_mode_reach_layers(filter_size: int, pad_mode: str) -> None:
    model = make_model("resnet18")
    apply_blurpool(model, filter_size=filter_size, pad_mode=pad_mode)
    taps = torch.tensor([float(c) for c in binomial_row(filter_size - 1)]) / 2 ** (filter_size - 1)
    expected = torch.outer(taps, taps)
    layers = [model.get_submodule(n) for n in blurred_names(model)]
    assert len(layers) == 7
    for layer in layers:
        assert layer.filter_size == filter_size
        assert layer.pad_mode == pad_mode
        assert layer.blur_filter.shape[-2:] == (filter_size, filter_size)
        torch.testing.assert_close(layer.blur_filter[0, 0], expected)
    x = make_input(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)


@pytest.mark.parametrize("blur_first", [True, False])
def test_blur_first_reaches_convs(blur_first: bool) -> None:
    model = make_model("resnet50")
    apply_blurpool(model, blur_first=blur_first)
    for name in RESNET50_CONVS:
        conv = model.get_submodule(name)
        assert conv.blur_first is blur_first
        # The blur acts on the conv's input before it, on its output after it.
        assert conv.blur_filter.shape[0] == (conv.in_channels if blur_first else conv.out_channels)
        assert tuple(conv.stride) == (2, 2)


# ---------------------------------------------------------------------------------------------------- idempotence


@pytest.mark.parametrize(
    ("arch", "options"),
    [("resnet18", {}), ("resnet50", {"blur_first": False, "filter_size": 4}), ("mobilenet_v2", {})],
)
def test_idempotent(arch: str, options: dict) -> None:
    model = make_model(arch)
    first = apply_blurpool(model, **options)
    once = copy.deepcopy(model)
    second = apply_blurpool(model, **options)

    assert first.changed
    assert not second.changed and second.num_replaced == 0
    codes = {d.name: d.code for d in second.skipped}
    for decision in first.replaced:
        assert codes[decision.name] is Reason.ALREADY_ANTI_ALIASED
    assert structure(model) == structure(once)
    assert repr(model) == repr(once)
    assert set(model.state_dict()) == set(once.state_dict())
    x = make_input(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), once(x))


# --------------------------------------------------------------------------------------------------- shared modules


def test_shared_module_replaced_once() -> None:
    torch.manual_seed(0)
    model = SharedConvModel().eval()
    reference = copy.deepcopy(model)
    params_before = [id(p) for p in model.parameters()]
    assert len(params_before) == 4

    report = apply_blurpool(model)

    assert isinstance(model.a, BlurConv2d) and model.a is model.b
    assert isinstance(model.seq1[0], BlurConv2d) and model.seq1[0] is model.seq2[1]
    assert [id(p) for p in model.parameters()] == params_before
    assert report.num_replaced == 2
    assert {d.name for d in report.replaced} == {"a", "seq1.0"}
    shared_b = next(d for d in report.replaced if d.name == "a")
    assert "b" in shared_b.reason

    # Independent numbers: Composer's BlurConv2d built around each original conv, applied where the model uses it.
    blur_a = composer_layers.BlurConv2d.from_conv2d(reference.a, 0)
    blur_other = composer_layers.BlurConv2d.from_conv2d(reference.seq1[0], 1)
    x = make_input(1, 16, 32, 32)
    with torch.no_grad():
        expected = blur_other(torch.relu(blur_other(blur_a(blur_a(x)))))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_paper_placement_replaces_a_shared_pool_at_every_place() -> None:
    pool = nn.MaxPool2d(2)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), pool, nn.ReLU(), pool)
    report = apply_blurpool(model, placement="after_activation")
    assert isinstance(model[1], BlurMaxPool2d) and model[1] is model[3]
    assert [(d.name, d.code) for d in report.replaced] == [("1", Reason.BLURRED_POOL)]
    assert report.skipped == []  # the paper's placement reports subsampling layers only
    assert "shared: also 3" in report.replaced[0].reason


# ------------------------------------------------------------------------------------------- rules and reason codes


def test_paper_placement_codes_on_resnet18() -> None:
    # torchvision's ResNet-18, read from its definition: the stem conv (3 input channels) stays strided; the stem
    # max-pool, the strided conv1 of layer2..4's first block and their 1x1 shortcuts are blurred.
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    report = apply_blurpool(model, placement="after_activation")
    codes = {d.name: d.code for d in report.replaced}
    assert codes == {
        "maxpool": Reason.BLURRED_POOL,
        **{f"layer{i}.0.conv1": ResNetReason.BLUR_INTO_NEXT_CONV for i in (2, 3, 4)},
        **{f"layer{i}.0.downsample.0": Reason.BLURRED_SHORTCUT for i in (2, 3, 4)},
    }
    assert [(d.name, d.code) for d in report.skipped] == [("conv1", Reason.FEW_CHANNELS)]
    assert report.replaced[1].details == {"stride": (2, 2), "consumer": "layer2.0.conv2"}
    assert all(d.reason == d.code.message(**d.details) for d in report.replaced)


def test_excluding_the_conv_a_block_would_change_vetoes_the_block() -> None:
    # The paper's placement in a BasicBlock changes conv1 (to stride 1) and conv2 (which takes the blur): excluding
    # conv2 leaves the whole block as it is, and the report says which name vetoed it.
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    report = apply_blurpool(model, placement="after_activation", exclude=["layer2.0.conv2"])
    vetoed = next(d for d in report.skipped if d.name == "layer2.0.conv1")
    assert vetoed.code is Reason.PARTNER_EXCLUDED
    assert vetoed.details == {"pattern": "layer2.0.conv2", "matched": "layer2.0.conv2"}
    assert type(model.layer2[0].conv2) is nn.Conv2d and model.layer2[0].conv1.stride == (2, 2)
    assert type(model.layer3[0].conv2) is BlurInputConv2d


class _Why(ReasonCode):
    STRIDED_CONV3D = "strided_conv3d", "stride {stride}: a 3-D conv, left as it is"


def _strided_conv3d(site: Site, context: SurgeryContext) -> Decision | None:
    if type(site.module) is not nn.Conv3d or site.module.stride == (1, 1, 1):
        return None
    return context.excluded(site) or rules.refuse(site.module, _Why.STRIDED_CONV3D, stride=site.module.stride)


def test_a_new_layer_kind_is_one_rule() -> None:
    # A rule of its own, with its own reason code, beside the conv placement's rules: the walker offers it every
    # module; the generic rules still handle theirs, and exclusion applies to the new rule through the context.
    # (A 3-D conv: the conv placement has rules for 1-D and 2-D ones.)
    model = nn.ModuleDict({
        "volume": nn.Conv3d(16, 16, 3, stride=2), "skipped": nn.Conv3d(16, 16, 3, stride=2),
        "spatial": nn.Conv2d(16, 16, 3, stride=2),
    })  # fmt: skip
    options = surgery.validate_options(exclude=["skipped"])
    context = rules.SurgeryContext.of(model, options, Exclusion(options.exclude))
    taken = rules.walk((*surgery.PLACEMENT_RULES["conv"], _strided_conv3d), context)
    assert [(site.name, decision.code) for site, decision in taken] == [
        ("volume", _Why.STRIDED_CONV3D),
        ("skipped", Reason.EXCLUDED),
        ("spatial", Reason.BLURRED_CONV),
    ]
    assert taken[0][1].reason == "stride (2, 2, 2): a 3-D conv, left as it is"
    assert type(model["volume"]) is nn.Conv3d and isinstance(model["spatial"], BlurConv2d)


# ------------------------------------------------------------------------------------ dtype, device, mode, layout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_is_kept(dtype: torch.dtype) -> None:
    model = make_model("resnet18")
    reference = copy.deepcopy(model)
    apply_blurpool(reference)
    model = model.to(dtype)
    apply_blurpool(model)
    for name in blurred_names(model):
        assert model.get_submodule(name).blur_filter.dtype == dtype
    x = make_input(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x.to(dtype))
        expected = reference(x)
    assert out.dtype == dtype
    tol = {torch.bfloat16: 0.1, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)


def test_bf16_composer_reference_fails() -> None:
    """The bf16 test above means something: Composer's surgery of a bf16 model gives a forward that fails."""
    model = make_model("resnet18").to(torch.bfloat16)
    composer_blurpool.apply_blurpool(model)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(make_input(1, 3, 64, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_training_mode_is_kept(arch: str, training: bool) -> None:
    model = make_model(arch).train(training)
    apply_blurpool(model, replace_avgpools=True, min_channels=0)
    assert blurred_names(model)
    assert all(module.training is training for module in model.modules())


@pytest.mark.parametrize(
    "options", [{}, {"blur_first": False}, {"pad_mode": "reflect", "filter_size": 4}], ids=["defaults", "last", "fs4"]
)
def test_channels_last_matches_contiguous(options: dict) -> None:
    model = make_model("resnet18")
    apply_blurpool(model, **options)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = make_input(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        out_cl = model_cl(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)
        # The memory format survives a replaced conv.
        feature = make_input(2, 64, 16, 16).to(memory_format=torch.channels_last)
        assert model_cl.layer2[0].conv1(feature).is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------------- refusals


def _assert_untouched(model: nn.Module) -> None:
    assert not blurred_names(model)


def test_refuses_ddp() -> None:
    from torch.nn.parallel import DistributedDataParallel

    assert not dist.is_initialized()
    dist.init_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        inner = make_model("resnet18")
        wrapped = DistributedDataParallel(inner)
        with pytest.raises(ValueError, match="DistributedDataParallel"):
            apply_blurpool(wrapped)
        _assert_untouched(inner)
    finally:
        dist.destroy_process_group()


def test_refuses_data_parallel() -> None:
    inner = make_model("resnet18")
    with pytest.raises(ValueError, match=r"DataParallel.*before wrapping"):
        apply_blurpool(nn.DataParallel(inner))
    _assert_untouched(inner)


def test_refuses_compiled_model() -> None:
    inner = make_model("resnet18")
    compiled = torch.compile(inner, backend="eager")  # the inductor import alone takes seconds
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match="compile"):
        apply_blurpool(compiled)
    _assert_untouched(inner)


@pytest.mark.parametrize("placement", ["conv", "after_activation"])
def test_refuses_a_model_holding_composers_blur_layers(placement: str) -> None:
    # Blurring a model that Composer's surgery already anti-aliased would blur every replaced layer twice.
    model = make_model("resnet18")
    composer_blurpool.apply_blurpool(model)
    theirs = blurred_names(model, COMPOSER_BLUR_TYPES)
    assert theirs
    before = structure(model)
    with pytest.raises(ValueError, match=r"Composer's BlurPool.*maxpool") as info:
        apply_blurpool(model, placement=placement)
    assert "\n" not in str(info.value)
    assert structure(model) == before
    # The control: a plain model with Composer's other layer kind, BlurPool2d, is refused too.
    with pytest.raises(ValueError, match=r"Composer's BlurPool.*'1'"):
        apply_blurpool(nn.Sequential(nn.Conv2d(16, 16, 3, stride=2), composer_layers.BlurPool2d(16)))


def test_refuses_scripted_models() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    x = make_input(1, 16, 12, 12)
    expected = plain(x)
    for scripted in (torch.jit.script(copy.deepcopy(plain)), torch.jit.trace(copy.deepcopy(plain), x)):
        with pytest.raises(ValueError, match=r"TorchScript.*plain module, then script"):
            apply_blurpool(scripted)
        assert torch.equal(scripted(x), expected)
    # A scripted submodule inside a plain model: the surgery could not reach its layers, so it refuses, naming it.
    holder = nn.Sequential(torch.jit.script(copy.deepcopy(plain)), nn.Conv2d(16, 16, 3, stride=2))
    with pytest.raises(ValueError, match=r"TorchScript.*'0'"):
        apply_blurpool(holder)
    assert type(holder[1]) is nn.Conv2d


# --------------------------------------------------------------------------------------------------- meta device


@pytest.mark.parametrize(
    "options",
    [{}, {"placement": "after_activation", "min_channels": 0, "filter_size": 4, "pad_mode": "reflect"}],
    ids=["conv", "paper"],
)
def test_meta_built_model_loads_a_baseline_into_the_cpu_built_network(options: dict) -> None:
    # Built on the meta device (no memory, no init), blurred, materialized with to_empty, then given baseline weights:
    # the filters are nowhere in that state dict, so the load must compute them. Reference: the same architecture
    # built on CPU, blurred, and given the same weights.
    baseline = make_model("resnet18")
    reference = torchvision.models.resnet18()
    apply_blurpool(reference, **options)
    reference.load_state_dict(baseline.state_dict(), strict=True)
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    report = apply_blurpool(model, **options)
    kinds = {d.replacement for d in report.replaced}
    assert kinds == ({"BlurConv2d", "BlurMaxPool2d"} if not options else
                     {"BlurConv2d", "BlurInputConv2d", "BlurMaxPool2d", "BlurPool2d"})  # fmt: skip
    model.to_empty(device="cpu")
    result = model.load_state_dict(baseline.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, module in model.named_modules():
        if isinstance(module, (*BLUR_TYPES, BlurInputConv2d, BlurPool2d)):
            assert torch.equal(module.blur_filter, reference.get_submodule(name).blur_filter), name
    x = make_input(2, 3, 32, 32)
    with torch.no_grad():
        out, expected = model.eval()(x), reference.eval()(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_checkpoint_with_a_tampered_filter_is_refused() -> None:
    model = make_model("resnet18")
    apply_blurpool(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    target = copy.deepcopy(model)
    target.load_state_dict(state, strict=True)  # the control: the untampered blurred state dict loads
    for key in ("maxpool.blur_filter", "layer2.0.conv1.blur_filter"):
        tampered = dict(state)
        tampered[key] = torch.zeros_like(state[key])
        tampered[key][..., 1, 1] = 1.0  # an identity "filter": the layer would alias again
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
                target.load_state_dict(tampered, strict=strict)
            # The refused filter does not stay behind in the model.
            assert torch.equal(target.get_submodule(key.rsplit(".", 1)[0]).blur_filter, state[key])


# -------------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"filter_size": 0}, r"filter_size.*>= 1"),
        ({"filter_size": 2.5}, r"filter_size.*>= 1"),
        ({"filter_size": True}, r"filter_size.*>= 1"),
        ({"pad_mode": "mirror"}, r"pad_mode.*'zeros'.*'reflect'.*'replicate'.*'circular'.*mirror"),
        ({"min_channels": -1}, r"min_channels.*>= 0"),
        ({"min_channels": 1.5}, r"min_channels.*>= 0"),
        ({"replace_convs": False, "replace_maxpools": False, "replace_avgpools": False}, "nothing to replace"),
        ({"blur_first": "yes"}, r"blur_first.*True or False"),
        ({"replace_convs": 1}, r"replace_convs.*True or False"),
        ({"exclude": [""]}, r"exclude.*non-empty"),
        ({"exclude": [3]}, r"exclude.*non-empty"),
        ({"exclude": 3}, r"exclude"),
        ({"optimizers": "x"}, r"optimizers.*Optimizer"),
        ({"optimizers": [object()]}, r"optimizers.*Optimizer"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    model = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2), nn.MaxPool2d(2))
    before = list(model)
    with pytest.raises(ValueError, match=match):
        apply_blurpool(model, **kwargs)
    assert list(model) == before


@pytest.mark.parametrize("model", ["resnet18", None, [nn.Conv2d(16, 16, 3, stride=2)], lambda x: x])
def test_bad_model_type(model) -> None:
    with pytest.raises(ValueError, match=r"model must be a torch\.nn\.Module"):
        apply_blurpool(model)


# ---------------------------------------------------------------------------------------------------- filter size 1


@pytest.mark.parametrize(
    "options",
    [{}, {"blur_first": False}, {"pad_mode": "reflect", "min_channels": 0}],
    ids=["defaults", "blur_last", "reflect_stem"],
)
def test_filter_size_one_is_the_original_network(options: dict) -> None:
    baseline = make_model("resnet18")
    model = copy.deepcopy(baseline)
    report = apply_blurpool(model, filter_size=1, **options)
    assert report.num_replaced >= 7
    x = make_input(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), baseline(x))


# ------------------------------------------------------------------------------------ sampling and circular padding


def test_sampling_and_circular_padding_reach_every_layer_and_the_report() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),  # few channels: no blur, but padded circularly
        nn.Conv2d(16, 16, 3, padding=1),  # stride 1: padded circularly
        nn.MaxPool2d(3, 1, 1),  # stride 1: padded circularly, no blur
        nn.Conv2d(16, 16, 3, stride=2, padding=1),  # blurred, adaptive, circular
        nn.MaxPool2d(3, 2, 1),  # blurred, adaptive, circular
        nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"),  # circular already: untouched
    )
    report = apply_blurpool(model, sampling="adaptive", circular_padding=True, exclude=["5"])
    assert [d.name for d in report.replaced] == ["3", "4"]
    assert [(d.name, d.code.value) for d in report.circular] == [
        ("0", "circular_conv"), ("1", "circular_conv"), ("2", "circular_pool"),
    ]  # fmt: skip
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d, BlurMaxPool2d, BlurConv2d, BlurMaxPool2d, nn.Conv2d]
    assert model[0].padding_mode == model[1].padding_mode == model[3].padding_mode == "circular"
    assert model[2].padding_mode == model[4].padding_mode == "circular" and model[2].filter_size == 1
    assert (model[3].sampling, model[3].pad_mode, model[4].sampling) == ("adaptive", "circular", "adaptive")
    assert "circular 0: Conv2d" in str(report)
    # Without circular_padding nothing else changes: no second pass, the blur keeps pad_mode.
    plain = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    report = apply_blurpool(plain, sampling="adaptive", pad_mode="reflect")
    assert report.circular == [] and plain[1].padding_mode == "zeros" and plain[0].pad_mode == "reflect"


def test_paper_placement_takes_the_sampling_option() -> None:
    model = make_model("resnet18")
    apply_blurpool(model, placement="after_activation", sampling="adaptive", circular_padding=True)
    blurs = [m for m in model.modules() if hasattr(m, "sampling")]
    assert blurs and all(m.sampling == "adaptive" and m.pad_mode == "circular" for m in blurs)
    assert all(
        m.padding_mode == "circular" for m in model.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)
    )
    with torch.no_grad():
        assert model(make_input(1, 3, 64, 64)).shape == (1, 1000)


# ------------------------------------------------------------------------------------------------------------ 1-D


def _audio_cnn(seed: int = 0) -> nn.Sequential:
    """A small 1-D CNN of the kind audio and time-series models use, in float64 and eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 16, 9, stride=2, padding=4), nn.BatchNorm1d(16), nn.ReLU(),  # 0-2: the stem (few channels)
        nn.MaxPool1d(3, 2, 1),  # 3
        nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.BatchNorm1d(32), nn.ReLU(),  # 4-6
        nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(),  # 7-8: stride 1
        nn.AvgPool1d(2),  # 9
        nn.Conv1d(32, 32, 1, stride=2),  # 10: a strided pointwise conv
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 5),
    ).double().eval()  # fmt: skip


def _codes(report: BlurPoolReport) -> dict[str, str]:
    return {d.name: d.code.value for d in report.replaced + report.skipped}


def test_1d_conv_placement() -> None:
    baseline = _audio_cnn()
    model = copy.deepcopy(baseline)
    parameters = [id(p) for p in model.parameters()]
    report = apply_blurpool(model, replace_avgpools=True, filter_size=4)
    assert _codes(report) == {
        "0": "few_channels", "3": "blurred_pool", "4": "blurred_conv", "7": "unstrided", "9": "blurred_pool",
        "10": "blurred_conv",
    }  # fmt: skip
    assert [type(model[i]).__name__ for i in (3, 4, 9, 10)] == [
        "BlurMaxPool1d",
        "BlurConv1d",
        "BlurAvgPool1d",
        "BlurConv1d",
    ]
    assert (report.num_blurconv_layers, report.num_blurmaxpool_layers, report.num_bluravgpool_layers) == (2, 1, 1)
    assert [id(p) for p in model.parameters()] == parameters
    x = torch.randn(3, 1, 100, dtype=torch.float64)
    assert model(x).shape == baseline(x).shape
    assert not torch.allclose(model(x), baseline(x))
    assert model[4].blur_filter.shape == (16, 1, 4)  # blur_first: the input's channels, the 1-D taps
    with torch.no_grad():  # the control: filter_size=1 is the plain network
        plain = copy.deepcopy(baseline)
        assert apply_blurpool(plain, replace_avgpools=True, filter_size=1).num_replaced == 4
        assert torch.equal(plain(x), baseline(x))
    assert not apply_blurpool(model, replace_avgpools=True).changed  # a second pass finds everything blurred


def test_1d_paper_placement() -> None:
    baseline = _audio_cnn()
    model = copy.deepcopy(baseline)
    report = apply_blurpool(model, placement="after_activation", replace_avgpools=True, min_channels=0)
    assert _codes(report) == {
        "0": "blur_after_activation", "4": "blur_after_activation", "3": "blurred_pool",
        "9": "average_becomes_blur", "10": "blurred_shortcut",
    }  # fmt: skip
    blur_after_4 = next(d for d in report.replaced if d.name == "4")
    assert blur_after_4.details["blur"] == "6.1" and blur_after_4.details["path"] == "BatchNorm1d -> ReLU"
    assert model[4].stride == (1,) and isinstance(model[6], nn.Sequential)
    assert [type(m).__name__ for m in model[6]] == ["ReLU", "BlurPool1d"] and model[6][1].stride == [2]
    assert type(model[9]).__name__ == "BlurPool1d" and model[9].channels == 32
    assert report.num_blurpool2d_layers == 3 and report.num_blurconv_layers == 1  # the 1-D blurs counted
    x = torch.randn(2, 1, 64, dtype=torch.float64)
    assert model(x).shape == baseline(x).shape


def test_1d_circular_padding_and_adaptive_sampling_make_a_network_invariant_to_circular_shifts() -> None:
    # 128 samples, total stride 16: every map's length stays a multiple of its stride. With adaptive sampling and
    # circular padding the logits of every roll of the signal are the same; fixed sampling (the control) and the
    # baseline are not.
    x = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    changes = {}
    for arm, options in (("aps", {"sampling": "adaptive"}), ("fixed", {}), ("baseline", None)):
        model = _audio_cnn()
        if options is not None:
            report = apply_blurpool(model, circular_padding=True, replace_avgpools=True, min_channels=0, **options)
            assert report.num_replaced == 5 and [d.name for d in report.circular] == ["7"]
        with torch.no_grad():
            logits = model(x)
            changes[arm] = max(
                (model(torch.roll(x, shift, 2)) - logits).abs().max().item() for shift in (1, 2, 5, 8, 13)
            )
    assert changes["aps"] < 1e-12
    assert changes["fixed"] > 1e-4 and changes["baseline"] > 1e-4
