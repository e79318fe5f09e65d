"""The surgery's options: checked once, kept frozen, read by every rule.

The defaults reproduce ``composer.algorithms.BlurPool()``: 3-tap binomial filter, zero padding, the blur before the
strided conv, convs with fewer than 16 input channels (the RGB stem) left alone, the fixed subsampling grid, the
network's own padding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from blurpool_algo.checks import check_bool, check_choice, check_int, fail
from blurpool_algo.exclusion import check_patterns
from blurpool_algo.filters import validate_filter_size, validate_pad_mode
from blurpool_algo.layers.sampling import SAMPLINGS, check_sampling

__all__ = ["PLACEMENTS", "SAMPLINGS", "BlurPoolOptions", "validate_options"]

#: Where a strided conv's blur goes: at the conv (``blur_first`` picks before or after it, Composer's two modes), or
#: after the conv's BatchNorm and activation (the paper's placement).
PLACEMENTS: tuple[str, ...] = ("conv", "after_activation")

_SWITCHES = ("replace_convs", "replace_maxpools", "replace_avgpools")


@dataclass(frozen=True)
class BlurPoolOptions:
    """Validated surgery options (build them with :func:`validate_options`)."""

    replace_convs: bool = True
    replace_maxpools: bool = True
    replace_avgpools: bool = False
    blur_first: bool = True
    min_channels: int = 16
    filter_size: int = 3
    pad_mode: str = "zeros"
    exclude: tuple[str, ...] = ()
    placement: str = "conv"
    sampling: str = "fixed"
    circular_padding: bool = False

    @property
    def blur_pad_mode(self) -> str:
        """The blurs' padding: ``pad_mode``, or ``'circular'`` under ``circular_padding``."""
        return "circular" if self.circular_padding else self.pad_mode


#: The option names, in the order of :class:`BlurPoolOptions`.
OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(BlurPoolOptions))


def validate_options(**options: Any) -> BlurPoolOptions:
    """Checks surgery options and returns them frozen; raises ``ValueError`` naming the bad one and what is allowed.

    Options not given take their defaults; one string as ``exclude`` is one pattern.

    Example:
        >>> validate_options(filter_size=4, exclude="layer4").exclude
        ('layer4',)
        >>> validate_options(min_channels=-1)
        Traceback (most recent call last):
        ...
        blurpool_algo.checks.CheckError: min_channels must be an int >= 0, got -1
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise fail("every BlurPool option", f"one of {', '.join(OPTION_NAMES)}", unknown, "unknown options")
    checked = {**{name: getattr(BlurPoolOptions, name) for name in OPTION_NAMES}, **options}
    for name in (*_SWITCHES, "blur_first", "circular_padding"):
        check_bool(name, checked[name])
    check_int("min_channels", checked["min_channels"], minimum=0)
    validate_filter_size(checked["filter_size"])
    validate_pad_mode(checked["pad_mode"])
    checked["exclude"] = check_patterns(checked["exclude"])
    check_choice("placement", checked["placement"], PLACEMENTS)
    check_sampling(checked["sampling"])
    if not any(checked[name] for name in _SWITCHES):
        switches = tuple(checked[name] for name in _SWITCHES)
        raise fail(" or ".join(_SWITCHES), "True for at least one", switches, "else there is nothing to replace")
    return BlurPoolOptions(**checked)
