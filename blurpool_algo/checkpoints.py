"""The gate every checkpoint load passes: safe unpickling, literal algorithm descriptions, a strict model match, and
partial files set aside.

A checkpoint is untrusted input. A file on shared storage may have been written by anyone who can write there, and
two things in a Composer checkpoint run code when Composer loads it: the pickle itself (Composer calls
``torch.load(weights_only=False)``), and the stored algorithm descriptions, which Composer's autoload passes to
``eval``. The gate closes both, in three modules by job, all reachable from here:

* :func:`load_checkpoint_file` (:mod:`blurpool_algo.checkpoint_files`) unpickles with torch's weights-only unpickler
  and an allowlist of the few non-tensor types Composer's own checkpoints hold (:func:`safe_globals`); anything else
  is refused, naming the types, unless the user opts in for a file they trust.
* :func:`check_algorithm_descriptions` parses each stored description with :mod:`ast`; it must be a plain call of a
  known algorithm with literal arguments (and, for this package's BlurPool, valid options), or the file is refused.
* :func:`check_model_state` compares the stored weights with the model they are meant for: every key present with
  its shape, blur filters aside (they follow from the layer's options); it names the missing, unexpected and
  mis-shaped keys.
* :func:`composer_load_gate` puts all three in front of every load the Composer Trainer makes (``load_path`` and
  autoresume), so no code path reaches Composer's own unpickler.
* :func:`recover_save_folder` (:mod:`blurpool_algo.resume`) recognises a checkpoint left partial by a crash or a full
  disk, moves it aside (never deletes it) and points ``latest`` at the newest complete one, so that the same command
  resumes after any crash.

This module holds the checks that know algorithms and models (it imports Composer and :class:`BlurPool`); the file
checks below it know neither, so :mod:`blurpool_algo.models` loads weights through them without an import cycle.

Example:
    >>> algorithm, args, kwargs = parse_algorithm_description("blurpool_algo.BlurPool(filter_size=4)")
    >>> algorithm is BlurPool, args, kwargs
    (True, (), {'filter_size': 4})
    >>> parse_algorithm_description("blurpool_algo.BlurPool(filter_size=__import__('os').getpid())")
    Traceback (most recent call last):
    ...
    ValueError: its arguments are not all literals
"""

from __future__ import annotations

import ast
import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import composer.algorithms
import composer.utils.checkpoint as composer_checkpoint
import torch
from composer.core import Algorithm
from torch import nn

from blurpool_algo.algorithm import BlurPool
from blurpool_algo.checkpoint_files import (
    CHECKPOINT_REASONS,
    CheckpointError,
    check_checkpoint_file,
    checkpoint_file_status,
    load_checkpoint_file,
    safe_globals,
)
from blurpool_algo.layers import FILTER_BUFFER
from blurpool_algo.resume import Recovery, recover_save_folder, room_for_a_checkpoint

__all__ = [
    "CHECKPOINT_REASONS",
    "CheckpointError",
    "Recovery",
    "check_algorithm_descriptions",
    "check_checkpoint_file",
    "check_model_state",
    "checkpoint_file_status",
    "composer_load_gate",
    "load_checkpoint_file",
    "parse_algorithm_description",
    "recover_save_folder",
    "room_for_a_checkpoint",
    "safe_globals",
]

_FILTER_SUFFIX = "." + FILTER_BUFFER


# ----------------------------------------------------------------------------------------- algorithm descriptions


@functools.cache
def _known_algorithms() -> dict[str, type]:
    """Dotted call name -> class: Composer's algorithms by class name, and this package's as ``blurpool_algo.X``."""
    known = {
        name: obj
        for name, obj in vars(composer.algorithms).items()
        if isinstance(obj, type) and issubclass(obj, Algorithm)
    }
    known[f"{BlurPool.__module__.split('.')[0]}.{BlurPool.__name__}"] = BlurPool
    return known


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        parent = _dotted(node.value)
        return None if parent is None else f"{parent}.{node.attr}"
    return None


def parse_algorithm_description(text: str) -> tuple[type, tuple[Any, ...], dict[str, Any]]:
    """Parses ``'Name(arg, key=value)'`` without evaluating it: a call of a known algorithm with literal arguments.

    Returns:
        ``(algorithm class, positional arguments, keyword arguments)``.

    Raises:
        ValueError: naming what is not allowed.
    """
    if not isinstance(text, str) or len(text) > 10_000:
        raise ValueError("the description is not a string of reasonable length")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError("the description is not a Python expression") from None
    call = tree.body
    if not isinstance(call, ast.Call):
        raise ValueError("the description is not a call of an algorithm")
    name = _dotted(call.func)
    algorithm = _known_algorithms().get(name or "")
    if algorithm is None:
        raise ValueError(f"{name or ast.unparse(call.func)!r} is not a known algorithm")
    try:
        args = tuple(ast.literal_eval(argument) for argument in call.args)
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords if keyword.arg}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("its arguments are not all literals") from None
    if any(keyword.arg is None for keyword in call.keywords):
        raise ValueError("its arguments are not all literals (** unpacking)")
    return algorithm, args, kwargs


def check_algorithm_descriptions(entries: Any, path: str) -> None:
    r"""Checks a checkpoint's ``state['algorithms']``: ``[(class name, {'repr': description}), ...]``.

    Composer's autoload ``eval``\ s the description of every entry whose name is a ``required_on_load`` algorithm
    of ``composer.algorithms`` (this package's BlurPool is stored as ``'BlurPool'``). Each such description must
    parse (:func:`parse_algorithm_description`) to a literal call of the algorithm of that name, and this package's
    BlurPool must accept the options. Other entries are never evaluated (Composer's own algorithms without a
    ``__repr__`` store ``<... object at 0x...>`` there) and pass as they are.

    Raises:
        CheckpointError: ``bad_algorithm``, naming the entry.
    """
    if entries is None:
        return
    if not isinstance(entries, list | tuple):
        raise CheckpointError(path, "bad_algorithm", f"{path}: its algorithms entry is not a list")
    for entry in entries:
        shown = repr(entry)[:200]
        try:
            name, serialized = entry
            registered = getattr(composer.algorithms, name, None) if isinstance(name, str) else None
            if not (isinstance(registered, type) and registered.required_on_load()):
                continue  # Composer does not evaluate it
            algorithm, args, kwargs = parse_algorithm_description(serialized["repr"])
            if algorithm.__qualname__ != name:
                raise ValueError(f"it is stored under the name {name!r}, not {algorithm.__qualname__!r}")
            if algorithm is BlurPool:
                BlurPool(*args, **kwargs)  # the options are checked as a recipe's would be
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(
                path, "bad_algorithm", f"{path} holds an algorithm description that is refused ({error}): {shown}",
                (shown,),
            ) from None  # fmt: skip


# ------------------------------------------------------------------------------------------------- strict weights


def _is_filter(key: str) -> bool:
    return key.endswith(_FILTER_SUFFIX)


def _preview(keys: list[str], limit: int = 4) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{f', and {len(keys) - limit} more' if len(keys) > limit else ''})"


def check_model_state(
    expected: Mapping[str, torch.Tensor],
    stored: Mapping[str, Any],
    *,
    path: str,
    what: str = "the model",
    extra_filters: bool = False,
) -> None:
    """Raises unless ``stored`` holds every key of ``expected`` with the same shape, and nothing else.

    Blur filters (``*.blur_filter``) may be missing from ``stored`` (a baseline's weights into a blurred model: the
    filters follow from the layers' options); with ``extra_filters`` they may also be extra (a blurred checkpoint
    whose algorithm the load re-applies).

    Raises:
        CheckpointError: ``model_mismatch``, naming the missing, unexpected and mis-shaped keys.
    """
    if not isinstance(stored, Mapping):
        raise CheckpointError(path, "model_mismatch", f"{path} holds no model weights (a mapping of names to tensors)")
    missing = sorted(key for key in expected if key not in stored and not _is_filter(key))
    unexpected = sorted(key for key in stored if key not in expected and not (extra_filters and _is_filter(key)))
    misshaped = sorted(
        f"{key} {tuple(stored[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in stored and (not torch.is_tensor(stored[key]) or stored[key].shape != expected[key].shape)
    )
    if missing or unexpected or misshaped:
        raise CheckpointError(
            path, "model_mismatch", f"{path} does not fit {what} (a checkpoint of another model or recipe?): missing "
            f"{_preview(missing)}; unexpected {_preview(unexpected)}; mis-shaped {_preview(misshaped)}",
            tuple(missing + unexpected + misshaped),
        )  # fmt: skip


def _records_blurpool(entries: Any) -> bool:
    return isinstance(entries, list | tuple) and any(
        isinstance(entry, list | tuple) and entry and entry[0] == BlurPool.__qualname__ for entry in entries
    )


def check_composer_checkpoint(checkpoint: Any, model: nn.Module, path: str, what: str) -> None:
    """Checks a loaded Composer checkpoint dict: its shape, its algorithm descriptions and its model weights."""
    state = checkpoint.get("state") if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or "model" not in state:
        raise CheckpointError(path, "not_a_checkpoint", f"{path} is not a Composer checkpoint (no state.model)")
    check_algorithm_descriptions(state.get("algorithms"), path)
    check_model_state(
        model.state_dict(),
        state["model"],
        path=path,
        what=what,
        extra_filters=_records_blurpool(state.get("algorithms")),
    )


@contextlib.contextmanager
def composer_load_gate(model: nn.Module, *, trusted: bool = False, what: str = "the model") -> Iterator[None]:
    """Routes every checkpoint the Composer Trainer loads while this is active through this module's checks.

    Composer 0.32 reads every monolithic checkpoint (``load_path``, autoresume) through one private function,
    ``composer.utils.checkpoint._torch_load_with_validation``, which calls ``torch.load(weights_only=False)``. While
    the context is active that function is replaced by one that runs Composer's own validation hook, then
    :func:`load_checkpoint_file`, :func:`check_algorithm_descriptions` and :func:`check_model_state` against
    ``model`` (the Trainer's model, whose surgery has run by the time Composer loads). Use it around the Trainer's
    construction, where Composer loads.
    """
    original: Callable[..., Any] | None = getattr(composer_checkpoint, "_torch_load_with_validation", None)
    if original is None:  # pragma: no cover - a Composer release that moved it: refuse rather than load unchecked
        raise RuntimeError("this Composer release has no _torch_load_with_validation; the checkpoint gate needs it")

    def gated_load(checkpoint_filepath: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
        composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath)
        # Composer links a local file into a temporary folder: name the user's file.
        path = os.path.realpath(checkpoint_filepath)
        checkpoint = load_checkpoint_file(path, trusted=trusted, map_location=map_location)
        check_composer_checkpoint(checkpoint, model, path, what)
        return checkpoint

    composer_checkpoint._torch_load_with_validation = gated_load
    try:
        yield
    finally:
        composer_checkpoint._torch_load_with_validation = original
