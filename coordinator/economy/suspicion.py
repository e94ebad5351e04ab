"""Suspicion and pausing: what a worker's owner loses when its workers misbehave.

- `suspect`: one more suspicion (a failed or outvoted check, a result faster than any GPU,
  a disputed result). Suspicion and trust belong to the owning account as well as the
  name: suspicions add up over the owner's workers, one suspicion takes trust from all of
  them, and `pause_after_suspicions` of them pause the worker.
- `gave_back`: `faulted_run` give-backs in a row pause a worker too.
- `pause`: the one way a worker is paused (its pops get 403). While one worker of an
  owner is paused none of them, nor a new name of that owner, gets jobs
  (`account_paused`, `inherited_pause`).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db import raw
from coordinator.db.schema import workers

__all__ = ["account_paused", "gave_back", "inherited_pause", "pause", "suspect"]

log = logging.getLogger(__name__)

# why a worker of the account is paused, if one is (built once: coordinator.db.raw)
_PAUSED = (
    select(workers.c.pause_reason)
    .where((workers.c.account_id == bindparam("account_id")) & (workers.c.paused == 1))
    .limit(1)
)


async def pause(conn: AsyncConnection, worker_id: str, reason: str) -> None:
    """Pause `worker_id`, and so every worker of its owner (`account_paused`): its jobs go
    to other workers until the operator reviews it. `reason` is what its pops are told."""
    await conn.execute(
        update(workers).where(workers.c.id == worker_id).values(paused=1, pause_reason=reason)
    )
    log.warning("worker %s paused: %s", worker_id, reason)


async def account_paused(conn: AsyncConnection, account_id: int) -> str | None:
    """Why a worker of `account_id` is paused, if one is: a pause belongs to the owner as
    well as the name, so a new name (or another worker) of that owner gets no jobs either."""
    reason = (await raw.execute(conn, _PAUSED, {"account_id": account_id})).first()
    return None if reason is None else str(reason[0] or "paused")


async def inherited_pause(conn: AsyncConnection, account_id: int) -> dict[str, Any]:
    """The columns of a new worker of `account_id`: paused if its owner is."""
    why = await account_paused(conn, account_id)
    if why is None:
        return {}
    return {"paused": 1, "pause_reason": f"its owner's other worker is paused ({why})"}


async def suspect(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, why: str
) -> None:
    """One more suspicion against `worker_id`. Suspicion and trust belong to the owner as
    well as the name: the owner's suspicions add up across its workers (a fresh name starts
    from the owner's count), and every worker of the owner loses trust."""
    row = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
    owner_total = (
        await conn.execute(
            select(func.coalesce(func.sum(workers.c.suspicion), 0)).where(
                workers.c.account_id == row.account_id
            )
        )
    ).scalar_one() + 1
    await conn.execute(
        update(workers)
        .where(workers.c.id == worker_id)
        .values(suspicion=row.suspicion + 1, trusted=0)
    )
    await conn.execute(
        update(workers)
        .where((workers.c.account_id == row.account_id) & (workers.c.trusted == 1))
        .values(trusted=0)
    )
    if owner_total >= config.pause_after_suspicions and not row.paused:
        reason = (
            f"paused after {owner_total} suspicions of its owner's workers (last: {why}); "
            "its jobs go to other workers"
        )
        await pause(conn, worker_id, reason)


async def gave_back(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, *, counts: bool
) -> None:
    """`worker_id` gave a job back. When it `counts` (not a drain, not a gateway whose
    block servers failed), one more in its run of give-backs; `faulted_run` in a row
    pause it: a worker that pops and returns every job only delays the queue."""
    if not counts:
        return
    row = (
        await conn.execute(
            select(workers.c.faulted_run, workers.c.paused).where(workers.c.id == worker_id)
        )
    ).one()
    run = row.faulted_run + 1
    await conn.execute(update(workers).where(workers.c.id == worker_id).values(faulted_run=run))
    if run >= config.faulted_run and not row.paused:
        reason = (
            f"paused after giving back {run} jobs in a row without finishing one; "
            "its jobs go to other workers"
        )
        await pause(conn, worker_id, reason)
