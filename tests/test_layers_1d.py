"""Tests for the 1-D layers (blurpool_algo.layers.oned): BlurPool1d, blur_pool1d, BlurConv1d, BlurInputConv1d,
BlurMaxPool1d and BlurAvgPool1d.

References are independent of the code under test: torch's own nn.Conv1d / nn.MaxPool1d / nn.AvgPool1d (output
shapes, filter_size=1), a blur written here with F.pad + F.conv1d and taps from Pascal's rule (values), adaptive
polyphase sampling written out by hand, and the 2-D layers on an (N, C, 1, L) map (with a non-zero padding mode, the
2-D filter's rows all land on the one row there, so it blurs as the 1-D taps do).
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from blurpool_algo.layers import (
    BlurAvgPool1d,
    BlurConv1d,
    BlurInputConv1d,
    BlurMaxPool1d,
    BlurMaxPool2d,
    BlurPool1d,
    BlurPool2d,
    blur_pool1d,
)

PAD_MODES = ("zeros", "reflect", "replicate", "circular")
CHANNELS = 3
KINDS = [
    "BlurPool1d",
    "BlurConv1d-blur_first",
    "BlurConv1d-blur_after",
    "BlurConv1d-pointwise",  # an unpadded 1-tap conv: blurred at the conv's stride
    "BlurInputConv1d",
    "BlurMaxPool1d",
    "BlurAvgPool1d",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def taps(filter_size: int) -> torch.Tensor:
    """Row ``filter_size - 1`` of Pascal's triangle, normalized to sum to one (float64)."""
    row = [1]
    while len(row) < filter_size:
        row = [left + right for left, right in zip([0, *row], [*row, 0], strict=True)]
    return torch.tensor(row, dtype=torch.float64) / sum(row)


def ref_blur(x: torch.Tensor, filter_size: int, stride: int, pad_mode: str) -> torch.Tensor:
    """In float64: pad ``(k-1)//2`` before and the rest after (replicate where torch cannot pad so small a map with
    ``pad_mode``, the layers' documented fallback), the depthwise conv with the taps, every stride-th sample."""
    before = (filter_size - 1) // 2
    pads = (before, filter_size - 1 - before)
    x = x.double()
    try:
        padded = F.pad(x, pads) if pad_mode == "zeros" else F.pad(x, pads, mode=pad_mode)
    except (RuntimeError, ValueError, IndexError):
        padded = F.pad(x, pads, mode="replicate")
    weight = taps(filter_size).expand(x.shape[1], 1, filter_size)
    return F.conv1d(padded, weight, groups=x.shape[1])[..., ::stride]


def make_layer(kind: str, *, filter_size: int = 4, pad_mode: str = "reflect", dtype=None, sampling: str = "fixed"):
    """One configuration per kind, each taking a different code path."""
    blur = {"filter_size": filter_size, "pad_mode": pad_mode, "sampling": sampling}
    if kind == "BlurPool1d":
        return BlurPool1d(CHANNELS, 2, dtype=dtype, **blur)
    if kind == "BlurInputConv1d":
        return BlurInputConv1d.from_conv(nn.Conv1d(CHANNELS, 4, 3, padding=1, dtype=dtype), blur_stride=2, **blur)
    if kind == "BlurConv1d-pointwise":
        return BlurConv1d.from_conv(nn.Conv1d(CHANNELS, 4, 1, 2, bias=False, dtype=dtype), blur_first=False, **blur)
    if kind.startswith("BlurConv1d"):
        conv = nn.Conv1d(CHANNELS, 4, 3, 2, 1, dtype=dtype)
        return BlurConv1d.from_conv(conv, blur_first=kind.endswith("first"), **blur)
    if kind == "BlurMaxPool1d":
        return BlurMaxPool1d.from_maxpool(nn.MaxPool1d(3, 2, 1, ceil_mode=True), dtype=dtype, **blur)
    return BlurAvgPool1d.from_avgpool(
        nn.AvgPool1d(3, 2, 1, ceil_mode=True, count_include_pad=False), dtype=dtype, **blur
    )


def every_kind() -> nn.Sequential:
    """Every 1-D layer in one network (reflect, circular and adaptive among them), for the export paths."""
    return nn.Sequential(
        BlurConv1d.from_conv(nn.Conv1d(CHANNELS, 8, 5, 2, 2), filter_size=4, pad_mode="reflect", sampling="adaptive"),
        BlurMaxPool1d.from_maxpool(nn.MaxPool1d(3, 2, 1), sampling="adaptive", padding_mode="circular"),
        BlurConv1d.from_conv(nn.Conv1d(8, 8, 3, 2, 1), blur_first=False, pad_mode="circular"),
        BlurConv1d.from_conv(nn.Conv1d(8, 8, 1, 2), sampling="adaptive"),
        BlurInputConv1d.from_conv(nn.Conv1d(8, 8, 3, padding=1), blur_stride=2),
        BlurAvgPool1d.from_avgpool(nn.AvgPool1d(2, ceil_mode=True)),
        BlurPool1d(8, 1, 3, "replicate"),
    ).eval()


# ---------------------------------------------------------------------------------------------------------------------
# Output shapes: those of the replaced torch layer, at every length (1 included)
# ---------------------------------------------------------------------------------------------------------------------

LENGTHS = (1, 2, 3, 5, 8, 13)
SHAPE_LENGTHS = (1, 2, 5, 13)
# Blur options and the conv's padding mode and groups, rotated along the geometries below (co-prime cycle lengths).
BLURS = list(itertools.product(range(1, 6), PAD_MODES, ("fixed", "adaptive")))
CONV_SETTINGS = list(itertools.product(PAD_MODES, (1, CHANNELS), (True, False)))[:7]


def test_conv_output_shape_matches_conv1d():
    checked = 0
    for step, (kernel, stride, padding, dilation) in enumerate(
        itertools.product((1, 2, 3, 5), (2, 3), (0, 1, "valid"), (1, 2))
    ):
        padding_mode, groups, blur_first = CONV_SETTINGS[step % len(CONV_SETTINGS)]
        conv = nn.Conv1d(CHANNELS, CHANNELS, kernel, stride, padding, dilation, groups, padding_mode=padding_mode)
        filter_size, pad_mode, sampling = BLURS[step % len(BLURS)]
        new = BlurConv1d.from_conv(conv, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode,
                                   sampling=sampling)  # fmt: skip
        for length in SHAPE_LENGTHS:
            x = torch.randn(1, CHANNELS, length)
            try:
                expected = conv(x).shape
            except RuntimeError:
                continue  # torch rejects this geometry itself (a kernel longer than the padded map)
            assert new(x).shape == expected, (kernel, stride, padding, dilation, groups, padding_mode, length)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_output_shape_matches_pool1d(kind):
    checked = 0
    configs = itertools.product(range(1, 6), (None, 2, 3), range(3), (False, True))
    for step, (kernel, stride, padding, ceil_mode) in enumerate(configs):
        if padding > kernel // 2:
            continue  # torch's own pools refuse it
        filter_size, pad_mode, sampling = BLURS[step % len(BLURS)]
        padding_mode, dilation = ("zeros", "circular")[step // 2 % 2], 1 + step // 3 % 2
        blur = {"filter_size": filter_size, "pad_mode": pad_mode, "sampling": sampling, "padding_mode": padding_mode}
        if kind == "max":
            pool = nn.MaxPool1d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
            new = BlurMaxPool1d.from_maxpool(pool, **blur)
        else:
            pool = nn.AvgPool1d(kernel, stride, padding, ceil_mode, count_include_pad=bool(step % 2))
            new = BlurAvgPool1d.from_avgpool(pool, **blur)
        for length in LENGTHS:
            x = torch.randn(1, CHANNELS, length)
            try:
                expected = pool(x).shape
            except RuntimeError:
                continue  # torch's own pool rejects this length (the output would be empty)
            assert new(x).shape == expected, (kernel, stride, padding, dilation, ceil_mode, padding_mode, length)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("dims", [1, 2])
def test_an_even_pool_padded_by_half_keeps_its_size_when_circular(dims):
    # MaxPool(2, 2, padding=1) has one more window than the map has samples: the circular pool wraps one sample
    # around after the map too, so its output keeps the plain pool's size (3 for 4 samples), in 1-D and 2-D.
    pool = nn.MaxPool1d(2, 2, 1) if dims == 1 else nn.MaxPool2d(2, 2, 1)
    new = (BlurMaxPool1d if dims == 1 else BlurMaxPool2d).from_maxpool(pool, padding_mode="circular")
    for length in (1, 4, 7):
        x = torch.randn(1, CHANNELS, *[length] * dims)
        assert new(x).shape == pool(x).shape == (1, CHANNELS, *[length // 2 + 1] * dims)


# ---------------------------------------------------------------------------------------------------------------------
# Values against the references
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_blur_pool1d_matches_the_reference(pad_mode):
    for filter_size, stride in itertools.product(range(1, 8), (1, 2, 3)):
        module = BlurPool1d(CHANNELS, stride, filter_size, pad_mode, dtype=torch.float64)
        adaptive = BlurPool1d(CHANNELS, stride, filter_size, pad_mode, dtype=torch.float64, sampling="adaptive")
        assert torch.equal(module.blur_filter, taps(filter_size).expand(CHANNELS, 1, filter_size))
        for length in (1, 2, 3, 4, 5, 8, 9):
            x = torch.randn(2, CHANNELS, length, dtype=torch.float64)
            expected = ref_blur(x, filter_size, stride, pad_mode)
            assert expected.shape[-1] == math.ceil(length / stride) and adaptive(x).shape == expected.shape
            for out in (module(x), blur_pool1d(x, (stride,), filter_size, pad_mode)):
                torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=f"{filter_size} {length}")


def test_blur_pool1d_by_hand():
    # [1, 3, 3, 1]/8 over [0 | 8, 0, 0, 16, 0 | 0, 0] (one zero before, two after), every second window.
    x = torch.tensor([[[8.0, 0.0, 0.0, 16.0, 0.0]]], dtype=torch.float64)
    expected = [(0 + 3 * 8 + 0 + 0) / 8, (0 + 0 + 3 * 16 + 0) / 8, (16 + 0 + 0 + 0) / 8]
    assert blur_pool1d(x, 2, 4).flatten().tolist() == expected


# Modes that pad a one-row map by repeating its row (reflect cannot pad a row at all, and circular only one row deep:
# the 2-D blur then pads the whole map with replicate, the 1-D one only where the length is too short).
ONE_ROW_MODES = [("replicate", (2, 3, 4, 5)), ("circular", (2, 3))]


@pytest.mark.parametrize(("pad_mode", "filter_sizes"), ONE_ROW_MODES, ids=[mode for mode, _ in ONE_ROW_MODES])
def test_the_2d_layers_on_a_one_row_map_agree(pad_mode, filter_sizes):
    # A (N, C, 1, L) map padded by repeating its one row above and below: the k x k filter sums to the 1-D taps
    # along the row, so the 2-D layers at stride (1, s) compute what the 1-D ones compute.
    x = torch.randn(2, CHANNELS, 11, dtype=torch.float64)
    for filter_size, stride in itertools.product(filter_sizes, (2, 3)):
        blur_1d = BlurPool1d(CHANNELS, stride, filter_size, pad_mode, dtype=torch.float64)
        blur_2d = BlurPool2d(CHANNELS, (1, stride), filter_size, pad_mode, dtype=torch.float64)
        torch.testing.assert_close(blur_1d(x), blur_2d(x[:, :, None])[:, :, 0])
        options = {"filter_size": filter_size, "pad_mode": pad_mode, "dtype": torch.float64}
        max_1d = BlurMaxPool1d(3, stride, 1, ceil_mode=True, **options)
        max_2d = BlurMaxPool2d((1, 3), (1, stride), (0, 1), ceil_mode=True, **options)
        torch.testing.assert_close(max_1d(x), max_2d(x[:, :, None])[:, :, 0])


CONVS = [  # (kernel, padding, dilation, groups, bias)
    (3, 1, 1, 1, True),
    (1, 0, 1, 1, True),  # pointwise, biased: blur_first=False keeps conv-then-blur under zero padding
    (4, 2, 1, CHANNELS, False),
    (3, 2, 2, 1, True),
]


FOUR_BLURS = [(2, "zeros"), (3, "reflect"), (4, "circular"), (5, "replicate")]


@pytest.mark.parametrize("padding_mode", PAD_MODES)
@pytest.mark.parametrize("blur_first", [True, False], ids=["blur_first", "blur_after"])
def test_blur_conv1d_is_blur_then_conv_or_conv_then_blur(blur_first, padding_mode):
    # Each conv meets another blur under each padding mode.
    for index, (kernel, padding, dilation, groups, bias) in enumerate(CONVS):
        filter_size, pad_mode = FOUR_BLURS[(index + PAD_MODES.index(padding_mode)) % len(FOUR_BLURS)]
        conv = nn.Conv1d(CHANNELS, CHANNELS, kernel, 2, padding, dilation, groups, bias, padding_mode,
                         dtype=torch.float64)  # fmt: skip
        new = BlurConv1d.from_conv(conv, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode)
        dense = copy.deepcopy(conv)
        dense.stride = (1,)
        for length in (3, 8, 13):
            x = torch.randn(2, CHANNELS, length, dtype=torch.float64)
            expected = conv(ref_blur(x, filter_size, 1, pad_mode)) if blur_first else ref_blur(dense(x), filter_size,
                                                                                               2, pad_mode)  # fmt: skip
            torch.testing.assert_close(new(x), expected, msg=f"{kernel} {padding} {pad_mode} {length}")


def test_blur_input_conv1d_is_blur_pool_then_the_conv():
    for stride, blur_stride, pad_mode in itertools.product((1, 2), (2, 3), PAD_MODES):
        conv = nn.Conv1d(CHANNELS, 4, 3, stride, 1, dtype=torch.float64)
        new = BlurInputConv1d.from_conv(conv, blur_stride=blur_stride, filter_size=4, pad_mode=pad_mode)
        x = torch.randn(2, CHANNELS, 10, dtype=torch.float64)
        torch.testing.assert_close(new(x), conv(ref_blur(x, 4, blur_stride, pad_mode)))


@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_pools_are_the_dense_pool_then_the_blur(pad_mode):
    x = torch.randn(2, CHANNELS, 12, dtype=torch.float64)
    for kernel, stride, padding in ((2, 2, 0), (3, 2, 1), (4, 3, 2)):
        new = BlurMaxPool1d(kernel, stride, padding, filter_size=3, pad_mode=pad_mode, dtype=torch.float64)
        expected = ref_blur(F.max_pool1d(x, kernel, 1, padding), 3, stride, pad_mode)
        torch.testing.assert_close(new(x), expected)
        new = BlurAvgPool1d(kernel, stride, padding, filter_size=3, pad_mode=pad_mode, dtype=torch.float64)
        expected = ref_blur(F.avg_pool1d(x, kernel, 1, padding), 3, stride, pad_mode)
        torch.testing.assert_close(new(x), expected)


@pytest.mark.parametrize("stride", [2, 3])
def test_adaptive_sampling_keeps_each_samples_largest_phase(stride):
    # APS by hand: blur at stride 1, then per sample the phase p whose samples p, p + s, ... have the largest l2 norm
    # over channels and time (lengths that are multiples of the stride: no end padding).
    x = torch.randn(16, CHANNELS, 6 * stride, dtype=torch.float64)
    dense = ref_blur(x, 4, 1, "circular")
    energies = torch.stack([dense[..., phase::stride].square().sum((1, 2)) for phase in range(stride)], 1)
    phases = energies.argmax(1)
    expected = torch.stack([dense[n, :, phase::stride] for n, phase in enumerate(phases.tolist())])
    module = BlurPool1d(CHANNELS, stride, 4, "circular", dtype=torch.float64, sampling="adaptive")
    torch.testing.assert_close(module(x), expected)
    assert len(set(phases.tolist())) > 1  # the control: phase 0 (fixed sampling) is not always the answer
    # A circular shift moves the largest phase along: the output is the unshifted one's, rolled.
    torch.testing.assert_close(module(torch.roll(x, stride, 2)), torch.roll(module(x), 1, 2))


# ---------------------------------------------------------------------------------------------------------------------
# filter_size=1 computes exactly the plain layer
# ---------------------------------------------------------------------------------------------------------------------


def test_filter_size_one_is_the_plain_layer():
    x = torch.randn(2, CHANNELS, 11)
    for step, (kernel, stride, padding, dilation) in enumerate(itertools.product((1, 3, 4), (1, 2, 3), (0, 1), (1, 2))):
        padding_mode, ceil_mode = PAD_MODES[step % 4], step % 3 == 0
        conv = nn.Conv1d(CHANNELS, 4, kernel, stride, padding, dilation, padding_mode=padding_mode)
        new = BlurConv1d.from_conv(conv, blur_first=step % 2 == 0, filter_size=1, pad_mode="reflect")
        assert torch.equal(new(x), conv(x)), (kernel, stride, padding, dilation, padding_mode)
        pool = nn.MaxPool1d(kernel, stride, min(padding, kernel // 2), dilation, ceil_mode=ceil_mode)
        assert torch.equal(BlurMaxPool1d.from_maxpool(pool, filter_size=1)(x), pool(x))
        pool = nn.AvgPool1d(kernel, stride, min(padding, kernel // 2), ceil_mode, count_include_pad=dilation == 2)
        assert torch.equal(BlurAvgPool1d.from_avgpool(pool, filter_size=1)(x), pool(x))
    assert torch.equal(BlurPool1d(CHANNELS, 3, 1)(x), x[..., ::3])


class _Ops(TorchDispatchMode):
    """The names of the aten ops that run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_copies_neither_filter_nor_map(kind):
    # The (N, C, 1, L) view and the expanded filter are views; only the blur's own padding may make a new map.
    layer = make_layer(kind, filter_size=3, pad_mode="zeros")
    with _Ops() as ops:
        layer(torch.randn(2, CHANNELS, 12))
    assert not {"repeat", "clone", "copy_", "_to_copy", "contiguous", "cat", "stack"} & set(ops.names), ops.names
    assert "convolution" in ops.names  # the control: the recorder sees the layer's ops


# ---------------------------------------------------------------------------------------------------------------------
# Gradients, dtypes, parameters, state dicts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    layer = make_layer(kind, dtype=torch.float64)
    names = [name for name, _ in layer.named_parameters()]
    parameters = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

    def fn(x, *parameters):
        return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

    x = torch.randn(1, CHANNELS, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (x, *parameters))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_dtype_follows_the_layer(kind, dtype):
    layer = make_layer(kind, dtype=dtype)
    assert layer.blur_filter.dtype == dtype
    x = torch.randn(2, CHANNELS, 12).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    reference = copy.deepcopy(layer).double()  # the same weights and taps (exact in 16 bits too), in float64
    tolerance = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.double(), reference(x.double()), rtol=tolerance, atol=tolerance)


def test_from_conv_keeps_the_parameters_and_hyperparameters():
    conv = nn.Conv1d(CHANNELS, 4, 5, 2, 2, 2, padding_mode="reflect").train(False)
    conv.bias.requires_grad_(False)
    new = BlurConv1d.from_conv(conv, blur_first=False, filter_size=4)
    assert isinstance(new, nn.Conv1d) and not new.training
    assert new.weight is conv.weight and new.bias is conv.bias and not new.bias.requires_grad
    assert [id(p) for p in new.parameters()] == [id(p) for p in conv.parameters()]
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(new, name) == getattr(conv, name), name
    assert list(new.state_dict()) == ["weight", "bias", "blur_filter"]
    assert torch.equal(new.blur_filter.double(), taps(4).expand(4, 1, 4))  # one row per output channel
    pool = nn.MaxPool1d(3, 2, 1, 2, ceil_mode=True)
    new_pool = BlurMaxPool1d.from_maxpool(pool)
    for name in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"):
        assert getattr(new_pool, name) == getattr(pool, name), name


def test_a_baseline_state_dict_loads_strictly_and_a_blurred_one_does_not_load_into_the_baseline():
    plain = nn.Sequential(nn.Conv1d(CHANNELS, 4, 3, 2, 1), nn.MaxPool1d(2), nn.AvgPool1d(2))
    blurred = nn.Sequential(BlurConv1d(CHANNELS, 4, 3, 2, 1, filter_size=4), BlurMaxPool1d(2), BlurAvgPool1d(2))
    result = blurred.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(blurred.state_dict()) == ["0.weight", "0.bias", "0.blur_filter", "1.blur_filter", "2.blur_filter"]
    assert torch.equal(blurred[0].weight, plain[0].weight)
    with pytest.raises(RuntimeError, match=r"0\.blur_filter"):
        plain.load_state_dict(blurred.state_dict(), strict=True)


@pytest.mark.parametrize("kind", ["BlurConv1d-blur_first", "BlurPool1d", "BlurMaxPool1d"])
def test_a_wrong_filter_is_refused_and_a_meta_built_layer_gets_the_right_one(kind):
    layer = make_layer(kind, filter_size=3)
    state = layer.state_dict()
    for wrong in (torch.full_like(state["blur_filter"], 1 / 3), state["blur_filter"] * 2):
        with pytest.raises(RuntimeError, match=r"blur_filter.*binomial filter of size 3"):
            layer.load_state_dict({**state, "blur_filter": wrong})
    layer.load_state_dict(state, strict=True)  # the control: its own filter loads
    with torch.device("meta"):
        built = make_layer(kind, filter_size=3)
    built.to_empty(device="cpu")
    built.load_state_dict({k: v for k, v in state.items() if k != "blur_filter"}, strict=True)
    assert torch.equal(built.blur_filter.double(), taps(3).expand_as(built.blur_filter))
    x = torch.randn(2, CHANNELS, 9)
    torch.testing.assert_close(built(x), layer(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# TorchScript, torch.fx, torch.compile, torch.export
# ---------------------------------------------------------------------------------------------------------------------

EXPORT_LENGTHS = (1, 2, 9, 16)


def test_torchscript_and_fx():
    model = every_kind()
    scripted, traced = torch.jit.script(model), torch.fx.symbolic_trace(model)
    filters = {node.target for node in traced.graph.nodes if node.op == "get_attr" and node.target.endswith("filter")}
    assert len(filters) == 7  # every layer's buffer enters the graph
    for length in EXPORT_LENGTHS:
        x = torch.randn(2, CHANNELS, length)
        expected = model(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-6, atol=1e-6, msg=str(length))
        torch.testing.assert_close(traced(x), expected, rtol=1e-6, atol=1e-6, msg=str(length))


def test_torch_compile_without_graph_breaks():
    # Every layer: fullgraph=True raises at the first graph break. The "eager" backend runs dynamo's whole trace
    # without AOTAutograd (ten times faster here); torch.export below goes through AOT as inductor would.
    torch._dynamo.reset()
    model = every_kind()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for length in (16, 9):
        x = torch.randn(2, CHANNELS, length)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_torch_export_with_a_dynamic_batch():
    model = nn.Sequential(*every_kind()[:4])  # adaptive sampling, a circular pool: the batch stays unbounded
    program = torch.export.export(
        model, (torch.randn(2, CHANNELS, 16),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    (signal,) = [node for node in program.graph.nodes if node.op == "placeholder" and node.name == "input"]
    assert isinstance(signal.meta["val"].shape[0], torch.SymInt), "the batch dim was specialised"
    for batch in (1, 5):
        x = torch.randn(batch, CHANNELS, 16)
        torch.testing.assert_close(program.module()(x), model(x))


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [0, (2, 2), 1.5, True, (0,)], ids=repr)
def test_bad_stride(stride):
    for build in (lambda: BlurPool1d(CHANNELS, stride), lambda: blur_pool1d(torch.randn(1, 1, 8), stride),
                  lambda: BlurConv1d(CHANNELS, 4, 3, stride), lambda: BlurMaxPool1d(3, stride)):  # fmt: skip
        with pytest.raises(ValueError, match=r"stride must be an int >= 1"):
            build()


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"input must be 3-D \(N, C, L\)"):
        blur_pool1d(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"divisor_override must be None"):
        BlurAvgPool1d(3, 2, 1, False, True, 2)
    with pytest.raises(ValueError, match="return_indices"):
        BlurMaxPool1d.from_maxpool(nn.MaxPool1d(3, 2, return_indices=True))
    with pytest.raises(ValueError, match=r"filter_size must be an int >= 1"):
        BlurConv1d.from_conv(nn.Conv1d(2, 2, 3, 2), filter_size=0)
    with pytest.raises(ValueError, match=r"pad_mode must be one of"):
        BlurPool1d(2, pad_mode="mirror")


@pytest.mark.parametrize("kind", KINDS)
def test_extra_repr_names_the_blur(kind):
    text = repr(make_layer(kind, sampling="adaptive"))
    assert "filter_size=4" in text and "pad_mode='reflect'" in text and "sampling='adaptive'" in text
