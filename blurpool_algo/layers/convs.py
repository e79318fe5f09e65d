"""Convolutions whose subsampling is anti-aliased: :class:`BlurConv2d` (blur at the strided conv) and
:class:`BlurInputConv2d` (a blur-subsample in front of a conv), and :func:`conv_copy`, which rebuilds a conv around the
same Parameter objects.

The layers' code lives in :class:`BlurConvNd` and :class:`BlurInputConvNd`, written for either dimension: the 2-D
classes put them on ``nn.Conv2d``, the 1-D ones (:mod:`~blurpool_algo.layers.oned`) on ``nn.Conv1d``.
"""

from __future__ import annotations

from typing import Any, Self, TypeVar

import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from blurpool_algo.checks import check_bool
from blurpool_algo.filters import binomial_filter
from blurpool_algo.layers.blur import (
    OptionalFilterOnLoad,
    blur_sample,
    blur_subsample,
    check_stride,
    sampling_repr,
    setup_blur,
)
from blurpool_algo.layers.sampling import choose_phase, conv_at_phase, select_phase

__all__ = ["BlurConv2d", "BlurConvNd", "BlurInputConv2d", "BlurInputConvNd", "conv_copy"]

# torch.fx.wrap keeps a function out of a symbolic trace by its name in the calling module's globals: this module
# calls blur_subsample under its own name, so it is registered here too.
torch.fx.wrap("blur_subsample")
torch.fx.wrap("blur_sample")
torch.fx.wrap("choose_phase")
torch.fx.wrap("conv_at_phase")
torch.fx.wrap("select_phase")

_Conv = TypeVar("_Conv", bound=nn.modules.conv._ConvNd)


def conv_copy(
    conv: nn.Conv2d | nn.Conv1d,
    cls: type[_Conv] | None = None,
    *,
    stride: Any = None,
    padding_mode: str | None = None,
    **options: Any,
) -> _Conv:
    """A new ``cls`` (by default the plain conv of ``conv``'s dimension) with ``conv``'s hyperparameters and
    ``options``, holding ``conv``'s own Parameter objects.

    ``stride`` replaces the conv's stride when given (the paper's placement runs a strided conv at stride 1), and
    ``padding_mode`` its padding mode (``circular_padding`` makes every conv pad circularly). The new
    module is built on the meta device (no weights initialised only to be dropped), then takes ``conv``'s ``weight``
    and ``bias``, its training mode and, for a blur layer, a real filter in the weight's dtype and device.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        >>> unstrided = conv_copy(conv, stride=1)
        >>> unstrided.stride, unstrided.weight is conv.weight
        ((1, 1), True)
    """
    if cls is None:
        cls = nn.Conv1d if isinstance(conv, nn.Conv1d) else nn.Conv2d  # type: ignore[assignment]
    new = cls(  # type: ignore[misc]
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride if stride is None else stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, padding_mode or conv.padding_mode, device="meta", **options,
    )  # fmt: skip
    new.weight = conv.weight
    new.bias = conv.bias
    if isinstance(new, OptionalFilterOnLoad):
        blur_filter = binomial_filter(
            new.filter_size, new.blur_dims, dtype=conv.weight.dtype, device=conv.weight.device
        )
        new.blur_filter = blur_filter.expand_as(new.blur_filter).contiguous()
    new.train(conv.training)
    return new


class _BlurringConv(OptionalFilterOnLoad):
    """A conv with a blur, put in front of ``nn.Conv2d`` or ``nn.Conv1d``: the conv's arguments, then keyword-only
    ``filter_size``, ``pad_mode``, ``sampling`` and the options the subclass's :meth:`_setup` takes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        sampling: str = "fixed",
        **blur_options: Any,
    ) -> None:
        check_stride(stride, dims=self.blur_dims)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
        setup_blur(self, self._setup(**blur_options), filter_size, pad_mode, device, dtype, sampling)

    def _setup(self, **blur_options: Any) -> int:
        """Takes the subclass's own blur options; returns how many channels the blur filters."""
        raise NotImplementedError


class BlurConvNd(_BlurringConv):
    """The code of :class:`BlurConv2d` and :class:`~blurpool_algo.layers.oned.BlurConv1d` (see :class:`BlurConv2d`)."""

    def _setup(self, *, blur_first: bool = True) -> int:  # type: ignore[override]
        self.blur_first = check_bool("blur_first", blur_first)
        self.blur_stride = [int(s) for s in self.stride]
        dims = len(self.blur_stride)
        padding = self.padding
        # The conv's padding as ints (a strided conv's padding is never 'same'), for the conv at a chosen phase.
        self.conv_padding = [0] * dims if isinstance(padding, str) else [int(p) for p in padding]
        # An unpadded 1x1 conv ("pointwise") can take its input already blurred and subsampled: see forward.
        self.pointwise = set(self.kernel_size) == {1} and not any(self.conv_padding)
        # The conv at stride 1 (blur_first=False), as geometry lists; the conv's own padding where F.pad must do it
        # (a padding_mode other than zeros, or 'same', which may pad one more sample after than before).
        pads: list[int] = self._reversed_padding_repeated_twice
        self.unit = [1] * dims
        self.dense_dilation = [int(d) for d in self.dilation]
        self.pad_first = (self.padding_mode != "zeros" or padding == "same") and max(pads) > 0
        self.dense_padding = [0] * dims if self.pad_first else self.conv_padding
        self.dense_pad_mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return self.in_channels if self.blur_first else self.out_channels

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d | nn.Conv1d,
        *,
        blur_first: bool = True,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        sampling: str = "fixed",
        padding_mode: str | None = None,
    ) -> Self:
        """Builds an anti-aliased copy of ``conv`` that shares its ``weight`` and ``bias`` Parameter objects.

        Hyperparameters (padding_mode included), training mode and requires_grad carry over; the filter buffer takes
        the weight's dtype and device; ``padding_mode`` replaces the conv's when given.
        """
        return conv_copy(conv, cls, blur_first=blur_first, filter_size=filter_size, pad_mode=pad_mode,
                         sampling=sampling, padding_mode=padding_mode)  # type: ignore[type-var]  # fmt: skip

    def _conv_at_stride_one(self, x: Tensor) -> Tensor:
        if self.pad_first:
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.dense_pad_mode)
        # Lists for stride, padding and dilation: FX static quantization's conv prepack wants them so.
        if len(self.unit) == 1:
            return F.conv1d(x, self.weight, self.bias, self.unit, self.dense_padding, self.dense_dilation, self.groups)
        return F.conv2d(x, self.weight, self.bias, self.unit, self.dense_padding, self.dense_dilation, self.groups)

    def forward(self, input: Tensor) -> Tensor:
        if self.filter_size == 1 and self.sampling == "fixed":
            return self._conv_forward(input, self.weight, self.bias)
        if self.pointwise and (self.blur_first or self.bias is None or self.pad_mode != "zeros"):
            # A pointwise conv reads only the samples its stride lands on, so blurring at its stride computes just
            # those (a quarter of the blur at stride 2) and the conv runs at stride 1 on them. It also commutes with
            # the blur (both linear; the blur treats every channel alike), so blur_first=False gets the same function
            # without the stride**2 larger conv. A bias commutes too unless zero padding dims it near the border.
            blurred = blur_sample(
                input, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling, True
            )
            return self._conv_at_stride_one(blurred)
        if self.blur_first:
            blurred = blur_subsample(input, self.blur_filter, self.unit, self.blur_pads, self.pad_mode)
            if self.sampling == "fixed":
                return self._conv_forward(blurred, self.weight, self.bias)
            phase = choose_phase(blurred, self.blur_stride, self.pad_mode)
            return conv_at_phase(
                blurred, phase, self.weight, self.bias, self.blur_stride, self.conv_padding,
                self.dense_dilation, self.groups, self.padding_mode,
            )  # fmt: skip
        dense = self._conv_at_stride_one(input)
        if self.sampling == "fixed":
            blurred = blur_subsample(dense, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode)
            # A view of the blur's output: an exported graph then has no conv right before the BatchNorm that follows
            # this layer in a conv -> BN run, which PT2E's prepare_pt2e would try to fold into the blur's filter (a
            # buffer) and fail. Free in eager; compile and Inductor drop it.
            return blurred.view_as(blurred)
        # The phase of the blurred input, as a pointwise shortcut reading the same input chooses it (see BlurConv2d).
        blurred_input = blur_subsample(input, self.blur_filter, self.unit, self.blur_pads, self.pad_mode, True)
        phase = choose_phase(blurred_input, self.blur_stride, self.pad_mode)
        dense = blur_subsample(dense, self.blur_filter, self.unit, self.blur_pads, self.pad_mode)
        return select_phase(dense, phase, self.blur_stride, self.pad_mode)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, blur_first={self.blur_first}, filter_size={self.filter_size}, "
            f"pad_mode={self.pad_mode!r}{sampling_repr(self.sampling)}"
        )


class BlurConv2d(BlurConvNd, nn.Conv2d):
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
        sampling: ``'fixed'`` or ``'adaptive'`` (see above).

    ``sampling='adaptive'`` (APS) keeps, for each sample, the polyphase component of largest l2 norm instead of the
    fixed grid. The phase is chosen on the *blurred input* in both orders, so a ResNet block's strided conv and its
    strided 1x1 shortcut, which read the same tensor, choose the same phase and stay aligned. With ``blur_first=True``
    the strided conv then runs at its stride on the input cropped from that phase on
    (:func:`~blurpool_algo.layers.sampling.conv_at_phase`), never at stride 1; with ``blur_first=False`` the conv runs
    at stride 1, is blurred, and that phase is kept.

    Use :meth:`from_conv` to anti-alias an existing conv while keeping its parameters.
    """


class BlurInputConvNd(_BlurringConv):
    """The code of :class:`BlurInputConv2d` and :class:`~blurpool_algo.layers.oned.BlurInputConv1d`."""

    def _setup(self, *, blur_stride: int | tuple[int, ...] = 2) -> int:  # type: ignore[override]
        self.blur_stride = list(check_stride(blur_stride, "blur_stride", self.blur_dims))
        return self.in_channels

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d | nn.Conv1d,
        *,
        blur_stride: int | tuple[int, ...] = 2,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        sampling: str = "fixed",
        padding_mode: str | None = None,
    ) -> Self:
        """Builds a copy of ``conv`` that blur-subsamples its input first, sharing ``conv``'s Parameter objects."""
        return conv_copy(conv, cls, blur_stride=blur_stride, filter_size=filter_size, pad_mode=pad_mode,
                         sampling=sampling, padding_mode=padding_mode)  # type: ignore[type-var]  # fmt: skip

    def forward(self, input: Tensor) -> Tensor:
        blurred = blur_sample(input, self.blur_filter, self.blur_stride, self.blur_pads, self.pad_mode, self.sampling)
        return self._conv_forward(blurred, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, blur_stride={tuple(self.blur_stride)}, filter_size={self.filter_size}, "
            f"pad_mode={self.pad_mode!r}{sampling_repr(self.sampling)}"
        )


class BlurInputConv2d(BlurInputConvNd, nn.Conv2d):
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
        sampling: ``'fixed'`` or ``'adaptive'`` (the blur at stride 1, then each sample's polyphase component of
            largest l2 norm: APS).
    """
