"""Tests for blurpool_algo.filters: binomial taps, the 2-D filter and the padding arithmetic.

Expected values are written out by hand (rows of Pascal's triangle, padding tables) or follow from ``math``; nothing
here is a value copied from running the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from blurpool_algo import filters
from blurpool_algo.filters import (
    PAD_MODES,
    binomial_filter_2d,
    binomial_taps,
    blur_padding,
    subsampled_size,
    validate_filter_size,
    validate_pad_mode,
)

# Rows of Pascal's triangle, written out by hand; size k is row k-1, normalized by 2**(k-1).
PASCAL_ROWS = {
    1: ([1], 1),
    2: ([1, 1], 2),
    3: ([1, 2, 1], 4),
    4: ([1, 3, 3, 1], 8),
    5: ([1, 4, 6, 4, 1], 16),
    6: ([1, 5, 10, 10, 5, 1], 32),
    7: ([1, 6, 15, 20, 15, 6, 1], 64),
    8: ([1, 7, 21, 35, 35, 21, 7, 1], 128),
}

# Blur padding (before, after) by hand: odd sizes split k-1 evenly, even sizes put the extra sample after.
PADDING_TABLE = {1: (0, 0), 2: (0, 1), 3: (1, 1), 4: (1, 2), 5: (2, 2), 6: (2, 3), 7: (3, 3), 8: (3, 4), 9: (4, 4)}

# All taps up to size 8 are dyadic rationals with <= 6 significant bits: exact in every one of these dtypes.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

BAD_FILTER_SIZES = [0, -1, 2.5, True, False, "3", None, 3.0]
BAD_PAD_MODES = ["mirror", "constant", "Zeros", "", None, 0, "reflection"]


def _expected_taps(size: int) -> torch.Tensor:
    row, denominator = PASCAL_ROWS[size]
    return torch.tensor(row, dtype=torch.float64) / denominator


# ---------------------------------------------------------------------------------------------------------------------
# binomial_taps / binomial_filter_2d
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", sorted(PASCAL_ROWS))
def test_binomial_taps_are_pascal_rows(size, dtype):
    taps = binomial_taps(size, dtype=dtype)
    assert taps.shape == (size,)
    assert taps.dtype == dtype
    assert taps.device.type == "cpu"
    assert torch.equal(taps, _expected_taps(size).to(dtype))
    # Symmetric, positive, and the sum is exactly one (the taps are exact dyadic rationals).
    assert torch.equal(taps, taps.flip(0))
    assert bool((taps > 0).all())
    assert taps.double().sum().item() == 1.0


def test_binomial_taps_examples_by_hand():
    assert binomial_taps(1).tolist() == [1.0]
    assert binomial_taps(2).tolist() == [0.5, 0.5]
    assert binomial_taps(3).tolist() == [0.25, 0.5, 0.25]
    assert binomial_taps(4).tolist() == [0.125, 0.375, 0.375, 0.125]


def test_binomial_taps_default_dtype_is_float32():
    assert binomial_taps(3).dtype == torch.float32
    assert binomial_filter_2d(3).dtype == torch.float32


@pytest.mark.parametrize("size", [9, 12, 16])
def test_binomial_taps_larger_sizes_match_math_comb(size):
    # Beyond the hand-written table: the definition C(k-1, i) / 2**(k-1), in float64.
    expected = torch.tensor([math.comb(size - 1, i) / 2 ** (size - 1) for i in range(size)], dtype=torch.float64)
    assert torch.equal(binomial_taps(size, dtype=torch.float64), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", sorted(PASCAL_ROWS))
def test_binomial_filter_2d_is_outer_product(size, dtype):
    filt = binomial_filter_2d(size, dtype=dtype)
    expected = _expected_taps(size)[:, None] * _expected_taps(size)[None, :]
    assert filt.shape == (size, size)
    assert filt.dtype == dtype
    assert torch.equal(filt, expected.to(dtype))
    assert torch.equal(filt, filt.T)
    assert filt.double().sum().item() == 1.0


def test_binomial_filter_2d_size_one_is_identity():
    filt = binomial_filter_2d(1)
    assert filt.shape == (1, 1)
    assert torch.equal(filt, torch.tensor([[1.0]]))


def test_binomial_filter_2d_size_three_by_hand():
    expected = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    assert torch.equal(binomial_filter_2d(3), expected)


@pytest.mark.parametrize("fn", [binomial_taps, binomial_filter_2d])
def test_filters_honour_device(fn):
    out = fn(3, device="meta")
    assert out.device.type == "meta"
    assert fn(3, device=torch.device("cpu")).device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------------
# blur_padding / subsampled_size
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(PADDING_TABLE))
def test_blur_padding_table(size):
    before, after = blur_padding(size)
    assert (before, after) == PADDING_TABLE[size]
    assert isinstance(before, int) and isinstance(after, int)
    assert before + after == size - 1
    if size % 2 == 1:
        assert before == after
    else:
        assert before == (size - 1) // 2
        assert after == before + 1


@pytest.mark.parametrize("size", sorted(PADDING_TABLE))
@pytest.mark.parametrize("length", [1, 2, 3, 7, 8])
def test_blur_padding_keeps_length_at_stride_one(size, length):
    # A 'valid' convolution of the padded signal with a size-k filter has exactly the original length.
    before, after = blur_padding(size)
    assert before + length + after - size + 1 == length


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size", list(range(0, 21)))
def test_subsampled_size_is_ceil(size, stride):
    out = subsampled_size(size, stride)
    assert out == math.ceil(size / stride)
    assert isinstance(out, int)
    # Same as the number of samples x[::stride] keeps.
    assert out == len(range(0, size, stride))


# ---------------------------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_FILTER_SIZES, ids=repr)
@pytest.mark.parametrize("fn", [binomial_taps, binomial_filter_2d, blur_padding, validate_filter_size])
def test_bad_filter_size_raises(fn, bad):
    with pytest.raises(ValueError, match=r"filter_size") as info:
        fn(bad)
    message = str(info.value)
    assert ">= 1" in message  # the allowed values
    assert repr(bad) in message  # the offending value


@pytest.mark.parametrize("bad", BAD_FILTER_SIZES, ids=repr)
def test_validate_filter_size_names_the_argument(bad):
    with pytest.raises(ValueError, match=r"^blur_size must") as info:
        validate_filter_size(bad, name="blur_size")
    assert "filter_size" not in str(info.value)


@pytest.mark.parametrize("good", [1, 2, 3, 7, 32])
def test_validate_filter_size_returns_value(good):
    assert validate_filter_size(good) == good


def test_filter_size_upper_bound():
    # The bound is documented and checked up front: far beyond any published use (2-7), and every tap of the
    # largest filter is still a positive, finite float32 summing to one (2**1029 as a float overflows).
    from blurpool_algo.surgery import validate_options

    largest = filters.MAX_FILTER_SIZE
    assert largest == 32
    assert validate_filter_size(largest) == largest
    taps = binomial_taps(largest)
    expected = torch.tensor([math.comb(largest - 1, i) / 2 ** (largest - 1) for i in range(largest)])
    assert bool((taps > 0).all()) and bool(torch.isfinite(taps).all())
    torch.testing.assert_close(taps, expected, rtol=1e-7, atol=0)
    assert abs(binomial_filter_2d(largest).double().sum().item() - 1.0) < 1e-6
    for bad in (largest + 1, 1030, 10**6):
        for fn in (validate_filter_size, binomial_taps, binomial_filter_2d, blur_padding):
            with pytest.raises(ValueError, match=rf"filter_size must be an int >= 1 and <= {largest}.*got {bad}"):
                fn(bad)
        with pytest.raises(ValueError, match=rf"filter_size.*<= {largest}"):
            validate_options(filter_size=bad)


def test_pad_modes_are_the_conv_padding_modes():
    assert set(PAD_MODES) == {"zeros", "reflect", "replicate", "circular"}
    # The same names nn.Conv2d accepts as padding_mode.
    for mode in PAD_MODES:
        torch.nn.Conv2d(1, 1, 3, padding=1, padding_mode=mode)


@pytest.mark.parametrize("good", ["zeros", "reflect", "replicate", "circular"])
def test_validate_pad_mode_returns_value(good):
    assert validate_pad_mode(good) == good


@pytest.mark.parametrize("bad", BAD_PAD_MODES, ids=repr)
def test_bad_pad_mode_raises(bad):
    with pytest.raises(ValueError, match=r"pad_mode") as info:
        validate_pad_mode(bad)
    message = str(info.value)
    for allowed in ("zeros", "reflect", "replicate", "circular"):
        assert allowed in message
    assert repr(bad) in message


def test_validate_pad_mode_names_the_argument():
    with pytest.raises(ValueError, match=r"^mode must"):
        validate_pad_mode("mirror", name="mode")
