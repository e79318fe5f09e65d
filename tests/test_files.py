"""blurpool_algo.files: a file appears whole or not at all, under an error, a SIGKILL mid-write, and a full disk."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blurpool_algo.files import atomic_path, write_json_atomically, write_text_atomically


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_creates_an_ordinary_file_and_leaves_nothing_else(tmp_path):
    old_umask = os.umask(0o077)  # a private umask must not make the report private (mkstemp's 0600 is undone)
    try:
        path = write_json_atomically(tmp_path / "report.json", {"a": [1, 2]})
    finally:
        os.umask(old_umask)
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert path.read_text().endswith("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _names(tmp_path) == ["report.json"]


def test_an_error_inside_the_block_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = write_text_atomically(tmp_path / "summary.txt", "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half of the new")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old\n"
    assert _names(tmp_path) == ["summary.txt"]


def test_the_suffix_is_kept_for_writers_that_read_the_format_from_the_name(tmp_path):
    with atomic_path(tmp_path / "plot.png", suffix=".png") as temporary:
        assert temporary.suffix == ".png" and temporary.parent == tmp_path
        temporary.write_bytes(b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    from blurpool_algo.files import atomic_path
    with atomic_path(sys.argv[1]) as temporary, open(temporary, "w") as stream:
        for _ in range(10_000):
            stream.write("new " * 1000)
            stream.flush()
            print("writing", flush=True)
            time.sleep(0.01)
    """
)


def test_sigkill_mid_write_leaves_the_old_file_whole(tmp_path):
    path = write_text_atomically(tmp_path / "evaluation.json", '{"old": true}\n')
    child = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # several chunks are on disk under the temporary name
            assert child.stdout.readline() == "writing\n"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert path.read_text() == '{"old": true}\n'
    # A killed process cannot clean up: its partial file stays under a hidden temporary name, never the real one.
    leftovers = [name for name in _names(tmp_path) if name != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(".evaluation.json.")
    assert (tmp_path / leftovers[0]).stat().st_size > 0  # control: the kill did land mid-write


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_a_full_disk_raises_and_keeps_the_old_file(tmp_path):
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN")
    try:
        path = write_text_atomically(disk / "report.md", "old report\n")
        with pytest.raises(OSError) as error:
            write_text_atomically(path, "x" * 2 * 2**20)  # twice the disk
        assert error.value.errno == 28  # ENOSPC, the real one
        assert path.read_text() == "old report\n"
        assert _names(disk) == ["report.md"]  # the partial temporary was removed: the space is free again
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
