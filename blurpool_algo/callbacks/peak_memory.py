"""Peak memory of this process since a reset, by the best method the device and system offer (torch only).

``cuda``: ``torch.cuda.max_memory_allocated`` (tensors only, not the caching allocator's reserve), reset at the start.
``mps``: the tensors' memory, ``torch.mps.current_allocated_memory``, sampled (MPS keeps no peak). On the CPU, the
resident set: ``rss+hwm``, the largest of ``VmRSS`` samples and of the kernel's high-water mark ``VmHWM`` when
``/proc/self/clear_refs`` could reset it (which also catches temporaries freed between samples); ``rss``, the samples
alone (the reset was refused); ``ru_maxrss`` outside Linux, ``getrusage``'s lifetime peak (it cannot be reset).

Example:
    >>> peak = PeakMemory.start("cpu")
    >>> peak.source in ("rss+hwm", "rss", "ru_maxrss") and peak.bytes() > 0
    True
"""

from __future__ import annotations

import functools
import resource
import sys
from collections.abc import Callable

import torch

__all__ = ["PEAK_MEMORY_SOURCES", "PeakMemory"]

#: Values of :attr:`PeakMemory.source`.
PEAK_MEMORY_SOURCES: tuple[str, ...] = ("cuda", "mps", "rss+hwm", "rss", "ru_maxrss")

_PROC_STATUS = "/proc/self/status"
_PROC_CLEAR_REFS = "/proc/self/clear_refs"


def _proc_status_bytes(field: str) -> int | None:
    """Returns a ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes, or None where unreadable."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark (``VmHWM``); returns whether that worked.

    Writing ``5`` to ``/proc/self/clear_refs`` does this on Linux >= 4.0; containers may forbid it.
    """
    try:
        with open(_PROC_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
    except OSError:  # PermissionError included; also the file is missing outside Linux
        return False
    return True


def _max_rss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * (1 if sys.platform == "darwin" else 1024)


class PeakMemory:
    """Peak memory since :meth:`start`: the largest of the samples taken by :meth:`sample` and of what the method's
    own high-water mark reports, in bytes.

    Attributes:
        source: the method, one of :data:`PEAK_MEMORY_SOURCES`.
        sampled: the largest sample so far, bytes (0 for methods that take none).
    """

    def __init__(
        self,
        source: str,
        *,
        current: Callable[[], int | None] | None = None,
        high_water: Callable[[], int | None] | None = None,
    ) -> None:
        self.source = source
        self._current, self._high_water = current, high_water
        self.sampled = 0
        self.sample()

    @classmethod
    def start(cls, device: str) -> PeakMemory:
        """Resets what can be reset and returns the method for ``device`` (``'cuda'``, ``'mps'``, else the CPU).

        On CUDA, the current device (a Trainer makes its GPU the current one).
        """
        if device == "cuda":
            index = torch.cuda.current_device()
            torch.cuda.reset_peak_memory_stats(index)
            return cls("cuda", high_water=functools.partial(torch.cuda.max_memory_allocated, index))
        if device == "mps":
            return cls("mps", current=torch.mps.current_allocated_memory)
        if _proc_status_bytes("VmRSS") is None:
            return cls("ru_maxrss", high_water=_max_rss_bytes)
        rss = functools.partial(_proc_status_bytes, "VmRSS")
        if _reset_peak_rss():
            return cls("rss+hwm", current=rss, high_water=functools.partial(_proc_status_bytes, "VmHWM"))
        return cls("rss", current=rss)

    def sample(self) -> None:
        """Takes a sample now (a no-op for methods that keep their own peak)."""
        value = self._current() if self._current is not None else None
        if value is not None:
            self.sampled = max(self.sampled, int(value))

    def bytes(self) -> int:
        """The peak so far, in bytes."""
        high_water = self._high_water() if self._high_water is not None else None
        return max(self.sampled, int(high_water or 0))
