"""`create_app(config)`: the aiohttp application with its store and background reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

# Importing the route modules registers their handlers on API.
from coordinator import (  # noqa: F401
    routes_accounts,
    routes_economy,
    routes_jobs,
    routes_openai,
    routes_results,
    routes_text,
    routes_workers,
)
from coordinator.api import API, error_middleware
from coordinator.config import CoordinatorConfig
from coordinator.ratelimit import RateLimiter
from coordinator.results import ResultFiles
from coordinator.signals import Signals
from coordinator.state import CONFIG, FILES, LIMITER, SIGNALS, STORE, UPLOADS
from coordinator.store import Store
from coordinator.uploads import Uploads

__all__ = ["create_app"]

log = logging.getLogger(__name__)


# how often staged uploads of abandoned jobs are looked for
PRUNE_INTERVAL = 3600.0


async def _reap_forever(app: web.Application) -> None:
    store, signals, interval = app[STORE], app[SIGNALS], app[CONFIG].reap_interval
    pruned_at = 0.0
    while True:
        if time.monotonic() - pruned_at > PRUNE_INTERVAL:
            pruned_at = time.monotonic()
            try:
                await asyncio.to_thread(app[UPLOADS].prune, app[CONFIG].upload_max_age)
            except OSError:
                log.exception("pruning old uploads failed; retrying later")
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
    # beside results/ on the same file system: verified uploads are renamed into it
    app[UPLOADS] = Uploads(config.data_dir / "uploads")
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
    # Bodies are read and size-checked by the route table (JSON) or streamed by their
    # handler (image uploads); this only caps aiohttp's own reads.
    app = web.Application(middlewares=[error_middleware], client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    app[LIMITER] = RateLimiter(config.rate_limits)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_wake_waiters)
    API.install(app)
    return app
