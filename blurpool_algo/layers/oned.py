"""1-D anti-aliased layers, for audio and time-series CNNs: :class:`BlurPool1d` and :func:`blur_pool1d`,
:class:`BlurConv1d`, :class:`BlurInputConv1d`, :class:`BlurMaxPool1d` and :class:`BlurAvgPool1d`.

Each is its 2-D namesake's code (:mod:`~blurpool_algo.layers.blur`, :mod:`~blurpool_algo.layers.convs`,
:mod:`~blurpool_algo.layers.pools`) on the 1-D torch layer: the same contracts (output shape of the replaced layer,
same Parameter objects and state-dict keys plus the optional ``blur_filter`` buffer, ``filter_size=1`` is the plain
layer, ``sampling='adaptive'``, ``padding_mode='circular'`` pools), the binomial taps of :func:`~blurpool_algo.filters.
binomial_taps` as the filter (buffer shape ``(channels, 1, k)``), and the padding modes of the 2-D layers. The blur and
the phase choice run on the ``(N, C, 1, L)`` view of the map (the kernel ``conv1d`` itself runs on); the convs and
pools run as ``F.conv1d`` / ``F.max_pool1d`` / ``F.avg_pool1d``, which are faster than their 2-D forms on such a view.
"""

from __future__ import annotations

import torch  # noqa: F401 (the docstring examples use it)
from torch import Tensor, nn

from blurpool_algo.layers.blur import BlurPoolNd, blur_pool_nd
from blurpool_algo.layers.convs import BlurConvNd, BlurInputConvNd
from blurpool_algo.layers.pools import BlurAvgPoolNd, BlurMaxPoolNd

__all__ = ["BlurAvgPool1d", "BlurConv1d", "BlurInputConv1d", "BlurMaxPool1d", "BlurPool1d", "blur_pool1d"]


def blur_pool1d(input: Tensor, stride: int | tuple[int] = 2, filter_size: int = 3, pad_mode: str = "zeros") -> Tensor:
    """Blurs ``input`` (N, C, L) with the binomial taps and subsamples it by ``stride``: the functional
    :class:`BlurPool1d` (it builds the filter on each call, so prefer the module in a model).

    Returns:
        A tensor of shape ``(N, C, ceil(L / stride))``.

    Example:
        >>> blur_pool1d(torch.ones(1, 3, 7)).shape
        torch.Size([1, 3, 4])
        >>> blur_pool1d(torch.tensor([[[0.0, 0.0, 4.0, 0.0]]]), 1)  # [1, 2, 1]/4 taps, zero padding
        tensor([[[0., 1., 2., 1.]]])
    """
    return blur_pool_nd(input, stride, filter_size, pad_mode, dims=1)


class BlurPool1d(BlurPoolNd):
    """Low-pass filters a 1-D map (N, C, L) with the binomial taps, then subsamples it: the 1-D
    :class:`~blurpool_algo.layers.BlurPool2d` (same arguments; ``stride`` an int or a 1-tuple).

    Output length is ``ceil(L / stride)`` for every filter size.

    Example:
        >>> BlurPool1d(16, filter_size=4)(torch.randn(2, 16, 9)).shape
        torch.Size([2, 16, 5])
    """

    blur_dims = 1


class BlurConv1d(BlurConvNd, nn.Conv1d):
    """A :class:`torch.nn.Conv1d` whose subsampling is anti-aliased: the 1-D
    :class:`~blurpool_algo.layers.BlurConv2d` (``nn.Conv1d``'s arguments, then keyword-only ``blur_first``,
    ``filter_size``, ``pad_mode``, ``sampling``; :meth:`from_conv` keeps a conv's Parameter objects).

    Example:
        >>> conv = nn.Conv1d(8, 16, 5, stride=2, padding=2)
        >>> blurred = BlurConv1d.from_conv(conv, filter_size=4)
        >>> blurred.weight is conv.weight, blurred(torch.randn(1, 8, 11)).shape == conv(torch.randn(1, 8, 11)).shape
        (True, True)
    """

    blur_dims = 1


class BlurInputConv1d(BlurInputConvNd, nn.Conv1d):
    """A :class:`torch.nn.Conv1d` that first blurs and subsamples its input by ``blur_stride``: the 1-D
    :class:`~blurpool_algo.layers.BlurInputConv2d`."""

    blur_dims = 1


class BlurMaxPool1d(BlurMaxPoolNd, nn.MaxPool1d):
    """A :class:`torch.nn.MaxPool1d` whose subsampling is anti-aliased (max at stride 1, then blur-subsample): the 1-D
    :class:`~blurpool_algo.layers.BlurMaxPool2d`, with its arguments and :meth:`from_maxpool`.

    Example:
        >>> pool = nn.MaxPool1d(3, 2, 1, ceil_mode=True)
        >>> BlurMaxPool1d.from_maxpool(pool)(torch.randn(1, 4, 10)).shape == pool(torch.randn(1, 4, 10)).shape
        True
    """

    blur_dims = 1


class BlurAvgPool1d(BlurAvgPoolNd, nn.AvgPool1d):
    """A :class:`torch.nn.AvgPool1d` whose subsampling is anti-aliased (average at stride 1, then blur-subsample):
    the 1-D :class:`~blurpool_algo.layers.BlurAvgPool2d`, with its arguments (``divisor_override`` only None:
    ``nn.AvgPool1d`` has none) and :meth:`from_avgpool`.
    """

    blur_dims = 1
