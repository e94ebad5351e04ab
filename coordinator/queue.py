"""The waiting queue as `protocol.priority` sees it: load, rank, position and ETA.

Used for image pops here and for text pops by `coordinator.text_store`: pass the SQL
condition that selects the jobs a worker could take, get them back best first.

ETA method: throughput is the kudos-weighted work of jobs of the same kind finished in the
last `eta_window` seconds, divided by the time from the first of them being leased until
now. A queued job's ETA is (the work ranked ahead of it + its own work) / throughput; a
running job's ETA extrapolates its own progress. No recent throughput -> no ETA (null).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Row, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.schema import jobs, postings
from protocol.priority import Waiting, order, position

__all__ = [
    "balances_of",
    "eta_of",
    "queue_info",
    "quote_place",
    "ranked",
    "throughput",
    "waiting",
]


async def balances_of(conn: AsyncConnection, account_ids: Iterable[int]) -> dict[int, int]:
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    query = (
        select(postings.c.account_id, func.sum(postings.c.amount))
        .where(postings.c.account_id.in_(ids))
        .group_by(postings.c.account_id)
    )
    found = {int(a): int(total) for a, total in (await conn.execute(query)).all()}
    return {account: found.get(account, 0) for account in ids}


async def waiting(conn: AsyncConnection, condition: ColumnElement[bool]) -> list[Row[Any]]:
    """Queued jobs matching `condition` (id, account_id, created_at, priority_class, cost,
    lease_seconds), unordered."""
    query = select(
        jobs.c.id,
        jobs.c.account_id,
        jobs.c.created_at,
        jobs.c.priority_class,
        jobs.c.cost,
        jobs.c.lease_seconds,
    ).where((jobs.c.state == "queued") & condition)
    found: Any = (await conn.execute(query)).all()
    return list(found)


def _as_waiting(row: Row[Any], kudos: dict[int, int]) -> Waiting:
    return Waiting(
        job_id=row.id,
        account_id=row.account_id,
        kudos=kudos.get(row.account_id, 0),
        created_at=row.created_at,
        anonymous=row.priority_class == 0,
    )


async def ranked(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    condition: ColumnElement[bool],
    owner: int | None = None,
) -> list[Row[Any]]:
    """Queued jobs matching `condition`, best first; `owner`'s own jobs before all others."""
    rows = await waiting(conn, condition)
    kudos = await balances_of(conn, (row.account_id for row in rows))
    by_id = {row.id: row for row in rows}
    return [
        by_id[w.job_id] for w in order((_as_waiting(r, kudos) for r in rows), config.aging, owner)
    ]


async def throughput(conn: AsyncConnection, kind: str, window: float, now: float) -> float | None:
    """Kudos of work finished per second recently; None without recent finished jobs."""
    query = select(func.coalesce(func.sum(jobs.c.cost), 0), func.min(jobs.c.leased_at)).where(
        (jobs.c.kind == kind)
        & (jobs.c.state == "done")
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


async def queue_info(
    conn: AsyncConnection, config: CoordinatorConfig, job: Row[Any]
) -> tuple[int | None, float | None]:
    """(queue position, ETA seconds) of a job row; position None unless queued."""
    now = time.time()
    rate = await throughput(conn, job.kind, config.eta_window, now)
    if job.state != "queued":
        return None, eta_of(job, 0, rate, now)
    rows = await waiting(conn, (jobs.c.kind == job.kind) & jobs.c.verify_of.is_(None))
    kudos = await balances_of(conn, (row.account_id for row in rows))
    entries = [_as_waiting(row, kudos) for row in rows]
    place = position(entries, job.id, config.aging)
    if place is None:
        return None, None
    costs = {row.id: int(row.cost) for row in rows}
    ahead = order(entries, config.aging)[:place]
    return place, eta_of(job, sum(costs[w.job_id] for w in ahead), rate, now)


async def quote_place(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    kind: str,
    account_id: int,
    anonymous: bool,
    cost: int,
) -> tuple[int, int, float | None]:
    """For a job not yet submitted: (queue length, position it would get, ETA seconds)."""
    now = time.time()
    rows = await waiting(conn, (jobs.c.kind == kind) & jobs.c.verify_of.is_(None))
    kudos = await balances_of(conn, [*(row.account_id for row in rows), account_id])
    entries = [_as_waiting(row, kudos) for row in rows]
    # The reservation will lower the balance before the job is ranked.
    new = Waiting("~quote", account_id, kudos[account_id] - cost, now, anonymous)
    ranked_all = order([*entries, new], config.aging)
    place = ranked_all.index(new)
    costs = {row.id: int(row.cost) for row in rows}
    rate = await throughput(conn, kind, config.eta_window, now)
    ahead = sum(costs[w.job_id] for w in ranked_all[:place])
    eta = None if rate is None else (ahead + cost) / rate
    return len(rows), place, eta
