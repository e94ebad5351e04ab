"""The clock the coordinator reads and waits on: `create_app(config, clock=...)`.

Everything in the service that depends on time passing takes it from here: transaction
timestamps (leases, holds, uptime), the lease reaper's rounds, rate-limit refills, long-poll
deadlines, event-stream refreshes and keep-alives. Tests pass a clock they advance by hand
(`tests.clock.MockClock`, after trio's) instead of sleeping or patching `time`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since the epoch: the timestamps stored in the database."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps back: intervals and deadlines in memory."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once `seconds` have passed on this clock."""
        ...

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        """`asyncio.timeout(seconds)`, with the seconds counted on this clock."""
        ...


class SystemClock:
    """Real time."""

    def __call__(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)


SYSTEM_CLOCK = SystemClock()
