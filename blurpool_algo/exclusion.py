"""Exclude patterns: which modules the surgery must leave alone, and which patterns name no module at all.

Exclude patterns are fnmatch patterns of module names. A pattern that matches a module's name excludes that module and
everything under it (``'layer4'`` is all of layer4); a pattern that matches no module name at all is reported and
warned about, naming the closest names, since a typo would otherwise exclude nothing in silence. Names are matched
relative to *roots*: the model itself (``''``) and, for the Composer algorithm, each of the ComposerModel's children
(so ``'layer4'`` names ``module.layer4``). Names only: nothing here reads a weight or changes a module.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from blurpool_algo.checks import fail

__all__ = ["Exclusion", "ExclusionMatch", "check_patterns", "child_name_roots", "unmatched_exclude_patterns"]


def check_patterns(exclude: Any, name: str = "exclude") -> tuple[str, ...]:
    """Exclude patterns as a tuple (one string is one pattern); raises ``ValueError`` unless each is a non-empty
    string."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    patterns = tuple(exclude) if isinstance(exclude, Iterable) else None
    if patterns is None or not all(isinstance(p, str) and p for p in patterns):
        raise fail(name, "a sequence of non-empty module-name patterns (fnmatch)", exclude)
    return patterns


def _check_roots(roots: Any) -> tuple[str, ...]:
    names = None if isinstance(roots, str) or not isinstance(roots, Iterable) else tuple(roots)
    if names is None or not all(isinstance(r, str) for r in names):
        raise fail("roots", "a sequence of module names ('' = the model itself)", roots)
    return tuple(dict.fromkeys(names))


def _relative_names(name: str, roots: Sequence[str]) -> Iterator[str]:
    """``name`` as each root it lies strictly under spells it (a root's own name only from the model's root ``''``)."""
    for root in roots:
        if not root:
            yield name
        elif name.startswith(root + "."):
            yield name[len(root) + 1 :]


def child_name_roots(model: nn.Module) -> tuple[str, ...]:
    """The roots the Composer algorithm matches exclude patterns under: the model itself and each direct child.

    A ComposerClassifier holds the user's network as ``module``; with these roots ``'layer4'`` and ``'module.layer4'``
    both name its ``layer4``. Pass the result as ``roots`` to :func:`unmatched_exclude_patterns` to check patterns the
    way ``BlurPool`` will apply them.

    Example:
        >>> child_name_roots(nn.ModuleDict({"module": nn.Sequential(nn.Conv2d(3, 8, 3))}))
        ('', 'module')
    """
    return ("", *(name for name, _ in model.named_children()))


def unmatched_exclude_patterns(
    model: nn.Module, patterns: str | Iterable[str], roots: Sequence[str] = ("",)
) -> list[tuple[str, list[str]]]:
    """The exclude patterns that match no module name of ``model``, each with the closest module names.

    A pattern matches when it fnmatches the name of any module (containers included, as ``named_modules()`` spells
    them) relative to any of ``roots``. No weights are read, so a model built on the meta device will do: this is the
    check to run on a recipe before training, and the one ``apply_blurpool`` warns with.

    Args:
        model: the model whose module names the patterns should match.
        patterns: fnmatch patterns, or one pattern as a string.
        roots: module names the patterns are relative to; ``''`` is the model itself. The Composer algorithm uses
            :func:`child_name_roots` (the model and each of its direct children).

    Returns:
        ``[(pattern, closest_names), ...]`` in the order of ``patterns``, for the patterns that match nothing;
        ``closest_names`` (at most 3, by ``difflib.get_close_matches``, relative to a root) may be empty.

    Raises:
        ValueError: on an empty or non-string pattern, or ``roots`` that is not a sequence of strings.

    Example:
        >>> network = nn.ModuleDict({"features": nn.Conv2d(3, 8, 3), "head": nn.Linear(8, 2)})
        >>> unmatched_exclude_patterns(network, ["head", "featurs"])
        [('featurs', ['features'])]
    """
    patterns, roots = check_patterns(patterns), _check_roots(roots)
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    relative = list(dict.fromkeys(r for name in names for r in _relative_names(name, roots)))
    return [
        (pattern, difflib.get_close_matches(pattern, relative, n=3))
        for pattern in patterns
        if not any(fnmatch.fnmatchcase(name, pattern) for name in relative)
    ]


@dataclass(frozen=True)
class ExclusionMatch:
    """Why a module is excluded: ``pattern`` matched the module named ``matched`` (the module itself, a container
    it sits in, or another module the same change would replace)."""

    pattern: str
    matched: str


class Exclusion:
    """Which modules the exclude patterns leave alone: a matched module and everything under it, under any root.

    Example:
        >>> Exclusion(["layer4"], roots=("",)).match("layer4.0.conv1")
        ExclusionMatch(pattern='layer4', matched='layer4')
    """

    def __init__(self, patterns: Sequence[str], roots: Sequence[str] = ("",)) -> None:
        self.patterns = check_patterns(patterns)
        self.roots = _check_roots(roots)

    def _match_one(self, name: str) -> ExclusionMatch | None:
        """``name`` itself if a pattern matches it, else the nearest container that a pattern matches."""
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):
            prefix = ".".join(parts[:depth])
            for pattern in self.patterns:
                if any(fnmatch.fnmatchcase(r, pattern) for r in _relative_names(prefix, self.roots)):
                    return ExclusionMatch(pattern, prefix)
        return None

    def match(self, *names: str) -> ExclusionMatch | None:
        """The first match among ``names``: a module's names (a shared module has several), then the names of the
        other modules a change would replace (an excluded one vetoes the change too); None if nothing is excluded."""
        return next((found for name in names if (found := self._match_one(name)) is not None), None)
