"""Atomic writes: every file this package writes (summaries, reports, evaluations, plots, benchmark results) appears
whole or not at all.

The content goes to a temporary file in the destination's folder (same file system, so the rename is atomic), is
flushed to disk, then renamed over the destination. A crash, a kill or a full disk at any moment leaves either the old
file or the new one, never a truncated one; the temporary file is removed on any error. Standard library only.

Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> path = write_json_atomically(folder / "summary.json", {"accuracy": 98.8})
    >>> json.loads(path.read_text())
    {'accuracy': 98.8}
    >>> sorted(p.name for p in folder.iterdir())  # no temporary file is left behind
    ['summary.json']
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_json_atomically", "write_text_atomically"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write to (by any means: ``savefig``, ``torch.save``, ``open``);
    on leaving the block without an error it is synced and renamed to ``path``, else removed.

    ``suffix`` keeps the extension writers that infer the format from the name need (``.png``).
    """
    destination = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=suffix, dir=destination.parent)
    os.close(handle)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes it private; the result is an ordinary file
        yield Path(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())  # the content is on disk before the name points at it
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` whole or not at all; returns ``path`` as a Path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomically(path: str | os.PathLike[str], payload: Any) -> Path:
    """Writes ``payload`` as indented JSON (and a final newline) to ``path`` whole or not at all; returns the Path."""
    return write_text_atomically(path, json.dumps(payload, indent=2) + "\n")
