"""How a blur layer subsamples: the padding it shares with the blur, and adaptive polyphase sampling (APS, Chaman &
Dokmanic, CVPR 2021).

Subsampling a map by ``stride = (s_h, s_w)`` keeps one of its ``s_h * s_w`` *polyphase components*: the samples at
rows ``i + s_h * k`` and columns ``j + s_w * l`` for one phase ``(i, j)``. Fixed sampling always keeps phase ``(0, 0)``;
adaptive sampling keeps, for each sample of the batch, the component of largest l2 norm over channels, rows and
columns. A circular shift of the map only permutes the components (and rolls each), so the same component is kept,
rolled: with circular padding everywhere before it, the subsampled map is a circular shift of the one the unshifted
input gives, and a network ending in a global pool is exactly invariant to circular shifts.

Phases are numbered ``i * s_w + j``; ties go to the lowest number (``argmax`` returns the first maximum), so a constant
map keeps the fixed grid's phase. The choice is made with tensor operations only (reshape, sum, argmax, gather): no
data-dependent Python control flow, so ``torch.compile`` sees no graph break and TorchScript and ONNX export work.
Where a side is not a multiple of the stride, the map is first padded at its end up to one (with the blur's padding
mode), so the output has ``ceil(size / stride)`` samples, as fixed sampling gives.

A 1-D map ``(N, C, L)`` comes with a stride (padding, dilation) of one value: every function here then works on its
``(N, C, 1, L)`` view (:func:`as_2d` gives the view's geometry) and returns a 1-D result, so 1-D layers share this code.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from blurpool_algo.checks import check_choice

__all__ = [
    "SAMPLINGS",
    "adaptive_subsample",
    "as_2d",
    "check_sampling",
    "choose_phase",
    "conv_at_phase",
    "pad_map",
    "select_phase",
]

#: How a blur layer subsamples: ``'fixed'`` keeps phase ``(0, 0)`` (every stride-th sample from the first),
#: ``'adaptive'`` each sample's largest-norm phase (APS).
SAMPLINGS: tuple[str, ...] = ("fixed", "adaptive")


def check_sampling(sampling: object, name: str = "sampling") -> str:
    """Returns ``sampling`` if it is one of :data:`SAMPLINGS`, else raises ``ValueError`` naming ``name``.

    Example:
        >>> check_sampling("adaptive")
        'adaptive'
    """
    return check_choice(name, sampling, SAMPLINGS, hint="'adaptive' is APS: the largest-norm phase")  # type: ignore[return-value]


def pad_map(x: Tensor, pads: list[int], pad_mode: str) -> Tensor:
    """Pads ``x`` (``F.pad`` order: two amounts per padded axis, the last axis first), falling back to ``replicate``
    where the map is too small for ``pad_mode``.

    ``reflect`` padding needs the map to be larger than the pad and ``circular`` at least as large; ``replicate``
    works on any size and agrees with both on a 1-pixel map.
    """
    if max(pads) == 0:
        return x
    if pad_mode == "zeros":
        return F.pad(x, pads)
    too_small = False
    for axis in range(len(pads) // 2):
        size = x.shape[-1 - axis]
        reach = max(pads[2 * axis], pads[2 * axis + 1])
        if (reach >= size) if pad_mode == "reflect" else (reach > size):
            too_small = True
    padded = F.pad(x, pads, mode="replicate" if too_small else pad_mode)
    if x.is_contiguous(memory_format=torch.channels_last) and not padded.is_contiguous(
        memory_format=torch.channels_last
    ):
        # Circular padding on CPU returns a contiguous (NCHW) tensor; keep the caller's memory format.
        padded = padded.contiguous(memory_format=torch.channels_last)
    return padded


def as_2d(values: list[int], fill: int) -> list[int]:
    """A 1-D layer's geometry (one value: stride, padding, dilation) as the 2-D geometry of its ``(N, C, 1, L)`` view,
    ``fill`` for the added axis; 2-D geometry as it is."""
    return [fill, values[0]] if len(values) == 1 else values


def _view_2d(x: Tensor, stride: list[int]) -> Tensor:
    """A 1-D map ``(N, C, L)`` (its stride has one value) as ``(N, C, 1, L)``; a 2-D map as it is."""
    return x.unsqueeze(2) if len(stride) == 1 else x


def _unview(x: Tensor, stride: list[int]) -> Tensor:
    """The inverse of :func:`_view_2d`."""
    return x.squeeze(2) if len(stride) == 1 else x


def _to_multiple(x: Tensor, stride: list[int], pad_mode: str) -> Tensor:
    """``x`` padded at its end so that each side is a multiple of its stride."""
    if torch.jit.is_tracing():
        # An ONNX graph (a trace) must serve every map size: pad by the most any size needs, a static amount, then cut
        # to the multiple, an end that follows the traced shape.
        padded = pad_map(x, [0, stride[1] - 1, 0, stride[0] - 1], pad_mode)
        rows = (x.shape[-2] + stride[0] - 1) // stride[0] * stride[0]
        cols = (x.shape[-1] + stride[1] - 1) // stride[1] * stride[1]
        return padded[:, :, :rows, :cols]
    extra_h = (stride[0] - x.shape[-2] % stride[0]) % stride[0]
    extra_w = (stride[1] - x.shape[-1] % stride[1]) % stride[1]
    return pad_map(x, [0, extra_w, 0, extra_h], pad_mode)


@torch.fx.wrap
def choose_phase(x: Tensor, stride: list[int], pad_mode: str = "zeros") -> Tensor:
    """For each sample of ``x`` (N, C, H, W), the number ``i * s_w + j`` of its polyphase component of largest l2 norm
    (the lowest number among equal ones); a ``(N,)`` int64 tensor.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> x[0, 0, 1, 0] = 1.0  # phase (1, 0) = 2
        >>> choose_phase(x, [2, 2]).tolist()  # the second sample is all zeros: a tie, phase 0
        [2, 0]
    """
    x = _view_2d(x, stride)
    stride = as_2d(stride, 1)
    x = _to_multiple(x, stride, pad_mode)
    n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    # Energies in float64: the components of a smooth map with many channels can differ by 1e-8 of their energy, below
    # float32's rounding, and a circular shift sums the same squares in another order; in float32 that order alone
    # could change which component wins, and with it the output.
    # The squares themselves are the same whatever the order, so only the sums need float64 (MPS has none).
    accumulate = torch.float32 if x.device.type == "mps" else torch.float64
    energy = x.square().sum(1, dtype=accumulate)
    energy = energy.reshape(n, height // stride[0], stride[0], width // stride[1], stride[1]).sum((1, 3))
    return energy.reshape(n, stride[0] * stride[1]).argmax(1)


@torch.fx.wrap
def select_phase(x: Tensor, phase: Tensor, stride: list[int], pad_mode: str = "zeros") -> Tensor:
    """The polyphase component ``phase[n]`` (numbered as :func:`choose_phase` numbers them) of each sample ``n`` of
    ``x``: shape ``(N, C, ceil(H / s_h), ceil(W / s_w))``. Phase 0 everywhere is ``x[..., ::s_h, ::s_w]``.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> select_phase(x, torch.tensor([3]), [2, 2])  # phase (1, 1)
        tensor([[[[ 5.,  7.],
                  [13., 15.]]]])
    """
    view = _to_multiple(_view_2d(x, stride), as_2d(stride, 1), pad_mode)
    steps = as_2d(stride, 1)
    n, channels, height, width = view.shape
    rows, cols = height // steps[0], width // steps[1]
    # (N, C, rows, s_h, cols, s_w) -> (N, C, rows, cols, s_h * s_w): the phase is the last axis, gathered per sample.
    phases = view.reshape(n, channels, rows, steps[0], cols, steps[1]).permute(0, 1, 2, 4, 3, 5)
    phases = phases.reshape(n, channels, rows, cols, steps[0] * steps[1])
    index = phase.reshape(n, 1, 1, 1, 1).expand(n, channels, rows, cols, 1)
    return _unview(phases.gather(4, index).squeeze(4), stride)


@torch.fx.wrap
def adaptive_subsample(x: Tensor, stride: list[int], pad_mode: str = "zeros") -> Tensor:
    """``x`` subsampled by ``stride`` at each sample's largest-norm phase (:func:`choose_phase`, :func:`select_phase`).

    Example:
        >>> x = torch.zeros(1, 1, 4, 4)
        >>> x[0, 0, 1, 3] = 5.0
        >>> adaptive_subsample(x, [2, 2])
        tensor([[[[0., 5.],
                  [0., 0.]]]])
    """
    return select_phase(x, choose_phase(x, stride, pad_mode), stride, pad_mode)


def _crop_at(x: Tensor, start: Tensor, length: int, dim: int) -> Tensor:
    """``x.narrow(dim, start[n], length)`` for each sample ``n`` (a gather: ``start`` is a tensor)."""
    shape = [1, 1, 1, 1]
    shape[dim] = length
    offsets = torch.arange(length, device=x.device).reshape(shape) + start.reshape(-1, 1, 1, 1)
    size = list(x.shape)
    size[dim] = length
    return x.gather(dim, offsets.expand(size))


@torch.fx.wrap
def conv_at_phase(
    x: Tensor,
    phase: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    padding_mode: str,
) -> Tensor:
    """A strided conv of ``x`` whose sampling grid starts at each sample's ``phase`` instead of at ``(0, 0)``.

    Equal to the conv at stride 1 followed by :func:`select_phase`, at a stride-``s``-th of the cost: the input is
    padded as the conv pads it (``padding_mode``: ``'zeros'`` or a ``F.pad`` mode), cropped per sample from the phase
    on (a gather), and convolved at the conv's stride. The output has the strided conv's shape; where the shifted grid
    runs past the padded input, it is padded further the same way.
    """
    native_stride = stride
    x, weight = _view_2d(x, stride), _view_2d(weight, stride)
    stride, padding, dilation = as_2d(stride, 1), as_2d(padding, 0), as_2d(dilation, 1)
    phase_h = torch.div(phase, stride[1], rounding_mode="floor")
    phase_w = phase - phase_h * stride[1]
    kernel = [weight.shape[2], weight.shape[3]]
    lengths: list[int] = []
    for axis in range(2):
        size = x.shape[axis + 2] + 2 * padding[axis]
        reach = dilation[axis] * (kernel[axis] - 1)
        outputs = (size - reach - 1) // stride[axis] + 1
        # The crop the strided conv reads, from the phase on: at most the padded map's length, so ``stride - 1`` more
        # samples at the end (a static amount, as an ONNX graph for every size needs) let the last phase find it.
        lengths.append(stride[axis] * (outputs - 1) + reach + 1)
    pads = [padding[1], padding[1] + stride[1] - 1, padding[0], padding[0] + stride[0] - 1]
    padded = F.pad(x, pads) if padding_mode == "zeros" else pad_map(x, pads, padding_mode)
    cropped = _crop_at(_crop_at(padded, phase_h, lengths[0], 2), phase_w, lengths[1], 3)
    return _unview(F.conv2d(cropped, weight, bias, stride, [0, 0], dilation, groups), native_stride)
