"""Peak memory of a block of work: the CUDA allocator's peak, or the peak resident set size on CPU.

On Linux the kernel's own high-water mark (``VmHWM``) is reset at the start (``/proc/self/clear_refs``)
and read at the end, so the peak is exact; elsewhere the resident set size is sampled every 20 ms.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import torch


def rss_bytes() -> int:
    """Current resident set size (process-wide peak where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _high_water_mark() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _high_water_mark() is not None


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak`` is the peak in bytes and ``m.kind`` says
    what was measured (``cuda-allocated`` or ``peak-rss``)."""

    def __init__(self, device: torch.device, interval_s: float = 0.02) -> None:
        self.device, self.interval_s, self.peak = device, interval_s, 0
        self.kind = "cuda-allocated" if device.type == "cuda" else "peak-rss"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._kernel = False

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._kernel = _reset_high_water_mark()
            if not self._kernel:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self._kernel:
            self.peak = _high_water_mark() or rss_bytes()
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes())
