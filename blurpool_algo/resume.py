"""Crash-safe resume of a save folder: checkpoints a crash or a full disk left partial are set aside, never deleted,
and ``latest`` points at the newest complete one, so the same command resumes after any crash.

Composer's autoresume loads ``latest-rank{R}.pt`` and saves the next checkpoints under their usual names; a partial
file at either name would make it fail or resume from garbage. :func:`recover_save_folder` runs before the Trainer is
built (``autoresume=true``); :func:`room_for_a_checkpoint` tells a failed save that was a full disk from other errors.

Example:
    >>> import pathlib, tempfile, torch, warnings
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> torch.save({"step": 1}, folder / "ep0-ba1-rank0.pt")
    >>> _ = (folder / "ep0-ba2-rank0.pt").write_bytes(b"PK\\x03\\x04 cut short")  # a kill during the write
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     recovery = recover_save_folder(folder)
    >>> pathlib.Path(recovery.latest).name, os.readlink(folder / "latest-rank0.pt")
    ('ep0-ba1-rank0.pt', 'ep0-ba1-rank0.pt')
    >>> [pathlib.Path(source).name for source, _ in recovery.set_aside]
    ['ep0-ba2-rank0.pt']
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import warnings
from dataclasses import dataclass

from blurpool_algo.checkpoint_files import checkpoint_file_status

__all__ = ["LATEST_NAME", "SET_ASIDE_FOLDER", "Recovery", "recover_save_folder", "room_for_a_checkpoint"]

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


def _move_aside(folder: str, path: str, name: str) -> str:
    """Moves ``path`` (a rename, never a copy or a deletion) to ``folder/incomplete/name``; returns where it went."""
    aside = os.path.join(folder, SET_ASIDE_FOLDER)
    os.makedirs(aside, exist_ok=True)
    target = os.path.join(aside, name)
    os.replace(path, target)
    return target


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
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        moved.append((path, _move_aside(folder, path, f"{name}.{stamp}")))
    link = os.path.join(folder, LATEST_NAME.format(rank=rank))
    current = os.readlink(link) if os.path.islink(link) else None
    relinked = False
    if newest_complete is not None and current != newest_complete:
        _replace_symlink(link, newest_complete)
        relinked = True
    elif newest_complete is None and os.path.lexists(link):
        # Only partial checkpoints: ``latest`` points at a moved file; move the link aside too, so the run starts
        # afresh instead of failing on a dangling link.
        moved.append((link, _move_aside(folder, link, os.path.basename(link))))
        relinked = True
    recovery = Recovery(tuple(moved), os.path.join(folder, newest_complete) if newest_complete else None, relinked)
    if moved or relinked:
        warnings.warn(f"{folder}: {recovery}", stacklevel=2)
    return recovery
