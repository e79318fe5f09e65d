"""The blur itself: a depthwise binomial filter followed by subsampling, its padding, and the filter buffer every blur
layer holds (:class:`OptionalFilterOnLoad`), with the functional :func:`blur_pool2d` and the module :class:`BlurPool2d`.

Every function here takes 1-D maps ``(N, C, L)`` too, with a stride of one value and two pads: the blur then runs on
the ``(N, C, 1, L)`` view, so the 1-D layers (:mod:`~blurpool_algo.layers.oned`) share this code.

Padding of tiny maps: ``reflect`` padding needs the map to be larger than the pad and ``circular`` at least as large.
Where a map is too small for the requested mode (a 1x1 map, say), the blur pads it with ``replicate`` instead, the
mode that works on any size and agrees with ``reflect`` and ``circular`` on a 1-pixel map; no stride is ever dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from blurpool_algo.checks import check_int, check_int_or_pair, fail
from blurpool_algo.filters import binomial_filter, blur_padding, validate_filter_size, validate_pad_mode
from blurpool_algo.layers.sampling import adaptive_subsample, as_2d, check_sampling, pad_map

__all__ = [
    "FILTER_BUFFER",
    "BlurPool2d",
    "BlurPoolNd",
    "OptionalFilterOnLoad",
    "blur_pool2d",
    "blur_pool_nd",
    "blur_sample",
    "blur_subsample",
    "check_stride",
    "setup_blur",
]

#: The name of the buffer that holds a blur layer's filter (``<module>.blur_filter`` in a state dict).
FILTER_BUFFER = "blur_filter"


def check_stride(stride: Any, name: str = "stride", dims: int = 2) -> tuple[int, ...]:
    """Returns ``stride`` as a (rows, cols) pair of ints >= 1 (``dims=1``: a 1-tuple, from an int or a sequence of
    one), else raises ``ValueError`` naming ``name``.

    Example:
        >>> check_stride(2), check_stride([3], dims=1)
        ((2, 2), (3,))
    """
    if dims == 2:
        return check_int_or_pair(name, stride, minimum=1)
    one = isinstance(stride, Sequence) and not isinstance(stride, str) and len(stride) == 1
    return (check_int(name, stride[0] if one else stride, minimum=1, hint="or a sequence of one"),)


def blur_pads(filter_size: int, dims: int = 2) -> tuple[int, ...]:
    """The blur's padding in ``F.pad`` order: (left, right, top, bottom), or (left, right) for ``dims=1``."""
    before, after = blur_padding(filter_size)
    return (before, after) * dims


@torch.fx.wrap
def blur_subsample(
    x: Tensor, blur_filter: Tensor, stride: list[int], pads: list[int], pad_mode: str, any_channels: bool = False
) -> Tensor:
    """Depthwise blur of ``x`` with ``blur_filter`` (shape ``(1 or C, 1, k, k)``), sampled every ``stride``.

    ``any_channels`` uses the filter's first row for whatever channel count ``x`` has. A 1-D map ``(N, C, L)`` takes
    a ``(1 or C, 1, k)`` filter, a stride of one value and two pads, and is blurred as its ``(N, C, 1, L)`` view.

    One leaf node for ``torch.fx`` (the filter still enters the graph as a ``get_attr`` of the module's buffer): the
    channel count and the tiny-map padding fallback come from the input's shape, which symbolic tracing cannot feed
    to ``expand``, ``conv2d``'s ``groups`` or an ``if``. ``torch.compile`` and TorchScript see through it.
    """
    oned = len(stride) == 1
    if oned:  # the (N, C, 1, L) view of a 1-D map
        x, blur_filter = x.unsqueeze(2), blur_filter.unsqueeze(2)
        stride, pads = as_2d(stride, 1), [pads[0], pads[1], 0, 0]
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
    if pad_mode == "zeros" and pads[0] == pads[1] and pads[2] == pads[3]:
        # Symmetric zero padding goes into the conv itself: no padded copy of the map.
        out = F.conv2d(x, weight, stride=stride, padding=[pads[2], pads[0]], groups=channels)
    else:
        out = F.conv2d(pad_map(x, pads, pad_mode), weight, stride=stride, groups=channels)
    return out.squeeze(2) if oned else out


def blur_sample(
    x: Tensor,
    blur_filter: Tensor,
    stride: list[int],
    pads: list[int],
    pad_mode: str,
    sampling: str = "fixed",
    any_channels: bool = False,
) -> Tensor:
    """:func:`blur_subsample` under ``sampling``: ``'fixed'`` blurs at ``stride``; ``'adaptive'`` blurs at stride 1,
    then keeps each sample's largest-norm polyphase component
    (:func:`~blurpool_algo.layers.sampling.adaptive_subsample`). Same output shape either way."""
    if sampling == "fixed":
        return blur_subsample(x, blur_filter, stride, pads, pad_mode, any_channels)
    blurred = blur_subsample(x, blur_filter, [1 for _ in stride], pads, pad_mode, any_channels)
    return adaptive_subsample(blurred, stride, pad_mode)


def setup_blur(
    module: nn.Module,
    channels: int,
    filter_size: int,
    pad_mode: str,
    device: Any,
    dtype: Any,
    sampling: str = "fixed",
) -> None:
    """Checks and sets a blur layer's ``filter_size``, ``pad_mode``, ``sampling`` and ``blur_pads`` (for its
    ``blur_dims``), and registers its filter."""
    module.filter_size = validate_filter_size(filter_size)
    module.pad_mode = validate_pad_mode(pad_mode)
    module.sampling = check_sampling(sampling)
    module.blur_pads = list(blur_pads(filter_size, module.blur_dims))
    register_filter(module, channels, filter_size, device, dtype)


def register_filter(module: nn.Module, channels: int, filter_size: int, device: Any, dtype: Any) -> None:
    """Gives ``module`` its filter buffer: one row of the size-``filter_size`` binomial filter (of the module's
    ``blur_dims``) per channel, shape ``(channels, 1, k, k)`` or ``(channels, 1, k)``."""
    blur_filter = binomial_filter(
        filter_size, module.blur_dims, dtype=dtype or torch.get_default_dtype(), device=device
    )
    module.register_buffer(
        FILTER_BUFFER, blur_filter.expand(channels, 1, *blur_filter.shape).contiguous(), persistent=True
    )


class OptionalFilterOnLoad:
    """Lets a state dict without the filter buffer load strictly (the filter follows from the hyperparameters).

    The buffer is still saved, so a blurred state dict has keys an un-blurred model lacks and a strict load into one
    fails loudly instead of giving a different network.

    Whatever the state dict holds, a load leaves the buffer holding the filter that ``filter_size`` gives, in the
    buffer's dtype and device: a model built on the meta device and materialized with ``to_empty`` has garbage there,
    which a baseline state dict (no filter key) would otherwise keep. A filter the state dict does hold must be that
    same filter (compared in the dtype it was saved in); anything else is reported as a load error, so a corrupted or
    foreign checkpoint cannot swap in another filter.

    ``blur_dims`` says which filter: the 2-D one (the default), or the 1-D taps for a 1-D layer.
    """

    #: The filter's dimensions: 2 for the 2-D layers, 1 for the 1-D ones.
    blur_dims: int = 2

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
            expected = binomial_filter(filter_size, self.blur_dims, dtype=stored.dtype, device=stored.device)
            if not (stored.is_floating_point() and torch.equal(stored, expected.expand_as(stored))):
                errors.append(
                    f"{key} is not the binomial filter of size {filter_size} this layer computes (a corrupted or "
                    "foreign checkpoint?); allowed: that filter, or no such key"
                )
        computed = binomial_filter(filter_size, self.blur_dims, dtype=buffer.dtype, device=buffer.device).expand_as(
            buffer
        )
        with torch.no_grad():
            if local_metadata.get("assign_to_params_buffers", False):
                if computed.is_meta:
                    # A meta-built layer and no filter key: nothing says where the filter lives, and a meta buffer
                    # makes forward read uninitialised memory without a word.
                    errors.append(
                        f"{key}: this layer is on the meta device and the state dict holds no filter to assign; "
                        "allowed: materialise the model first (to_empty), or include the filter keys"
                    )
                    return
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
    return blur_pool_nd(input, stride, filter_size, pad_mode, dims=2)


def blur_pool_nd(input: Tensor, stride: Any, filter_size: int, pad_mode: str, dims: int) -> Tensor:
    """:func:`blur_pool2d` (``dims=2``) or :func:`~blurpool_algo.layers.oned.blur_pool1d` (``dims=1``)."""
    steps = check_stride(stride, dims=dims)
    validate_filter_size(filter_size)
    validate_pad_mode(pad_mode)
    if input.dim() != dims + 2:
        raise fail("input", "3-D (N, C, L)" if dims == 1 else "4-D (N, C, H, W)", input.shape)
    blur_filter = binomial_filter(filter_size, dims, dtype=input.dtype, device=input.device)[None, None]
    return blur_subsample(input, blur_filter, list(steps), list(blur_pads(filter_size, dims)), pad_mode)


class BlurPoolNd(OptionalFilterOnLoad, nn.Module):
    """What :class:`BlurPool2d` and :class:`~blurpool_algo.layers.oned.BlurPool1d` share; ``blur_dims`` picks which."""

    __constants__ = ["channels", "stride", "filter_size", "pad_mode", "pads", "sampling"]

    def __init__(
        self,
        channels: int,
        stride: int | tuple[int, ...] = 2,
        filter_size: int = 3,
        pad_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        sampling: str = "fixed",
    ) -> None:
        super().__init__()
        self.channels = check_int("channels", channels, minimum=1)
        self.stride = list(check_stride(stride, dims=self.blur_dims))
        self.filter_size = validate_filter_size(filter_size)
        self.pad_mode = validate_pad_mode(pad_mode)
        self.sampling = check_sampling(sampling)
        self.pads = list(blur_pads(filter_size, self.blur_dims))
        register_filter(self, channels, filter_size, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return blur_sample(x, self.blur_filter, self.stride, self.pads, self.pad_mode, self.sampling)

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, stride={tuple(self.stride)}, filter_size={self.filter_size}, pad_mode={self.pad_mode!r}"
            + sampling_repr(self.sampling)
        )


class BlurPool2d(BlurPoolNd):
    """Low-pass filters a feature map with a binomial filter, then subsamples it (the paper's ``BlurPool``).

    Output size is ``ceil(H / stride)`` by ``ceil(W / stride)`` for every filter size, even ones included.

    Args:
        channels: number of input channels (the filter is applied to each channel separately).
        stride: subsampling factor, an int or a (rows, cols) pair.
        filter_size: binomial filter size, >= 1. 3 = ``[1, 2, 1]/4`` (Composer's), 4 = ``[1, 3, 3, 1]/8`` (the paper's).
        pad_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
        device: device of the filter buffer.
        dtype: dtype of the filter buffer.
        sampling: ``'fixed'`` (every stride-th sample from the first) or ``'adaptive'`` (blur at stride 1, then each
            sample's polyphase component of largest l2 norm: APS).

    Example:
        >>> BlurPool2d(16)(torch.randn(2, 16, 9, 9)).shape
        torch.Size([2, 16, 5, 5])
        >>> BlurPool2d(16, sampling="adaptive")(torch.randn(2, 16, 9, 9)).shape
        torch.Size([2, 16, 5, 5])
    """


def sampling_repr(sampling: str) -> str:
    """The ``extra_repr`` part for ``sampling``: nothing for the default, so fixed layers print as they always did."""
    return "" if sampling == "fixed" else f", sampling={sampling!r}"
