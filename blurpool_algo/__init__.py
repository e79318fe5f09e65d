"""blurpool-algo: anti-aliased downsampling (BlurPool, Zhang 2019) for PyTorch and MosaicML Composer.

Layers (:mod:`blurpool_algo.layers`) and filters work in any PyTorch model; :func:`apply_blurpool` does the model
surgery without a Trainer; :class:`BlurPool` is the Composer algorithm. :func:`shift_consistency` and
:func:`diagonal_stability` measure what it is for on any model; :class:`ShiftConsistencyMonitor` and
:class:`ThroughputMonitor` log that and what it costs during training.

The layers, filters, surgery and metrics import no Composer: on a machine with torch only (an export or inference
box), ``from blurpool_algo import BlurPool2d, apply_blurpool`` works, and only the Composer names (:class:`BlurPool`,
the two callbacks) need Composer, imported when first asked for.
"""

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from blurpool_algo.algorithm import BlurPool
    from blurpool_algo.callbacks import ShiftConsistencyMonitor, ThroughputMonitor

__version__ = "0.1.0"

#: The names whose modules import Composer, and those modules: loaded on first access (PEP 562), not by this import.
_COMPOSER_NAMES = {
    "BlurPool": "blurpool_algo.algorithm",
    "ShiftConsistencyMonitor": "blurpool_algo.callbacks",
    "ThroughputMonitor": "blurpool_algo.callbacks",
}


def __getattr__(name: str) -> Any:
    if name not in _COMPOSER_NAMES:
        raise AttributeError(f"module 'blurpool_algo' has no attribute {name!r}")
    # Not a cycle dodge: Composer is needed for these names only, so that torch-only machines can use the rest.
    value = getattr(importlib.import_module(_COMPOSER_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_COMPOSER_NAMES})


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
