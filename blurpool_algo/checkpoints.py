"""The gate every checkpoint load passes: safe unpickling, literal algorithm descriptions, a strict model match, and
partial files set aside.

A checkpoint is untrusted input. A file on shared storage may have been written by anyone who can write there, and
two things in a Composer checkpoint run code when Composer loads it: the pickle itself (Composer calls
``torch.load(weights_only=False)``), and the stored algorithm descriptions, which Composer's autoload passes to
``eval``. This module closes both:

* :func:`load_checkpoint_file` unpickles with torch's weights-only unpickler and an explicit allowlist of the few
  non-tensor types Composer's own checkpoints hold (:data:`SAFE_GLOBALS`: numpy arrays for the RNG state,
  ``datetime.timedelta`` for the timestamps, torch's version string). Anything else is refused, naming the types;
  a user opts in for a file they trust (``trust_checkpoint=true`` in a recipe, ``--trust-checkpoint`` on a command).
* :func:`check_algorithm_descriptions` parses each stored description with :mod:`ast`; it must be a plain call of a
  known algorithm with literal arguments (and, for this package's BlurPool, valid options), or the file is refused.
* :func:`check_model_state` compares the stored weights with the model they are meant for: every key present with
  its shape, blur filters aside (they follow from the layer's options); it names the missing, unexpected and
  mis-shaped keys.
* :func:`composer_load_gate` puts all three in front of every load the Composer Trainer makes (``load_path`` and
  autoresume), so no code path reaches Composer's own unpickler.
* :func:`recover_save_folder` recognises a checkpoint left partial by a crash or a full disk, moves it aside (never
  deletes it) and points ``latest`` at the newest complete one, so that the same command resumes after any crash.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import functools
import os
import pickle
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blurpool_algo.layers import FILTER_BUFFER

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

#: Reason codes of :class:`CheckpointError`: what is wrong with a file, as data.
CHECKPOINT_REASONS: tuple[str, ...] = (
    "not_found",  # no such file
    "incomplete",  # a torch zip archive cut short (a crash or a full disk during its write), or an empty file
    "not_a_checkpoint",  # neither a torch archive nor a legacy torch file
    "unsafe_type",  # pickles objects of types outside the allowlist
    "bad_algorithm",  # a stored algorithm description that is not a literal call of a known algorithm
    "model_mismatch",  # weights that do not fit the model they are loaded into
)

#: How a command-line user opts in to a file they trust; library callers say their own (see ``opt_in``).
RECIPE_OPT_IN = "if you trust the file, opt in with trust_checkpoint=true (or the --trust-checkpoint flag)"

_ZIP_MAGIC = b"PK\x03\x04"
_FILTER_SUFFIX = "." + FILTER_BUFFER


class CheckpointError(ValueError):
    """A checkpoint that is refused; ``str()`` is one line naming the file and what is wrong.

    Attributes:
        path: the file.
        reason: one of :data:`CHECKPOINT_REASONS`.
        details: the offending names (types, keys or descriptions), for callers and tests.
    """

    def __init__(self, path: str, reason: str, message: str, details: tuple[str, ...] = ()) -> None:
        assert reason in CHECKPOINT_REASONS, reason
        self.path, self.reason, self.details = path, reason, details
        super().__init__(message)


# ------------------------------------------------------------------------------------------------ safe unpickling


@functools.cache
def safe_globals() -> tuple[Any, ...]:
    """The non-tensor types a Composer checkpoint of this package's recipes holds, beyond torch's own allowlist.

    Found by reading what Composer saves (``State.state_dict`` and ``reproducibility.get_rng_state``) and checked
    against real checkpoints with ``torch.serialization.get_unsafe_globals_in_checkpoint``: numpy's RNG state (an
    ``ndarray`` of ``uint32``), the timestamps' wall-clock durations, and the torch version in the metadata.
    """
    import numpy as np
    from torch.torch_version import TorchVersion

    found: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), datetime.timedelta, TorchVersion]
    # numpy 2 pickles arrays through numpy._core, numpy 1 through numpy.core.
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(__import__(module_name, fromlist=["_reconstruct"])._reconstruct)
    return tuple(dict.fromkeys(found))


def _global_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def checkpoint_file_status(path: str | os.PathLike[str], *, verify: bool = True) -> str:
    """``'complete'``, ``'incomplete'`` (empty, or a torch zip archive cut short) or ``'not_a_checkpoint'``.

    A torch archive ends with the zip central directory and every member carries a CRC, so a file cut short by a
    crash or a full disk fails :class:`zipfile.ZipFile` (no central directory) or, with ``verify``, its CRC test
    (which reads the whole file). Files of torch's legacy (non-zip) format count as ``'complete'`` if they start
    like a pickle: the unpickler finds out the rest.
    """
    path = os.fspath(path)
    with open(path, "rb") as stream:
        head = stream.read(4)
    if not head:
        return "incomplete"
    if head != _ZIP_MAGIC:
        return "complete" if head[:1] == b"\x80" else "not_a_checkpoint"
    try:
        with zipfile.ZipFile(path) as archive:
            return "complete" if not verify or archive.testzip() is None else "incomplete"
    except (zipfile.BadZipFile, OSError, EOFError):
        return "incomplete"


def check_checkpoint_file(path: str | os.PathLike[str], *, verify: bool = False) -> None:
    """Raises unless ``path`` is a file that looks like a whole torch checkpoint (cheap: its header and directory).

    Raises:
        CheckpointError: ``not_found``, ``incomplete`` or ``not_a_checkpoint``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(path, "not_found", f"checkpoint not found: {path}")
    status = checkpoint_file_status(path, verify=verify)
    if status == "incomplete":
        raise CheckpointError(
            path, "incomplete", f"{path} is an incomplete checkpoint ({os.path.getsize(path)} bytes: cut short by a "
            "crash or a full disk while it was written)",
        )  # fmt: skip
    if status == "not_a_checkpoint":
        raise CheckpointError(path, "not_a_checkpoint", f"{path} is not a torch checkpoint file")


def load_checkpoint_file(
    path: str | os.PathLike[str],
    *,
    trusted: bool = False,
    map_location: Any = "cpu",
    opt_in: str = RECIPE_OPT_IN,
) -> Any:
    """Unpickles a checkpoint file with torch's weights-only loader and :func:`safe_globals`; nothing else runs.

    Args:
        path: the file.
        trusted: unpickle anything (``torch.load(weights_only=False)``): only for a file the user trusts.
        map_location: as for :func:`torch.load`.
        opt_in: the sentence telling the user how to opt in, appended to an ``unsafe_type`` refusal.

    Raises:
        CheckpointError: ``not_found``, ``incomplete``, ``not_a_checkpoint`` or ``unsafe_type``.
    """
    path = os.fspath(path)
    check_checkpoint_file(path, verify=True)
    if not trusted:
        allowed = {_global_name(obj) for obj in safe_globals()}
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a legacy-format file: the weights-only unpickler below decides
            found = []
        unexpected = sorted(set(found) - allowed)
        if unexpected:
            raise CheckpointError(
                path, "unsafe_type", f"{path} holds objects of types the safe loader does not allow "
                f"({', '.join(unexpected)}); loading it could run code. {opt_in[0].upper()}{opt_in[1:]}",
                tuple(unexpected),
            )  # fmt: skip
    try:
        with torch.serialization.safe_globals(list(safe_globals())):
            return torch.load(path, map_location=map_location, weights_only=not trusted)
    except pickle.UnpicklingError:
        if trusted:
            raise CheckpointError(path, "not_a_checkpoint", f"{path} is not a torch checkpoint file") from None
        raise CheckpointError(
            path, "unsafe_type", f"{path} holds a pickled object the safe loader refuses; loading it could run code. "
            f"{opt_in[0].upper()}{opt_in[1:]}",
        ) from None  # fmt: skip
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            path, "not_a_checkpoint", f"{path} cannot be read as a torch checkpoint ({type(error).__name__})"
        ) from None


# ----------------------------------------------------------------------------------------- algorithm descriptions


@functools.cache
def _known_algorithms() -> dict[str, type]:
    """Dotted call name -> class: Composer's algorithms by class name, and this package's as ``blurpool_algo.X``."""
    import composer.algorithms
    from composer.core import Algorithm

    from blurpool_algo.algorithm import BlurPool

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
    import composer.algorithms

    from blurpool_algo.algorithm import BlurPool

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
    from blurpool_algo.algorithm import BlurPool

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
    import composer.utils.checkpoint as composer_checkpoint

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


# --------------------------------------------------------------------------------------------- crash-safe resume

#: Composer's default checkpoint names (``save_filename``, ``save_latest_filename``), which the recipes use.
_CHECKPOINT_NAME = re.compile(r"^ep(?P<epoch>\d+)-ba(?P<batch>\d+)-rank(?P<rank>\d+)\.pt$")
LATEST_NAME = "latest-rank{rank}.pt"
#: Where partial checkpoints go, inside the save folder (Composer only looks at the folder's own files).
SET_ASIDE_FOLDER = "incomplete"


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover_save_folder` did.

    Attributes:
        set_aside: ``(file, where it went)`` for each partial checkpoint moved aside.
        latest: the checkpoint ``latest`` points to now (None: no complete checkpoint).
        relinked: whether ``latest`` had to be (re)pointed.
    """

    set_aside: tuple[tuple[str, str], ...]
    latest: str | None
    relinked: bool

    def __str__(self) -> str:
        lines = [f"set aside incomplete checkpoint {source} -> {target}" for source, target in self.set_aside]
        if self.relinked:
            lines.append(f"resuming from the last complete checkpoint: {self.latest or 'none, starting afresh'}")
        return "; ".join(lines)


def room_for_a_checkpoint(folder: str | os.PathLike[str]) -> tuple[int, int]:
    """``(free bytes, bytes the next checkpoint needs)`` on the file system of ``folder``.

    The need is the size of the largest checkpoint already there (the next one is about as large); 0 when there is
    none. A write that failed with ``free < need`` failed because the disk is full, whatever error torch raised
    (its zip writer reports a short write as ``RuntimeError: unexpected pos``, with no errno).
    """
    folder = os.fspath(folder)
    existing = folder
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    sizes = [
        entry.stat().st_size
        for entry in (os.scandir(folder) if os.path.isdir(folder) else ())
        if entry.is_file(follow_symlinks=False) and _CHECKPOINT_NAME.match(entry.name)
    ]
    return shutil.disk_usage(existing).free, max(sizes, default=0)


def _replace_symlink(link: str, target_name: str) -> None:
    """Points ``link`` at ``target_name`` atomically (a new link under a temporary name, then a rename)."""
    temporary = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)
    os.symlink(target_name, temporary)
    os.replace(temporary, link)


def recover_save_folder(folder: str | os.PathLike[str], *, rank: int = 0) -> Recovery:
    """Makes ``folder`` resumable after a crash: partial newest checkpoints aside, ``latest`` on the last whole one.

    Checks this rank's checkpoints (``ep{E}-ba{B}-rank{R}.pt``) newest first. Each incomplete one
    (:func:`checkpoint_file_status`) is moved to ``folder/incomplete/`` with a UTC time suffix, never deleted, until
    a complete one is found; ``latest-rank{R}.pt`` is then pointed at it (atomically) if it pointed elsewhere or
    nowhere. A warning names every move. Composer's autoresume then loads that checkpoint and saves the next ones
    under their usual names, which no partial file blocks any more.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return Recovery((), None, False)
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match and int(match["rank"]) == rank and os.path.isfile(os.path.join(folder, name)):
            found.append((int(match["batch"]), int(match["epoch"]), name))
    moved: list[tuple[str, str]] = []
    newest_complete = None
    for _, _, name in sorted(found, reverse=True):
        path = os.path.join(folder, name)
        if checkpoint_file_status(path) == "complete":
            newest_complete = name
            break
        aside = os.path.join(folder, SET_ASIDE_FOLDER)
        os.makedirs(aside, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = os.path.join(aside, f"{name}.{stamp}")
        os.replace(path, target)
        moved.append((path, target))
    link = os.path.join(folder, LATEST_NAME.format(rank=rank))
    current = os.readlink(link) if os.path.islink(link) else None
    relinked = False
    if newest_complete is not None and current != newest_complete:
        _replace_symlink(link, newest_complete)
        relinked = True
    elif newest_complete is None and os.path.lexists(link):
        # Only partial checkpoints: ``latest`` points at a moved file; move the link aside too, so the run starts
        # afresh instead of failing on a dangling link.
        aside = os.path.join(folder, SET_ASIDE_FOLDER)
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, os.path.basename(link))
        os.replace(link, target)
        moved.append((link, target))
        relinked = True
    recovery = Recovery(tuple(moved), os.path.join(folder, newest_complete) if newest_complete else None, relinked)
    if moved or relinked:
        warnings.warn(f"{folder}: {recovery}", stacklevel=2)
    return recovery
