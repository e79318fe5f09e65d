"""Binomial low-pass filter taps and the padding arithmetic that goes with them.

Pure functions over Python ints and torch tensors; nothing here holds state.

A binomial filter of size ``k`` has taps ``C(k-1, i) / 2**(k-1)`` for ``i = 0..k-1``: size 1 is the identity, size 2
the box ``[1, 1]/2``, size 3 the ``[1, 2, 1]/4`` filter Composer uses, size 4 ``[1, 3, 3, 1]/8`` the paper's default.
The 2-D filter is the outer product of the 1-D taps with itself, which sums to one, so a constant map stays constant;
1-D layers use the taps themselves.
"""

from __future__ import annotations

import math

import torch

from blurpool_algo.checks import check_choice, check_int

__all__ = [
    "MAX_FILTER_SIZE",
    "PAD_MODES",
    "binomial_filter",
    "binomial_filter_2d",
    "binomial_taps",
    "blur_padding",
    "subsampled_size",
    "validate_filter_size",
    "validate_pad_mode",
]

#: Padding modes a blur accepts; the names follow ``nn.Conv2d``'s ``padding_mode``.
PAD_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")

#: The largest filter size accepted: far beyond any published use (2 to 7), and small enough that every tap of the 2-D
#: filter is a positive, normal float32 (the smallest, 2**-62, is far above float32's 2**-126). Without a bound, a
#: size above 1024 would fail as an OverflowError of the normalization 2**(k-1) instead of a message naming the option.
MAX_FILTER_SIZE = 32


def validate_filter_size(filter_size: object, name: str = "filter_size") -> int:
    """Returns ``filter_size`` if it is an int from 1 to :data:`MAX_FILTER_SIZE`, else raises ``ValueError``.

    Example:
        >>> validate_filter_size(4)
        4
    """
    return check_int(
        name, filter_size, minimum=1, maximum=MAX_FILTER_SIZE, hint="1 = no blur, 3 = [1, 2, 1]/4, 4 = the paper's"
    )


def validate_pad_mode(pad_mode: object, name: str = "pad_mode") -> str:
    """Returns ``pad_mode`` if it is one of :data:`PAD_MODES`, else raises ``ValueError`` naming ``name``.

    Example:
        >>> validate_pad_mode("x", name="pad")
        Traceback (most recent call last):
        ...
        blurpool_algo.checks.CheckError: pad must be one of 'zeros', 'reflect', 'replicate', 'circular', got 'x'
    """
    return check_choice(name, pad_mode, PAD_MODES)  # type: ignore[return-value]


def binomial_taps(filter_size: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """1-D binomial low-pass taps of length ``filter_size``, normalized to sum to one.

    Args:
        filter_size: number of taps, 1 to :data:`MAX_FILTER_SIZE`.
        dtype: dtype of the returned tensor.
        device: device of the returned tensor.

    Returns:
        A tensor of shape ``(filter_size,)``.

    Example:
        >>> binomial_taps(3)
        tensor([0.2500, 0.5000, 0.2500])
    """
    validate_filter_size(filter_size)
    order = filter_size - 1
    # Exact integer coefficients first, then one division: the taps are exact in float32 up to size 25.
    coefficients = [math.comb(order, i) for i in range(filter_size)]
    taps = torch.tensor(coefficients, dtype=torch.float64, device=device) / float(2**order)
    return taps.to(dtype)


def binomial_filter_2d(filter_size: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """2-D binomial filter: the outer product of :func:`binomial_taps` with itself (sums to one).

    Returns:
        A tensor of shape ``(filter_size, filter_size)``.
    """
    taps = binomial_taps(filter_size, dtype=torch.float64, device=device)
    return torch.outer(taps, taps).to(dtype)


def binomial_filter(
    filter_size: int, dims: int = 2, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The ``dims``-D binomial filter: :func:`binomial_taps` (1-D) or :func:`binomial_filter_2d` (2-D).

    Example:
        >>> binomial_filter(3, 1).tolist(), binomial_filter(2).tolist()
        ([0.25, 0.5, 0.25], [[0.25, 0.25], [0.25, 0.25]])
    """
    if dims == 1:
        return binomial_taps(filter_size, dtype=dtype, device=device)
    return binomial_filter_2d(filter_size, dtype=dtype, device=device)


def blur_padding(filter_size: int) -> tuple[int, int]:
    """Padding ``(before, after)`` along one axis so that a blur keeps the map's size.

    The filter spans ``filter_size - 1`` extra samples; odd sizes split them evenly, even sizes put the extra sample
    after (``[(k-1)//2, ceil((k-1)/2)]``). With this padding a stride-``s`` blur maps ``n`` samples to
    ``ceil(n / s)``, for every filter size.
    """
    validate_filter_size(filter_size)
    before = (filter_size - 1) // 2
    return before, filter_size - 1 - before


def subsampled_size(size: int, stride: int) -> int:
    """Output length of a stride-``stride`` blur-subsample over ``size`` samples: ``ceil(size / stride)``."""
    return -(-size // stride)
