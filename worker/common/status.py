"""What a running worker is doing, for its owner: a live line on the terminal and a JSON
status file beside the identity file that `idlegrid worker status` reads.

`WorkerStatus` holds the state (idle, serving, paused, draining), the counts and the job
in hand; listeners (`StatusFile`, `TerminalLine`) are told on every change. The file is
replaced atomically, so a reader never sees half of it, and removed when the worker
exits; a file left by a killed worker is recognised by its dead pid.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TextIO

__all__ = [
    "State",
    "StatusFile",
    "TerminalLine",
    "WorkerStatus",
    "pid_alive",
    "read_status",
    "status_path",
]

# idle: asking for work; serving: running a job; paused: a donor control holds it back;
# draining: finishing the job in hand after SIGINT/SIGTERM, then exiting
State = Literal["idle", "serving", "paused", "draining"]


def status_path(identity_file: Path) -> Path:
    """The status file of the worker that holds `identity_file` (`worker-NAME.status.json`
    beside `worker-NAME.key`)."""
    return identity_file.with_suffix(".status.json")


class WorkerStatus:
    """The worker's state and counts; every change is passed to the listeners."""

    def __init__(self, name: str, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.pid = os.getpid()
        self.state: State = "idle"
        # why the worker is paused (None unless paused)
        self.reason: str | None = None
        self.jobs_done = 0
        self.kudos_earned = 0
        self.current_job: str | None = None
        self._clock = clock
        self.started_at = clock()
        self.updated_at = self.started_at
        self._listeners: list[Callable[[WorkerStatus], None]] = []

    def listen(self, listener: Callable[[WorkerStatus], None]) -> None:
        self._listeners.append(listener)
        listener(self)

    def set_state(self, state: State, reason: str | None = None) -> None:
        """Enter `state`. Draining is final: nothing moves the worker out of it."""
        if self.state == "draining" or (state, reason) == (self.state, self.reason):
            return
        self.state, self.reason = state, reason
        self._changed()

    def job_started(self, job_id: str) -> None:
        self.current_job = job_id
        if self.state != "draining":
            self.state, self.reason = "serving", None
        self._changed()

    def job_paid(self, kudos: int) -> None:
        self.jobs_done += 1
        self.kudos_earned += kudos

    def job_ended(self) -> None:
        self.current_job = None
        self._changed()

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "jobs_done": self.jobs_done,
            "kudos_earned": self.kudos_earned,
            "current_job": self.current_job,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
        }

    def line(self) -> str:
        """One line for the terminal, e.g. `serving job 4f2a | 3 jobs, 12 kudos`."""
        state = f"paused ({self.reason})" if self.state == "paused" else self.state
        job = f" job {self.current_job}" if self.current_job else ""
        return f"{self.name}: {state}{job} | {self.jobs_done} jobs, {self.kudos_earned} kudos"

    def _changed(self) -> None:
        self.updated_at = self._clock()
        for listener in self._listeners:
            listener(self)


class StatusFile:
    """Keeps `path` equal to the status (a listener); `remove()` when the worker exits."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, status: WorkerStatus) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(status.as_dict(), indent=1) + "\n")
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class TerminalLine:
    """Rewrites one line of a terminal (a listener); only for a stream that is a TTY.

    Log handlers writing to the same terminal should write through it (`write`), so that
    a log line replaces the status line and the status line is drawn again below it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._text: str | None = None

    def __call__(self, status: WorkerStatus) -> None:
        self._text = status.line()
        self._draw()

    def _draw(self) -> None:
        # \r back to the line's start, ESC[K clears what a longer previous line left
        self.stream.write("\r\x1b[K" + (self._text or ""))
        self.stream.flush()

    def write(self, text: str) -> int:
        """Write `text` (e.g. a log line) above the status line."""
        if self._text is not None:
            self.stream.write("\r\x1b[K")
        self.stream.write(text)
        if self._text is not None and text.endswith("\n"):
            self._draw()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self._text is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._text = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def read_status(path: Path) -> dict[str, Any] | None:
    """The status a live worker wrote to `path`; None when there is no file, it cannot be
    read, or its worker is gone (killed before it could remove the file)."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or not isinstance(status.get("pid"), int):
        return None
    return status if pid_alive(status["pid"]) else None
