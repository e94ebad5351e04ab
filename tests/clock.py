"""A clock that moves only when a test says so (trio's MockClock, for asyncio).

Pass it to `create_app(config, clock=...)` (or `Store.open`, `Signals`, `RateLimiter`) and
`advance` it instead of sleeping: leases expire, buckets refill and the reaper runs when the
test decides, in no real time and in the same order on every run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from coordinator.app import REAPER

__all__ = ["MockClock", "reaper_round"]


@dataclass(eq=False)
class _Timer:
    deadline: float
    scope: asyncio.Timeout
    task: str


class MockClock:
    """`clock()` is the time; `advance(seconds)` moves it and ends the sleeps and timeouts
    that are due. Wall and monotonic time are the same number here."""

    def __init__(self, start: float | None = None) -> None:
        # real time by default: workers sign their registrations with the real clock, and
        # the coordinator checks those timestamps against its own
        self._now = time.time() if start is None else start
        self._timers: set[_Timer] = set()
        self._changed = asyncio.Event()

    def __call__(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; got advance({seconds})")
        self._now += seconds
        for timer in [t for t in self._timers if t.deadline <= self._now]:
            self._timers.discard(timer)
            # asyncio's own timeout fires at once (on the next loop iteration)
            timer.scope.reschedule(asyncio.get_running_loop().time())

    @asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[object]:
        async with asyncio.timeout(None) as scope:
            task = asyncio.current_task()
            timer = _Timer(self._now + seconds, scope, task.get_name() if task else "")
            if timer.deadline <= self._now:
                scope.reschedule(asyncio.get_running_loop().time())
            else:
                self._timers.add(timer)
                self._changed.set()
            try:
                yield scope
            finally:
                self._timers.discard(timer)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        try:
            async with self.timeout(seconds):
                await asyncio.Event().wait()
        except TimeoutError:
            pass

    def waiting(self, task: str | None = None) -> int:
        """How many sleeps and timeouts are pending (of the task named `task`)."""
        return sum(1 for t in self._timers if task is None or t.task == task)

    async def wait_waiting(self, task: str | None = None, count: int = 1) -> None:
        """Until `count` sleeps or timeouts (of the task named `task`) are pending on this
        clock: the sleepers have got as far as their sleep. Guard it with asyncio.timeout."""
        while self.waiting(task) < count:
            self._changed.clear()
            await self._changed.wait()


async def reaper_round(clock: MockClock, seconds: float) -> None:
    """Move `clock` on by `seconds` with the lease reaper asleep, and return once it has run
    one round at the new time and gone back to sleep."""
    async with asyncio.timeout(10):
        await clock.wait_waiting(REAPER)
        clock.advance(seconds)
        await clock.wait_waiting(REAPER)
