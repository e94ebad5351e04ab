"""Real idlegrid processes for tests: start, wait for a line, stop by pid."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Proc", "assert_confined", "sandboxed_engine"]


def sandboxed_engine(pid: int) -> int:
    """The pid of the one sandbox child (`python -m sandbox.child`, bubblewrap's grandchild)
    among the descendants of process `pid`."""
    import psutil

    engines = [
        p.pid
        for p in psutil.Process(pid).children(recursive=True)
        if p.cmdline()[1:3] == ["-m", "sandbox.child"]
    ]
    assert len(engines) == 1, engines
    engine: int = engines[0]
    return engine


def assert_confined(engine: int, outside: int, namespaces: tuple[str, ...]) -> None:
    """Issue 11's check, from the host's /proc: the engine has no_new_privs and a seccomp
    filter, and none of `namespaces` is shared with process `outside`."""
    lines = Path(f"/proc/{engine}/status").read_text().splitlines()
    status = {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2"), status
    for ns in namespaces:
        assert os.readlink(f"/proc/{engine}/ns/{ns}") != os.readlink(f"/proc/{outside}/ns/{ns}"), ns


class Proc:
    """An `idlegrid ...` subprocess whose output goes to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.args = args
        self._handle = log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "client.cli", *args],
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Poll the log until `pattern` appears; fail with the log if the process dies."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.args[0]} exited {self.popen.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)
            self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=30)
        # whatever the process left behind in its group (e.g. an engine child)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._handle.close()
        return self.popen.returncode
