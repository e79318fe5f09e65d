"""Composer callbacks that measure what BlurPool is for and what it costs.

:class:`ShiftConsistencyMonitor` (:mod:`.shift_consistency`) measures what it is for: how often the model's top-1
survives a shift of the input (:func:`blurpool_algo.metrics.shift_consistency`), logged during training.

:class:`ThroughputMonitor` (:mod:`.throughput`) measures the cost: throughput, compute time per batch, the share of
each step spent waiting for the dataloader, and peak memory (:mod:`.peak_memory`), so that an A/B between a baseline
and a BlurPool run compares the model and not a dataloader bottleneck.
"""

from blurpool_algo.callbacks.shift_consistency import ShiftConsistencyMonitor, network_of
from blurpool_algo.callbacks.throughput import ThroughputMonitor

__all__ = ["ShiftConsistencyMonitor", "ThroughputMonitor", "network_of"]
