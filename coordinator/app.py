"""`create_app(config)`: the aiohttp application with its store and background reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

# Importing the route modules registers their handlers on API.
from coordinator import (  # noqa: F401
    routes_accounts,
    routes_economy,
    routes_jobs,
    routes_openai,
    routes_text,
    routes_workers,
)
from coordinator.api import API, error_middleware
from coordinator.config import CoordinatorConfig
from coordinator.ratelimit import RateLimiter
from coordinator.results import ResultFiles
from coordinator.signals import Signals
from coordinator.state import CONFIG, FILES, LIMITER, SIGNALS, STORE
from coordinator.store import Store

__all__ = ["create_app"]

log = logging.getLogger(__name__)


async def _reap_forever(app: web.Application) -> None:
    store, signals, interval = app[STORE], app[SIGNALS], app[CONFIG].reap_interval
    while True:
        try:
            expired = await store.reap_expired()
        except Exception:
            log.exception("reaping expired leases failed; retrying")
            expired = []
        for job_id in expired:
            log.info("lease of job %s expired; job requeued or failed", job_id)
            signals.job_changed(job_id)
        if expired:
            signals.queue_changed()
        await asyncio.sleep(interval)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    app[FILES] = ResultFiles(config.data_dir / "results")
    app[STORE] = await Store.open(config)
    app[SIGNALS] = Signals()
    reaper = asyncio.create_task(_reap_forever(app), name="lease-reaper")
    try:
        yield
    finally:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        await app[STORE].aclose()


async def _wake_waiters(app: web.Application) -> None:
    """Shutting down: end long-polls and event streams now instead of at their timeouts."""
    app[SIGNALS].close()


def create_app(config: CoordinatorConfig) -> web.Application:
    # Bodies are read and size-checked by the route table; this only caps aiohttp's own reads.
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_upload_bytes)
    app[CONFIG] = config
    app[LIMITER] = RateLimiter(config.rate_limits)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_wake_waiters)
    API.install(app)
    return app
