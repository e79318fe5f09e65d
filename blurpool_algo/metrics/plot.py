"""The diagonal stability plot: one PNG comparing models' curves, written whole or not at all.

Example:
    >>> import pathlib, tempfile
    >>> curve = DiagonalStability([0, 1], accuracy=[90.0, 89.0], true_class_probability=[0.8, 0.7], num_images=4)
    >>> path = plot_diagonal_stability({"baseline": curve}, pathlib.Path(tempfile.mkdtemp()) / "curve.png")
    >>> path.read_bytes()[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from blurpool_algo.files import atomic_path
from blurpool_algo.metrics.measure import DiagonalStability

__all__ = ["plot_diagonal_stability"]


def plot_diagonal_stability(curves: Mapping[str, DiagonalStability], path: str | os.PathLike[str]) -> Path:
    """Writes a PNG of the curves (one line per model: P(true class) on top, accuracy below), whole or not at all.

    Args:
        curves: label (e.g. ``'baseline'``, ``'blurpool'``) -> its curve.
        path: the PNG to write; its folder must exist.

    Returns:
        The written path.
    """
    if not curves:
        raise ValueError("curves must hold at least one labelled DiagonalStability")
    # The object-oriented API: no pyplot global state, no GUI backend, safe in worker processes and tests. Imported
    # here, not at the top: matplotlib takes a second to import and only this function needs it.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 6.0))
    top, bottom = figure.subplots(2, 1, sharex=True)
    for label, curve in curves.items():
        top.plot(curve.offsets, curve.true_class_probability, marker=".", label=label)
        bottom.plot(curve.offsets, curve.accuracy, marker=".", label=label)
    top.set_ylabel("mean P(true class)")
    top.set_title("Diagonal shift stability (flat = shift-invariant)")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("top-1 accuracy (%)")
    bottom.set_xlabel("diagonal shift (px)")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    return Path(path)
