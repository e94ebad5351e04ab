"""Paying workers: the trust hold, releases, AI Horde workers' held pay and disputes,
uptime kudos.

- `pay_worker` pays every worker through one ledger entry (what to pay: a `Pay`); for an
  untrusted worker `trust_hold_fraction` of it goes to the worker's pending account
  `pending:<worker id>`, released or forfeited by its spot checks
  (coordinator.economy.checks).
- Pay keeps what funded it: the part of a job that grants paid reaches the worker's owner
  (and its pending account) as grants; uptime and check pay are minted, so grants too
  (README "Threat model: no kudos from nothing").
- An AI Horde worker's results are unsigned and cannot be re-run: the whole price is held
  (`hold_for_dispute`) for `horde_hold_seconds` and then released (`release_held`) unless
  the requester disputes it first (`dispute`). Disputes are limited per day and to a share
  of the requester's finished jobs, and delete the disputed images.
- Uptime: a worker polling through a full `uptime_period` earns `uptime_reward` (grants)
  if it recently finished verified work (`record_poll`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Row,
    bindparam,
    case,
    exists,
    func,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db import raw
from coordinator.db.database import ESCROW, GRANTS, now
from coordinator.db.ledger import GRANTED, grants, open_balance, post_entry
from coordinator.db.schema import accounts, jobs, ledger_entries, results, workers
from coordinator.db.tx import SYSTEM_BY_NAME
from coordinator.economy.suspicion import suspect
from coordinator.errors import Forbidden

__all__ = [
    "DONE",
    "GRANT_REASONS",
    "PENDING_PREFIX",
    "RELEASE_BATCH",
    "WORKER_ROW",
    "Pay",
    "dispute",
    "grants_first",
    "hold_for_dispute",
    "job_grants",
    "pay_worker",
    "pending_account",
    "record_poll",
    "release_held",
    "system_id",
]

PENDING_PREFIX = "pending:"

DONE = text("jobs.state = 'done'")

# Entries with these reasons create or destroy kudos (they move system:grants); every
# other entry only moves kudos between accounts.
GRANT_REASONS = frozenset({"grant", "rating", "uptime", "verify", "forfeit", "mint", "opening"})

# held pay of at most this many jobs is released per transaction
RELEASE_BATCH = 100

# the window of `max_disputes_per_day`
DISPUTE_DAY = 86400.0


# built once (coordinator.db.prepared): every job's settlement runs these
# built once (coordinator.db.prepared): every job's settlement runs these
_ACCOUNT_BY_NAME = select(accounts.c.id).where(accounts.c.name == bindparam("name"))

WORKER_ROW = select(workers).where(workers.c.id == bindparam("worker_id"))

_TRUSTED = select(workers.c.trusted).where(workers.c.id == bindparam("worker_id"))

_SET_WORKER = update(workers).where(workers.c.id == bindparam("worker_id"))  # SET: the params

_GRANT_FUNDED = select(jobs.c.grant_funded).where(jobs.c.id == bindparam("job_id"))
# until when a job's AI Horde pay is held (None: released or refunded)
_HELD_UNTIL = (
    update(jobs)
    .where(jobs.c.id == bindparam("job_id"))
    .values(held_until=bindparam("held_until", type_=jobs.c.held_until.type))
)


async def system_id(conn: AsyncConnection, name: str) -> int:
    known: dict[str, int] = conn.info.get(SYSTEM_BY_NAME, {})
    if name in known:  # (system accounts are never renamed nor removed)
        return known[name]
    found = (await raw.execute(conn, _ACCOUNT_BY_NAME, {"name": name})).scalar_one()
    return int(found)


async def pending_account(conn: AsyncConnection, worker_id: str) -> int:
    """The account holding `worker_id`'s unverified earnings (created on first use)."""
    name = PENDING_PREFIX + worker_id
    found = (await raw.execute(conn, _ACCOUNT_BY_NAME, {"name": name})).scalar_one_or_none()
    if found is None:
        found = (
            await conn.execute(
                accounts.insert()
                .values(name=name, kind="pending", floor=0, created_at=now(conn))
                .returning(accounts.c.id)
            )
        ).scalar_one()
        await open_balance(conn, int(found))
    return int(found)


@dataclass(frozen=True)
class Pay:
    """What `pay_worker` pays: `amount` kudos for `worker_id`'s work into `account_id`, as
    one ledger entry with idempotency key `key` (and `reason`), about job `job_id` (None:
    no job, e.g. uptime). `source` is the paying account (None: system:escrow, for a job's
    reserved cost; system:grants for uptime, checks and the like). `granted`: how much of
    `amount` grants funded (`job_grants`)."""

    worker_id: str
    account_id: int
    amount: int
    job_id: str | None
    key: str
    reason: str = "settle"
    source: int | None = None
    granted: int = 0


async def pay_worker(conn: AsyncConnection, config: CoordinatorConfig, pay: Pay) -> tuple[int, int]:
    """Pay `pay` in the caller's transaction; returns (paid now, held).

    The granted part arrives as grants, in proportion on the paid and the held part (a
    minted reason, such as uptime, is all grants anyway). While the worker is untrusted,
    `trust_hold_fraction` of the amount (rounded down) goes to its pending account instead.
    """
    worker_id, account_id, amount, granted = pay.worker_id, pay.account_id, pay.amount, pay.granted
    if amount <= 0:
        return 0, 0
    trusted = (await raw.execute(conn, _TRUSTED, {"worker_id": worker_id})).scalar_one()
    held = 0 if trusted else math.floor(amount * config.trust_hold_fraction)
    payer = pay.source if pay.source is not None else await system_id(conn, ESCROW)
    moves = [(payer, -amount)]
    # rounded down on the held part, so the part paid now takes the odd kudo as a grant
    granted_held = granted * held // amount
    grants: dict[int, int] = {}
    if amount - held:
        moves.append((account_id, amount - held))
        grants[account_id] = granted - granted_held
    if held:
        pending = await pending_account(conn, worker_id)
        moves.append((pending, held))
        grants[pending] = granted_held
    await post_entry(
        conn,
        reason=pay.reason,
        key=pay.key,
        job_id=pay.job_id,
        moves=moves,
        granted=None if pay.reason in GRANTED else grants,
    )
    return amount - held, held


async def job_grants(conn: AsyncConnection, job_id: str) -> int:
    """How much of what `job_id` still holds in escrow grants funded (its requester's unspent
    grants, or credit below zero): that part of its pay arrives as grants."""
    funded = (await raw.execute(conn, _GRANT_FUNDED, {"job_id": job_id})).scalar_one()
    return int(funded)


async def grants_first(conn: AsyncConnection, account_id: int, amount: int) -> int:
    """The grants among `amount` kudos leaving `account_id` (a pending account), taken first:
    what leaves as grants arrives as grants."""
    return min(await grants(conn, account_id), amount)


async def hold_for_dispute(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, job: Row[Any]
) -> int:
    """Settle a job an AI Horde worker finished: its results are unsigned and come from
    engines we cannot re-run, so there is nothing to check them against. The whole price
    goes to the worker's pending account and is released after `horde_hold_seconds`
    (`release_held`) unless the requester disputes it first (`dispute`). Returns it."""
    pending = await pending_account(conn, worker_id)
    if job.cost > 0:
        await post_entry(
            conn,
            reason="settle",
            key=f"settle:{job.id}",
            job_id=job.id,
            moves=[(await system_id(conn, ESCROW), -job.cost), (pending, job.cost)],
            granted={pending: await job_grants(conn, job.id)},
        )
    held_until = job.finished_at + config.horde_hold_seconds
    await raw.execute(conn, _HELD_UNTIL, {"job_id": job.id, "held_until": held_until})
    return int(job.cost)


async def _held_move(conn: AsyncConnection, job: Any, reason: str, to: int) -> int:
    """Move what `job` holds on its worker's pending account to `to`; the amount. Its grants
    (what grants funded of the job) leave as grants; a release pays them as grants, a
    refund gives the requester back what its own grants paid (coordinator.db.ledger)."""
    if job.cost > 0:
        pending = await pending_account(conn, job.worker_id)
        held_grants = min(await job_grants(conn, job.id), int(job.cost))
        moved = {pending: -held_grants}
        if reason != "refund":
            moved[to] = held_grants
        await post_entry(
            conn,
            reason=reason,
            key=f"{reason}:horde:{job.id}",
            job_id=job.id,
            moves=[(pending, -job.cost), (to, job.cost)],
            granted=moved,
        )
    await raw.execute(conn, _HELD_UNTIL, {"job_id": job.id, "held_until": None})
    return int(job.cost)


async def release_held(conn: AsyncConnection, now: float) -> int:
    """Pay AI Horde workers what they earned on jobs whose hold ended undisputed; the
    number of jobs released (at most RELEASE_BATCH; call again while it returns that)."""
    due = (
        await conn.execute(
            select(jobs.c.id, jobs.c.cost, jobs.c.worker_id, workers.c.account_id)
            .join(workers, workers.c.id == jobs.c.worker_id)
            .where(jobs.c.held_until.is_not(None) & (jobs.c.held_until <= now))
            .order_by(jobs.c.held_until)
            .limit(RELEASE_BATCH)
            .with_for_update(of=jobs, skip_locked=True)
        )
    ).all()
    for job in due:
        await _held_move(conn, job, "release", job.account_id)
    return len(due)


async def _check_dispute_limits(
    conn: AsyncConnection, config: CoordinatorConfig, account_id: int, at: float, kind: str
) -> None:
    """Forbidden past `max_disputes_per_day` or `max_dispute_share` (rounded up) of the
    account's finished jobs of `kind` (image, text): a dispute costs the requester nothing and
    suspects the worker, so unlimited disputes would be free work and a way to pause honest
    workers."""
    mine = jobs.c.account_id == account_id
    signed = "signed_only: true" if kind == "image" else "trusted_workers: true on /api/v2"
    disputed_today = (
        await conn.execute(
            select(func.count())
            .select_from(ledger_entries.join(jobs, jobs.c.id == ledger_entries.c.job_id))
            .where(
                mine
                & (ledger_entries.c.reason == "refund")
                & ledger_entries.c.idempotency_key.startswith("refund:horde:")
                & (ledger_entries.c.created_at >= at - DISPUTE_DAY)
            )
        )
    ).scalar_one()
    if disputed_today >= config.max_disputes_per_day:
        raise Forbidden(
            f"you disputed {disputed_today} results in the last 24 hours, the most allowed "
            f"here (--max-disputes-per-day {config.max_disputes_per_day}); try again later, "
            f"or send {signed} so that only workers that sign their results serve you",
            [("job_id", "dispute limit reached")],
        )
    finished, disputed = (
        await conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((jobs.c.verdict == "disputed", 1), else_=0)), 0),
            ).where(mine & DONE & (jobs.c.kind == kind) & jobs.c.verify_of.is_(None))
        )
    ).one()
    allowed = math.ceil(config.max_dispute_share * finished - 1e-9)
    if int(disputed) + 1 > allowed:
        raise Forbidden(
            f"you disputed {disputed} of your {finished} finished {kind} jobs; at most "
            f"{config.max_dispute_share:g} of them (rounded up) may be disputed here "
            f"(--max-dispute-share); send {signed} so that only workers that sign "
            "their results serve you",
            [("job_id", "dispute share reached")],
        )


async def dispute(conn: AsyncConnection, config: CoordinatorConfig, job: Row[Any], why: str) -> int:
    """The requester disputes an unsigned result while its pay is held (within its limits:
    `_check_dispute_limits`): the price goes back to the requester (as a refund: granted
    kudos stay grants), the job's verdict is `disputed`, its images are gone (the caller
    deletes the files: whoever disputes does not keep them) and the worker takes a
    suspicion. Returns the kudos refunded."""
    await _check_dispute_limits(conn, config, job.account_id, now(conn), str(job.kind))
    refunded = await _held_move(conn, job, "refund", job.account_id)
    await conn.execute(update(jobs).where(jobs.c.id == job.id).values(verdict="disputed"))
    await conn.execute(results.delete().where(results.c.job_id == job.id))
    await suspect(conn, config, job.worker_id, f"job {job.id} disputed: {why}")
    return refunded


async def _verified_work(conn: AsyncConnection, worker: Row[Any], since: float) -> bool:
    """The worker finished verified work since `since`: any job if it is trusted (it earned
    that through independent checks, or the operator vouched for it), else a job that an
    independent check agreed with. Polling alone, or unchecked work (every job of an AI
    Horde worker), earns no uptime: names cost nothing, and a poll proves no GPU."""
    check = jobs.alias("check")
    done = (
        (jobs.c.worker_id == worker.id) & (jobs.c.state == "done") & (jobs.c.finished_at >= since)
    )
    if not worker.trusted:
        agreed = (check.c.verify_of == jobs.c.id) & (check.c.verdict == "agree")
        done = done & exists().where(agreed)
    found = (await conn.execute(select(jobs.c.id).where(done).limit(1))).first()
    return found is not None


async def record_poll(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker_id: str,
    now: float,
    ip: str | None = None,
    offer: dict[str, Any] | None = None,
) -> int:
    """Note that the worker is polling (from `ip`, when known; `offer`: columns saying what
    it serves, when they changed); pay uptime kudos (grants) for the last full period it was
    online through, if it recently finished verified work (`_verified_work`). Returns the
    kudos paid (0 if none)."""
    row = (await raw.execute(conn, WORKER_ROW, {"worker_id": worker_id})).one()
    online_since = row.online_since
    if online_since is None or now - row.last_seen > config.uptime_grace:
        online_since = now
    values: dict[str, Any] = {"last_seen": now, "online_since": online_since}
    if ip is not None:
        values["ip"] = ip
    values.update(offer or {})
    await raw.execute(conn, _SET_WORKER, {"worker_id": worker_id, **values})
    if config.uptime_reward <= 0 or row.paused:
        return 0
    period = config.uptime_period
    last_full = math.floor(now / period) - 1
    if online_since > last_full * period:
        return 0
    if not await _verified_work(conn, row, now - config.uptime_serve_window):
        return 0
    key = f"uptime:{worker_id}:{last_full}"
    seen = select(ledger_entries.c.id).where(ledger_entries.c.idempotency_key == key)
    if (await conn.execute(seen)).first() is not None:
        return 0
    paid, held = await pay_worker(
        conn,
        config,
        Pay(
            worker_id,
            row.account_id,
            config.uptime_reward,
            None,
            key,
            reason="uptime",
            source=await system_id(conn, GRANTS),
        ),
    )
    return paid + held
