"""The waiting queue in SQL: ranks, the next job, and a shared ranking for positions.

Each queued job stores its *rank*, the effective time of `protocol.priority` (submit time
minus the requester's kudos head start, or plus the anonymous handicap), fixed when it is
queued. The database picks the next job: the first row of the partial index
`ix_jobs_queue (kind, rank) WHERE state = 'queued'` that fits the worker (`ORDER BY rank
LIMIT k`; `FOR UPDATE SKIP LOCKED` on PostgreSQL), so a pop costs O(log n), not O(n).

Ranks follow balances: when a transaction moves a requester's balance far enough to shift
their head start by `rank_refresh_seconds`, `refresh_ranks` recomputes the ranks of their
queued jobs before it commits (and `balances.ranked` remembers the balance they came from).
Because ranks only ever move by the head start, which is bounded, nobody starves.

Positions and ETAs come from a `Ranking`: one snapshot of each kind's queue (ids, ranks,
costs, throughput), refreshed at most every `ranking_interval` seconds and shared by every
reader, instead of ranking the queue per request.

ETA method: throughput is the work (kudos) of jobs of the same kind finished in the last
`eta_window` seconds, divided by the time from the first of them being leased until now.
A queued job's ETA is (the work ranked ahead of it + its own work) / throughput; a running
job's ETA extrapolates its own progress. No recent throughput -> no ETA (null).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db import raw
from coordinator.db.database import Database
from coordinator.db.prepared import Shapes
from coordinator.db.schema import balances, jobs
from protocol.priority import Aging, Waiting, effective_time

__all__ = [
    "CHECKS",
    "LEASED",
    "QUEUED",
    "Ranking",
    "Snapshot",
    "candidates",
    "eta_of",
    "queued_owners",
    "rank_of",
    "rerank_account",
    "ranked_kudos",
    "refresh_ranks",
]

# queues up to this long are reloaded after every local change (it takes a millisecond or two)
EXACT_BELOW = 500
# Literal (not bound) so that SQLite and PostgreSQL's generic plans can use the partial
# indexes ix_jobs_queue, ix_jobs_checks and ix_jobs_leases.
QUEUED = text("jobs.state = 'queued' AND jobs.verify_of IS NULL")
CHECKS = text("jobs.state = 'queued' AND jobs.verify_of IS NOT NULL")
LEASED = text("jobs.state = 'leased'")


def rank_of(created_at: float, kudos: int, anonymous: bool, aging: Aging) -> float:
    """A job's rank: its effective time (protocol.priority); lower runs first."""
    return effective_time(Waiting("", 0, kudos, created_at, anonymous), aging)


def _head_start(kudos: int, aging: Aging) -> float:
    return -rank_of(0.0, kudos, False, aging)


_ACCOUNT = bindparam("account_id", type_=balances.c.account_id.type)
_RANKED = select(balances.c.ranked).where(balances.c.account_id == _ACCOUNT)
_BALANCE_LOCKED = (
    select(balances.c.amount, balances.c.ranked)
    .where(balances.c.account_id == _ACCOUNT)
    .with_for_update()
)

# (an UPDATE's parameter may not be named as a column)
_OF = bindparam("b_account", type_=balances.c.account_id.type)
# registered requests only: an anonymous job's rank never depends on kudos
_RERANK = (
    update(jobs)
    .where((jobs.c.account_id == _OF) & (jobs.c.state == "queued") & (jobs.c.priority_class == 1))
    .values(rank=jobs.c.created_at - bindparam("head_start", type_=jobs.c.rank.type))
)
_RANKED_AT = (
    update(balances)
    .where(balances.c.account_id == _OF)
    .values(ranked=bindparam("kudos", type_=balances.c.ranked.type))
)


async def ranked_kudos(conn: AsyncConnection, account_id: int) -> int:
    """The balance the ranks of `account_id`'s queued jobs are computed from."""
    found = (await raw.execute(conn, _RANKED, {"account_id": account_id})).scalar_one_or_none()
    return int(found or 0)


async def refresh_ranks(
    conn: AsyncConnection, config: CoordinatorConfig, account_ids: set[int]
) -> None:
    """Re-rank the queued jobs of accounts whose balance moved their head start by at least
    `rank_refresh_seconds` (a commit hook: runs in the transaction that moved it)."""
    aging = config.aging
    for account_id in sorted(account_ids):
        # locked (the ledger's update already holds it): balance row before job rows
        row = (await raw.execute(conn, _BALANCE_LOCKED, {"account_id": account_id})).first()
        if row is None:
            continue
        moved = _head_start(int(row.amount), aging) - _head_start(int(row.ranked), aging)
        if abs(moved) < config.rank_refresh_seconds:
            continue
        await rerank(conn, account_id, int(row.amount), aging)


async def rerank(conn: AsyncConnection, account_id: int, kudos: int, aging: Aging) -> None:
    """Rank `account_id`'s queued jobs by `kudos` and remember that balance as `ranked`."""
    values = {"b_account": account_id, "head_start": _head_start(kudos, aging), "kudos": kudos}
    await raw.execute(conn, _RERANK, values)
    await raw.execute(conn, _RANKED_AT, values)


async def queued_owners(conn: AsyncConnection) -> list[tuple[int, bool]]:
    """(account id, anonymous) of every account with queued jobs."""
    rows = (
        await conn.execute(
            select(jobs.c.account_id, jobs.c.priority_class)
            .where(jobs.c.state == "queued")
            .distinct()
        )
    ).all()
    return [(int(account_id), priority_class == 0) for account_id, priority_class in rows]


async def rerank_account(
    conn: AsyncConnection, aging: Aging, account_id: int, anonymous: bool
) -> None:
    """Recompute the ranks of one account's queued jobs from its balance and `aging` (at
    start-up: the operator may have changed the aging settings)."""
    if anonymous:
        await conn.execute(
            update(jobs)
            .where((jobs.c.account_id == account_id) & (jobs.c.state == "queued"))
            .values(rank=jobs.c.created_at + aging.anonymous_penalty)
        )
        return
    # the balance row first, as every other writer locks it: no deadlock with a submit
    kudos = (
        await conn.execute(
            select(balances.c.amount).where(balances.c.account_id == account_id).with_for_update()
        )
    ).scalar_one_or_none()
    await rerank(conn, account_id, int(kudos or 0), aging)


# (fits' shape, with an owner, limit, skip_locked) -> the statements `candidates` runs
_CANDIDATES: Shapes[list[Select[Any]]] = Shapes()


def _candidate_queries(
    fits: ColumnElement[bool], owner: bool, limit: int, skip_locked: bool
) -> list[Select[Any]]:
    columns = (jobs.c.id, jobs.c.lease_seconds, jobs.c.model, jobs.c.kind)
    scopes = [QUEUED & fits & (jobs.c.account_id == bindparam("owner"))] if owner else []
    scopes.append(QUEUED & fits)
    queries = []
    for scope in scopes:
        query = select(*columns).where(scope).order_by(jobs.c.rank, jobs.c.id).limit(limit)
        if skip_locked:
            query = query.with_for_update(skip_locked=True, of=jobs)
        queries.append(query)
    return queries


async def candidates(
    conn: AsyncConnection,
    fits: ColumnElement[bool],
    owner: int | None,
    limit: int,
    skip_locked: bool,
    *,
    shape: Hashable | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[Row[Any]]:
    """The best queued jobs matching `fits`, `owner`'s own first (a worker serves its
    owner's jobs before others'), then in rank order: (id, lease_seconds, model, kind).
    With `skip_locked` (PostgreSQL) the rows come locked, and rows another pop is taking are
    skipped rather than waited for; ask for one then, so a pop locks only what it takes.
    `fits` may hold bind parameters (their values in `params`); with a `shape` (the same
    for every `fits` built the same way) the statements are built once per shape
    (coordinator.db.prepared)."""
    key = (shape, owner is not None, limit, skip_locked)
    queries = (
        _CANDIDATES.get(key, lambda: _candidate_queries(fits, *key[1:]))
        if shape is not None
        else _candidate_queries(fits, *key[1:])
    )
    values = {**(params or {}), "owner": owner}
    for query in queries:
        found: list[Any] = (
            await raw.execute(conn, query, values, built_once=shape is not None)
        ).all()
        if found:
            return found
    return []


async def throughput(conn: AsyncConnection, kind: str, window: float, now: float) -> float | None:
    """Kudos of work finished per second recently; None without recent finished jobs."""
    query = select(func.coalesce(func.sum(jobs.c.cost), 0), func.min(jobs.c.leased_at)).where(
        (jobs.c.kind == kind)
        & text("jobs.state = 'done'")
        & (jobs.c.finished_at >= now - window)
        & jobs.c.verify_of.is_(None)
    )
    work, first = (await conn.execute(query)).one()
    if not work or first is None:
        return None
    return float(work) / max(now - float(first), 1.0)


def eta_of(job: Row[Any], ahead_work: int, rate: float | None, now: float) -> float | None:
    """Seconds until `job` is done, or None when unknown."""
    if job.state == "queued":
        return None if rate is None else (ahead_work + job.cost) / rate
    if job.state == "leased":
        total = int(max(job.n, 1) * max(job.steps_total, 1))
        done = int(job.image * max(job.steps_total, 1) + job.step)
        if job.leased_at is not None and done > 0:
            elapsed = now - float(job.leased_at)
            return max(elapsed * (total - done) / done, 0.0)
        return None if rate is None else float(job.cost) / rate
    return None


def _queue_of(kind: str) -> Select[Any]:
    """The queued jobs of `kind` in rank order: (id, rank, cost)."""
    return (
        select(jobs.c.id, jobs.c.rank, jobs.c.cost)
        .where(QUEUED & (jobs.c.kind == kind))
        .order_by(jobs.c.rank, jobs.c.id)
    )


_QUEUE_OF: Shapes[Select[Any]] = Shapes()


@dataclass(frozen=True)
class Snapshot:
    """One kind's queue at one moment, best first."""

    taken_at: float
    # time.monotonic() when it was loaded (staleness is real time, whatever the clock says)
    loaded: float
    ids: dict[str, int]
    ranks: Sequence[float]
    # work_ahead[i]: the kudos of work ranked before place i
    work_ahead: Sequence[int]
    rate: float | None

    @property
    def length(self) -> int:
        return len(self.ranks)

    def place(self, job_id: str | None, rank: float) -> int:
        """Queue position (0 = next) of a job: its place in the snapshot, or for a job queued
        since then, where its rank falls."""
        if job_id is not None and job_id in self.ids:
            return self.ids[job_id]
        return bisect.bisect_right(self.ranks, rank)

    def ahead(self, place: int) -> int:
        return self.work_ahead[min(place, len(self.work_ahead) - 1)]


class Ranking:
    """Shared, periodically refreshed snapshots of the queue (one per job kind)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._snapshots: dict[str, Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._load_seconds: dict[str, float] = {}
        self._dirty: set[str] = set()
        # kind -> (throughput, time.monotonic() when computed)
        self._rates: dict[str, tuple[float | None, float]] = {}

    def changed(self, kind: str) -> None:
        """This process queued or took a job of `kind`: refresh the snapshot sooner."""
        self._dirty.add(kind)

    def _fresh(self, kind: str, current: Snapshot | None) -> bool:
        if current is None:
            return False
        age = time.monotonic() - current.loaded
        interval = self._db.config.ranking_interval
        if kind not in self._dirty:
            return age < interval
        if current.length <= EXACT_BELOW:
            return False  # a short queue is cheap to reload: exact positions after changes
        # A long one is reloaded after changes once a second, or once per 10x the time a load
        # takes if that is longer (a good fraction of a second at 100 000 queued jobs).
        return age < max(10 * self._load_seconds.get(kind, 0.0), interval)

    async def snapshot(self, kind: str) -> Snapshot:
        current = self._snapshots.get(kind)
        if self._fresh(kind, current):
            assert current is not None
            return current
        lock = self._locks.setdefault(kind, asyncio.Lock())
        async with lock:
            current = self._snapshots.get(kind)
            if self._fresh(kind, current):
                assert current is not None
                return current  # another reader refreshed it while we waited
            self._dirty.discard(kind)
            started = time.perf_counter()
            current = await self._load(kind)
            self._load_seconds[kind] = time.perf_counter() - started
            self._snapshots[kind] = current
            return current

    async def _rate(self, kind: str, at: float) -> float | None:
        """The throughput, recomputed at most every `ranking_interval` (it sums the window's
        finished jobs; an ETA needs no fresher one), or whenever there was none."""
        rate, computed = self._rates.get(kind, (None, -math.inf))
        if rate is None or time.monotonic() - computed >= self._db.config.ranking_interval:
            async with self._db.begin() as conn:
                rate = await throughput(conn, kind, self._db.config.eta_window, at)
            self._rates[kind] = (rate, time.monotonic())
        return rate

    async def _load(self, kind: str) -> Snapshot:
        query = _QUEUE_OF.get(kind, lambda: _queue_of(kind))
        taken_at = self._db.now()

        def build(rows: Sequence[Any], rate: float | None) -> Snapshot:
            ids = {row[0]: place for place, row in enumerate(rows)}
            ranks = [float(row[1]) for row in rows]
            work_ahead = list(itertools.accumulate((int(row[2]) for row in rows), initial=0))
            return Snapshot(taken_at, time.monotonic(), ids, ranks, work_ahead, rate)

        previous = self._snapshots.get(kind)
        rate = await self._rate(kind, taken_at)
        if previous is not None and previous.length <= EXACT_BELOW and self._db.inline_reads:
            # short: read at once (cheaper than a thread with a connection of its own); a
            # long queue is read beside the event loop, below
            return build(await self._db.read_all(query, {}), rate)
        return await self._db.read_rows(query, lambda rows: build(rows, rate))
