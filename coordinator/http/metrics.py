"""GET /metrics: the operator's view in the Prometheus text format.

Every application has a registry of its own (`Metrics.registry`, never prometheus_client's
global one), so several apps in one process (the tests) count apart.

    idlegrid_queue_length{kind}                      queued jobs (spot checks too)
    idlegrid_jobs{kind,state}                        jobs in each state, all time
    idlegrid_kudos_supply{holder}                    kudos held, by account kind: user,
                                                     worker, anonymous, pending (earnings
                                                     held until a spot check); system
                                                     accounts (escrow, grants) are left out
    idlegrid_workers_online{kind,trusted}            workers seen within ONLINE_SECONDS, by
                                                     what they serve: image, text
                                                     (gateways), blocks, unknown
    idlegrid_sse_streams_open                        open event streams
    idlegrid_lease_expiries_total{kind}              leases the reaper took back
    idlegrid_pop_duration_seconds{kind}              one store pop (not the long-poll wait)
    idlegrid_http_request_duration_seconds{method,route}
    idlegrid_http_requests_total{method,route,status}

`route` is the route's template (/api/v1/jobs/{job_id}), or "unmatched" for a path no
route has. Every gauge and the two `kind` series have a sample for each label value they
may take (0 when there is none), so an empty queue reads 0 rather than vanishing. The first
four are read from the database at scrape time (three grouped
queries), so every process reports the same; the others count in this process only: with
`--processes N` a scrape reaches one of the N, and each keeps its own counters (scrape each
process, or sum what you can reach, knowing the split). A scrape reads the database before
the counters, so the two parts are not one instant. Anyone who reaches the port may scrape:
the numbers are the network's totals, no account's; keep the path off a public proxy if
even that is too much.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, get_args

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from coordinator.db.schema import ACCOUNT_KINDS, accounts, balances, jobs, workers
from coordinator.http.api import API, Call
from coordinator.http.state import STORE
from coordinator.http.streams import StreamCounts
from coordinator.jobs.network import ONLINE_SECONDS
from coordinator.store import Store
from protocol.messages import JobKind, JobState, WorkerKind

__all__ = ["METRICS", "Metrics", "metrics_middleware", "timed_pop"]

T = TypeVar("T")


# every label value a series may take: each gets a sample, 0 when there is nothing
KINDS: tuple[str, ...] = get_args(JobKind)
STATES: tuple[str, ...] = get_args(JobState)
HOLDERS = tuple(kind for kind in ACCOUNT_KINDS if kind != "system")
# "unknown": registered, but neither polled nor reported an engine
WORKER_KINDS: tuple[str, ...] = (*get_args(WorkerKind), "unknown")
TRUSTED = ("false", "true")
# a worker that never polled (a block server links its peers but never pops) is known by the
# engine it reported (worker.common.sandboxing.report_confinement); any other engine is an
# image worker's
ENGINE_KINDS = {"swarm-gateway": "text", "swarm-blocks": "blocks"}
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# seconds; long-polls and event streams reach the top buckets
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
POP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Snapshot:
    """What the database said at the last scrape."""

    jobs: dict[tuple[str, str], int] = field(default_factory=dict)
    kudos: dict[str, int] = field(default_factory=dict)
    workers: dict[tuple[str, str], int] = field(default_factory=dict)


class _DatabaseCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        queue = GaugeMetricFamily(
            "idlegrid_queue_length", "Queued jobs (spot checks included)", labels=["kind"]
        )
        by_state = GaugeMetricFamily("idlegrid_jobs", "Jobs by state", labels=["kind", "state"])
        for kind in KINDS:
            queue.add_metric([kind], snapshot.jobs.get((kind, "queued"), 0))
            for state in STATES:
                by_state.add_metric([kind, state], snapshot.jobs.get((kind, state), 0))
        kudos = GaugeMetricFamily(
            "idlegrid_kudos_supply",
            "Kudos held by the accounts of each kind (system accounts left out)",
            labels=["holder"],
        )
        for holder in HOLDERS:
            kudos.add_metric([holder], snapshot.kudos.get(holder, 0))
        online = GaugeMetricFamily(
            "idlegrid_workers_online",
            f"Workers seen within {ONLINE_SECONDS:.0f} s, by what they run and trust",
            labels=["kind", "trusted"],
        )
        for kind in WORKER_KINDS:
            for trusted in TRUSTED:
                online.add_metric([kind, trusted], snapshot.workers.get((kind, trusted), 0))
        yield from (queue, by_state, kudos, online)


class Metrics:
    """One application's registry and its metrics."""

    def __init__(self, streams: StreamCounts) -> None:
        self.registry = registry = CollectorRegistry()
        self.database = _DatabaseCollector()
        registry.register(self.database)
        self.streams_open = Gauge(
            "idlegrid_sse_streams_open", "Open event streams (this process)", registry=registry
        )
        self.streams_open.set_function(lambda: streams.open)
        self.lease_expiries = Counter(
            "idlegrid_lease_expiries",
            "Leases that ran out and were taken back by the reaper (this process)",
            ["kind"],
            registry=registry,
        )
        self.pop_seconds = Histogram(
            "idlegrid_pop_duration_seconds",
            "One attempt to lease a queued job in the store (this process)",
            ["kind"],
            buckets=POP_BUCKETS,
            registry=registry,
        )
        self.request_seconds = Histogram(
            "idlegrid_http_request_duration_seconds",
            "Time to answer a request, by route template (this process)",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "idlegrid_http_requests",
            "Requests answered, by route template and status (this process)",
            ["method", "route", "status"],
            registry=registry,
        )
        for kind in KINDS:
            # a labelled counter or histogram has no series until its labels are first used
            self.lease_expiries.labels(kind)
            self.pop_seconds.labels(kind)
        # (method, route, status) -> its series of the two: `labels` costs a lock and
        # a look-up on every request; the route templates and statuses are few
        self._answered: dict[tuple[str, str, int], tuple[Histogram, Counter]] = {}

    def answered(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request answered with `status` after `seconds`."""
        series = self._answered.get((method, route, status))
        if series is None:
            series = self._answered[method, route, status] = (
                self.request_seconds.labels(method, route),
                self.requests.labels(method, route, str(status)),
            )
        series[0].observe(seconds)
        series[1].inc()

    async def refresh(self, store: Store) -> None:
        """Read the database's part of the next scrape."""
        async with asyncio.TaskGroup() as group:
            jobs_task = group.create_task(_jobs(store))
            kudos_task = group.create_task(_kudos(store))
            workers_task = group.create_task(_workers(store))
        self.database.snapshot = Snapshot(
            jobs=jobs_task.result(), kudos=kudos_task.result(), workers=workers_task.result()
        )


METRICS = web.AppKey("metrics", Metrics)


async def _jobs(store: Store) -> dict[tuple[str, str], int]:
    query = select(jobs.c.kind, jobs.c.state, func.count()).group_by(jobs.c.kind, jobs.c.state)
    rows = await store.db.read_rows(query, list)
    return {(str(kind), str(state)): int(count) for kind, state, count in rows}


async def _kudos(store: Store) -> dict[str, int]:
    # system accounts have no balance row (their balance is a sum over the ledger)
    query = (
        select(accounts.c.kind, func.sum(balances.c.amount))
        .select_from(balances.join(accounts, accounts.c.id == balances.c.account_id))
        .where(accounts.c.kind != "system")
        .group_by(accounts.c.kind)
    )
    rows = await store.db.read_rows(query, list)
    return {str(kind): int(amount or 0) for kind, amount in rows}


def _worker_kind(kind: str | None, engine: str | None) -> str:
    """What a worker serves: as its polls said, else as its engine report says."""
    if kind:
        return kind
    try:
        name = json.loads(engine).get("engine") if engine else None
    except (ValueError, AttributeError):
        name = None
    return ENGINE_KINDS.get(name, "image") if isinstance(name, str) else "unknown"


async def _workers(store: Store) -> dict[tuple[str, str], int]:
    # one row per distinct (kind, engine report, trust): builds repeat, so not one per worker
    columns = (workers.c.kind, workers.c.engine, workers.c.trusted)
    query = (
        select(*columns, func.count())
        .where(workers.c.last_seen >= store.db.now() - ONLINE_SECONDS)
        .group_by(*columns)
    )
    rows = await store.db.read_rows(query, list)
    counts: dict[tuple[str, str], int] = {}
    for kind, engine, trusted, count in rows:
        key = (_worker_kind(kind, engine), "true" if trusted else "false")
        counts[key] = counts.get(key, 0) + int(count)
    return counts


def timed_pop(
    request: web.Request, kind: str, attempt: Callable[[], Awaitable[T]]
) -> Callable[[], Awaitable[T]]:
    """`attempt` (one store pop), observed in idlegrid_pop_duration_seconds{kind}."""
    histogram = request.app[METRICS].pop_seconds.labels(kind)

    async def timed() -> T:
        start = time.perf_counter()
        try:
            return await attempt()
        finally:
            histogram.observe(time.perf_counter() - start)

    return timed


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Time and count every request by its route template; outside error_middleware, so
    errors are counted with the status they were answered with."""
    metrics = request.app[METRICS]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    method = request.method if request.method in METHODS else "other"
    start = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        # shutting down (or the client left): not an answer
        status = 0
        raise
    finally:
        if status:
            metrics.answered(method, route, status, time.perf_counter() - start)


@API.route(
    "GET",
    "/metrics",
    summary="Prometheus metrics: queue, jobs, kudos and workers from the database; "
    "requests, pops, lease expiries and event streams counted in the process that answers",
    produces="text/plain",
)
async def scrape_metrics(request: web.Request, call: Call[None]) -> web.StreamResponse:
    collected = request.app[METRICS]
    await collected.refresh(request.app[STORE])
    return web.Response(
        body=generate_latest(collected.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
