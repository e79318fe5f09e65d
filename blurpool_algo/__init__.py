"""blurpool-algo: anti-aliased downsampling (BlurPool, Zhang 2019) for PyTorch and MosaicML Composer.

Layers (:mod:`blurpool_algo.layers`) and filters work in any PyTorch model; :func:`apply_blurpool` does the model
surgery without a Trainer; :class:`BlurPool` is the Composer algorithm.
"""

from blurpool_algo.algorithm import BlurPool
from blurpool_algo.filters import binomial_filter_2d, binomial_taps
from blurpool_algo.layers import BlurAvgPool2d, BlurConv2d, BlurMaxPool2d, BlurPool2d, blur_pool2d
from blurpool_algo.surgery import BlurPoolReport, apply_blurpool

__version__ = "0.1.0"

__all__ = [
    "BlurAvgPool2d",
    "BlurConv2d",
    "BlurMaxPool2d",
    "BlurPool",
    "BlurPool2d",
    "BlurPoolReport",
    "apply_blurpool",
    "binomial_filter_2d",
    "binomial_taps",
    "blur_pool2d",
]
