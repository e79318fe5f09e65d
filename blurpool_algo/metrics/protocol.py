"""The geometry of a shift-consistency measurement, defined once: which views of an image are compared.

A :class:`ConsistencyProtocol` is a mode, a shift range and a crop size. In ``'crop'`` mode (the paper's protocol)
each image is prepared at ``crop_size + max_shift`` (its *frame*) and two ``crop_size`` crops are taken at offsets in
``[0, max_shift)`` per axis; in ``'circular'`` mode the image (centre-cropped to ``crop_size`` when one is given) is
rolled by two shifts in ``[-max_shift, max_shift)`` per axis. The measurements (:mod:`.measure`), the callback and the
datasets' consistency loaders all take their sizes from here. Torch only.

Example:
    >>> protocol = ConsistencyProtocol(mode="crop", max_shift=32, crop_size=224)
    >>> protocol.frame_size, protocol.offset_range
    (256, (0, 32))
    >>> ConsistencyProtocol(mode="circular", max_shift=8, crop_size=36).frame_size
    36
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from blurpool_algo.checks import check_choice, check_int

__all__ = [
    "CONSISTENCY_MODES",
    "PAPER_CROP_SIZE",
    "PAPER_MAX_SHIFT",
    "ConsistencyProtocol",
    "center_crop",
    "shifted_crops",
    "shifted_rolls",
]

#: Values of ``mode``: two random crops (the paper's protocol) or two circular shifts.
CONSISTENCY_MODES: tuple[str, ...] = ("crop", "circular")

#: The paper's ImageNet protocol (Zhang 2019): 224 px crops at offsets in [0, 32) per axis. The defaults of every
#: measurement and of the monitor, and ImageNet's consistency defaults, are these two numbers, written only here.
PAPER_MAX_SHIFT = 32
PAPER_CROP_SIZE = 224


@dataclass(frozen=True)
class ConsistencyProtocol:
    """Mode, shift range and crop size of one shift-consistency measurement (checked on construction).

    Attributes:
        mode: ``'crop'`` or ``'circular'``.
        max_shift: the shift range in pixels (the paper: 32 at 224 px).
        crop_size: the side of the compared views; None: ``'crop'``: the image side - ``max_shift``, ``'circular'``:
            the whole image.
    """

    mode: str = "crop"
    max_shift: int = PAPER_MAX_SHIFT
    crop_size: int | None = PAPER_CROP_SIZE

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, CONSISTENCY_MODES)
        check_int("max_shift", self.max_shift, minimum=1)
        check_int("crop_size", self.crop_size, minimum=1, allow_none=True)

    @property
    def frame_size(self) -> int | None:
        """Side of the images the measurement needs: ``crop_size + max_shift`` (crop), ``crop_size`` (circular; no
        margin: the views are rolled, not cropped); None when the crop size comes from the images."""
        if self.crop_size is None:
            return None
        return self.crop_size + self.max_shift if self.mode == "crop" else self.crop_size

    @property
    def offset_range(self) -> tuple[int, int]:
        """``[low, high)`` of the offsets drawn per axis: crop tops/lefts, or signed roll shifts."""
        return (0, self.max_shift) if self.mode == "crop" else (-self.max_shift, self.max_shift)

    def fitted(self, image_size: tuple[int, int] | torch.Size) -> ConsistencyProtocol:
        """This protocol with a crop size for images of ``(height, width)``: a crop mode without one takes the
        smaller side - ``max_shift``; raises ``ValueError`` when that leaves no crop."""
        if self.crop_size is not None or self.mode == "circular":
            return self
        side = min(image_size) - self.max_shift
        if side < 1:
            raise ValueError(f"images of {tuple(image_size)} px leave no crop for max_shift={self.max_shift}")
        return replace(self, crop_size=side)

    def frame(self, images: Tensor) -> Tensor:
        """``images`` centre-cropped to :attr:`frame_size` (unchanged when it is None or their size)."""
        return images if self.frame_size is None else center_crop(images, self.frame_size)

    def views(self, images: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """The two shifted views of framed ``images``, from ``(N, 4)`` offsets ``(dy_a, dx_a, dy_b, dx_b)`` drawn in
        :attr:`offset_range` (the crop size must be set: see :meth:`fitted`)."""
        if self.mode == "crop":
            assert self.crop_size is not None, "fit the protocol to the images first"
            return shifted_crops(images, offsets[:, :2], self.crop_size), shifted_crops(
                images, offsets[:, 2:], self.crop_size
            )
        return shifted_rolls(images, offsets[:, :2]), shifted_rolls(images, offsets[:, 2:])

    def diagonal_view(self, images: Tensor, shift: int) -> Tensor:
        """The crop of framed ``images`` at diagonal offset ``(shift, shift)`` (the paper's Figure 1)."""
        assert self.crop_size is not None, "fit the protocol to the images first"
        return images[..., shift : shift + self.crop_size, shift : shift + self.crop_size]


def _window_start(size: int, window: int, axis: str) -> int:
    """Top-left of a centred ``window`` in an image side of ``size`` (0 when they are equal)."""
    if window > size:
        raise ValueError(
            f"images are {size} px along {axis}, smaller than crop_size + max_shift = {window}: prepare them at "
            f"crop_size + max_shift (ImageNet: Resize 256 + CenterCrop 256 for 224 crops shifted by up to 32)"
        )
    return (size - window) // 2


def center_crop(images: Tensor, size: int) -> Tensor:
    """The centred ``size`` x ``size`` window of ``(..., H, W)`` images; ``ValueError`` if they are smaller."""
    top = _window_start(images.shape[-2], size, "height")
    left = _window_start(images.shape[-1], size, "width")
    return images[..., top : top + size, left : left + size]


def shifted_crops(images: Tensor, offsets: Tensor, crop_size: int) -> Tensor:
    """``crop_size`` crops of ``images`` at per-image top-left ``offsets``; one gather, no Python loop.

    Args:
        images: ``(N, C, H, W)``.
        offsets: ``(N, 2)`` integer ``(top, left)`` per image; each crop must fit inside its image.
        crop_size: side of the square crops.

    Returns:
        ``(N, C, crop_size, crop_size)``.

    Example:
        >>> images = torch.arange(16.0).view(1, 1, 4, 4)
        >>> shifted_crops(images, torch.tensor([[1, 2]]), 2).flatten().tolist()
        [6.0, 7.0, 10.0, 11.0]
    """
    n, c, _, width = images.shape
    offsets = offsets.to(images.device).long()
    steps = torch.arange(crop_size, device=images.device)
    rows = (offsets[:, 0:1] + steps).view(n, 1, crop_size, 1).expand(n, c, crop_size, width)
    images = images.gather(2, rows)
    cols = (offsets[:, 1:2] + steps).view(n, 1, 1, crop_size).expand(n, c, crop_size, crop_size)
    return images.gather(3, cols)


def shifted_rolls(images: Tensor, shifts: Tensor) -> Tensor:
    """Each image rolled by its own ``(dy, dx)``: row ``i`` of the result is row ``i - dy`` (mod H), as ``torch.roll``.

    Args:
        images: ``(N, C, H, W)``.
        shifts: ``(N, 2)`` integer ``(dy, dx)`` per image, any sign.

    Example:
        >>> images = torch.arange(4.0).view(1, 1, 1, 4)
        >>> shifted_rolls(images, torch.tensor([[0, 1]])).flatten().tolist()
        [3.0, 0.0, 1.0, 2.0]
    """
    n, c, height, width = images.shape
    shifts = shifts.to(images.device).long()
    rows = (torch.arange(height, device=images.device) - shifts[:, 0:1]).remainder(height)
    images = images.gather(2, rows.view(n, 1, height, 1).expand(n, c, height, width))
    cols = (torch.arange(width, device=images.device) - shifts[:, 1:2]).remainder(width)
    return images.gather(3, cols.view(n, 1, 1, width).expand(n, c, height, width))
