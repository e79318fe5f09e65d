"""Crash-safe resume, for real: a SIGKILL in the middle of a checkpoint write, a write that fails with ENOSPC, and a
real full file system. In each case the same command, run again, resumes from the last complete checkpoint, sets the
partial file aside (never deletes it) and ends with final weights equal, bit for bit, to an uninterrupted run's."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, ROOT, TINY, assert_same_weights, model_weights

from blurpool_algo.checkpoints import recover_save_folder
from blurpool_algo.recipe import load_recipe
from blurpool_algo.trainer import run_recipe

CHILD = Path(__file__).with_name("crash_child.py")
FINAL = "ep0-ba4-rank0.pt"  # 32 synthetic samples in batches of 8: the last batch of epoch 0


def _overrides(folder: Path) -> list[str]:
    return [*TINY, "max_duration=4ba", "save_interval=1ba", f"save_folder={folder}", "run_name=crash",
            "autoresume=true"]  # fmt: skip


def _run(folder: Path) -> None:
    run_recipe(load_recipe(QUICKSTART, _overrides(folder)))


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    folder = tmp_path_factory.mktemp("uninterrupted")
    _run(folder)
    return model_weights(folder / FINAL)


def _child(folder: Path, marker: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, str(CHILD), "ep0-ba3-rank0.pt", str(marker), str(torch.get_num_threads()), "--",
               "-f", str(QUICKSTART), *_overrides(folder)]  # fmt: skip
    # Its output to a file: an unread pipe could fill and stop the child before it reaches the checkpoint.
    with open(log, "w") as stream:
        return subprocess.Popen(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)


def _resumes_to_the_same_weights(folder: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    partial = folder / "ep0-ba3-rank0.pt"
    size = partial.stat().st_size
    assert size > 0, "the fault must leave a partial file behind"
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba2-rank0.pt"
    with pytest.warns(UserWarning, match=r"set aside incomplete checkpoint .*ep0-ba3-rank0\.pt"):
        _run(folder)  # the same command as the crashed run
    aside = list((folder / "incomplete").iterdir())
    assert [p.name.split(".pt.")[0] for p in aside] == ["ep0-ba3-rank0"] and aside[0].stat().st_size == size
    assert_same_weights(model_weights(folder / FINAL), uninterrupted)


def test_sigkill_during_a_checkpoint_write(tmp_path, uninterrupted):
    folder, marker, log = tmp_path / "run", tmp_path / "writing", tmp_path / "child.log"
    child = _child(folder, marker, log)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), log.read_text()[-3000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    _resumes_to_the_same_weights(folder, uninterrupted)


def _train(folder: Path, capsys) -> tuple[int, str]:
    """``python -m blurpool_algo.train`` with the crash test's recipe, in this process: (exit code, stderr)."""
    from blurpool_algo.train import main

    code = main(["-f", str(QUICKSTART), *_overrides(folder)])
    return code, capsys.readouterr().err


def test_a_write_that_fails_with_enospc(tmp_path, uninterrupted, capsys, monkeypatch):
    folder = tmp_path / "run"
    original_save = torch.save

    def full_disk_at_the_third_checkpoint(obj, f, *args, **kwargs):
        if os.path.basename(getattr(f, "name", "")) != "ep0-ba3-rank0.pt":
            return original_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + bytes(1000))  # the start of a zip archive, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)

    monkeypatch.setattr(torch, "save", full_disk_at_the_third_checkpoint)
    code, stderr = _train(folder, capsys)
    monkeypatch.undo()
    assert code == 1 and stderr.strip().splitlines()[-1].startswith("error: no space left on the disk holding")
    _resumes_to_the_same_weights(folder, uninterrupted)


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0  # fmt: skip


def test_a_real_full_file_system(tmp_path, uninterrupted, capsys):
    mount = tmp_path / "small-disk"
    # Room for two of the tiny run's checkpoints (about 39 MB each), not three.
    if not _mount_tmpfs(mount, "100m"):
        pytest.skip("mounting a tmpfs needs CAP_SYS_ADMIN; the injected ENOSPC test covers the write path")
    try:
        folder = mount / "run"
        # torch's zip writer reports the short write as a RuntimeError with no errno: the free space tells.
        code, stderr = _train(folder, capsys)
        assert code == 1 and "error: no space left on the disk holding" in stderr, stderr[-3000:]
        # Free space, as a user would, then the same command.
        subprocess.run(["mount", "-o", "remount,size=400m", str(mount)], check=True)
        _resumes_to_the_same_weights(folder, uninterrupted)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_recovery_keeps_the_newest_complete_checkpoint_and_moves_only_partial_ones(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"w": torch.ones(3)}, tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (folder / "ep0-ba1-rank0.pt").write_bytes(data)
    (folder / "ep0-ba2-rank0.pt").write_bytes(data)  # complete, but the crash came before `latest` moved to it
    (folder / "ep0-ba3-rank0.pt").write_bytes(data[:100])
    (folder / "ep0-ba4-rank0.pt").write_bytes(b"")
    (folder / "ep0-ba9-rank1.pt").write_bytes(b"")  # another rank's: not this rank's business
    os.symlink("ep0-ba1-rank0.pt", folder / "latest-rank0.pt")
    with pytest.warns(UserWarning, match="set aside"):
        recovery = recover_save_folder(folder)
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba2-rank0.pt" and recovery.relinked
    assert sorted(Path(source).name for source, _ in recovery.set_aside) == ["ep0-ba3-rank0.pt", "ep0-ba4-rank0.pt"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "ep0-ba1-rank0.pt", "ep0-ba2-rank0.pt", "ep0-ba9-rank1.pt", "incomplete", "latest-rank0.pt",
    ]  # fmt: skip
    # A second pass finds nothing to do, and says nothing.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = recover_save_folder(folder)
    assert again.set_aside == () and not again.relinked
