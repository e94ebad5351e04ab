"""Live progress of a job on a terminal: queue position, then step progress."""

from __future__ import annotations

import sys
from typing import TextIO

from protocol.messages import JobStatus

__all__ = ["ProgressLine"]

BAR_WIDTH = 24


class ProgressLine:
    """Redraws one status line on a terminal; prints nothing when not on a terminal."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool | None = None) -> None:
        self.stream = stream
        self.enabled = stream.isatty() if enabled is None else enabled
        self._last = ""

    def __call__(self, status: JobStatus) -> None:
        if not self.enabled:
            return
        if status.state == "queued":
            position = "?" if status.queue_position is None else status.queue_position
            text = f"queued: position {position}"
            if status.attempts:
                text += f" (retry {status.attempts})"
        elif status.state == "leased":
            total = max(status.steps, 1)
            done = min(status.step, total)
            filled = BAR_WIDTH * done // total
            text = (
                f"image {status.image + 1}/{status.n} "
                f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] step {done}/{total}"
            )
        else:
            text = status.state
        if text != self._last:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self._last = text

    def close(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\n")
            self.stream.flush()
