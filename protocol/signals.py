"""SIGINT/SIGTERM for every idlegrid service: one way to be asked to stop.

`StopSignals` (asyncio services) sets an event on the first signal and counts them, so that
each service decides what a second one means (the coordinator: nothing more; a worker: give
the job in hand back; a block server: stop without draining). `caught_signals` is the same
for code without an event loop (the `--processes` supervisor): it records the signals and
wakes a socket that a `wait()` watches. `exit_on_sigterm` makes SIGTERM unwind a
synchronous command like Ctrl-C does (its `finally` blocks run).

Why in protocol, which does no I/O: the coordinator and the worker may not import each
other, and both stop the same way; this installs handlers, it reads and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType

__all__ = ["STOP_SIGNALS", "StopSignals", "caught_signals", "exit_on_sigterm"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

log = logging.getLogger(__name__)


class StopSignals:
    """While entered (inside a running event loop): every SIGINT/SIGTERM sets `stop`, adds
    one to `count` and calls `on_signal(count)`. `ignore_more()` turns later signals into a
    log line (a shutdown that must not be interrupted)."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.stop = asyncio.Event()
        self.count = 0
        self._on_signal = on_signal
        self._ignoring = False

    def _handle(self) -> None:
        if self._ignoring:
            log.info("already stopping")
            return
        self.count += 1
        self.stop.set()
        if self._on_signal is not None:
            self._on_signal(self.count)

    def ignore_more(self) -> None:
        self._ignoring = True

    def __enter__(self) -> StopSignals:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


@contextlib.contextmanager
def caught_signals(wake: socket.socket) -> Iterator[list[int]]:
    """Without an event loop: the SIGINT/SIGTERM received while inside, in order; each one
    also writes to `wake` (a non-blocking socket), so that a `wait()` on its peer returns."""
    caught: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    old_wakeup = signal.set_wakeup_fd(wake.fileno(), warn_on_full_buffer=False)
    try:
        yield caught
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_on_sigterm() -> None:
    """From now on SIGTERM raises SystemExit(143) (as Ctrl-C raises KeyboardInterrupt)."""

    def on_sigterm(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
