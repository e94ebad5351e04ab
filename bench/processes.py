"""What the benchmark scripts share: waiting for a started process to print a line."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

__all__ = ["wait_line"]


def wait_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    """Poll `log` until `pattern` appears; return its first group (or the whole match).
    Exits with the log if the process dies or the line does not come in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return match.group(1 if match.lastindex else 0)
        if proc.poll() is not None:
            raise SystemExit(f"process exited early:\n{log.read_text()}")
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {pattern!r}:\n{log.read_text()}")
