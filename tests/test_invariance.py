"""Adaptive polyphase sampling (APS): exact invariance to circular shifts, and the adaptive layers' contracts.

Model level: torchvision networks with every subsampling adaptive and every padding circular give the same logits for
``torch.roll(x, shift)`` as for ``x``; the same networks with fixed sampling do not (the control that lets the test
fail). Layer level, against independent references: a hand loop over the polyphase components, torch's own layers for
shapes, the stride-1 conv followed by slicing for the conv at a chosen phase; gradients, dtypes, memory formats,
TorchScript and torch.compile.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from blurpool_algo import apply_blurpool
from blurpool_algo.layers import (
    BlurAvgPool2d,
    BlurConv2d,
    BlurInputConv2d,
    BlurMaxPool2d,
    BlurPool2d,
    adaptive_subsample,
    choose_phase,
    conv_at_phase,
    select_phase,
)

MODELS = ("resnet18", "mobilenet_v2", "densenet121")
APS = {"sampling": "adaptive", "circular_padding": True, "min_channels": 0, "replace_avgpools": True}
#: Edge shifts (one row, one column, both axes by amounts coprime to the total stride of 32) and six random ones.
SHIFTS = [(1, 0), (0, 1), (31, 17), *(tuple(int(v) for v in torch.randint(-63, 64, (2,), generator=g))
                                       for g in [torch.Generator().manual_seed(s) for s in range(6)])]  # fmt: skip


def _calibrated(arch: str) -> nn.Module:
    """A seeded torchvision model whose BatchNorm statistics come from one random batch, so logits are O(1)."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    return model.eval()


@pytest.fixture(scope="module", params=MODELS)
def networks(request) -> tuple[nn.Module, nn.Module]:
    """(adaptive, fixed control): the same weights, circular padding everywhere, every subsampling blurred."""
    adaptive = _calibrated(request.param)
    fixed = copy.deepcopy(adaptive)
    apply_blurpool(adaptive, **APS)
    apply_blurpool(fixed, **{**APS, "sampling": "fixed"})
    return adaptive, fixed


def _tolerance(reference: torch.Tensor) -> float:
    """The largest difference ``assert_close`` allows from ``reference`` in float32 (atol 1e-5, rtol 1.3e-6)."""
    return 1e-5 + 1.3e-6 * reference.abs().max().item()


def _roll_differences(model: nn.Module, x: torch.Tensor, shifts: list[tuple[int, int]]) -> list[float]:
    with torch.no_grad():
        reference = model(x)
        return [(model(torch.roll(x, shift, dims=(2, 3))) - reference).abs().max().item() for shift in shifts]


def test_adaptive_networks_are_invariant_to_circular_shifts_and_fixed_ones_are_not(networks) -> None:
    adaptive, fixed = networks
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = adaptive(x)
        for shift in SHIFTS:
            torch.testing.assert_close(adaptive(torch.roll(x, shift, dims=(2, 3))), reference, msg=str(shift))
    # The control: the same network sampling the fixed grid is off by over 100 times what assert_close allows.
    assert min(_roll_differences(fixed, x, SHIFTS[:3])) > 100 * _tolerance(reference)


def test_invariance_at_224_px(networks) -> None:
    adaptive, fixed = networks
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = adaptive(x)
        for shift in [(1, 0), (31, 17)]:
            torch.testing.assert_close(adaptive(torch.roll(x, shift, dims=(2, 3))), reference, msg=str(shift))
    assert _roll_differences(fixed, x, [(1, 0)])[0] > 100 * _tolerance(reference)


@pytest.mark.parametrize("blur_first", [True, False])
def test_resnet_invariant_in_both_blur_orders_and_its_baseline_state_dict_loads_strictly(blur_first: bool) -> None:
    # The main path and the strided 1x1 shortcut choose their phase on the same blurred input, so they stay aligned.
    baseline = _calibrated("resnet18")
    model = copy.deepcopy(baseline)
    apply_blurpool(model, **APS, blur_first=blur_first)
    model.load_state_dict(baseline.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    assert max(_roll_differences(model, x, [(1, 0), (5, 9)])) < 1e-5
    assert set(model.state_dict()) - set(baseline.state_dict()) == {
        name for name in model.state_dict() if name.endswith("blur_filter")
    }


# ------------------------------------------------------------------------------------------------------- functions


def _hand_phase(x: torch.Tensor, stride: tuple[int, int]) -> list[int]:
    """The largest-norm phase of each sample, by a loop over phases (zero padding to a multiple of the stride)."""
    rows, cols = -(-x.shape[2] // stride[0]) * stride[0], -(-x.shape[3] // stride[1]) * stride[1]
    padded = F.pad(x, [0, cols - x.shape[3], 0, rows - x.shape[2]]).double()
    chosen = []
    for sample in padded:
        norms = [
            sample[:, i :: stride[0], j :: stride[1]].norm().item() for i in range(stride[0]) for j in range(stride[1])
        ]
        chosen.append(max(range(len(norms)), key=lambda k: (norms[k], -k)))
    return chosen


@pytest.mark.parametrize(("stride", "size"), [((2, 2), (8, 8)), ((2, 2), (7, 9)), ((3, 3), (10, 5)), ((2, 3), (6, 7))])
def test_choose_phase_is_the_largest_norm_component(stride, size) -> None:
    x = torch.randn(6, 3, *size, generator=torch.Generator().manual_seed(5))
    assert choose_phase(x, list(stride)).tolist() == _hand_phase(x, stride)
    out = adaptive_subsample(x, list(stride))
    padded = F.pad(x, [0, out.shape[3] * stride[1] - size[1], 0, out.shape[2] * stride[0] - size[0]])
    for n, phase in enumerate(_hand_phase(x, stride)):
        i, j = divmod(phase, stride[1])
        assert torch.equal(out[n], padded[n, :, i :: stride[0], j :: stride[1]])


def test_ties_go_to_the_lowest_phase() -> None:
    x = torch.zeros(3, 1, 4, 4)
    x[0, 0, 1, 0] = x[0, 0, 0, 1] = 2.0  # phases 2 and 1 tie: 1
    x[1, 0, 1, 1] = x[1, 0, 0, 0] = -3.0  # phases 3 and 0 tie: 0
    # sample 2 is all zeros: every phase ties, 0 (the fixed grid)
    assert choose_phase(x, [2, 2]).tolist() == [1, 0, 0]


@pytest.mark.parametrize(("kernel", "padding", "stride"), [(3, 1, 2), (1, 0, 2), (7, 3, 2), (3, 0, 3), (4, 1, 2)])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_conv_at_phase_is_the_stride_one_conv_sampled_from_the_phase(kernel, padding, stride, padding_mode) -> None:
    conv = nn.Conv2d(3, 4, kernel, stride, padding, padding_mode=padding_mode)
    x = torch.randn(stride * stride, 3, 12, 13, generator=torch.Generator().manual_seed(6))
    phase = torch.arange(stride * stride)
    with torch.no_grad():
        out = conv_at_phase(x, phase, conv.weight, conv.bias, [stride] * 2, [padding] * 2, [1, 1], 1, padding_mode)
        assert out.shape == conv(x).shape
        torch.testing.assert_close(out[0], conv(x)[0])  # phase 0 is the strided conv
        mode = "constant" if padding_mode == "zeros" else padding_mode
        dense = F.conv2d(F.pad(x, [padding] * 4, mode=mode), conv.weight, conv.bias)
        for n in range(stride * stride):
            i, j = divmod(n, stride)
            sampled = dense[n, :, i::stride, j::stride]  # where the shifted grid lies inside the dense output
            rows, cols = min(sampled.shape[1], out.shape[2]), min(sampled.shape[2], out.shape[3])
            torch.testing.assert_close(out[n, :, :rows, :cols], sampled[:, :rows, :cols])


# ---------------------------------------------------------------------------------------------------------- layers


def _adaptive_layers(padding_mode: str = "zeros", dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    kw = {"sampling": "adaptive"}
    pool = {**kw, "padding_mode": padding_mode}
    torch.manual_seed(7)
    return {
        "conv_blur_first": BlurConv2d(4, 6, 3, 2, 1, padding_mode=padding_mode, **kw).to(dtype),
        "conv_blur_after": BlurConv2d(4, 6, 3, 2, 1, padding_mode=padding_mode, blur_first=False, **kw).to(dtype),
        "shortcut": BlurConv2d(4, 6, 1, 2, bias=False, **kw).to(dtype),
        "input_conv": BlurInputConv2d(4, 6, 3, 1, 1, padding_mode=padding_mode, blur_stride=2, **kw).to(dtype),
        "maxpool": BlurMaxPool2d(3, 2, 1, **pool).to(dtype),
        "avgpool": BlurAvgPool2d(2, 2, **pool).to(dtype),
        "blurpool": BlurPool2d(4, 2, filter_size=4, **kw).to(dtype),
    }


_PLAIN = {
    "conv_blur_first": lambda: nn.Conv2d(4, 6, 3, 2, 1),
    "conv_blur_after": lambda: nn.Conv2d(4, 6, 3, 2, 1),
    "shortcut": lambda: nn.Conv2d(4, 6, 1, 2),
    "input_conv": lambda: nn.Sequential(nn.MaxPool2d(1, 2), nn.Conv2d(4, 6, 3, 1, 1)),
    "maxpool": lambda: nn.MaxPool2d(3, 2, 1),
    "avgpool": lambda: nn.AvgPool2d(2, 2),
    "blurpool": lambda: nn.MaxPool2d(1, 2),
}


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_adaptive_layers_keep_the_replaced_layers_output_shape(padding_mode) -> None:
    layers = _adaptive_layers(padding_mode)
    for (name, layer), size in itertools.product(layers.items(), [(1, 1), (2, 3), (5, 8), (7, 7), (9, 12)]):
        x = torch.randn(2, 4, *size)
        with torch.no_grad():
            try:
                expected = _PLAIN[name]()(x).shape
            except RuntimeError:  # a map too small for the plain layer (a 2x2 average of one pixel)
                continue
            assert layer(x).shape == expected, (name, size)


@pytest.mark.parametrize(("kernel", "stride", "padding", "ceil_mode"), [(3, 2, 1, False), (3, 2, 1, True),
                         (2, 2, 0, True), (3, 3, 0, True), (5, 2, 2, False)])  # fmt: skip
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_adaptive_pools_keep_the_pools_shape_with_ceil_mode(kernel, stride, padding, ceil_mode, padding_mode) -> None:
    for size in [3, 6, 7, 10]:
        x = torch.randn(1, 2, size, size + 1)
        for plain, cls in [(nn.MaxPool2d, BlurMaxPool2d), (nn.AvgPool2d, BlurAvgPool2d)]:
            pool = plain(kernel, stride, padding, ceil_mode=ceil_mode)
            new = cls(kernel, stride, padding, ceil_mode=ceil_mode, sampling="adaptive", padding_mode=padding_mode)
            assert new(x).shape == pool(x).shape, (cls.__name__, size)


def test_blur_first_picks_the_phase_on_the_input_and_equals_the_stride_one_route() -> None:
    # Phase chosen on the blurred input, then the strided conv from it == conv at stride 1, then that phase kept.
    layer = _adaptive_layers()["conv_blur_first"]
    x = torch.randn(4, 4, 10, 10, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        blurred = F.conv2d(F.pad(x, [1, 1, 1, 1]), layer.blur_filter, groups=4)
        dense = F.conv2d(blurred, layer.weight, layer.bias, padding=1)
        torch.testing.assert_close(layer(x), select_phase(dense, choose_phase(blurred, [2, 2]), [2, 2]))


@pytest.mark.parametrize("name", list(_PLAIN))
def test_gradcheck_adaptive_layers(name) -> None:
    layer = _adaptive_layers("circular", torch.float64)[name]
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtypes_and_channels_last(dtype) -> None:
    x = torch.randn(2, 4, 9, 8).to(dtype)
    for name, layer in _adaptive_layers("circular", dtype).items():
        with torch.no_grad():
            out = layer(x)
            assert out.dtype == dtype and out.shape == _PLAIN[name]()(x.float()).shape, name
            if dtype == torch.float32:
                torch.testing.assert_close(layer(x.contiguous(memory_format=torch.channels_last)), out, msg=name)


def test_torchscript_and_compile_match_eager() -> None:
    layers = nn.ModuleList(_adaptive_layers("circular").values())
    x = torch.randn(2, 4, 11, 12)
    with torch.no_grad():
        for layer in layers:
            torch.testing.assert_close(torch.jit.script(layer)(x), layer(x))
        torch._dynamo.reset()
        model = nn.Sequential(*[m for m in layers if not isinstance(m, BlurConv2d | BlurInputConv2d)], layers[0])
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), model(x))
        torch._dynamo.reset()
