"""Long-polling: workers wait in one request until there is work for them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

from aiohttp import web

from coordinator.http.state import CLOCK, CONFIG, SIGNALS

__all__ = ["long_poll"]

T = TypeVar("T")


async def long_poll(
    request: web.Request,
    wait: float,
    attempt: Callable[[], Awaitable[T | None]],
    kind: str,
    models: Collection[str] | None,
) -> T | None:
    """Call `attempt` (e.g. a pop) until it gives something or `wait` seconds (capped by the
    config) pass; tries again when a job of `kind` for one of `models` (None: any) is
    queued, and every `poll_fallback` seconds so that a change another coordinator made
    without a notification is still seen. A worker that hangs up while it waits gets
    nothing leased (else its job would wait out the lease)."""
    config, signals = request.app[CONFIG], request.app[SIGNALS]
    clock = request.app[CLOCK]
    deadline = clock.monotonic() + min(wait, config.max_pop_wait)
    while True:
        if _gone(request):
            # the worker hung up (stopped, killed): lease nothing it would never hear of
            return None
        found = await attempt()
        if found is not None:
            return found
        remaining = deadline - clock.monotonic()
        if remaining <= 0 or signals.closing:
            return None
        await signals.wait_for_work(kind, models, min(remaining, config.poll_fallback))


def _gone(request: web.Request) -> bool:
    """Whether the client that sent `request` has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()
