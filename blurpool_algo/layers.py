"""Anti-aliased downsampling layers: blur with a binomial low-pass filter, then subsample.

Pure PyTorch (no Composer import), so the layers work in any model. Every layer here:

* gives exactly the output shape of the layer it replaces, for every kernel, stride, padding, dilation, ceil_mode and
  map size (1 px included);
* keeps the original layer's parameters as the *same* ``Parameter`` objects at the same state-dict keys
  (:class:`BlurConv2d` subclasses :class:`torch.nn.Conv2d`, :class:`BlurMaxPool2d` subclasses
  :class:`torch.nn.MaxPool2d`), so optimizers stay valid and baseline checkpoints load;
* holds its filter in a buffer that is saved in state dicts but may be missing when loading one, so a baseline
  (un-blurred) state dict loads strictly, while a blurred one refuses to load strictly into an un-blurred model;
* has no data-dependent Python control flow in ``forward`` (no ``.item()``, no ``int(tensor)``), so ``torch.compile``
  sees no graph break and ``torch.jit.script``, ``torch.fx`` and ONNX export work;
* with ``filter_size=1`` computes exactly the original layer.

Padding of tiny maps: ``reflect`` padding needs the map to be larger than the pad and ``circular`` at least as large.
Where a map is too small for the requested mode (a 1x1 map, say), the blur pads it with ``replicate`` instead, the
mode that works on any size and agrees with ``reflect`` and ``circular`` on a 1-pixel map; no stride is ever dropped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from blurpool_algo.filters import (
    binomial_filter_2d,
    blur_padding,
    validate_filter_size,
    validate_pad_mode,
)

__all__ = ["BlurAvgPool2d", "BlurConv2d", "BlurInputConv2d", "BlurMaxPool2d", "BlurPool2d", "blur_pool2d"]

FILTER_BUFFER = "blur_filter"


def _validate_stride(stride: Any, name: str = "stride") -> tuple[int, int]:
    pair = _pair(stride)
    if len(pair) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pair):
        raise ValueError(f"{name} must be an int >= 1 or a pair of them, got {stride!r}")
    return pair  # type: ignore[return-value]


def _blur_pads(filter_size: int) -> tuple[int, int, int, int]:
    """The blur's padding in ``F.pad`` order (left, right, top, bottom)."""
    before, after = blur_padding(filter_size)
    return before, after, before, after


def _pad(x: Tensor, pads: list[int], pad_mode: str) -> Tensor:
    """Pads ``x`` for the blur, falling back to ``replicate`` where the map is too small for ``pad_mode``."""
    if max(pads) == 0:
        return x
    if pad_mode == "zeros":
        return F.pad(x, pads)
    height, width = x.shape[-2], x.shape[-1]
    too_small = (
        max(pads[0], pads[1]) >= width or max(pads[2], pads[3]) >= height
        if pad_mode == "reflect"
        else max(pads[0], pads[1]) > width or max(pads[2], pads[3]) > height
    )
    padded = F.pad(x, pads, mode="replicate" if too_small else pad_mode)
    if x.is_contiguous(memory_format=torch.channels_last) and not padded.is_contiguous(
        memory_format=torch.channels_last
    ):
        # Circular padding on CPU returns a contiguous (NCHW) tensor; keep the caller's memory format.
        padded = padded.contiguous(memory_format=torch.channels_last)
    return padded


@torch.fx.wrap
def _blur_subsample(
    x: Tensor, blur_filter: Tensor, stride: list[int], pads: list[int], pad_mode: str, any_channels: bool = False
) -> Tensor:
    """Depthwise blur of ``x`` with ``blur_filter`` (shape ``(1 or C, 1, k, k)``), sampled every ``stride``.

    ``any_channels`` uses the filter's first row for whatever channel count ``x`` has.

    One leaf node for ``torch.fx`` (the filter still enters the graph as a ``get_attr`` of the module's buffer): the
    channel count and the tiny-map padding fallback come from the input's shape, which symbolic tracing cannot feed
    to ``expand``, ``conv2d``'s ``groups`` or an ``if``. ``torch.compile`` and TorchScript see through it.
    """
    channels = x.shape[1]
    if torch.jit.is_tracing():
        # Channel counts are structural constants, and ONNX export (a trace) needs a static kernel shape.
        channels = int(channels)
    if any_channels and blur_filter.shape[0] != channels:
        # The taps are the same for every channel, so any rows serve (a pointwise conv in blur_first=False mode blurs
        # its input with the filter it holds for its output). A dense slice where there are enough rows: oneDNN's
        # depthwise conv is a little slower with a stride-0 filter.
        blur_filter = blur_filter[:channels] if blur_filter.shape[0] > channels else blur_filter[:1]
    # A view, no copy, when dtypes agree; the cast lets a pool (whose filter has no weight to follow) take any dtype.
    weight = blur_filter.to(x.dtype).expand(channels, -1, -1, -1)
    if pad_mode == "zeros" and pads[0] == pads[1] and pads[1] == pads[2] and pads[2] == pads[3]:
        # Symmetric zero padding goes into the conv itself: no padded copy of the map.
        return F.conv2d(x, weight, stride=stride, padding=pads[0], groups=channels)
    return F.conv2d(_pad(x, pads, pad_mode), weight, stride=stride, groups=channels)


def _from_conv(cls: Any, conv: nn.Conv2d, **blur_options: Any) -> Any:
    """Builds ``cls`` with ``conv``'s hyperparameters and ``blur_options``, sharing ``conv``'s Parameter objects.

    The new module is built on the meta device (no weights initialised only to be dropped), then takes ``conv``'s
    ``weight`` and ``bias``, its training mode, and a real filter in the weight's dtype and device.
    """
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        conv.bias is not None, conv.padding_mode, device="meta", **blur_options,
    )  # fmt: skip
    new.weight = conv.weight
    new.bias = conv.bias
    blur_filter = binomial_filter_2d(new.filter_size, dtype=conv.weight.dtype, device=conv.weight.device)
    new.blur_filter = blur_filter.expand(new.blur_filter.shape[0], 1, -1, -1).contiguous()
    new.train(conv.training)
    return new


def _register_filter(module: nn.Module, channels: int, filter_size: int, device: Any, dtype: Any) -> None:
    blur_filter = binomial_filter_2d(filter_size, dtype=dtype or torch.get_default_dtype(), device=device)
    module.register_buffer(FILTER_BUFFER, blur_filter.expand(channels, 1, -1, -1).contiguous(), persistent=True)


class _OptionalFilterOnLoad:
    """Lets a state dict without the filter buffer load strictly (the filter follows from the hyperparameters).

    The buffer is still saved, so a blurred state dict has keys an un-blurred model lacks and a strict load into one
    fails loudly instead of giving a different network.

    Whatever the state dict holds, a load leaves the buffer holding the filter that ``filter_size`` gives, in the
    buffer's dtype and device: a model built on the meta device and materialized with ``to_empty`` has garbage there,
    which a baseline state dict (no filter key) would otherwise keep. A filter the state dict does hold must be that
    same filter (compared in the dtype it was saved in); anything else is reported as a load error, so a corrupted or
    foreign checkpoint cannot swap in another filter.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        key = prefix + FILTER_BUFFER
        if key in missing_keys:
            missing_keys.remove(key)
        buffer = self._buffers[FILTER_BUFFER]  # type: ignore[attr-defined]
        filter_size: int = self.filter_size  # type: ignore[attr-defined]
        stored = state_dict.get(key)
        # A mis-shaped or non-tensor value was reported by the load above; a meta tensor has no values to compare.
        if torch.is_tensor(stored) and stored.shape == buffer.shape and not stored.is_meta:
            expected = binomial_filter_2d(filter_size, dtype=stored.dtype, device=stored.device)
            if not (stored.is_floating_point() and torch.equal(stored, expected.expand_as(stored))):
                errors.append(
                    f"{key} is not the binomial filter of size {filter_size} this layer computes (a corrupted or "
                    "foreign checkpoint?); allowed: that filter, or no such key"
                )
        computed = binomial_filter_2d(filter_size, dtype=buffer.dtype, device=buffer.device).expand_as(buffer)
        with torch.no_grad():
            if local_metadata.get("assign_to_params_buffers", False):
                # load_state_dict(assign=True) made the caller's tensor the buffer: never write into it.
                self._buffers[FILTER_BUFFER] = computed.contiguous()  # type: ignore[attr-defined]
            else:
                buffer.copy_(computed)


def blur_pool2d(
    input: Tensor,
    stride: int | tuple[int, int] = 2,
    filter_size: int = 3,
    pad_mode: str = "zeros",
) -> Tensor:
    """Blurs ``input`` (N, C, H, W) with a binomial filter and subsamples it by ``stride``.

    The functional form of :class:`BlurPool2d`; it builds the filter on each call, so prefer the module in a model.

    Args:
        input: a 4-D tensor.
        stride: subsampling factor, an int or a (rows, cols) pair.
        filter_size: binomial filter size, >= 1 (1 = plain subsampling).
        pad_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Returns:
        A tensor of shape ``(N, C, ceil(H / stride), ceil(W / stride))``.

    Example:
        >>> blur_pool2d(torch.ones(1, 3, 7, 8)).shape
        torch.Size([1, 3, 4, 4])
    """
    stride_pair = _validate_stride(stride)
    validate_filter_size(filter_size)
    validate_pad_mode(pad_mode)
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    blur_filter = binomial_filter_2d(filter_size, dtype=input.dtype, device=input.device)[None, None]
    return _blur_subsample(input, blur_filter, list(stride_pair), list(_blur_pads(filter_size)), pad_mode)


class BlurPool2d(_OptionalFilterOnLoad, nn.Module):
    """Low-pass filters a feature map with a binomial filter, then subsamples it (the paper's ``BlurPool``).

    Output size is ``ceil(H / stride)`` by ``ceil(W / stride)`` for every filter size, even ones included.

    Args:
        channels: number of input channels (the filter is applied to each channel separately).
        stride: subsampling factor, an int or a (rows, cols) pair.
        filter_size: binomial filter size, >= 1. 3 = ``[1, 2, 1]/4`` (Composer's), 4 = ``[1, 3, 3, 1]/8`` (the paper's).
        pad_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: device of the filter buffer.
        dtype: dtype of the filter buffer.

    Example:
        >>> BlurPool2d(16)(torch.randn(2, 16, 9, 9)).shape
        torch.Size([2, 16, 5, 5])
    """

    __constants__ = ["channels", "stride", "filter_size", "pad_mode", "pads"]

    def __init__(
        self,
        channels: int,
        stride: int | tuple[int, int] = 2,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        self.channels = channels
        self.stride = list(_validate_stride(stride))
        self.filter_size = validate_filter_size(filter_size)
        self.pad_mode = validate_pad_mode(pad_mode)
        self.pads = list(_blur_pads(filter_size))
        _register_filter(self, channels, filter_size, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _blur_subsample(x, self.blur_filter, self.stride, self.pads, self.pad_mode)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, stride={tuple(self.stride)}, filter_size={self.filter_size}, pad_mode={self.pad_mode!r}"
        )


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


class BlurConv2d(_OptionalFilterOnLoad, nn.Conv2d):
    """A :class:`torch.nn.Conv2d` whose subsampling is anti-aliased.

    ``blur_first=True`` blurs the input at stride 1, then runs the strided conv (Composer's default, cheapest).
    ``blur_first=False`` runs the conv at stride 1, then blurs and subsamples by the conv's stride (closer to the
    paper, about ``stride**2`` times the conv's compute). ``self.stride`` always holds the original conv's stride, and
    ``weight`` and ``bias`` are ordinary conv parameters at the usual state-dict keys.

    An unpadded 1x1 conv (a ResNet shortcut) is computed as blur at the conv's stride, then the conv at stride 1: in
    either mode that is the same function with a fraction of the work, except for a biased conv under zero padding
    with ``blur_first=False``, which keeps the literal order (the padding dims the blurred bias near the border).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as for :class:`torch.nn.Conv2d`.
        blur_first: where the blur goes (see above).
        filter_size: binomial filter size, >= 1; 1 computes exactly the plain conv.
        pad_mode: padding of the blur: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.

    Use :meth:`from_conv` to anti-alias an existing conv while keeping its parameters.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        blur_first: bool = True,
        filter_size: int = 3,
        pad_mode: str = "zeros",
    ) -> None:
        _validate_stride(stride)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.blur_first = bool(blur_first)
        self.filter_size = validate_filter_size(filter_size)
        self.pad_mode = validate_pad_mode(pad_mode)
        self.blur_stride = [int(s) for s in self.stride]
        self.blur_pads = list(_blur_pads(filter_size))
        # An unpadded 1x1 conv ("pointwise") can take its input already blurred and subsampled: see forward.
        self.pointwise = self.kernel_size == (1, 1) and self.padding in ((0, 0), "valid")
        blurred_channels = in_channels if self.blur_first else out_channels
        _register_filter(self, blurred_channels, filter_size, device, dtype)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, *, blur_first: bool = True, filter_size: int = 3, pad_mode: str = "zeros"
    ) -> BlurConv2d:
        """Builds an anti-aliased copy of ``conv`` that shares its ``weight`` and ``bias`` Parameter objects.

        Hyperparameters (padding_mode included), training mode and requires_grad carry over; the filter buffer takes
        the weight's dtype and device.
        """
        return _from_conv(cls, conv, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode)

    def _conv_at_stride_one(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, self.weight, self.bias, 1, 0, self.dilation, self.groups)
        return F.conv2d(x, self.weight, self.bias, 1, self.padding, self.dilation, self.groups)

    def forward(self, input: Tensor) -> Tensor:
        if self.filter_size == 1:
            return self._conv_forward(input, self.weight, self.bias)
        if self.pointwise and (self.blur_first or self.bias is None or self.pad_mode != "zeros"):
            # A pointwise conv reads only the samples its stride lands on, so blurring at its stride computes just
            # those (a quarter of the blur at stride 2) and the conv runs at stride 1 on them. It also commutes with
            # the blur (both linear; the blur treats every channel alike), so blur_first=False gets the same function
            # without the stride**2 larger conv. A bias commutes too unless zero padding dims it near the border.
            blurred = _blur_subsample(
                input, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, any_channels=True
            )
            return F.conv2d(blurred, self.weight, self.bias, 1, 0, 1, self.groups)
        if self.blur_first:
            blurred = _blur_subsample(input, self.blur_filter, [1, 1], self.blur_pads, self.pad_mode)
            return self._conv_forward(blurred, self.weight, self.bias)
        dense = self._conv_at_stride_one(input)
        return _blur_subsample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, blur_first={self.blur_first}, filter_size={self.filter_size}, "
            f"pad_mode={self.pad_mode!r}"
        )


class BlurInputConv2d(_OptionalFilterOnLoad, nn.Conv2d):
    """A :class:`torch.nn.Conv2d` that first blurs and subsamples its input: a :class:`BlurPool2d` in front of the conv,
    as one module.

    This is how the paper's placement (strided conv -> the conv at stride 1 -> BN -> activation -> blur-subsample) fits
    blocks whose ``forward`` cannot take a new module, such as torchvision's ResNet blocks: the strided conv runs at
    stride 1, and the next conv, after the activation, blurs what it receives by the stride the first one gave up.
    ``weight`` and ``bias`` keep their state-dict keys, so un-blurred checkpoints load.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype:
            as for :class:`torch.nn.Conv2d` (``stride`` is the conv's own, applied after the blur).
        blur_stride: subsampling factor of the blur, an int >= 1 or a pair.
        filter_size: binomial filter size, >= 1; 1 is plain subsampling.
        pad_mode: padding of the blur: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        blur_stride: int | tuple[int, int] = 2,
        filter_size: int = 3,
        pad_mode: str = "zeros",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.blur_stride = list(_validate_stride(blur_stride, "blur_stride"))
        self.filter_size = validate_filter_size(filter_size)
        self.pad_mode = validate_pad_mode(pad_mode)
        self.blur_pads = list(_blur_pads(filter_size))
        _register_filter(self, in_channels, filter_size, device, dtype)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, *, blur_stride: int | tuple[int, int] = 2, filter_size: int = 3, pad_mode: str = "zeros"
    ) -> BlurInputConv2d:
        """Builds a copy of ``conv`` that blur-subsamples its input first, sharing ``conv``'s Parameter objects."""
        return _from_conv(cls, conv, blur_stride=blur_stride, filter_size=filter_size, pad_mode=pad_mode)

    def forward(self, input: Tensor) -> Tensor:
        blurred = _blur_subsample(input, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode)
        return self._conv_forward(blurred, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, blur_stride={tuple(self.blur_stride)}, filter_size={self.filter_size}, "
            f"pad_mode={self.pad_mode!r}"
        )


class BlurMaxPool2d(_OptionalFilterOnLoad, nn.MaxPool2d):
    """A :class:`torch.nn.MaxPool2d` whose subsampling is anti-aliased: max at stride 1, then blur-subsample.

    The output size equals the plain pool's for every kernel, stride, padding, dilation and ``ceil_mode``.
    ``return_indices=True`` is not supported (indices of a blurred max have no meaning).

    Args:
        kernel_size, stride, padding, dilation, ceil_mode: as for :class:`torch.nn.MaxPool2d`.
        filter_size: binomial filter size, >= 1; 1 computes exactly the plain pool.
        pad_mode: padding of the blur: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: device of the filter buffer.
        dtype: dtype of the filter buffer.

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
    ) -> None:
        super().__init__(kernel_size, stride, padding, dilation, return_indices=False, ceil_mode=ceil_mode)
        self.filter_size = validate_filter_size(filter_size)
        self.pad_mode = validate_pad_mode(pad_mode)
        self.blur_stride = list(_validate_stride(self.stride))
        self.blur_pads = list(_blur_pads(filter_size))
        self.ceil_extension = _ceil_mode_extension(self)
        _register_filter(self, 1, filter_size, device, dtype)

    @classmethod
    def from_maxpool(
        cls, pool: nn.MaxPool2d, *, filter_size: int = 3, pad_mode: str = "zeros", dtype: Any = None, device: Any = None
    ) -> BlurMaxPool2d:
        """Builds the anti-aliased version of ``pool`` (which must not use ``return_indices``)."""
        if pool.return_indices:
            raise ValueError("BlurMaxPool2d cannot replace a MaxPool2d with return_indices=True")
        new = cls(
            pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
            filter_size=filter_size, pad_mode=pad_mode, device=device, dtype=dtype,
        )  # fmt: skip
        new.train(pool.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        if self.filter_size == 1:
            return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        if self.ceil_mode:
            # -inf never wins a max: the extended windows are exactly ceil_mode's partial windows.
            input = F.pad(input, self.ceil_extension, value=float("-inf"))
        dense = F.max_pool2d(input, self.kernel_size, 1, self.padding, self.dilation)
        return _blur_subsample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, filter_size={self.filter_size}, pad_mode={self.pad_mode!r}"


class BlurAvgPool2d(_OptionalFilterOnLoad, nn.AvgPool2d):
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
    ) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self.filter_size = validate_filter_size(filter_size)
        self.pad_mode = validate_pad_mode(pad_mode)
        self.blur_stride = list(_validate_stride(self.stride))
        self.blur_pads = list(_blur_pads(filter_size))
        self.ceil_extension = _ceil_mode_extension(self)
        _register_filter(self, 1, filter_size, device, dtype)

    @classmethod
    def from_avgpool(
        cls, pool: nn.AvgPool2d, *, filter_size: int = 3, pad_mode: str = "zeros", dtype: Any = None, device: Any = None
    ) -> BlurAvgPool2d:
        """Builds the anti-aliased version of ``pool``."""
        new = cls(
            pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad,
            pool.divisor_override, filter_size=filter_size, pad_mode=pad_mode, device=device, dtype=dtype,
        )  # fmt: skip
        new.train(pool.training)
        return new

    def forward(self, input: Tensor) -> Tensor:
        if self.filter_size == 1:
            return F.avg_pool2d(
                input, self.kernel_size, self.stride, self.padding, self.ceil_mode, self.count_include_pad,
                self.divisor_override,
            )  # fmt: skip
        if self.ceil_mode:
            # ceil_mode's partial windows average only what they cover; edge values stand in for the missing part.
            input = F.pad(input, self.ceil_extension, mode="replicate")
        dense = F.avg_pool2d(
            input, self.kernel_size, 1, self.padding, False, self.count_include_pad, self.divisor_override
        )
        return _blur_subsample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, filter_size={self.filter_size}, pad_mode={self.pad_mode!r}"
