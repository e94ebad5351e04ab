"""The engine's peak memory during one job, as the engine reports it (ImageResult).

On CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at the job's
start, the tensors' peak (not the caching allocator's reserve).

On the CPU: the peak resident set size of the engine process during the job. Linux keeps
the process's high-water mark (`VmHWM` in /proc/self/status) and resets it to the current
RSS when "5" is written to /proc/self/clear_refs (Linux 4.0+, allowed in the sandbox), so
the mark read after the job is the job's own peak, weights included (they are resident).
Where the reset is refused, the lifetime mark is all there is: it is reported only when
the job raised it (then it is the job's peak), else the peak is unknown (None), never the
peak of an earlier job.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

__all__ = ["PeakMemory", "high_water_mark"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_HWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.MULTILINE)


def high_water_mark() -> int | None:
    """The process's peak RSS in bytes since it started or the last reset (None off Linux)."""
    try:
        found = _HWM.search(_STATUS.read_text())
    except OSError:
        return None
    return None if found is None else int(found.group(1)) * 1024


def _reset_high_water_mark() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """`start()` before a job, `peak()` after it: the job's peak memory in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset = False
        self._before: int | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._reset = _reset_high_water_mark()
        self._before = high_water_mark()

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        after = high_water_mark()
        if self._reset or after is None:
            return after
        # without a reset the mark is the process's lifetime peak: the job's only if it rose
        return after if self._before is not None and after > self._before else None
