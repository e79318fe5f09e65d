"""Argument checks shared by every module: one helper per kind of argument, one message style.

Each helper returns the value it accepted (so a caller writes ``self.size = check_int("size", size, minimum=1)``) and
raises :class:`CheckError` (a ``ValueError``) with one line, ``"<name> must be <allowed>[ (<hint>)], got <value!r>"``.
``bool`` is not an int here: ``True`` passed as a size is a mistake, not 1. Standard library only.

Example:
    >>> check_int("window_size", 50, minimum=1)
    50
    >>> check_int("window_size", 0, minimum=1, hint="batches to average over")
    Traceback (most recent call last):
    ...
    blurpool_algo.checks.CheckError: window_size must be an int >= 1 (batches to average over), got 0
    >>> check_choice("mode", "circular", ("crop", "circular"))
    'circular'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = ["CheckError", "check_bool", "check_choice", "check_float", "check_int", "check_int_or_pair", "fail"]

_Choice = TypeVar("_Choice")


class CheckError(ValueError):
    """A refused argument: ``str()`` is ``"<name> <requirement>"``; both parts are attributes, so a caller that names
    the argument its own way (a recipe key, a CLI flag) reuses ``requirement`` instead of parsing the text."""

    def __init__(self, name: str, requirement: str) -> None:
        self.name, self.requirement = name, requirement
        super().__init__(f"{name} {requirement}")

    def __reduce__(self):  # picklable across processes (a DataLoader worker's error reaches the main process)
        return type(self), (self.name, self.requirement)


def fail(name: str, allowed: str, value: Any, hint: str = "") -> CheckError:
    """The one message style: ``"<name> must be <allowed>[ (<hint>)], got <value!r>"``, as an error to raise."""
    return CheckError(name, f"must be {allowed}{f' ({hint})' if hint else ''}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_range(minimum: int | None, maximum: int | None) -> str:
    bounds = [f">= {minimum}"] if minimum is not None else []
    bounds += [f"<= {maximum}"] if maximum is not None else []
    return "an int" + (" " + " and ".join(bounds) if bounds else "")


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> Any:
    """Returns ``value`` if it is an int (not a bool) in ``[minimum, maximum]``, or None when ``allow_none``."""
    if value is None and allow_none:
        return None
    if _is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    raise fail(name, _int_range(minimum, maximum) + (" or None" if allow_none else ""), value, hint)


def check_int_or_pair(name: str, value: Any, *, minimum: int | None = None, hint: str = "") -> tuple[int, int]:
    """Returns ``value`` as a pair: an int (for both axes) or a sequence of two ints, each ``>= minimum``."""
    pair = (value, value) if _is_int(value) else tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) == 2 and all(_is_int(v) and (minimum is None or v >= minimum) for v in pair):
        return pair  # type: ignore[return-value]
    raise fail(name, f"{_int_range(minimum, None)} or a pair of them", value, hint)


def check_float(
    name: str, value: Any, *, minimum: float | None = None, inclusive: bool = True, hint: str = ""
) -> float:
    """Returns ``value`` as a float if it is a finite real number (not a bool) ``>= minimum`` (``>`` if not
    ``inclusive``)."""
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    low_ok = minimum is None or (number >= minimum if inclusive else number > minimum)
    if math.isfinite(number) and low_ok:
        return number
    bound = "" if minimum is None else f" {'>=' if inclusive else '>'} {minimum:g}"
    raise fail(name, f"a finite number{bound}", value, hint)


def check_bool(name: str, value: Any, *, hint: str = "") -> bool:
    """Returns ``value`` if it is True or False (not 0, 1 or a string)."""
    if isinstance(value, bool):
        return value
    raise fail(name, "True or False", value, hint)


def check_choice(name: str, value: _Choice, allowed: Sequence[_Choice], *, hint: str = "") -> _Choice:
    """Returns ``value`` if it is one of ``allowed``."""
    # A list or dict is unhashable but may still be passed by mistake: compare, never hash.
    if any(type(value) is type(choice) and value == choice for choice in allowed):
        return value
    raise fail(name, f"one of {', '.join(map(repr, allowed))}", value, hint)
