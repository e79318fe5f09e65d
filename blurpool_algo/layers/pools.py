"""Pools whose subsampling is anti-aliased: :class:`BlurMaxPool2d` and :class:`BlurAvgPool2d` pool at stride 1, then
blur-subsample, with the output size of the pool they replace for every kernel, stride, padding and ``ceil_mode``.
"""

from __future__ import annotations

from typing import Any

import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from blurpool_algo.checks import check_choice, fail
from blurpool_algo.layers.blur import OptionalFilterOnLoad, blur_sample, check_stride, sampling_repr, setup_blur
from blurpool_algo.layers.sampling import pad_map

__all__ = ["POOL_PADDING_MODES", "BlurAvgPool2d", "BlurMaxPool2d"]

# torch.fx.wrap keeps a function out of a symbolic trace by its name in the calling module's globals: this module
# calls blur_subsample under its own name, so it is registered here too.
torch.fx.wrap("blur_sample")
torch.fx.wrap("pad_map")

#: How a pool pads: ``'zeros'`` is the pool's own padding (-inf for a max, zeros for an average), ``'circular'`` wraps
#: the map around (what ``circular_padding`` asks of every layer).
POOL_PADDING_MODES: tuple[str, ...] = ("zeros", "circular")


def _setup_pool(
    pool: nn.MaxPool2d | nn.AvgPool2d,
    filter_size: int,
    pad_mode: str,
    device: Any,
    dtype: Any,
    sampling: str,
    padding_mode: str,
) -> None:
    """A pool's blur (filter, stride, ceil_mode extension), ``padding_mode``, its geometry as lists of ints, and its
    circular padding in ``F.pad`` order.

    Circular padding wraps ``padding`` samples around before each side and ``dilation * (kernel - 1) - padding``
    after it, so the stride-1 pool keeps the map's size: a periodic map stays periodic, whatever the kernel (an
    unpadded 2x2 average included), which is what exact invariance to circular shifts needs.
    """
    pool.blur_stride = list(check_stride(pool.stride))
    pool.ceil_extension = _ceil_mode_extension(pool)
    setup_blur(pool, 1, filter_size, pad_mode, device, dtype, sampling)
    pool.padding_mode = check_choice("padding_mode", padding_mode, POOL_PADDING_MODES)
    kernel, stride, padding = (list(_pair(v)) for v in (pool.kernel_size, pool.stride, pool.padding))
    dilation = list(_pair(getattr(pool, "dilation", 1)))
    pool.geometry = [kernel, stride, padding, dilation]
    reach = [dilation[i] * (kernel[i] - 1) for i in range(2)]
    # ceil_mode's extra windows read past the end: wrap that many more samples around there (the cut below keeps them).
    extension = _ceil_mode_extension(pool)
    pool.pool_pads = [
        padding[1],
        reach[1] - padding[1] + extension[1],
        padding[0],
        reach[0] - padding[0] + extension[3],
    ]
    # The stride-1 pool's own padding: none where the map was wrapped around first.
    pool.dense_padding = [0, 0] if padding_mode == "circular" else padding
    pool.plain = pool.filter_size == 1 and pool.sampling == "fixed" and padding_mode == "zeros"


def _pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """The output length of a plain pool over ``size`` samples (PyTorch's formula, ceil_mode's rule included)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window would start in the right padding
    return out


@torch.fx.wrap
def _cut_to_pool(out: Tensor, size: list[int], geometry: list[list[int]], ceil_mode: bool) -> Tensor:
    """A circular pool's blur-subsampled output (``ceil(side / stride)``), cut to the plain pool's output size for an
    input of ``size`` (equal to it wherever the map's sides are multiples of the stride)."""
    kernel, stride, padding, dilation = geometry[0], geometry[1], geometry[2], geometry[3]
    rows = _pooled_size(size[0], kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    cols = _pooled_size(size[1], kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    return out[:, :, :rows, :cols]


def _pool_repr(pool: nn.MaxPool2d | nn.AvgPool2d) -> str:
    circular = ", padding_mode='circular'" if pool.padding_mode == "circular" else ""
    return f"filter_size={pool.filter_size}, pad_mode={pool.pad_mode!r}{sampling_repr(pool.sampling)}{circular}"


def _ceil_mode_extension(pool: nn.MaxPool2d | nn.AvgPool2d) -> list[int]:
    """``F.pad`` amounts that extend a pool's input so that its stride-1 output, subsampled, has ceil_mode's size.

    With ``ceil_mode=True`` PyTorch keeps last windows that run past the input's end, as long as they start inside the
    input or its left padding: ``min(stride - 1, dilation * (kernel - 1) - padding)`` more windows per axis than
    floor mode. Extending the input by that many samples gives the stride-1 pool exactly those partial windows.
    """
    if not pool.ceil_mode:
        return [0, 0, 0, 0]
    dilation = getattr(pool, "dilation", 1)
    kernel, stride, padding, dilation = (_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, dilation))
    rows, cols = (max(0, min(stride[i] - 1, dilation[i] * (kernel[i] - 1) - padding[i])) for i in range(2))
    return [0, cols, 0, rows]


class BlurMaxPool2d(OptionalFilterOnLoad, nn.MaxPool2d):
    """A :class:`torch.nn.MaxPool2d` whose subsampling is anti-aliased: max at stride 1, then blur-subsample.

    The output size equals the plain pool's for every kernel, stride, padding, dilation and ``ceil_mode``.
    ``return_indices=True`` is not supported (indices of a blurred max have no meaning).

    Args:
        kernel_size, stride, padding, dilation, ceil_mode: as for :class:`torch.nn.MaxPool2d`.
        filter_size: binomial filter size, >= 1; 1 computes exactly the plain pool.
        pad_mode: padding of the blur: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: device of the filter buffer.
        dtype: dtype of the filter buffer.
        sampling: ``'fixed'`` or ``'adaptive'`` (after the blur, each sample's polyphase component of largest l2
            norm: APS).
        padding_mode: the pool's own padding: ``'zeros'`` (as the plain pool pads) or ``'circular'`` (the map
            wrapped around, then the pool without padding).

    The channel count is unknown to a pool, so the one ``(1, 1, k, k)`` filter is expanded (a view, no copy) to the
    input's channels in forward.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        ceil_mode: bool = False,
        *,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        sampling: str = "fixed",
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(kernel_size, stride, padding, dilation, return_indices=False, ceil_mode=ceil_mode)
        _setup_pool(self, filter_size, pad_mode, device, dtype, sampling, padding_mode)

    @classmethod
    def from_maxpool(
        cls,
        pool: nn.MaxPool2d,
        *,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        dtype: Any = None,
        device: Any = None,
        sampling: str = "fixed",
        padding_mode: str = "zeros",
    ) -> BlurMaxPool2d:
        """Builds the anti-aliased version of ``pool`` (which must not use ``return_indices``)."""
        if pool.return_indices:
            raise fail("pool.return_indices", "False (the indices of a blurred max have no meaning)", True)
        new = cls(
            pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
            filter_size=filter_size, pad_mode=pad_mode, device=device, dtype=dtype, sampling=sampling,
            padding_mode=padding_mode,
        )  # fmt: skip
        new.train(pool.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        if self.plain:
            return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        if self.padding_mode == "circular":
            size = [input.shape[-2], input.shape[-1]]
            dense = F.max_pool2d(pad_map(input, self.pool_pads, "circular"), self.kernel_size, 1, 0, self.dilation)
            out = blur_sample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling)
            return _cut_to_pool(out, size, self.geometry, self.ceil_mode)
        if self.ceil_mode:
            # -inf never wins a max: the extended windows are exactly ceil_mode's partial windows.
            input = F.pad(input, self.ceil_extension, value=float("-inf"))
        dense = F.max_pool2d(input, self.kernel_size, 1, self.dense_padding, self.dilation)
        return blur_sample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_pool_repr(self)}"


class BlurAvgPool2d(OptionalFilterOnLoad, nn.AvgPool2d):
    """A :class:`torch.nn.AvgPool2d` whose subsampling is anti-aliased: average at stride 1, then blur-subsample.

    The output size equals the plain pool's for every kernel, stride, padding and ``ceil_mode``; ``count_include_pad``
    and ``divisor_override`` keep their meaning for the stride-1 average.

    Args:
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override: as for
            :class:`torch.nn.AvgPool2d`.
        filter_size: binomial filter size, >= 1; 1 computes exactly the plain pool.
        pad_mode: padding of the blur: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: device of the filter buffer.
        dtype: dtype of the filter buffer.
        sampling: ``'fixed'`` or ``'adaptive'`` (after the blur, each sample's polyphase component of largest l2
            norm: APS).
        padding_mode: the pool's own padding: ``'zeros'`` (as the plain pool pads) or ``'circular'`` (the map
            wrapped around, then the pool without padding).
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        divisor_override: int | None = None,
        *,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        sampling: str = "fixed",
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        _setup_pool(self, filter_size, pad_mode, device, dtype, sampling, padding_mode)

    @classmethod
    def from_avgpool(
        cls,
        pool: nn.AvgPool2d,
        *,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        dtype: Any = None,
        device: Any = None,
        sampling: str = "fixed",
        padding_mode: str = "zeros",
    ) -> BlurAvgPool2d:
        """Builds the anti-aliased version of ``pool``."""
        new = cls(
            pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
            pool.divisor_override, filter_size=filter_size, pad_mode=pad_mode, device=device, dtype=dtype,
            sampling=sampling, padding_mode=padding_mode,
        )  # fmt: skip
        new.train(pool.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        if self.plain:
            return F.avg_pool2d(
                input, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override,
            )  # fmt: skip
        if self.padding_mode == "circular":
            dense = F.avg_pool2d(
                pad_map(input, self.pool_pads, "circular"), self.kernel_size, 1, 0, False, True, self.divisor_override
            )
            out = blur_sample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling)
            return _cut_to_pool(out, [input.shape[-2], input.shape[-1]], self.geometry, self.ceil_mode)
        if self.ceil_mode:
            # ceil_mode's partial windows average only what they cover; edge values stand in for the missing part.
            input = F.pad(input, self.ceil_extension, mode="replicate")
        dense = F.avg_pool2d(
            input, self.kernel_size, 1, self.dense_padding, False, self.count_include_pad, self.divisor_override
        )
        return blur_sample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {_pool_repr(self)}"
