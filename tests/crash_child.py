"""`python -m blurpool_algo.train`, stopped in the middle of a checkpoint write, for tests/test_resume.py.

    python tests/crash_child.py NAME MARKER THREADS -- TRAIN_ARGS...

When Composer writes the checkpoint file named NAME, this process writes the first half of its bytes, flushes them to
the disk, creates MARKER and waits: the test then kills it with SIGKILL, in the middle of the write. THREADS pins
torch's intra-op threads, so the test's own runs compute bit-identically.
"""

from __future__ import annotations

import io
import os
import sys
import time

import torch


def main() -> int:
    name, marker, threads = sys.argv[1:4]
    train_args = sys.argv[sys.argv.index("--") + 1 :]
    torch.set_num_threads(int(threads))
    original_save = torch.save

    def faulty_save(obj, f, *args, **kwargs):
        if os.path.basename(getattr(f, "name", "")) != name:
            return original_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        open(marker, "w").close()
        while True:
            time.sleep(60)

    torch.save = faulty_save
    from blurpool_algo.train import main as train

    return train(train_args)


if __name__ == "__main__":
    sys.exit(main())
