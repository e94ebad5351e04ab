"""In-process wake-ups: a job changed, or the queue changed.

Waiters always re-read the database after waking, and wake at least every
`poll_fallback` seconds, so coordinators sharing one database stay correct.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

__all__ = ["Signal", "Signals"]


class Signal:
    """Wakes every current waiter on `fire()`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.waiters = 0

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        """True if fired within `seconds`."""
        event = self._event
        self.waiters += 1
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self.waiters -= 1


class Signals:
    def __init__(self) -> None:
        self.queue = Signal()
        self._jobs: defaultdict[str, Signal] = defaultdict(Signal)
        # set when the coordinator shuts down: long-polls and streams end at once
        self.closing = False

    def close(self) -> None:
        self.closing = True
        self.queue.fire()
        for signal in list(self._jobs.values()):
            signal.fire()

    def job(self, job_id: str) -> Signal:
        return self._jobs[job_id]

    def job_changed(self, job_id: str) -> None:
        signal = self._jobs.get(job_id)
        if signal is not None:
            signal.fire()
            if not signal.waiters:
                del self._jobs[job_id]

    def queue_changed(self) -> None:
        self.queue.fire()
