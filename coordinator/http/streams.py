"""Event streams (SSE), written once for every job kind and API.

`open_stream` admits a stream under the caps (`max_streams_per_key`, `max_streams_per_ip`;
429 beyond them), prepares the response and ends it cleanly; `follow` yields a job each
time it may have changed: when its own job changes (coordinator.jobs.signals), every
`stream_refresh_seconds` while it is queued (its position comes from the shared ranking,
coordinator.jobs.queue.Ranking), and every `poll_fallback` seconds otherwise (so a change
made by another coordinator process is seen even without a notification).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from aiohttp import web

from coordinator.accounts import Account
from coordinator.clock import Clock
from coordinator.errors import RateLimited
from coordinator.http.addresses import client_ip
from coordinator.http.ratelimit import address_bucket
from coordinator.http.state import CLOCK, CONFIG, SIGNALS

__all__ = [
    "KEEPALIVE_SECONDS",
    "STREAMS",
    "EventStream",
    "StreamCounts",
    "follow",
    "open_stream",
]

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 15.0
# what a refused stream is told to wait
RETRY_SECONDS = 5.0

T = TypeVar("T")


class StreamCounts:
    """Open event streams per API key (account) and per client address, in this process."""

    def __init__(self) -> None:
        # account id, or "anonymous@<address bucket>": anonymous callers from one address
        # share one key
        self.keys: Counter[int | str] = Counter()
        self.ips: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return sum(self.ips.values())


STREAMS = web.AppKey("streams", StreamCounts)


class EventStream:
    """An open SSE response: `send` events, `keepalive` when quiet for a while."""

    def __init__(self, response: web.StreamResponse, clock: Clock) -> None:
        self.response = response
        self._clock = clock
        self._last = clock.monotonic()

    async def send(self, data: str, event: str | None = None) -> None:
        head = f"event: {event}\n" if event else ""
        await self.response.write(f"{head}data: {data}\n\n".encode())
        self._last = self._clock.monotonic()

    async def keepalive(self) -> None:
        if self._clock.monotonic() - self._last >= KEEPALIVE_SECONDS:
            await self.response.write(b": keepalive\n\n")
            self._last = self._clock.monotonic()


@asynccontextmanager
async def open_stream(
    request: web.Request, account: Account | None, what: str
) -> AsyncIterator[EventStream]:
    """Admit, prepare and finally end an event stream; `what` names it in the debug log
    when the client goes away."""
    config, counts = request.app[CONFIG], request.app[STREAMS]
    ip = address_bucket(client_ip(request))
    # without a key, the address is the key: otherwise anonymous streams would be held only
    # to the (much larger) per-address cap
    key: int | str = (
        account.id if account is not None and not account.anonymous else f"anonymous@{ip}"
    )
    if counts.keys[key] >= config.max_streams_per_key:
        raise RateLimited(
            f"{'this API key' if isinstance(key, int) else 'this address without an API key'}"
            f" has {counts.keys[key]} event streams open, the most allowed; "
            "close one (or poll the job) and retry",
            RETRY_SECONDS,
        )
    if counts.ips[ip] >= config.max_streams_per_ip:
        raise RateLimited(
            f"this address has {counts.ips[ip]} event streams open, the most allowed; "
            "close one (or poll the job) and retry",
            RETRY_SECONDS,
        )
    counts.ips[ip] += 1
    counts.keys[key] += 1
    try:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            yield EventStream(response, request.app[CLOCK])
            await response.write_eof()
        except ConnectionResetError:
            log.debug("%s closed by the client", what)
    finally:
        counts.ips[ip] -= 1
        if counts.ips[ip] <= 0:
            del counts.ips[ip]
        counts.keys[key] -= 1
        if counts.keys[key] <= 0:
            del counts.keys[key]


async def follow(
    request: web.Request,
    job_id: str,
    read: Callable[[], Awaitable[T]],
    finished: Callable[[T], bool],
    queued: Callable[[T], bool],
) -> AsyncIterator[T]:
    """Yield the job (`read()`) now and whenever it may have changed, until `finished` (the
    finished job is yielded too) or the coordinator shuts down."""
    config, signals = request.app[CONFIG], request.app[SIGNALS]
    with signals.watch(job_id) as watch:
        while True:
            job = await read()
            yield job
            if finished(job) or signals.closing:
                return
            wait = config.stream_refresh_seconds if queued(job) else config.poll_fallback
            await watch.wait(wait)
