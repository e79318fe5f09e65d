"""The max-blur-subsample of :class:`~blurpool_algo.layers.pools.BlurMaxPool2d` as a stencil that keeps neither the
full-resolution max nor its indices for the backward: what ``torch.compile`` (Inductor) fuses into a few loops.

The layer's forward is a max at stride 1 (``F.max_pool2d``, which saves int64 indices, twice the map's bytes, for its
backward) and then a strided blur. Here the max is the elementwise maximum of the kernel's shifted slices of the map
(padded with ``-inf``), the blur is the layer's own strided depthwise conv, and only the input is saved. The backward
recomputes the max and, for each window, which of its elements is the *first* maximum in row-major window order: the
one element ``F.max_pool2d``'s backward gives the window's gradient to (ReLU maps are full of tied zeros, and
``torch.maximum``'s own gradient would split ties between them). A ``NaN`` wins a window as it does in PyTorch's kernel
(the last ``NaN`` in window order), and padding never does (an all ``-inf`` window routes to its first real element).
Each input's gradient sums its windows' shares in the order ``F.max_pool2d``'s backward adds them, so outputs and
gradients equal the layer's eager ones (bit for bit on this CPU, tested in ``tests/test_layers.py``). AOTAutograd's
partitioner may still choose to compute the routing (an int32 map) in the forward and save it instead of the input.

In eager mode this is many passes over the map and several times slower than PyTorch's pooling kernel, so the layer
takes it only in training mode while ``torch.compile`` traces it (:func:`fused_max_blur_wanted`; eval mode, where
``torch.export`` and PT2E trace, has no backward to save for); TorchScript, ``torch.fx`` and ONNX keep the plain
formulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_max_blur_applies", "fused_max_blur_wanted", "max_blur_sample"]


def fused_max_blur_applies(dims: int, sampling: str, padding_mode: str, pad_mode: str, pads: list[int]) -> bool:
    """Whether :func:`max_blur_sample` computes a pool's exact result: a 2-D pool with fixed sampling, the pool's own
    (``-inf``) padding and a symmetric zero-padded blur (odd filter sizes), whose backward is one transposed conv.

    Example:
        >>> fused_max_blur_applies(2, "fixed", "zeros", "zeros", [1, 1, 1, 1])
        True
        >>> fused_max_blur_applies(2, "adaptive", "zeros", "zeros", [1, 1, 1, 1])
        False
    """
    if dims != 2 or sampling != "fixed" or padding_mode != "zeros" or pad_mode != "zeros":
        return False
    return pads[0] == pads[1] and pads[2] == pads[3]


def fused_max_blur_wanted() -> bool:
    """True while ``torch.compile`` or ``torch.export`` traces (a constant to dynamo: no graph break; torch 2.7 reports
    ``is_exporting()`` as true under ``torch.compile`` too, so the two cannot be told apart, and need not be: the values
    are the same)."""
    return torch.compiler.is_compiling()


def _offsets(kernel: list[int], dilation: list[int]) -> list[tuple[int, int]]:
    """The window's element offsets in row-major order (the order PyTorch's max kernel scans a window in)."""
    return [(dilation[0] * a, dilation[1] * b) for a in range(kernel[0]) for b in range(kernel[1])]


def _dense_size(x: Tensor, kernel: list[int], padding: list[int], dilation: list[int]) -> list[int]:
    return [x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) for i in range(2)]


def _dense_max(x: Tensor, kernel: list[int], padding: list[int], dilation: list[int]) -> tuple[Tensor, Tensor]:
    """``F.max_pool2d(x, kernel, 1, padding, dilation)`` as a maximum of shifted slices; also the padded map."""
    rows, cols = _dense_size(x, kernel, padding, dilation)
    padded = F.pad(x, [padding[1], padding[1], padding[0], padding[0]], value=float("-inf"))
    dense = None
    for a, b in _offsets(kernel, dilation):
        window = padded[:, :, a : a + rows, b : b + cols]
        # torch.maximum propagates NaN, as the pool's kernel does.
        dense = window if dense is None else torch.maximum(dense, window)
    assert dense is not None  # a kernel has at least one element
    return dense, padded


def _first_max(x: Tensor, dense: Tensor, padded: Tensor, kernel: list[int], padding: list[int], dilation: list[int]):
    """For each window, the number (row-major) of the element ``F.max_pool2d``'s backward routes its gradient to."""
    rows, cols = dense.shape[2], dense.shape[3]
    inside = F.pad(x.new_ones(1, 1, x.shape[2], x.shape[3]), [padding[1], padding[1], padding[0], padding[0]]) > 0
    offsets = _offsets(kernel, dilation)
    # The first real element that equals the max: assigned from the last offset back, so the first one stays.
    # A window of -inf only keeps its first real element, as the kernel's starting index does.
    # int32: Inductor's CPU loops ran 3 to 4 times slower with an int8 map next to the float ones (no vector path).
    winner = torch.zeros(dense.shape, dtype=torch.int32, device=x.device)
    for number in range(len(offsets) - 1, -1, -1):
        a, b = offsets[number]
        hit = (padded[:, :, a : a + rows, b : b + cols] == dense) & inside[:, :, a : a + rows, b : b + cols]
        winner = torch.where(hit, number, winner)
    # The kernel replaces its max with every NaN it meets: the last NaN of a window wins.
    for number, (a, b) in enumerate(offsets):
        winner = torch.where(padded[:, :, a : a + rows, b : b + cols].isnan(), number, winner)
    return winner


def _route(grad_dense: Tensor, winner: Tensor, x: Tensor, kernel: list[int], padding: list[int], dilation: list[int]):
    """Each window's gradient given to its winning element: the input's gradient, as a gather over the windows."""
    reach = [dilation[i] * (kernel[i] - 1) for i in range(2)]
    side = [reach[1], reach[1], reach[0], reach[0]]
    grad = F.pad(grad_dense, side)
    winner = F.pad(winner, side, value=-1)
    offsets = _offsets(kernel, dilation)
    total = None
    # Input p takes window p + padding - offset's share. max_pool2d's backward adds the shares in the windows'
    # row-major order, which is from the last offset to the first: the same order here gives the same sums.
    for number in range(len(offsets) - 1, -1, -1):
        a, b = offsets[number]
        top, left = reach[0] + padding[0] - a, reach[1] + padding[1] - b
        rows = slice(top, top + x.shape[2])
        cols = slice(left, left + x.shape[3])
        share = torch.where(winner[:, :, rows, cols] == number, grad[:, :, rows, cols], 0.0)
        total = share if total is None else total + share
    return total


def _blur(dense: Tensor, blur_filter: Tensor, stride: list[int], pads: list[int]) -> Tensor:
    channels = dense.shape[1]
    weight = blur_filter[:1].to(dense.dtype).expand(channels, -1, -1, -1)
    return F.conv2d(dense, weight, stride=stride, padding=[pads[2], pads[0]], groups=channels)


class _MaxBlurSample(torch.autograd.Function):
    """Saves only the input; the backward recomputes the max and its first-maximum routing."""

    @staticmethod
    def forward(ctx, x, blur_filter, kernel, padding, dilation, stride, pads):  # type: ignore[override]
        dense, _ = _dense_max(x, kernel, padding, dilation)
        ctx.save_for_backward(x, blur_filter)
        ctx.geometry = (kernel, padding, dilation, stride, pads)
        return _blur(dense, blur_filter, stride, pads)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, blur_filter = ctx.saved_tensors
        kernel, padding, dilation, stride, pads = ctx.geometry
        dense, padded = _dense_max(x, kernel, padding, dilation)
        channels = x.shape[1]
        weight = blur_filter[:1].to(grad_out.dtype).expand(channels, -1, -1, -1)
        # The conv's own backward, as autograd calls it for the layer's blur: the same kernel, so the same sums.
        grad_dense = torch.ops.aten.convolution_backward(
            grad_out, dense, weight, None, stride, [pads[2], pads[0]], [1, 1], False, [0, 0], channels,
            [True, False, False],
        )[0]  # fmt: skip
        winner = _first_max(x, dense, padded, kernel, padding, dilation)
        return _route(grad_dense, winner, x, kernel, padding, dilation), None, None, None, None, None, None


def max_blur_sample(
    x: Tensor,
    blur_filter: Tensor,
    kernel: list[int],
    padding: list[int],
    dilation: list[int],
    stride: list[int],
    pads: list[int],
) -> Tensor:
    """``blur_subsample(F.max_pool2d(x, kernel, 1, padding, dilation), blur_filter, stride, pads, 'zeros')`` without
    the stride-1 max's indices, and without keeping the max for the backward (see the module's docstring).

    ``pads`` must be symmetric (:func:`fused_max_blur_applies`).

    Example:
        >>> x = torch.relu(torch.randn(1, 2, 6, 6))
        >>> taps = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        >>> fast = max_blur_sample(x, taps[None, None], [3, 3], [1, 1], [1, 1], [2, 2], [1, 1, 1, 1])
        >>> plain = F.conv2d(F.max_pool2d(x, 3, 1, 1), taps.expand(2, 1, 3, 3), stride=2, padding=1, groups=2)
        >>> torch.equal(fast, plain)
        True
    """
    return _MaxBlurSample.apply(x, blur_filter, kernel, padding, dilation, stride, pads)
