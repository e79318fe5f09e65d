"""Tests for blurpool_algo.layers: BlurPool2d, blur_pool2d, BlurConv2d, BlurMaxPool2d and BlurAvgPool2d.

References are independent of the code under test: torch's own layers (for shapes and the filter_size=1 identity),
hand-written filters and loops (for values), and invariants (constant maps, the Nyquist checkerboard, shift
equivariance under circular padding).
"""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from blurpool_algo.layers import (
    BlurAvgPool2d,
    BlurConv2d,
    BlurInputConv2d,
    BlurMaxPool2d,
    BlurPool2d,
    blur_pool2d,
)

PAD_MODES = ("zeros", "reflect", "replicate", "circular")

# Pascal's triangle, written out by hand: the binomial filter of size k is row k-1 normalized to sum to one.
PASCAL_ROWS = {
    1: [1],
    2: [1, 1],
    3: [1, 2, 1],
    4: [1, 3, 3, 1],
    5: [1, 4, 6, 4, 1],
    6: [1, 5, 10, 10, 5, 1],
    7: [1, 6, 15, 20, 15, 6, 1],
}
# Blur padding (before, after) per axis by hand: odd sizes symmetric, even sizes one more after.
BLUR_PADS = {1: (0, 0), 2: (0, 1), 3: (1, 1), 4: (1, 2), 5: (2, 2), 6: (2, 3), 7: (3, 3)}
# Weight of the tap that lands on the sample itself, squared: a zero-padded 1x1 map is scaled by this.
CENTER_WEIGHT_2D = {1: 1.0, 2: 1 / 4, 3: 1 / 4, 4: 9 / 64, 5: 36 / 256, 6: 100 / 1024, 7: 400 / 4096}

BLUR_COMBOS = list(itertools.product(range(1, 6), PAD_MODES))  # every filter size 1..5 x every pad mode
SHAPE_SIZES = [(1, 1), (2, 2), (3, 3), (1, 4), (7, 8), (8, 7)]
LAYER_KINDS = [
    "BlurPool2d",
    "BlurConv2d-blur_first",
    "BlurConv2d-blur_after",
    "BlurConv2d-pointwise_first",  # an unpadded 1x1 conv: the blur runs at the conv's stride
    "BlurConv2d-pointwise_after",  # the same, bias-free: blur_first=False takes that path too
    "BlurInputConv2d",  # blur-subsample, then a 3x3 conv at stride 1 (the paper's placement in ResNet blocks)
    "BlurMaxPool2d",
    "BlurAvgPool2d",
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
    torch.float16: {"rtol": 3e-3, "atol": 3e-3},
}
IN_CHANNELS = 2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _pair(value):
    return tuple(value) if isinstance(value, tuple | list) else (value, value)


def ref_filter_2d(filter_size: int) -> torch.Tensor:
    row = torch.tensor(PASCAL_ROWS[filter_size], dtype=torch.float64)
    taps = row / row.sum()
    return taps[:, None] * taps[None, :]


def ref_blur_pool(x: torch.Tensor, filter_size: int, stride, pad_mode: str) -> torch.Tensor:
    """Independent reference, in float64: pad, full-resolution depthwise blur, then keep every stride-th sample.

    Where torch cannot pad the map with ``pad_mode`` (reflect needs pad < size, circular pad <= size), the layers'
    documented fallback is replicate padding.
    """
    before, after = BLUR_PADS[filter_size]
    pads = (before, after, before, after)
    xd = x.double()
    if pad_mode == "zeros":
        padded = F.pad(xd, pads)
    else:
        try:
            padded = F.pad(xd, pads, mode=pad_mode)
        except (RuntimeError, ValueError, IndexError):
            padded = F.pad(xd, pads, mode="replicate")
    channels = x.shape[1]
    weight = ref_filter_2d(filter_size)[None, None].expand(channels, 1, -1, -1)
    full = F.conv2d(padded, weight, groups=channels)
    assert full.shape[-2:] == x.shape[-2:]
    rows, cols = _pair(stride)
    return full[..., ::rows, ::cols]


def make_layer(kind: str, *, dtype=None, pad_mode: str = "zeros", filter_size: int = 3, channels: int = IN_CHANNELS):
    """One representative configuration per layer class (each exercising a different code path)."""
    if kind == "BlurPool2d":
        return BlurPool2d(channels, stride=2, filter_size=filter_size, pad_mode=pad_mode, dtype=dtype)
    if kind == "BlurInputConv2d":
        conv = nn.Conv2d(channels, 3, 3, padding=1, dtype=dtype)
        return BlurInputConv2d.from_conv(conv, blur_stride=2, filter_size=filter_size, pad_mode=pad_mode)
    if kind.startswith("BlurConv2d-pointwise"):
        blur_first = kind.endswith("first")
        conv = nn.Conv2d(channels, 3, 1, stride=2, bias=blur_first, dtype=dtype)
        return BlurConv2d.from_conv(conv, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode)
    if kind.startswith("BlurConv2d"):
        conv = nn.Conv2d(channels, 3, 3, stride=2, padding=1, dtype=dtype)
        blur_first = kind.endswith("blur_first")
        return BlurConv2d.from_conv(conv, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode)
    if kind == "BlurMaxPool2d":
        pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        return BlurMaxPool2d.from_maxpool(pool, filter_size=filter_size, pad_mode=pad_mode, dtype=dtype)
    if kind == "BlurAvgPool2d":
        pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        return BlurAvgPool2d.from_avgpool(pool, filter_size=filter_size, pad_mode=pad_mode, dtype=dtype)
    raise AssertionError(kind)


def _original_runs(kind: str, dtype: torch.dtype) -> str | None:
    """Whether torch itself runs the layer that ``kind`` replaces in ``dtype`` on CPU (None) or why not."""
    x = torch.ones(1, IN_CHANNELS, 6, 6, dtype=dtype)
    try:
        if kind == "BlurPool2d":  # the blur is a depthwise conv
            F.conv2d(x, torch.ones(IN_CHANNELS, 1, 3, 3, dtype=dtype), stride=2, groups=IN_CHANNELS)
        elif kind.startswith(("BlurConv2d", "BlurInputConv2d")):
            nn.Conv2d(IN_CHANNELS, 3, 3, stride=2, padding=1, dtype=dtype)(x)
        elif kind == "BlurMaxPool2d":
            nn.MaxPool2d(3, 2, 1, ceil_mode=True)(x)
        else:
            nn.AvgPool2d(3, 2, 1, ceil_mode=True)(x)
    except RuntimeError as error:
        return str(error).splitlines()[0]
    return None


def _dtype_cases():
    cases = []
    for kind, dtype in itertools.product(LAYER_KINDS, DTYPES):
        why = _original_runs(kind, dtype)
        marks = [] if why is None else [pytest.mark.skip(reason=f"torch cannot run the original layer: {why}")]
        cases.append(pytest.param(kind, dtype, marks=marks, id=f"{kind}-{str(dtype).removeprefix('torch.')}"))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# Output shapes: equal to the replaced torch layer for every configuration
# ---------------------------------------------------------------------------------------------------------------------

CONV_KERNELS = [1, 2, 3, 4, 5, 6, 7, (3, 1), (1, 5), (2, 4)]
STRIDES = [2, 3, (2, 1)]


def _paddings(kernel):
    k0, k1 = _pair(kernel)
    options = {(0, 0), (min(1, k0 // 2), min(1, k1 // 2)), (k0 // 2, k1 // 2)}
    return sorted(options)


@pytest.mark.parametrize("blur_first", [True, False], ids=["blur_first", "blur_after"])
@pytest.mark.parametrize("padding_mode", PAD_MODES)
@pytest.mark.parametrize("stride", STRIDES, ids=str)
@pytest.mark.parametrize("kernel", CONV_KERNELS, ids=str)
def test_blur_conv2d_output_shape_matches_conv(kernel, stride, padding_mode, blur_first):
    # The blur options rotate through every (filter_size, pad_mode) combination along the inner loop; the tiny-map
    # test below crosses every combination with every tiny size.
    step = CONV_KERNELS.index(kernel) * 7 + PAD_MODES.index(padding_mode) * 3 + int(blur_first)
    checked = 0
    for padding in [*_paddings(kernel), "valid"]:
        for dilation in (1, 2):
            for groups, out_channels in ((1, 3), (IN_CHANNELS, IN_CHANNELS)):  # dense, depthwise
                conv = nn.Conv2d(IN_CHANNELS, out_channels, kernel, stride, padding, dilation, groups,
                                 padding_mode=padding_mode)  # fmt: skip
                filter_size, pad_mode = BLUR_COMBOS[step % len(BLUR_COMBOS)]
                step += 1
                new = BlurConv2d.from_conv(conv, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode)
                for size in SHAPE_SIZES:
                    x = torch.randn(1, IN_CHANNELS, *size)
                    try:
                        expected = conv(x).shape
                    except RuntimeError:
                        continue  # torch rejects this geometry itself (map smaller than the kernel, pad > map)
                    config = (padding, dilation, groups, size, filter_size, pad_mode)
                    assert new(x).shape == expected, config
                    checked += 1
    assert checked >= 9


POOL_KERNELS = [1, 2, 3, 4, 5, 6, 7, (3, 1), (2, 4)]
POOL_STRIDES = [None, 1, 2, 3, (2, 1)]
POOL_SIZES = [*SHAPE_SIZES, (5, 9), (6, 6), (9, 10)]


def _check_pool_shapes(pool: nn.Module, new: nn.Module, config: tuple) -> int:
    """Asserts equal output shapes on every POOL_SIZES input torch's pool accepts; returns how many were checked."""
    checked = 0
    for size in POOL_SIZES:
        x = torch.randn(1, IN_CHANNELS, *size)
        try:
            expected = pool(x).shape
        except RuntimeError:
            continue  # torch's own pool rejects this size (output would be empty)
        assert new(x).shape == expected, (*config, size)
        checked += 1
    return checked


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("stride", POOL_STRIDES, ids=str)
@pytest.mark.parametrize("kernel", POOL_KERNELS, ids=str)
def test_blur_maxpool2d_output_shape_matches_maxpool(kernel, stride, ceil_mode):
    step = POOL_KERNELS.index(kernel) * 5 + POOL_STRIDES.index(stride) * 3 + int(ceil_mode)
    checked = 0
    for padding in _paddings(kernel):
        for dilation in (1, 2, (1, 2)):
            pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
            filter_size, pad_mode = BLUR_COMBOS[step % len(BLUR_COMBOS)]
            step += 1
            new = BlurMaxPool2d.from_maxpool(pool, filter_size=filter_size, pad_mode=pad_mode)
            checked += _check_pool_shapes(pool, new, (padding, dilation, filter_size, pad_mode))
    assert checked >= 9


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include_pad", "exclude_pad"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("stride", POOL_STRIDES, ids=str)
@pytest.mark.parametrize("kernel", POOL_KERNELS, ids=str)
def test_blur_avgpool2d_output_shape_matches_avgpool(kernel, stride, ceil_mode, count_include_pad):
    step = POOL_KERNELS.index(kernel) * 5 + POOL_STRIDES.index(stride) * 3 + int(ceil_mode) + int(count_include_pad)
    checked = 0
    for padding in _paddings(kernel):
        for divisor_override in (None, 3):
            pool = nn.AvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
            filter_size, pad_mode = BLUR_COMBOS[step % len(BLUR_COMBOS)]
            step += 1
            new = BlurAvgPool2d.from_avgpool(pool, filter_size=filter_size, pad_mode=pad_mode)
            checked += _check_pool_shapes(pool, new, (padding, divisor_override, filter_size, pad_mode))
    assert checked >= 9


TINY_SIZES = [(1, 1), (2, 2), (3, 3), (1, 3), (3, 2)]


def _tiny_original(kind: str, stride: int):
    if kind == "BlurPool2d":
        return None
    if kind.startswith("BlurConv2d-pointwise"):
        return nn.Conv2d(IN_CHANNELS, 3, 1, stride, bias=kind.endswith("first"))
    if kind.startswith(("BlurConv2d", "BlurInputConv2d")):  # a 3x3 conv at stride s: ceil(H / s), as the blur
        return nn.Conv2d(IN_CHANNELS, 3, 3, stride, padding=1)
    if kind == "BlurMaxPool2d":
        return nn.MaxPool2d(3, stride, padding=1, ceil_mode=True)
    return nn.AvgPool2d(3, stride, padding=1, ceil_mode=True)


def _replace(original, kind: str, filter_size: int, pad_mode: str, stride: int):
    if kind == "BlurPool2d":
        return BlurPool2d(IN_CHANNELS, stride, filter_size, pad_mode)
    if kind == "BlurInputConv2d":
        unstrided = nn.Conv2d(IN_CHANNELS, 3, 3, padding=1)
        return BlurInputConv2d.from_conv(unstrided, blur_stride=stride, filter_size=filter_size, pad_mode=pad_mode)
    if kind.startswith("BlurConv2d"):
        return BlurConv2d.from_conv(
            original, blur_first=kind.endswith("first"), filter_size=filter_size, pad_mode=pad_mode
        )
    if kind == "BlurMaxPool2d":
        return BlurMaxPool2d.from_maxpool(original, filter_size=filter_size, pad_mode=pad_mode)
    return BlurAvgPool2d.from_avgpool(original, filter_size=filter_size, pad_mode=pad_mode)


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("filter_size", range(1, 8))
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_tiny_maps_keep_the_stride(kind, filter_size, pad_mode):
    # 1, 2 and 3 px maps never crash and are never left un-subsampled: the output has the replaced layer's shape
    # (ceil(H / stride) for BlurPool2d), whatever the filter size, even where the map is smaller than the blur's pad.
    for stride in (2, 3):
        original = _tiny_original(kind, stride)
        new = _replace(original, kind, filter_size, pad_mode, stride)
        for size in TINY_SIZES:
            x = torch.randn(1, IN_CHANNELS, *size)
            if original is None:
                expected = (1, IN_CHANNELS, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
            else:
                expected = tuple(original(x).shape)
            out = new(x)
            assert tuple(out.shape) == expected, (stride, size)
            assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("stride", [1, 2, 3, (2, 1), (1, 3)], ids=str)
@pytest.mark.parametrize("filter_size", range(1, 8))
def test_blur_pool2d_shape_and_values_match_reference(filter_size, stride, pad_mode):
    rows, cols = _pair(stride)
    module = BlurPool2d(IN_CHANNELS, stride, filter_size, pad_mode, dtype=torch.float64)
    for height, width in itertools.product((1, 2, 3, 4, 5, 8, 9), (1, 2, 7)):
        x = torch.randn(2, IN_CHANNELS, height, width, dtype=torch.float64)
        expected_shape = (2, IN_CHANNELS, math.ceil(height / rows), math.ceil(width / cols))
        expected = ref_blur_pool(x, filter_size, stride, pad_mode)
        for out in (module(x), blur_pool2d(x, stride, filter_size, pad_mode)):
            assert tuple(out.shape) == expected_shape, (height, width)
            torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=f"{height}x{width}")


def test_blur_pool2d_defaults():
    # stride 2, the 3-tap [1, 2, 1]/4 filter and zero padding (Composer's defaults).
    x = torch.randn(1, 3, 7, 8, dtype=torch.float64)
    expected = ref_blur_pool(x, 3, 2, "zeros")
    torch.testing.assert_close(blur_pool2d(x), expected)
    torch.testing.assert_close(BlurPool2d(3, dtype=torch.float64)(x), expected)
    assert blur_pool2d(x).shape == (1, 3, 4, 4)


# ---------------------------------------------------------------------------------------------------------------------
# Values by hand
# ---------------------------------------------------------------------------------------------------------------------


def test_blur_pool2d_filter3_zeros_equals_explicit_loop():
    kernel = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]  # /16
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    height, width = 5, 6
    padded = torch.zeros(1, 2, height + 2, width + 2, dtype=torch.float64)
    padded[:, :, 1:-1, 1:-1] = x
    expected = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    for c in range(2):
        for i in range(3):
            for j in range(3):
                total = 0.0
                for a in range(3):
                    for b in range(3):
                        total += kernel[a][b] * padded[0, c, 2 * i + a, 2 * j + b].item()
                expected[0, c, i, j] = total / 16
    torch.testing.assert_close(BlurPool2d(2, filter_size=3, dtype=torch.float64)(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blur_pool2d(x, 2, 3, "zeros"), expected, rtol=1e-12, atol=1e-12)


def test_blur_pool2d_filter3_zeros_equals_literal_conv2d():
    x = torch.randn(2, 3, 9, 10)
    weight = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    expected = F.conv2d(x, weight.expand(3, 1, 3, 3), padding=1, groups=3)[:, :, ::2, ::2]
    torch.testing.assert_close(BlurPool2d(3, filter_size=3)(x), expected)
    torch.testing.assert_close(blur_pool2d(x), expected)


def test_blur_pool2d_filter4_even_padding_equals_explicit_loop():
    # Even filter: one sample of padding before, two after; [1, 3, 3, 1] x [1, 3, 3, 1] / 64.
    taps = [1, 3, 3, 1]
    x = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    padded = torch.zeros(1, 1, 5 + 3, 4 + 3, dtype=torch.float64)
    padded[:, :, 1:6, 1:5] = x
    expected = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            total = 0.0
            for a in range(4):
                for b in range(4):
                    total += taps[a] * taps[b] * padded[0, 0, 2 * i + a, 2 * j + b].item()
            expected[0, 0, i, j] = total / 64
    torch.testing.assert_close(blur_pool2d(x, 2, 4, "zeros"), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("filter_size", range(1, 8))
@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_one_pixel_map(pad_mode, filter_size, stride):
    # A 1x1 map is too small for reflect padding whenever the filter needs any; the blur then pads with replicate,
    # which (like circular) repeats the single pixel, so the output is the input. Zero padding scales the pixel by the
    # squared weight of the tap that lands on it.
    x = torch.randn(2, IN_CHANNELS, 1, 1, dtype=torch.float64)
    out = BlurPool2d(IN_CHANNELS, stride, filter_size, pad_mode, dtype=torch.float64)(x)
    assert out.shape == (2, IN_CHANNELS, 1, 1)
    scale = CENTER_WEIGHT_2D[filter_size] if pad_mode == "zeros" else 1.0
    torch.testing.assert_close(out, x * scale, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("filter_size", [5, 6, 7])
def test_two_pixel_map_reflect_falls_back_to_replicate(filter_size):
    # The blur pad (2 or 3) is >= 2 px, which reflect cannot do; 11a+5b / 16 is replicate padding's answer for size 5.
    x = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]], dtype=torch.float64)
    out = blur_pool2d(x, 2, filter_size, "reflect")
    expected = ref_blur_pool(x, filter_size, 2, "replicate")
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if filter_size == 5:
        row_mix = (11 * 1.0 + 5 * 3.0) / 16, (11 * 5.0 + 5 * 7.0) / 16
        assert out.item() == pytest.approx((11 * row_mix[0] + 5 * row_mix[1]) / 16)


# ---------------------------------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(9, 9), (8, 11)], ids=str)
@pytest.mark.parametrize("stride", [2, 3, (2, 1)], ids=str)
@pytest.mark.parametrize("filter_size", range(1, 8))
@pytest.mark.parametrize("pad_mode", PAD_MODES)
def test_constant_map_stays_constant(pad_mode, filter_size, stride, size):
    value = 3.5
    x = torch.full((1, IN_CHANNELS, *size), value)
    out = BlurPool2d(IN_CHANNELS, stride, filter_size, pad_mode)(x)
    if pad_mode != "zeros":
        torch.testing.assert_close(out, torch.full_like(out, value))
        return
    # Zero padding: constant wherever the filter's support lies inside the map, strictly less where it overlaps the
    # padding (every binomial tap is positive).
    before, after = BLUR_PADS[filter_size]
    rows, cols = _pair(stride)
    interior_rows = [i for i in range(out.shape[2]) if i * rows - before >= 0 and i * rows + after <= size[0] - 1]
    interior_cols = [j for j in range(out.shape[3]) if j * cols - before >= 0 and j * cols + after <= size[1] - 1]
    assert interior_rows and interior_cols
    for i, j in itertools.product(range(out.shape[2]), range(out.shape[3])):
        if i in interior_rows and j in interior_cols:
            assert out[0, :, i, j].tolist() == pytest.approx([value] * IN_CHANNELS, abs=1e-6), (i, j)
        else:
            assert bool((out[0, :, i, j] < value - 1e-6).all()), (i, j)


def _checkerboard(height: int, width: int) -> torch.Tensor:
    rows = torch.arange(height)[:, None]
    cols = torch.arange(width)[None, :]
    board = 1.0 - 2.0 * ((rows + cols) % 2).float()  # +1 / -1 alternating
    return board.expand(1, IN_CHANNELS, height, width).clone()


@pytest.mark.parametrize("stride", [2, (2, 2), 3], ids=str)
@pytest.mark.parametrize("filter_size", range(2, 8))
def test_nyquist_checkerboard_is_removed(filter_size, stride):
    # Every binomial filter of size >= 2 has a zero at the Nyquist frequency; circular padding of an even-sized
    # checkerboard is again a checkerboard, so the blurred map is zero everywhere.
    x = _checkerboard(8, 12)
    rows, cols = _pair(stride)
    plain = x[..., ::rows, ::cols]
    assert plain.abs().min().item() == 1.0  # plain strided subsampling keeps (aliases) the pattern
    if rows == cols == 2:
        assert torch.equal(plain, torch.ones_like(plain))  # ... into a constant, worst case
    out = BlurPool2d(IN_CHANNELS, stride, filter_size, "circular")(x)
    assert out.shape == plain.shape
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stride", [2, 3, (2, 1)], ids=str)
def test_nyquist_checkerboard_is_kept_without_blur(stride):
    x = _checkerboard(8, 12)
    rows, cols = _pair(stride)
    out = BlurPool2d(IN_CHANNELS, stride, 1, "circular")(x)
    assert torch.equal(out, x[..., ::rows, ::cols])
    assert out.abs().min().item() == 1.0


# Even sizes, large enough for circular padding (pad <= size); smaller maps fall back to replicate padding.
SHIFT_CASES = [
    (filter_size, size)
    for filter_size in range(1, 7)
    for size in [(8, 8), (6, 10), (2, 4)]
    if BLUR_PADS[filter_size][1] <= min(size)
]


@pytest.mark.parametrize("shift", [(2, 2), (2, 0), (0, 4), (-2, 6), (4, -2)], ids=str)
@pytest.mark.parametrize(("filter_size", "size"), SHIFT_CASES, ids=str)
def test_circular_blur_pool_commutes_with_even_shifts(filter_size, size, shift):
    x = torch.randn(2, 3, *size)
    half = (shift[0] // 2, shift[1] // 2)
    shifted_first = blur_pool2d(torch.roll(x, shift, dims=(2, 3)), 2, filter_size, "circular")
    shifted_after = torch.roll(blur_pool2d(x, 2, filter_size, "circular"), half, dims=(2, 3))
    torch.testing.assert_close(shifted_first, shifted_after, rtol=1e-6, atol=1e-6)
    module = BlurPool2d(3, 2, filter_size, "circular")
    torch.testing.assert_close(module(torch.roll(x, shift, dims=(2, 3))), torch.roll(module(x), half, dims=(2, 3)))


def test_zero_padding_is_not_shift_equivariant():
    # Control for the test above: with zero padding the borders differ, so the circular result is meaningful.
    x = torch.randn(1, 1, 8, 8)
    shifted_first = blur_pool2d(torch.roll(x, (2, 2), dims=(2, 3)), 2, 3, "zeros")
    shifted_after = torch.roll(blur_pool2d(x, 2, 3, "zeros"), (1, 1), dims=(2, 3))
    assert not torch.allclose(shifted_first, shifted_after, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# filter_size = 1 computes exactly the replaced layer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blur_first", [True, False], ids=["blur_first", "blur_after"])
@pytest.mark.parametrize("groups", [1, IN_CHANNELS], ids=["dense", "depthwise"])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("stride", [1, 2, 3, (2, 1)], ids=str)
@pytest.mark.parametrize("padding_mode", PAD_MODES)
def test_from_conv_filter_size_one_is_the_conv(padding_mode, stride, dilation, groups, blur_first):
    # pad_mode has nothing to pad with a 1-tap filter: it rotates along the loop.
    for (kernel, padding), pad_mode in zip(((1, 0), (3, 1), (4, 2), ((3, 2), (1, 1))), PAD_MODES, strict=True):
        conv = nn.Conv2d(IN_CHANNELS, 2 * IN_CHANNELS, kernel, stride, padding, dilation, groups,
                         padding_mode=padding_mode)  # fmt: skip
        new = BlurConv2d.from_conv(conv, blur_first=blur_first, filter_size=1, pad_mode=pad_mode)
        for size in ((7, 7), (8, 6), (3, 4)):
            x = torch.randn(2, IN_CHANNELS, *size)
            try:
                expected = conv(x)
            except RuntimeError:
                continue  # torch rejects this geometry itself (reflect pad >= map, dilated kernel > padded map)
            assert torch.equal(new(x), expected), (kernel, padding, pad_mode, size)


@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("stride", [None, 1, 2, 3, (2, 1)], ids=str)
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, (3, 2)], ids=str)
def test_from_maxpool_filter_size_one_is_the_pool(kernel, stride, dilation, ceil_mode):
    for padding in _paddings(kernel):
        pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
        new = BlurMaxPool2d.from_maxpool(pool, filter_size=1, pad_mode="reflect")
        for size in ((7, 7), (8, 6), (5, 9)):
            x = torch.randn(2, IN_CHANNELS, *size)
            try:
                expected = pool(x)
            except RuntimeError:
                continue  # torch rejects this geometry itself (dilated kernel larger than the padded map)
            assert torch.equal(new(x), expected), (padding, size)


@pytest.mark.parametrize("divisor_override", [None, 3])
@pytest.mark.parametrize("count_include_pad", [True, False], ids=["include_pad", "exclude_pad"])
@pytest.mark.parametrize("ceil_mode", [False, True], ids=["floor", "ceil"])
@pytest.mark.parametrize("stride", [None, 1, 2, 3, (2, 1)], ids=str)
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, (3, 2)], ids=str)
def test_from_avgpool_filter_size_one_is_the_pool(kernel, stride, ceil_mode, count_include_pad, divisor_override):
    for padding in _paddings(kernel):
        pool = nn.AvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
        new = BlurAvgPool2d.from_avgpool(pool, filter_size=1, pad_mode="circular")
        for size in ((7, 7), (8, 6), (5, 9)):
            x = torch.randn(2, IN_CHANNELS, *size)
            assert torch.equal(new(x), pool(x)), (padding, size)


@pytest.mark.parametrize("stride", [1, 2, 3, (2, 1)], ids=str)
def test_blur_pool2d_filter_size_one_is_strided_subsampling(stride):
    rows, cols = _pair(stride)
    x = torch.randn(2, 3, 7, 8)
    assert torch.equal(BlurPool2d(3, stride, 1)(x), x[..., ::rows, ::cols])
    assert torch.equal(blur_pool2d(x, stride, 1, "reflect"), x[..., ::rows, ::cols])


# ---------------------------------------------------------------------------------------------------------------------
# blur_first: where the blur sits relative to the conv
# ---------------------------------------------------------------------------------------------------------------------

EQUIVALENCE_CONVS = [  # (kernel, padding, dilation, groups)
    (3, 1, 1, 1),
    (1, 0, 1, 1),
    (4, 2, 1, IN_CHANNELS),
    (3, 2, 2, 1),
]


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("filter_size", [2, 3, 4])
@pytest.mark.parametrize("padding_mode", PAD_MODES)
@pytest.mark.parametrize("stride", STRIDES, ids=str)
def test_blur_after_is_stride_one_conv_then_blur_pool(stride, padding_mode, filter_size, pad_mode):
    for kernel, padding, dilation, groups in EQUIVALENCE_CONVS:
        conv = nn.Conv2d(IN_CHANNELS, IN_CHANNELS, kernel, stride, padding, dilation, groups,
                         padding_mode=padding_mode, dtype=torch.float64)  # fmt: skip
        dense = nn.Conv2d(IN_CHANNELS, IN_CHANNELS, kernel, 1, padding, dilation, groups,
                          padding_mode=padding_mode, dtype=torch.float64)  # fmt: skip
        dense.weight, dense.bias = conv.weight, conv.bias
        new = BlurConv2d.from_conv(conv, blur_first=False, filter_size=filter_size, pad_mode=pad_mode)
        for size in ((9, 9), (8, 7), (3, 3)):
            x = torch.randn(1, IN_CHANNELS, *size, dtype=torch.float64)
            out = new(x)
            assert out.shape == conv(x).shape
            torch.testing.assert_close(out, blur_pool2d(dense(x), stride, filter_size, pad_mode))
            torch.testing.assert_close(out, ref_blur_pool(dense(x), filter_size, stride, pad_mode))


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("filter_size", [2, 3, 4])
@pytest.mark.parametrize("padding_mode", PAD_MODES)
@pytest.mark.parametrize("stride", STRIDES, ids=str)
def test_blur_first_is_blur_then_strided_conv(stride, padding_mode, filter_size, pad_mode):
    for kernel, padding, dilation, groups in EQUIVALENCE_CONVS:
        conv = nn.Conv2d(IN_CHANNELS, 3 if groups == 1 else IN_CHANNELS, kernel, stride, padding, dilation, groups,
                         padding_mode=padding_mode, dtype=torch.float64)  # fmt: skip
        new = BlurConv2d.from_conv(conv, blur_first=True, filter_size=filter_size, pad_mode=pad_mode)
        for size in ((9, 9), (8, 7), (3, 3)):
            x = torch.randn(1, IN_CHANNELS, *size, dtype=torch.float64)
            out = new(x)
            assert out.shape == conv(x).shape
            torch.testing.assert_close(out, conv(blur_pool2d(x, 1, filter_size, pad_mode)))
            torch.testing.assert_close(out, conv(ref_blur_pool(x, filter_size, 1, pad_mode)))


def test_blur_first_default_is_true():
    new = BlurConv2d.from_conv(nn.Conv2d(2, 4, 3, 2, 1))
    assert new.blur_first is True
    assert new.filter_size == 3 and new.pad_mode == "zeros"
    assert BlurConv2d(2, 4, 3, 2, 1).blur_first is True


# ---------------------------------------------------------------------------------------------------------------------
# Fast paths: each computes what the straightforward form computes, with less work
# ---------------------------------------------------------------------------------------------------------------------


class _AtenCalls(TorchDispatchMode):
    """Records the aten ops that run under it, with the shape of each one's (first) output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, tuple | list) else out
        self.calls.append((func.overloadpacket.__name__, tuple(first.shape) if torch.is_tensor(first) else None))
        return out

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


POINTWISE_STRIDES = [2, (2, 1), (1, 3)]


@pytest.mark.parametrize("blur_first", [True, False], ids=["blur_first", "blur_after"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("filter_size", [2, 3, 4, 5])
def test_pointwise_conv_equals_the_straightforward_form(filter_size, pad_mode, bias, blur_first):
    # The straightforward forms, from torch's own conv and the float64 reference blur: blur at stride 1 then the
    # strided 1x1 conv (blur_first), or the 1x1 conv at stride 1 then blur-subsample. Outputs and every gradient.
    for stride, groups, size in itertools.product(POINTWISE_STRIDES, (1, 2), ((9, 8), (2, 3), (1, 1))):
        conv = nn.Conv2d(4, 6, 1, stride, groups=groups, bias=bias, dtype=torch.float64)
        new = BlurConv2d.from_conv(conv, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode)
        x = torch.randn(2, 4, *size, dtype=torch.float64, requires_grad=True)
        if blur_first:
            expected = conv(ref_blur_pool(x, filter_size, 1, pad_mode))
        else:
            dense = F.conv2d(x, conv.weight, conv.bias, groups=groups)
            expected = ref_blur_pool(dense, filter_size, stride, pad_mode)
        out = new(x)
        torch.testing.assert_close(out, expected, msg=f"{stride} {groups} {size}")
        grad_output = torch.randn_like(out)
        inputs = (x, *conv.parameters())
        for got, want in zip(
            torch.autograd.grad(out, inputs, grad_output),
            torch.autograd.grad(expected, inputs, grad_output),
            strict=True,
        ):
            torch.testing.assert_close(got, want, msg=f"gradient: {stride} {groups} {size}")


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("blur_first", [True, False], ids=["blur_first", "blur_after"])
def test_pointwise_conv_blurs_only_the_samples_it_reads(blur_first, pad_mode):
    # A ResNet shortcut: 1x1, stride 2, no bias. No op may produce a full-resolution (16x16) map: the blur runs at the
    # conv's stride in both orders, so it computes a quarter of the samples and the conv never runs at stride 1.
    new = BlurConv2d.from_conv(nn.Conv2d(8, 16, 1, 2, bias=False), blur_first=blur_first, pad_mode=pad_mode)
    with _AtenCalls() as record:
        out = new(torch.randn(2, 8, 16, 16))
    assert out.shape == (2, 16, 8, 8)
    convolutions = [shape for name, shape in record.calls if name == "convolution"]
    assert convolutions == [(2, 8, 8, 8), (2, 16, 8, 8)], record.calls


def test_pointwise_conv_with_bias_and_zero_padding_keeps_the_dense_order():
    # Zero padding dims a blurred constant near the border, so a bias does not commute with the blur there: this one
    # case keeps conv-then-blur. The swapped order would differ on the border and agree inside, which is why.
    conv = nn.Conv2d(4, 6, 1, 2, bias=True, dtype=torch.float64)
    with torch.no_grad():
        conv.bias.fill_(3.0)
    new = BlurConv2d.from_conv(conv, blur_first=False)
    x = torch.randn(1, 4, 10, 10, dtype=torch.float64)
    with _AtenCalls() as record:
        out = new(x)
    assert [shape for name, shape in record.calls if name == "convolution"] == [(1, 6, 10, 10), (1, 6, 5, 5)]
    torch.testing.assert_close(out, ref_blur_pool(F.conv2d(x, conv.weight, conv.bias), 3, 2, "zeros"))
    swapped = F.conv2d(ref_blur_pool(x, 3, 2, "zeros"), conv.weight, conv.bias)
    torch.testing.assert_close(swapped[..., 1:, 1:], out[..., 1:, 1:])  # the interior agrees
    assert not torch.allclose(swapped[..., 0, :], out[..., 0, :])  # the top border does not


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("filter_size", [2, 3, 4])
def test_blur_input_conv_is_blur_pool_then_the_conv(filter_size, pad_mode):
    # The paper's "ReLU -> BlurPool -> conv", as one module: the reference blur, then torch's own conv, at the conv's
    # own stride; outputs and gradients.
    for stride, blur_stride, size in itertools.product((1, 2), (2, (2, 1), 3), ((9, 9), (8, 7), (2, 3))):
        conv = nn.Conv2d(IN_CHANNELS, 3, 3, stride, padding=1, dtype=torch.float64)
        new = BlurInputConv2d.from_conv(conv, blur_stride=blur_stride, filter_size=filter_size, pad_mode=pad_mode)
        assert new.weight is conv.weight and new.stride == conv.stride
        x = torch.randn(2, IN_CHANNELS, *size, dtype=torch.float64, requires_grad=True)
        out, expected = new(x), conv(ref_blur_pool(x, filter_size, blur_stride, pad_mode))
        torch.testing.assert_close(out, expected, msg=f"{stride} {blur_stride} {size}")
        grad_output = torch.randn_like(out)
        inputs = (x, conv.weight, conv.bias)
        for got, want in zip(
            torch.autograd.grad(out, inputs, grad_output),
            torch.autograd.grad(expected, inputs, grad_output),
            strict=True,
        ):
            torch.testing.assert_close(got, want)


def test_blur_input_conv_rejects_a_bad_blur_stride():
    with pytest.raises(ValueError, match="blur_stride"):
        BlurInputConv2d(2, 3, 3, blur_stride=0)


# Ops that would copy or rebuild the filter (or the input) on every forward, as Composer's per-forward .repeat does.
COPYING_OPS = {"repeat", "clone", "copy_", "_to_copy", "contiguous", "empty_like", "zeros_like", "cat", "stack"}


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_forward_makes_no_copies(kind, pad_mode, memory_format):
    layer = make_layer(kind, pad_mode=pad_mode, channels=4).to(memory_format=memory_format)
    x = torch.randn(2, 4, 9, 8).contiguous(memory_format=memory_format).requires_grad_(True)
    with _AtenCalls() as record:
        out = layer(x)
    assert not COPYING_OPS & set(record.names), record.names
    # Beyond the layer's own conv/pool calls, only views of the filter and the blur's padding.
    # "view": blur_first=False returns a view of the blur's output, so PT2E does not fold a following BatchNorm into
    # the blur; a view copies nothing.
    allowed = {"convolution", "max_pool2d_with_indices", "avg_pool2d", "expand", "slice", "view"}
    allowed |= {"constant_pad_nd", "replication_pad2d", "reflection_pad2d"}
    assert set(record.names) <= allowed, record.names
    assert out.is_contiguous(memory_format=memory_format)


def test_copy_detector_sees_composers_per_forward_repeat():
    # The check above can fail: Composer's max-pool rebuilds its filter with .repeat in every forward.
    from composer.algorithms.blurpool.blurpool_layers import BlurMaxPool2d as ComposerBlurMaxPool2d

    with _AtenCalls() as record:
        ComposerBlurMaxPool2d(3, 2, 1)(torch.randn(1, 4, 8, 8))
    assert "repeat" in record.names


@pytest.mark.parametrize("blur_first", [True, False])
def test_constructor_equals_from_conv(blur_first):
    conv = nn.Conv2d(2, 4, 3, 2, 1, padding_mode="reflect")
    built = BlurConv2d(2, 4, 3, 2, 1, padding_mode="reflect", blur_first=blur_first, filter_size=4, pad_mode="circular")
    built.load_state_dict(conv.state_dict())
    converted = BlurConv2d.from_conv(conv, blur_first=blur_first, filter_size=4, pad_mode="circular")
    x = torch.randn(2, 2, 9, 8)
    torch.testing.assert_close(built(x), converted(x), rtol=0, atol=0)
    torch.testing.assert_close(built.blur_filter, converted.blur_filter, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# from_conv / from_maxpool / from_avgpool keep the original's state
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("blur_first", [True, False])
def test_from_conv_shares_parameters(blur_first, bias):
    conv = nn.Conv2d(3, 4, 3, 2, 1, bias=bias)
    new = BlurConv2d.from_conv(conv, blur_first=blur_first)
    assert isinstance(new, nn.Conv2d)
    assert new.weight is conv.weight
    assert new.bias is conv.bias
    assert (new.bias is None) is (not bias)
    assert [id(p) for p in new.parameters()] == [id(p) for p in conv.parameters()]
    assert "blur_filter" not in dict(new.named_parameters())
    assert new.blur_filter.requires_grad is False
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(new, name) == getattr(conv, name), name
    channels = 3 if blur_first else 4
    expected_filter = ref_filter_2d(3).float()[None, None].expand(channels, 1, 3, 3)
    assert torch.equal(new.blur_filter, expected_filter)


def test_from_conv_optimizer_on_original_parameters_trains_the_new_layer():
    conv = nn.Conv2d(2, 3, 3, 2, 1)
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.1)
    new = BlurConv2d.from_conv(conv)
    before = conv.weight.detach().clone()
    new(torch.randn(2, 2, 8, 8)).square().sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None
    optimizer.step()
    assert not torch.equal(conv.weight.detach(), before)
    assert torch.equal(new.weight.detach(), conv.weight.detach())


def test_from_conv_keeps_requires_grad():
    conv = nn.Conv2d(2, 3, 3, 2, 1)
    conv.weight.requires_grad_(False)
    new = BlurConv2d.from_conv(conv)
    assert new.weight.requires_grad is False
    assert new.bias.requires_grad is True
    new(torch.randn(1, 2, 6, 6)).sum().backward()
    assert new.weight.grad is None
    assert new.bias.grad is not None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_training_mode_carried_over(training):
    conv = nn.Conv2d(2, 3, 3, 2, 1).train(training)
    maxpool = nn.MaxPool2d(3, 2, 1).train(training)
    avgpool = nn.AvgPool2d(3, 2, 1).train(training)
    assert BlurConv2d.from_conv(conv).training is training
    assert BlurMaxPool2d.from_maxpool(maxpool).training is training
    assert BlurAvgPool2d.from_avgpool(avgpool).training is training


@pytest.mark.parametrize("padding_mode", PAD_MODES)
def test_from_conv_keeps_padding_mode(padding_mode):
    conv = nn.Conv2d(2, 3, 3, 2, 1, padding_mode=padding_mode)
    new = BlurConv2d.from_conv(conv, filter_size=1)
    assert new.padding_mode == padding_mode
    x = torch.randn(2, 2, 7, 8)
    assert torch.equal(new(x), conv(x))
    if padding_mode != "zeros":
        # The padding mode matters: the same weights with zero padding give different borders.
        zero_padded = nn.Conv2d(2, 3, 3, 2, 1)
        zero_padded.load_state_dict(conv.state_dict())
        assert not torch.allclose(zero_padded(x), new(x))
    for blur_first in (True, False):
        assert BlurConv2d.from_conv(conv, blur_first=blur_first).padding_mode == padding_mode


@pytest.mark.parametrize("blur_first", [True, False])
def test_from_conv_keeps_device(blur_first):
    cpu = BlurConv2d.from_conv(nn.Conv2d(2, 3, 3, 2, 1), blur_first=blur_first)
    assert cpu.blur_filter.device.type == "cpu"
    assert cpu(torch.randn(1, 2, 8, 8)).device.type == "cpu"
    meta_conv = nn.Conv2d(2, 3, 3, 2, 1, device="meta")
    meta = BlurConv2d.from_conv(meta_conv, blur_first=blur_first)
    assert meta.blur_filter.device.type == "meta"
    assert meta.weight is meta_conv.weight
    out = meta(torch.empty(1, 2, 8, 8, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("filter_size", [2, 3, 4])
@pytest.mark.parametrize("blur_first", [True, False])
def test_from_conv_bf16_keeps_filter_dtype_and_runs(blur_first, filter_size):
    # Composer's BlurConv2d.from_conv2d keeps a float32 filter next to bf16 weights and fails in forward.
    conv = nn.Conv2d(2, 3, 3, 2, 1, dtype=torch.bfloat16)
    new = BlurConv2d.from_conv(conv, blur_first=blur_first, filter_size=filter_size)
    assert new.blur_filter.dtype == torch.bfloat16
    assert torch.equal(new.blur_filter[0, 0].double(), ref_filter_2d(filter_size))  # the taps are exact in bf16
    x = torch.randn(2, 2, 9, 8, dtype=torch.bfloat16)
    out = new(x)
    assert out.dtype == torch.bfloat16
    reference = BlurConv2d.from_conv(copy.deepcopy(conv).double(), blur_first=blur_first, filter_size=filter_size)
    torch.testing.assert_close(out.double(), reference(x.double()), **TOLERANCE[torch.bfloat16])


def test_from_maxpool_rejects_return_indices():
    with pytest.raises(ValueError, match="return_indices"):
        BlurMaxPool2d.from_maxpool(nn.MaxPool2d(3, 2, 1, return_indices=True))


@pytest.mark.parametrize("stride", [None, 2, (2, 1)], ids=str)
def test_from_pool_keeps_hyperparameters(stride):
    maxpool = nn.MaxPool2d(3, stride, 1, dilation=2, ceil_mode=True)
    new_max = BlurMaxPool2d.from_maxpool(maxpool, filter_size=4, pad_mode="reflect")
    assert isinstance(new_max, nn.MaxPool2d)
    for name in ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"):
        assert getattr(new_max, name) == getattr(maxpool, name), name
    avgpool = nn.AvgPool2d(3, stride, 1, ceil_mode=True, count_include_pad=False, divisor_override=2)
    new_avg = BlurAvgPool2d.from_avgpool(avgpool, filter_size=4, pad_mode="reflect")
    assert isinstance(new_avg, nn.AvgPool2d)
    for name in ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"):
        assert getattr(new_avg, name) == getattr(avgpool, name), name
    for new in (new_max, new_avg):
        assert new.filter_size == 4 and new.pad_mode == "reflect"
        assert torch.equal(new.blur_filter.double().reshape(4, 4), ref_filter_2d(4))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_deepcopy_keeps_output(kind):
    layer = make_layer(kind, pad_mode="reflect", filter_size=4)
    clone = copy.deepcopy(layer)
    x = torch.randn(2, IN_CHANNELS, 9, 8)
    assert torch.equal(clone(x), layer(x))


# ---------------------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "dtype"), _dtype_cases())
def test_output_dtype_follows_input(kind, dtype):
    layer = make_layer(kind, dtype=dtype, filter_size=4, pad_mode="reflect")
    assert layer.blur_filter.dtype == dtype
    x = torch.randn(2, IN_CHANNELS, 9, 10).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    reference = copy.deepcopy(layer).double()  # the same weights and taps (exact in every dtype), in float64
    torch.testing.assert_close(out.double(), reference(x.double()), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_module_to_converts_the_filter(dtype):
    for kind in LAYER_KINDS:
        layer = make_layer(kind).to(dtype)
        assert layer.blur_filter.dtype == dtype, kind
        assert layer(torch.randn(1, IN_CHANNELS, 8, 8).to(dtype)).dtype == dtype, kind


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_functional_blur_pool2d_follows_input_dtype(dtype):
    x = torch.randn(1, 2, 8, 9).to(dtype)
    for pad_mode in PAD_MODES:
        out = blur_pool2d(x, 2, 4, pad_mode)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref_blur_pool(x, 4, 2, pad_mode), **TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------------------------------
# Memory format
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filter_size", [1, 3, 4])
@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_channels_last_is_kept(kind, pad_mode, filter_size):
    layer = make_layer(kind, pad_mode=pad_mode, filter_size=filter_size, channels=4)
    x = torch.randn(2, 4, 9, 10)
    x_last = x.contiguous(memory_format=torch.channels_last)
    expected = layer(x)
    out = layer(x_last)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert expected.is_contiguous()


# ---------------------------------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_gradcheck(kind, pad_mode):
    # Filter size 4: asymmetric blur padding, the path with the most indexing to get wrong.
    layer = make_layer(kind, dtype=torch.float64, pad_mode=pad_mode, filter_size=4)
    x = torch.randn(1, IN_CHANNELS, 4, 5, dtype=torch.float64, requires_grad=True)
    if kind.startswith("BlurConv2d"):
        names = [name for name, _ in layer.named_parameters()]
        parameters = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())

        def fn(x, *parameters):
            return torch.func.functional_call(layer, dict(zip(names, parameters, strict=True)), (x,))

        assert torch.autograd.gradcheck(fn, (x, *parameters))
    else:
        assert torch.autograd.gradcheck(layer, (x,))


# ---------------------------------------------------------------------------------------------------------------------
# State dicts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blur_first", [True, False])
def test_blur_conv2d_state_dict_keys(blur_first):
    conv = nn.Conv2d(2, 3, 3, 2, 1)
    new = BlurConv2d.from_conv(conv, blur_first=blur_first)
    assert list(new.state_dict()) == [*conv.state_dict(), "blur_filter"]
    assert torch.equal(new.state_dict()["weight"], conv.weight.detach())


@pytest.mark.parametrize("blur_first", [True, False])
def test_baseline_conv_state_dict_loads_strictly(blur_first):
    conv = nn.Conv2d(2, 3, 3, 2, 1)
    new = BlurConv2d(2, 3, 3, 2, 1, blur_first=blur_first, filter_size=4)
    result = new.load_state_dict(conv.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(new.weight, conv.weight) and torch.equal(new.bias, conv.bias)
    channels = 2 if blur_first else 3
    assert torch.equal(new.blur_filter, ref_filter_2d(4).float()[None, None].expand(channels, 1, 4, 4))


def test_state_dict_still_needs_the_weights():
    # The filter may be missing; the conv's own parameters may not.
    new = BlurConv2d(2, 3, 3, 2, 1)
    with pytest.raises(RuntimeError, match="weight"):
        new.load_state_dict({"bias": torch.zeros(3)}, strict=True)


def test_blurred_state_dict_does_not_load_into_plain_conv():
    new = BlurConv2d.from_conv(nn.Conv2d(2, 3, 3, 2, 1))
    with pytest.raises(RuntimeError, match="blur_filter"):
        nn.Conv2d(2, 3, 3, 2, 1).load_state_dict(new.state_dict(), strict=True)


def test_blurred_state_dict_round_trips():
    source = BlurConv2d.from_conv(nn.Conv2d(2, 3, 3, 2, 1), filter_size=5, pad_mode="reflect")
    target = BlurConv2d(2, 3, 3, 2, 1, filter_size=5, pad_mode="reflect")
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(1, 2, 9, 9)
    assert torch.equal(target(x), source(x))


def test_pool_state_dicts():
    for layer in (BlurPool2d(2), BlurMaxPool2d(3, 2, 1), BlurAvgPool2d(3, 2, 1)):
        assert list(layer.state_dict()) == ["blur_filter"]
        layer.load_state_dict({}, strict=True)  # a plain pool has an empty state dict
        assert torch.equal(layer.blur_filter.double().reshape(-1, 3, 3)[0], ref_filter_2d(3))


def _plain_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.AvgPool2d(2))


def _blurred_net():
    return nn.Sequential(
        BlurConv2d(2, 4, 3, 2, 1), nn.ReLU(), BlurMaxPool2d(3, 2, 1), BlurAvgPool2d(2), BlurPool2d(4, 1, 3)
    )


def test_nested_state_dicts():
    plain, blurred = _plain_net(), _blurred_net()
    result = blurred.load_state_dict(plain.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(blurred[0].weight, plain[0].weight)
    assert torch.equal(blurred[0].blur_filter[0, 0].double(), ref_filter_2d(3))
    expected_keys = ["0.weight", "0.bias", "0.blur_filter", "2.blur_filter", "3.blur_filter", "4.blur_filter"]
    assert list(blurred.state_dict()) == expected_keys
    with pytest.raises(RuntimeError, match=r"0\.blur_filter"):
        _plain_net().load_state_dict(blurred.state_dict(), strict=True)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_meta_built_layer_loads_like_a_cpu_built_one(kind):
    # A layer built on the meta device and materialized with to_empty holds garbage where its filter goes; a state
    # dict without the filter (the plain layer's) must leave it the filter the layer's options give.
    reference = make_layer(kind, pad_mode="reflect", filter_size=4)
    with torch.device("meta"):
        layer = make_layer(kind, pad_mode="reflect", filter_size=4)
    assert layer.blur_filter.is_meta
    layer.to_empty(device="cpu")
    plain_state = {k: v for k, v in reference.state_dict().items() if k != "blur_filter"}
    result = layer.load_state_dict(plain_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    rows = layer.blur_filter.shape[0]
    assert rows == (1 if "Pool2d" in kind and kind != "BlurPool2d" else reference.blur_filter.shape[0])
    assert torch.equal(layer.blur_filter.double(), ref_filter_2d(4)[None, None].expand(rows, 1, 4, 4))
    x = torch.randn(2, IN_CHANNELS, 9, 8)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_a_state_dict_with_another_filter_is_refused(kind):
    layer = make_layer(kind, filter_size=3)
    state = layer.state_dict()
    expected = ref_filter_2d(3).float()[None, None].expand_as(layer.blur_filter)
    box = torch.full_like(state["blur_filter"], 1 / 9)  # a low-pass filter too, just not this layer's
    delta = torch.zeros_like(state["blur_filter"])
    delta[..., 1, 1] = 1.0  # no blur at all: the layer would alias again
    for wrong in (box, delta, state["blur_filter"] * 2):
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=r"blur_filter.*binomial filter of size 3"):
                layer.load_state_dict({**state, "blur_filter": wrong}, strict=strict)
            assert torch.equal(layer.blur_filter, expected)  # the refused values did not stay behind
    # Controls: the layer's own state dict loads, and so does one saved in bfloat16, whose taps it then holds exactly
    # in float32 (filter_size 16: those taps are rounded in bfloat16).
    layer.load_state_dict(state, strict=True)
    assert torch.equal(layer.blur_filter, expected)
    blur = BlurPool2d(2, filter_size=16)
    blur.load_state_dict(BlurPool2d(2, filter_size=16, dtype=torch.bfloat16).state_dict(), strict=True)
    taps = torch.tensor([math.comb(15, i) for i in range(16)], dtype=torch.float64) / 2**15
    assert torch.equal(blur.blur_filter, torch.outer(taps, taps).float().expand(2, 1, 16, 16))


def test_assign_load_never_writes_into_the_callers_tensors():
    source = BlurConv2d.from_conv(nn.Conv2d(2, 3, 3, 2, 1))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    kept = state["blur_filter"].clone()
    with torch.device("meta"):
        layer = BlurConv2d(2, 3, 3, 2, 1)
    layer.load_state_dict(state, strict=True, assign=True)
    assert torch.equal(state["blur_filter"], kept)
    x = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_a_meta_built_layer_refuses_an_assign_load_that_leaves_its_filter_on_meta(kind):
    # load_state_dict(assign=True) on a meta-built layer takes every tensor from the state dict; without the filter
    # key nothing says where the filter lives, and a meta buffer would make forward read uninitialised memory.
    reference = make_layer(kind, pad_mode="reflect", filter_size=4)
    plain_state = {k: v for k, v in reference.state_dict().items() if k != "blur_filter"}
    with torch.device("meta"):
        layer = make_layer(kind, pad_mode="reflect", filter_size=4)
    with pytest.raises(RuntimeError, match=r"blur_filter.*meta device"):
        layer.load_state_dict(plain_state, strict=True, assign=True)
    # Control: with the filter key the same load works and the layer computes the reference's output.
    with torch.device("meta"):
        layer = make_layer(kind, pad_mode="reflect", filter_size=4)
    layer.load_state_dict(reference.state_dict(), strict=True, assign=True)
    x = torch.randn(2, IN_CHANNELS, 9, 8)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# TorchScript, torch.fx, torch.compile, ONNX
# ---------------------------------------------------------------------------------------------------------------------

# Includes maps too small for reflect padding, where the blur falls back to replicate inside forward.
EXPORT_SIZES = [(1, 1), (2, 3), (9, 8), (12, 12)]


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_torchscript(kind, pad_mode):
    layer = make_layer(kind, pad_mode=pad_mode, filter_size=4).eval()
    scripted = torch.jit.script(layer)
    for size in EXPORT_SIZES:
        x = torch.randn(2, IN_CHANNELS, *size)
        torch.testing.assert_close(scripted(x), layer(x), rtol=1e-6, atol=1e-6, msg=str(size))


@pytest.mark.parametrize("pad_mode", PAD_MODES)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_fx_symbolic_trace(kind, pad_mode):
    layer = make_layer(kind, pad_mode=pad_mode, filter_size=4).eval()
    traced = torch.fx.symbolic_trace(layer)
    get_attrs = [node.target for node in traced.graph.nodes if node.op == "get_attr"]
    assert "blur_filter" in get_attrs
    for size in EXPORT_SIZES:
        x = torch.randn(2, IN_CHANNELS, *size)
        torch.testing.assert_close(traced(x), layer(x), rtol=1e-6, atol=1e-6, msg=str(size))


#: Each kind compiled once (compiling costs about half a second), the pad modes alternating: every kind's blur goes
#: through the same blur_sample, whose zero padding (inside the conv) and reflect padding (pad_map, with its tiny-map
#: fallback) are then both compiled several times over. TorchScript, fx and ONNX run every kind in every pad mode.
COMPILE_CASES = [(kind, ("zeros", "reflect")[index % 2]) for index, kind in enumerate(LAYER_KINDS)]


@pytest.mark.parametrize(("kind", "pad_mode"), COMPILE_CASES)
def test_torch_compile_without_graph_breaks(kind, pad_mode):
    torch._dynamo.reset()
    layer = make_layer(kind, pad_mode=pad_mode, filter_size=4).eval()
    x = torch.randn(2, IN_CHANNELS, 9, 8)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # aot_eager: the same dynamo + AOTAutograd front end as inductor, without a C++ compile (about 50 s on this CPU).
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for size in ((9, 8), (12, 12), (1, 1)):
        x = torch.randn(2, IN_CHANNELS, *size)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6, msg=str(size))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("pad_mode", ["zeros", "reflect", "circular"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_onnx_export_with_dynamic_axes(kind, pad_mode):
    import onnxruntime  # a dev dependency: missing it is a failure, not a skip

    layer = make_layer(kind, pad_mode=pad_mode, filter_size=4).eval()
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        layer,
        (torch.randn(1, IN_CHANNELS, 12, 12),),
        buffer,
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": axes, "output": axes},
    )
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for size in ((17, 9), (8, 14)):  # not the export size
        x = torch.randn(3, IN_CHANNELS, *size)
        (out,) = session.run(None, {"input": x.numpy()})
        expected = layer(x)
        assert tuple(out.shape) == tuple(expected.shape)
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------------------------------

LAYER_BUILDERS = {
    "BlurPool2d": lambda **kw: BlurPool2d(2, **kw),
    "blur_pool2d": lambda **kw: blur_pool2d(torch.randn(1, 2, 8, 8), **kw),
    "BlurConv2d": lambda **kw: BlurConv2d(2, 3, 3, padding=1, **kw),
    "BlurMaxPool2d": lambda **kw: BlurMaxPool2d(3, **kw),
    "BlurAvgPool2d": lambda **kw: BlurAvgPool2d(3, **kw),
    "BlurConv2d.from_conv": lambda **kw: BlurConv2d.from_conv(nn.Conv2d(2, 3, 3, 2, 1), **kw),
    "BlurMaxPool2d.from_maxpool": lambda **kw: BlurMaxPool2d.from_maxpool(nn.MaxPool2d(3, 2), **kw),
    "BlurAvgPool2d.from_avgpool": lambda **kw: BlurAvgPool2d.from_avgpool(nn.AvgPool2d(3, 2), **kw),
}
STRIDE_BUILDERS = ["BlurPool2d", "blur_pool2d", "BlurConv2d", "BlurMaxPool2d", "BlurAvgPool2d"]


@pytest.mark.parametrize("channels", [0, -1, True, 2.0, "4", None], ids=repr)
def test_bad_channels(channels):
    with pytest.raises(ValueError, match=r"channels must be an int >= 1"):
        BlurPool2d(channels)


@pytest.mark.parametrize("stride", [0, -1, (2, 0), 1.5, (2, 1.5), True, (1, 2, 3)], ids=repr)
@pytest.mark.parametrize("builder", STRIDE_BUILDERS)
def test_bad_stride(builder, stride):
    with pytest.raises(ValueError, match=r"stride must be an int >= 1"):
        LAYER_BUILDERS[builder](stride=stride)


@pytest.mark.parametrize("filter_size", [0, -1, 2.5, True, "3"], ids=repr)
@pytest.mark.parametrize("builder", sorted(LAYER_BUILDERS))
def test_bad_filter_size(builder, filter_size):
    with pytest.raises(ValueError, match=r"filter_size must be an int >= 1") as info:
        LAYER_BUILDERS[builder](filter_size=filter_size)
    assert repr(filter_size) in str(info.value)


@pytest.mark.parametrize("pad_mode", ["mirror", "constant", "Zeros", None], ids=repr)
@pytest.mark.parametrize("builder", sorted(LAYER_BUILDERS))
def test_bad_pad_mode(builder, pad_mode):
    with pytest.raises(ValueError, match=r"pad_mode must be one of") as info:
        LAYER_BUILDERS[builder](pad_mode=pad_mode)
    for allowed in PAD_MODES:
        assert repr(allowed) in str(info.value)


@pytest.mark.parametrize("shape", [(2, 8, 8), (8, 8), (1, 1, 2, 8, 8)], ids=str)
def test_blur_pool2d_rejects_non_4d_input(shape):
    with pytest.raises(ValueError, match=r"input must be 4-D"):
        blur_pool2d(torch.randn(*shape))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_extra_repr_names_the_blur(kind):
    text = repr(make_layer(kind, pad_mode="reflect", filter_size=4))
    assert "filter_size=4" in text
    assert "pad_mode='reflect'" in text


# ---------------------------------------------------------------------------------------------------------------------
# The fused max-blur (layers/maxblur.py): what torch.compile runs for BlurMaxPool2d
# ---------------------------------------------------------------------------------------------------------------------

# (kernel, stride, padding, dilation, ceil_mode, filter_size): ResNet's stem first, then ceil_mode's partial windows,
# an unpadded even kernel, dilation, a rectangular kernel and stride, a wide kernel.
FUSED_GEOMETRIES = [
    (3, 2, 1, 1, False, 3),
    (3, 2, 1, 1, True, 3),
    (2, 2, 0, 1, True, 3),
    (3, 3, 1, 2, True, 5),
    ((2, 3), (1, 2), (1, 1), 1, False, 3),
    (5, 3, 2, 1, True, 3),
]


def _tie_heavy_inputs(size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Inputs whose windows tie: a ReLU'd map (zeros everywhere), a few quantized levels, -inf rows and NaNs; and
    distinct float64 values."""
    base = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(size[0] * 31 + size[1]))
    special = base.relu()
    special[0, 0] = float("-inf")  # whole windows of -inf: the gradient goes to the first real element
    special[1, 1, :: max(1, size[0] - 1), ::2] = float("nan")  # two NaNs in a window: the last one wins
    return {
        "relu": base.relu(),
        "quantized": (base * 2).round().clamp(-1, 2),
        "inf_nan": special,
        "float64": base.double(),
    }


@pytest.mark.parametrize("geometry", FUSED_GEOMETRIES, ids=str)
def test_fused_max_blur_equals_the_layer_bit_for_bit(geometry):
    kernel, stride, padding, dilation, ceil_mode, filter_size = geometry
    layer = BlurMaxPool2d(kernel, stride, padding, dilation, ceil_mode, filter_size=filter_size)
    assert layer.fused
    for size, (name, x), channels_last in itertools.product(
        [(7, 9), (2, 3)], _tie_heavy_inputs((7, 9)).items(), (False, True)
    ):
        x = _tie_heavy_inputs(size)[name]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        layer.to(x.dtype)
        plain, fused = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected, out = layer(plain), layer._fused(fused)  # eager: forward is the max_pool2d + conv formulation
        grad = torch.randn(expected.shape, dtype=x.dtype)
        expected.backward(grad)
        out.backward(grad)
        case = f"{size} {name} channels_last={channels_last}"
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True, msg=case)
        torch.testing.assert_close(fused.grad, plain.grad, rtol=0, atol=0, equal_nan=True, msg=case)


def test_fused_max_blur_ties_need_its_routing():
    """The control: torch.maximum's own gradient splits a tie between its elements, so the same stencil without the
    first-maximum routing gives ReLU maps another gradient than the layer's."""
    layer = BlurMaxPool2d(3, 2, 1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).relu()
    plain, naive = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(plain).sum().backward()
    padded = F.pad(naive, [1, 1, 1, 1], value=float("-inf"))
    dense = _maximum_of([padded[:, :, a : a + 8, b : b + 8] for a in range(3) for b in range(3)])
    F.conv2d(dense, layer.blur_filter.expand(3, 1, 3, 3), stride=2, padding=1, groups=3).sum().backward()
    assert not torch.equal(naive.grad, plain.grad)
    torch.testing.assert_close(naive.grad.sum(), plain.grad.sum())  # the same total, routed elsewhere


def _maximum_of(maps: list[torch.Tensor]) -> torch.Tensor:
    out = maps[0]
    for other in maps[1:]:
        out = torch.maximum(out, other)
    return out


def test_fused_max_blur_gradcheck():
    layer = BlurMaxPool2d(3, 2, 1, ceil_mode=True).double()
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(layer._fused, (x,))


@pytest.mark.parametrize(
    "build",
    [
        lambda: BlurMaxPool2d(3, 2, 1, filter_size=1),  # the plain pool itself
        lambda: BlurMaxPool2d(3, 2, 1, filter_size=4),  # an even filter pads asymmetrically
        lambda: BlurMaxPool2d(3, 2, 1, pad_mode="reflect"),
        lambda: BlurMaxPool2d(3, 2, 1, sampling="adaptive"),
        lambda: BlurMaxPool2d(3, 2, 1, padding_mode="circular"),
        lambda: BlurAvgPool2d(3, 2, 1),
    ],
    ids=["filter_size=1", "filter_size=4", "reflect", "adaptive", "circular", "avgpool"],
)
def test_fused_max_blur_falls_back_where_it_is_not_exact(build):
    layer = build()
    assert not layer.fused
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(layer, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)
    x = torch.randn(1, 2, 7, 6)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
    assert "max_pool" in str(graphs[0].graph) or "avg_pool" in str(graphs[0].graph)


def test_compiled_max_pool_takes_the_fused_path():
    """Under torch.compile the stem's pool is the stencil (no max_pool2d in the graph) and still equals eager, ties
    and gradients included, through AOTAutograd's partitioner (aot_eager: no C++ compile)."""
    layer = BlurMaxPool2d.from_maxpool(nn.MaxPool2d(3, 2, 1))
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(2)).relu()
    x = x.contiguous(memory_format=torch.channels_last)
    plain, fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(2, 3, 5, 4)
    layer(plain).backward(grad)
    out = compiled(fused)
    out.backward(grad)
    # With a grad-requiring input, dynamo keeps the Function's forward and backward as subgraphs.
    code = "\n".join(str(module.graph) for module in graphs[0].modules() if isinstance(module, torch.fx.GraphModule))
    assert "max_pool" not in code and "maximum" in code and "convolution_backward" in code
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    torch.testing.assert_close(fused.grad, plain.grad, rtol=0, atol=0)


def test_compiled_max_pool_in_eval_mode_keeps_the_plain_path():
    # Eval mode has no backward to save for, and torch.export (which torch 2.7 reports as compiling) feeds PT2E
    # quantization, whose export_for_training cannot trace the stencil's autograd.Function: the plain pool there.
    layer = BlurMaxPool2d.from_maxpool(nn.MaxPool2d(3, 2, 1)).eval()
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(3)).relu()
    out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    assert "max_pool2d" in str(graphs[0].graph)
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    torch._dynamo.reset()
