"""Shift-consistency metrics: how often a classifier's prediction survives a small shift of its input.

BlurPool's claim (Zhang, ICML 2019) is that anti-aliasing makes a CNN's output stable under shifts. Three measures:

* **crop consistency**, the paper's protocol: each image is prepared at ``crop_size + max_shift`` (ImageNet: Resize
  256 + CenterCrop 256); two ``crop_size`` crops are taken at offsets drawn from ``[0, max_shift)`` per axis; the
  metric is the percentage of pairs whose top-1 classes agree. Labels are not needed.
* **circular consistency**: the same with two ``torch.roll`` shifts drawn from ``[-max_shift, max_shift)`` per axis, so
  no content enters or leaves the frame (a network built only from circular convolutions and global pooling scores
  exactly 100).
* **diagonal stability**, the paper's Figure 1: for crops at diagonal offsets ``(d, d)``, ``d = 0..max_shift``, the
  accuracy and the mean softmax probability of the true class, per offset.

Offsets are drawn from a generator seeded with ``seed`` and indexed by each sample's position in the dataset, so the
same seed gives the same number on 1 or N ranks and whatever the batch size. Counts live in torchmetrics states that
are summed across ranks. This package imports no Composer code: it works on any ``nn.Module`` that maps images to
logits.

Modules: :mod:`.protocol` (the views compared: :class:`ConsistencyProtocol`), :mod:`.counting` (torchmetrics states,
:class:`NonFiniteLogitsError`), :mod:`.batches` (feeding a model from a loader), :mod:`.measure` (the measurements),
:mod:`.plot` (the diagonal stability PNG).

A model whose logits hold a NaN or an inf has diverged (or its weights are corrupt): all its NaN predictions share one
argmax, so every pair would "agree". Such logits raise :class:`NonFiniteLogitsError` instead of giving a number.
"""

from blurpool_algo.metrics.counting import DiagonalStabilityMetric, NonFiniteLogitsError, ShiftConsistencyMetric
from blurpool_algo.metrics.measure import (
    OFFSET_DRAWS,
    DiagonalStability,
    diagonal_stability,
    shift_consistency,
    validate_consistency_options,
)
from blurpool_algo.metrics.plot import plot_diagonal_stability
from blurpool_algo.metrics.protocol import (
    CONSISTENCY_MODES,
    PAPER_CROP_SIZE,
    PAPER_MAX_SHIFT,
    ConsistencyProtocol,
    shifted_crops,
    shifted_rolls,
)

__all__ = [
    "CONSISTENCY_MODES",
    "OFFSET_DRAWS",
    "PAPER_CROP_SIZE",
    "PAPER_MAX_SHIFT",
    "ConsistencyProtocol",
    "DiagonalStability",
    "DiagonalStabilityMetric",
    "NonFiniteLogitsError",
    "ShiftConsistencyMetric",
    "diagonal_stability",
    "plot_diagonal_stability",
    "shift_consistency",
    "shifted_crops",
    "shifted_rolls",
    "validate_consistency_options",
]
