"""Following a job through a coordinator that may restart: event streams, backoff, patience.

A wait survives dropped streams, coordinator restarts (connection refused or reset) and
503s: it reconnects with growing pauses and, when a stream ends, re-reads the job's status.
It gives up (WaitTimeout, naming the job) once the coordinator has not answered for the
wait timeout. Any line of a stream counts as an answer, keep-alive comments included; a
stream silent for READ_TIMEOUT (longer than the coordinator's keep-alive interval) has lost
its coordinator.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from client.errors import ApiError, CoordinatorUnreachable, RateLimited, WaitTimeout

__all__ = ["READ_TIMEOUT", "WAIT_TIMEOUT", "Patience", "read_events", "retryable"]

# seconds of silence after which a stream is given up: the coordinator sends a keep-alive
# comment every 15 s (coordinator.http.streams.KEEPALIVE_SECONDS), so 45 s means it is gone
READ_TIMEOUT = 45.0
# default seconds a wait keeps trying while the coordinator does not answer
WAIT_TIMEOUT = 300.0
# pauses between attempts: doubling from FIRST_PAUSE up to MAX_PAUSE
FIRST_PAUSE = 0.25
MAX_PAUSE = 5.0
# answers that mean "not now" (a restarting coordinator, a proxy in front of one)
RETRY_STATUSES = frozenset({429, 502, 503, 504})


def retryable(exc: BaseException) -> bool:
    """Whether a failed status read or stream is worth another attempt."""
    if isinstance(exc, WaitTimeout):
        return False
    if isinstance(exc, CoordinatorUnreachable | TimeoutError):
        return True
    return isinstance(exc, ApiError) and exc.status in RETRY_STATUSES


class Patience:
    """How long one wait for `job_id` keeps trying: `seconds` since the last answer."""

    def __init__(self, job_id: str, seconds: float) -> None:
        self.job_id = job_id
        self.seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._pause = FIRST_PAUSE
        self._last = self._loop.time()

    def contact(self) -> None:
        """The coordinator answered: the clock and the backoff start over."""
        self._last = self._loop.time()
        self._pause = FIRST_PAUSE

    @property
    def deadline(self) -> float:
        """Loop time after which, without an answer, the wait gives up."""
        return self._last + self.seconds

    async def pause(self, error: BaseException) -> None:
        """After a failed attempt: wait a little longer each time, or raise WaitTimeout."""
        left = self.deadline - self._loop.time()
        if left <= 0:
            raise WaitTimeout(self.job_id, self.seconds, str(error) or type(error).__name__)
        pause = self._pause
        if isinstance(error, RateLimited):
            pause = max(pause, error.retry_after)
        self._pause = min(self._pause * 2, MAX_PAUSE)
        await asyncio.sleep(min(pause, left))


async def read_events(
    lines: AsyncIterator[bytes], patience: Patience
) -> AsyncGenerator[tuple[str, Any], None]:
    """(event name, decoded data) of each server-sent event; every line is an answer."""
    event, data = "message", []
    async for raw in lines:
        patience.contact()
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            payload = json.loads("\n".join(data))
            name, event, data = event, "message", []
            yield name, payload
