"""Checkpoint files: whether one is whole, and unpickling it without running code.

A checkpoint is untrusted input: two things in a Composer checkpoint run code when Composer loads it, the pickle
itself (Composer calls ``torch.load(weights_only=False)``) and the stored algorithm descriptions (which
:mod:`blurpool_algo.checkpoints` checks). This module closes the first, with torch alone (no Composer, no model):

* :func:`checkpoint_file_status` / :func:`check_checkpoint_file` recognise a file cut short by a crash or a full disk
  from its zip directory and CRCs, before anything is unpickled.
* :func:`load_checkpoint_file` unpickles with torch's weights-only unpickler and an explicit allowlist of the few
  non-tensor types Composer's own checkpoints hold (:func:`safe_globals`: numpy arrays for the RNG state,
  ``datetime.timedelta`` for the timestamps, torch's version string). Anything else is refused, naming the types;
  a user opts in for a file they trust (``trust_checkpoint=true`` in a recipe, ``--trust-checkpoint`` on a command).

Every refusal is a :class:`CheckpointError` whose ``reason`` is one of :data:`CHECKPOINT_REASONS`.

Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "weights.pt"
    >>> torch.save({"weight": torch.ones(2)}, path)
    >>> checkpoint_file_status(path)
    'complete'
    >>> load_checkpoint_file(path)["weight"]
    tensor([1., 1.])
    >>> _ = path.write_bytes(path.read_bytes()[:100])  # cut short, as a crash during the write leaves it
    >>> try:
    ...     load_checkpoint_file(path)
    ... except CheckpointError as error:
    ...     print(error.reason)
    incomplete
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import pickle
import zipfile
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

__all__ = [
    "CHECKPOINT_REASONS",
    "RECIPE_OPT_IN",
    "CheckpointError",
    "check_checkpoint_file",
    "checkpoint_file_status",
    "load_checkpoint_file",
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


@functools.cache
def safe_globals() -> tuple[Any, ...]:
    """The non-tensor types a Composer checkpoint of this package's recipes holds, beyond torch's own allowlist.

    Found by reading what Composer saves (``State.state_dict`` and ``reproducibility.get_rng_state``) and checked
    against real checkpoints with ``torch.serialization.get_unsafe_globals_in_checkpoint``: numpy's RNG state (an
    ``ndarray`` of ``uint32``), the timestamps' wall-clock durations, and the torch version in the metadata.
    """
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
