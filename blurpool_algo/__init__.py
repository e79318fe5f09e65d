"""blurpool-algo: anti-aliased downsampling (BlurPool, Zhang 2019) for PyTorch and MosaicML Composer.

Layers (:mod:`blurpool_algo.layers`) and filters work in any PyTorch model; :func:`apply_blurpool` does the model
surgery without a Trainer; :class:`BlurPool` is the Composer algorithm. :func:`shift_consistency` and
:func:`diagonal_stability` measure what it is for on any model; :class:`ShiftConsistencyMonitor` and
:class:`ThroughputMonitor` log that and what it costs during training.
"""

from blurpool_algo.algorithm import BlurPool
from blurpool_algo.callbacks import ShiftConsistencyMonitor, ThroughputMonitor
from blurpool_algo.filters import binomial_filter_2d, binomial_taps
from blurpool_algo.layers import (
    BlurAvgPool1d,
    BlurAvgPool2d,
    BlurConv1d,
    BlurConv2d,
    BlurInputConv1d,
    BlurInputConv2d,
    BlurMaxPool1d,
    BlurMaxPool2d,
    BlurPool1d,
    BlurPool2d,
    blur_pool1d,
    blur_pool2d,
)
from blurpool_algo.metrics import DiagonalStability, NonFiniteLogitsError, diagonal_stability, shift_consistency
from blurpool_algo.surgery import BlurPoolReport, apply_blurpool

__version__ = "0.1.0"

__all__ = [
    "BlurAvgPool1d",
    "BlurAvgPool2d",
    "BlurConv1d",
    "BlurConv2d",
    "BlurInputConv1d",
    "BlurInputConv2d",
    "BlurMaxPool1d",
    "BlurMaxPool2d",
    "BlurPool",
    "BlurPool1d",
    "BlurPool2d",
    "BlurPoolReport",
    "DiagonalStability",
    "NonFiniteLogitsError",
    "ShiftConsistencyMonitor",
    "ThroughputMonitor",
    "apply_blurpool",
    "binomial_filter_2d",
    "binomial_taps",
    "blur_pool1d",
    "blur_pool2d",
    "diagonal_stability",
    "shift_consistency",
]
