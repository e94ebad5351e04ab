"""`create_app(config)`: the aiohttp application with its store and background reaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

import coordinator.http.web  # noqa: F401  (the web page; not `web`: aiohttp's is)
from coordinator.clock import SYSTEM_CLOCK, Clock
from coordinator.config import CoordinatorConfig
from coordinator.db.secrets import REQUESTER_TAGS, shared_key
from coordinator.files import open_file_store

# Importing the route modules registers their handlers on API.
from coordinator.http import (  # noqa: F401
    accounts,
    docs,
    economy,
    horde,
    horde_text_workers,
    horde_workers,
    image_models,
    jobs,
    network,
    openai,
    results,
    samplers,
    text,
    workers,
)
from coordinator.http.api import API, error_middleware
from coordinator.http.bodies import DEFAULT_BODY_BYTES
from coordinator.http.metrics import METRICS, Metrics, metrics_middleware
from coordinator.http.ratelimit import PostgresBuckets, RateLimiter
from coordinator.http.state import (
    CLOCK,
    CONFIG,
    FILES,
    LIMITER,
    PREVIEWS,
    REQUESTER_KEY,
    SIGNALS,
    STORE,
    VIEWS,
)
from coordinator.http.streams import STREAMS, StreamCounts
from coordinator.http.views import SharedViews
from coordinator.jobs.notify import NotifyBridge
from coordinator.jobs.previews import Previews
from coordinator.jobs.signals import Signals
from coordinator.store import Store

__all__ = ["REAPER", "create_app"]

log = logging.getLogger(__name__)


# how often staged uploads of abandoned jobs are looked for
PRUNE_INTERVAL = 3600.0
# the name of the reaper's task (tests wait until it sleeps between rounds)
REAPER = "lease-reaper"


async def _reap_forever(app: web.Application) -> None:
    store, signals, interval = app[STORE], app[SIGNALS], app[CONFIG].reap_interval
    clock = app[CLOCK]
    pruned_at: float | None = None
    while True:
        if pruned_at is None or clock.monotonic() - pruned_at > PRUNE_INTERVAL:
            pruned_at = clock.monotonic()
            try:
                await app[FILES].prune(app[CONFIG].upload_max_age)
            except Exception:
                log.exception("pruning old uploads failed; retrying later")
        try:
            if released := await store.image_jobs.release_held():
                log.info("paid AI Horde workers for %d jobs whose hold ended", released)
        except Exception:
            log.exception("releasing held pay failed; retrying")
        try:
            expired = await store.reap_expired()
        except Exception:
            log.exception("reaping expired leases failed; retrying")
            expired = []
        for job_id, kind, model in expired:
            app[METRICS].lease_expiries.labels(kind).inc()
            log.info("lease of job %s expired; job requeued or failed", job_id)
            signals.job_changed(job_id)
            signals.job_queued(kind, model)
        await clock.sleep(interval)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    config.data_dir.mkdir(parents=True, exist_ok=True)
    app[STORE] = store = await Store.open(config, clock=app[CLOCK])
    app[FILES] = open_file_store(config, store.db.engine)
    app[REQUESTER_KEY] = await shared_key(store.db.engine, REQUESTER_TAGS)
    app[SIGNALS] = signals = Signals(app[CLOCK])
    bridge: NotifyBridge | None = None
    if store.db.dialect == "postgresql":
        # Every coordinator on this database (--processes N, or other hosts) shares the
        # rate-limit buckets and hears the others' job changes.
        app[LIMITER] = RateLimiter(
            config.rate_limits, clock=app[CLOCK].monotonic, buckets=PostgresBuckets(store.db.engine)
        )
        bridge = NotifyBridge(signals, config.resolved_database_url, config.notify_channel)
        await bridge.start()
    reaper = asyncio.create_task(_reap_forever(app), name=REAPER)
    try:
        yield
    finally:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper
        if bridge is not None:
            await bridge.stop()
        await store.aclose()


async def _name_process(request: web.Request, response: web.StreamResponse) -> None:
    """With --processes N: which process answered (`<index>:<pid>`), for tests and logs."""
    response.headers["X-Coordinator-Process"] = f"{request.app[CONFIG].process_index}:{os.getpid()}"


async def _wake_waiters(app: web.Application) -> None:
    """Shutting down: end long-polls and event streams now instead of at their timeouts."""
    app[SIGNALS].close()


def create_app(config: CoordinatorConfig, clock: Clock = SYSTEM_CLOCK) -> web.Application:
    """The application; `clock` is where it reads time and sleeps (coordinator.clock)."""
    # Bodies are read and size-checked by the route table (JSON, coordinator.http.bodies) or
    # streamed by their handler (image uploads); this only caps aiohttp's own reads.
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware], client_max_size=DEFAULT_BODY_BYTES
    )
    app[CONFIG] = config
    app[CLOCK] = clock
    app[LIMITER] = RateLimiter(config.rate_limits, clock=clock.monotonic)
    app[VIEWS] = SharedViews(config.network_view_seconds)
    app[PREVIEWS] = Previews()
    app[STREAMS] = streams = StreamCounts()
    app[METRICS] = Metrics(streams)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_wake_waiters)
    if config.processes > 1:
        app.on_response_prepare.append(_name_process)
    API.install(app)
    return app
