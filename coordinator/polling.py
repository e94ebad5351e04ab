"""Long-polling: workers wait in one request until there is work for them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from coordinator.state import CONFIG, SIGNALS

__all__ = ["long_poll"]

T = TypeVar("T")


async def long_poll(
    request: web.Request, wait: float, attempt: Callable[[], Awaitable[T | None]]
) -> T | None:
    """Call `attempt` (e.g. a pop) until it gives something or `wait` seconds (capped by the
    config) pass; tries again when the queue changes, and every `poll_fallback` seconds so
    that coordinators sharing one database see each other's jobs."""
    config, signals = request.app[CONFIG], request.app[SIGNALS]
    deadline = time.monotonic() + min(wait, config.max_pop_wait)
    while True:
        found = await attempt()
        if found is not None:
            return found
        remaining = deadline - time.monotonic()
        if remaining <= 0 or signals.closing:
            return None
        await signals.queue.wait(min(remaining, config.poll_fallback))
