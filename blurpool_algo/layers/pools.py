"""Pools whose subsampling is anti-aliased: :class:`BlurMaxPool2d` and :class:`BlurAvgPool2d` pool at stride 1, then
blur-subsample, with the output size of the pool they replace for every kernel, stride, padding and ``ceil_mode``.

Their code lives in :class:`BlurMaxPoolNd` and :class:`BlurAvgPoolNd`, written for either dimension: the 2-D classes
put them on ``nn.MaxPool2d`` / ``nn.AvgPool2d``, the 1-D ones (:mod:`~blurpool_algo.layers.oned`) on the 1-D pools.
"""

from __future__ import annotations

from typing import Any, Self

import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from blurpool_algo.checks import check_choice, fail
from blurpool_algo.layers.blur import OptionalFilterOnLoad, blur_sample, check_stride, sampling_repr, setup_blur
from blurpool_algo.layers.maxblur import fused_max_blur_applies, fused_max_blur_wanted, max_blur_sample
from blurpool_algo.layers.sampling import pad_map

__all__ = ["POOL_PADDING_MODES", "BlurAvgPool2d", "BlurAvgPoolNd", "BlurMaxPool2d", "BlurMaxPoolNd"]

# torch.fx.wrap keeps a function out of a symbolic trace by its name in the calling module's globals: this module
# calls blur_subsample under its own name, so it is registered here too.
torch.fx.wrap("blur_sample")
torch.fx.wrap("pad_map")

#: How a pool pads: ``'zeros'`` is the pool's own padding (-inf for a max, zeros for an average), ``'circular'`` wraps
#: the map around (what ``circular_padding`` asks of every layer).
POOL_PADDING_MODES: tuple[str, ...] = ("zeros", "circular")


def _setup_pool(
    pool: nn.Module,
    filter_size: int,
    pad_mode: str,
    device: Any,
    dtype: Any,
    sampling: str,
    padding_mode: str,
) -> None:
    """A pool's blur (filter, stride), ``padding_mode``, its geometry as lists of ints, the ceil_mode extension and its
    circular padding in ``F.pad`` order (the last axis first).

    Circular padding wraps ``padding`` samples around before each side and ``dilation * (kernel - 1) - padding``
    after it, so the stride-1 pool keeps the map's size: a periodic map stays periodic, whatever the kernel (an
    unpadded 2x2 average included), which is what exact invariance to circular shifts needs. Only an even kernel
    padded by half its size (``MaxPool2d(2, 2, 1)``) has windows past that: there ``padding`` samples wrap around
    after too (one more window than the map's size), so the output keeps the plain pool's size.
    """
    dims = pool.blur_dims
    pool.blur_stride = list(check_stride(pool.stride, dims=dims))
    setup_blur(pool, 1, filter_size, pad_mode, device, dtype, sampling)
    pool.padding_mode = check_choice("padding_mode", padding_mode, POOL_PADDING_MODES)
    as_list = _ntuple(dims)
    kernel, stride, padding, dilation = (
        [int(v) for v in as_list(value)]
        for value in (pool.kernel_size, pool.stride, pool.padding, getattr(pool, "dilation", 1))
    )
    pool.geometry = [kernel, stride, padding, dilation]
    pool.unit, pool.no_padding = [1] * dims, [0] * dims
    reach = [dilation[i] * (kernel[i] - 1) for i in range(dims)]
    # ceil_mode keeps last windows that run past the input's end, as long as they start inside the input or its left
    # padding: min(stride - 1, reach - padding) more windows per axis than floor mode. Extending the input by that
    # many samples gives the stride-1 pool exactly those partial windows (the circular pool wraps them around).
    extension = [max(0, min(stride[i] - 1, reach[i] - padding[i])) if pool.ceil_mode else 0 for i in range(dims)]
    axes = range(dims - 1, -1, -1)
    pool.ceil_extension = [amount for i in axes for amount in (0, extension[i])]
    after = [max(reach[i] - padding[i], padding[i]) + extension[i] for i in range(dims)]
    pool.pool_pads = [amount for i in axes for amount in (padding[i], after[i])]
    # The stride-1 pool's own padding: none where the map was wrapped around first.
    pool.dense_padding = pool.no_padding if padding_mode == "circular" else padding
    pool.plain = pool.filter_size == 1 and pool.sampling == "fixed" and padding_mode == "zeros"


def _pooled_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """The output length of a plain pool over ``size`` samples (PyTorch's formula, ceil_mode's rule included)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1  # the last window would start in the right padding
    return out


@torch.fx.wrap
def _cut_to_pool(out: Tensor, input: Tensor, geometry: list[list[int]], ceil_mode: bool) -> Tensor:
    """A circular pool's blur-subsampled output (``ceil(side / stride)``), cut to the plain pool's output size for
    ``input`` (equal to it wherever the map's sides are multiples of the stride)."""
    kernel, stride, padding, dilation = geometry[0], geometry[1], geometry[2], geometry[3]
    sizes = [
        _pooled_size(input.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode)
        for i in range(len(kernel))
    ]
    # narrow, not out[:, :, :h, :w]: a full slice of the batch axis makes torch.export guard a dynamic batch against
    # int64's largest value, which an unbounded torch.export.Dim refuses.
    for axis, size in enumerate(sizes):
        out = out.narrow(2 + axis, 0, size)
    return out


class _BlurringPool(OptionalFilterOnLoad):
    """The forward both pools share: the pool at stride 1 (:meth:`_pool`), then blur-subsample; ``padding_mode``
    ``'circular'`` wraps the map around first, ``ceil_mode`` extends it (:meth:`_extend`)."""

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (alone in its if, TorchScript skips the block)
            # TorchScript never compiles this block; under torch.compile a training max pool takes the stencil that
            # keeps no stride-1 max and no indices for the backward (layers/maxblur.py), where it computes the same
            # values. Not in eval mode: there is no backward to save for, and torch 2.7 reports torch.export as
            # compiling, whose export_for_training (PT2E quantization) cannot trace the stencil's autograd.Function.
            if getattr(self, "fused", False) and self.training and fused_max_blur_wanted():
                return self._fused(input)
        if self.plain:
            return self._pool(input, self.geometry[1], self.geometry[2], self.ceil_mode)
        if self.padding_mode == "circular":
            dense = self._pool(pad_map(input, self.pool_pads, "circular"), self.unit, self.no_padding, False)
            out = blur_sample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling)
            return _cut_to_pool(out, input, self.geometry, self.ceil_mode)
        if self.ceil_mode:
            input = self._extend(input)
        dense = self._pool(input, self.unit, self.dense_padding, False)
        return blur_sample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling)

    def _pool(self, x: Tensor, stride: list[int], padding: list[int], ceil_mode: bool) -> Tensor:
        raise NotImplementedError

    def _fused(self, input: Tensor) -> Tensor:
        raise NotImplementedError

    def _extend(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        circular = ", padding_mode='circular'" if self.padding_mode == "circular" else ""
        blur = f"filter_size={self.filter_size}, pad_mode={self.pad_mode!r}{sampling_repr(self.sampling)}{circular}"
        return f"{super().extra_repr()}, {blur}"


class BlurMaxPoolNd(_BlurringPool):
    """The code of :class:`BlurMaxPool2d` and :class:`~blurpool_algo.layers.oned.BlurMaxPool1d`."""

    def __init__(
        self,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] | None = None,
        padding: int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
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
        self.fused = not self.plain and fused_max_blur_applies(
            self.blur_dims, self.sampling, self.padding_mode, self.pad_mode, self.blur_pads
        )

    @classmethod
    def from_maxpool(
        cls,
        pool: nn.MaxPool2d | nn.MaxPool1d,
        *,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        dtype: Any = None,
        device: Any = None,
        sampling: str = "fixed",
        padding_mode: str = "zeros",
    ) -> Self:
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

    def _pool(self, x: Tensor, stride: list[int], padding: list[int], ceil_mode: bool) -> Tensor:
        kernel, dilation = self.geometry[0], self.geometry[3]
        if len(kernel) == 1:
            return F.max_pool1d(x, kernel, stride, padding, dilation, ceil_mode)
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)

    @torch.jit.unused
    def _fused(self, input: Tensor) -> Tensor:
        x = self._extend(input) if self.ceil_mode else input
        kernel, padding, dilation = self.geometry[0], self.geometry[2], self.geometry[3]
        return max_blur_sample(x, self.blur_filter, kernel, padding, dilation, self.blur_stride, self.blur_pads)

    def _extend(self, x: Tensor) -> Tensor:
        # -inf never wins a max: the extended windows are exactly ceil_mode's partial windows.
        return F.pad(x, self.ceil_extension, value=float("-inf"))


class BlurMaxPool2d(BlurMaxPoolNd, nn.MaxPool2d):
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


class BlurAvgPoolNd(_BlurringPool):
    """The code of :class:`BlurAvgPool2d` and :class:`~blurpool_algo.layers.oned.BlurAvgPool1d` (which has no
    ``divisor_override``, as ``nn.AvgPool1d`` has none)."""

    def __init__(
        self,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] | None = None,
        padding: int | tuple[int, ...] = 0,
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
        if self.blur_dims == 1 and divisor_override is not None:
            raise fail("divisor_override", "None (nn.AvgPool1d has none)", divisor_override)
        extra = (divisor_override,) if self.blur_dims == 2 else ()
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, *extra)
        self.divisor_override = divisor_override
        _setup_pool(self, filter_size, pad_mode, device, dtype, sampling, padding_mode)
        self.fused = False  # an average is linear: the stride-1 pool has no indices to save

    @classmethod
    def from_avgpool(
        cls,
        pool: nn.AvgPool2d | nn.AvgPool1d,
        *,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        dtype: Any = None,
        device: Any = None,
        sampling: str = "fixed",
        padding_mode: str = "zeros",
    ) -> Self:
        """Builds the anti-aliased version of ``pool``."""
        new = cls(
            pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
            getattr(pool, "divisor_override", None), filter_size=filter_size, pad_mode=pad_mode, device=device,
            dtype=dtype, sampling=sampling, padding_mode=padding_mode,
        )  # fmt: skip
        new.train(pool.training)
        return new

    def _pool(self, x: Tensor, stride: list[int], padding: list[int], ceil_mode: bool) -> Tensor:
        kernel = self.geometry[0]
        if len(kernel) == 1:
            return F.avg_pool1d(x, kernel, stride, padding, ceil_mode, self.count_include_pad)
        return F.avg_pool2d(x, kernel, stride, padding, ceil_mode, self.count_include_pad, self.divisor_override)

    def _extend(self, x: Tensor) -> Tensor:
        # ceil_mode's partial windows average only what they cover; edge values stand in for the missing part.
        return F.pad(x, self.ceil_extension, mode="replicate")


class BlurAvgPool2d(BlurAvgPoolNd, nn.AvgPool2d):
    """A :class:`torch.nn.AvgPool2d` whose subsampling is anti-aliased: average at stride 1, then blur-subsample.

    The output size equals the plain pool's for every kernel, stride, padding and ``ceil_mode``; ``count_include_pad``
    and ``divisor_override`` keep their meaning for the stride-1 average.

    Args:
        kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override: as for
            :class:`torch.nn.AvgPool2d`.
        filter_size, pad_mode, device, dtype, sampling, padding_mode: as for :class:`BlurMaxPool2d` (``filter_size=1``
            computes exactly the plain pool).
    """
