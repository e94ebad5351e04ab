"""Worker trust: held earnings, spot checks, suspicion, pausing, uptime kudos.

How it works (see README "The kudos economy"):
- A new worker is untrusted, unless its public key is in `trusted_workers` or it was
  registered with the API key of an account in `trusted_accounts` (the operator's way to
  seed trust: somebody has to be believed first).
- `pay_worker` pays every worker through one ledger entry; for an untrusted worker
  `trust_hold_fraction` of it goes to the worker's pending account `pending:<worker id>`.
- A completed image job of an untrusted worker is re-run by a trusted worker (a
  *verification job*, same seed and parameters) with probability `spot_check_rate`,
  halved for every check it passed (BOINC-style adaptive replication), never below
  `spot_check_min_rate`. Agreement releases everything held and, after
  `trust_after_checks` passes without suspicion, makes it trusted. Disagreement forfeits
  everything held (back to the grants account), adds a suspicion, replaces the requester's
  images with the trusted worker's, and revokes trust.
- A result faster than `max_pixel_steps_per_second` adds a suspicion and forces a check.
- `pause_after_suspicions` suspicions pause the worker: its pops get 403.
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from typing import Any

from sqlalchemy import Row, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db.database import ESCROW, GRANTS, now
from coordinator.db.ledger import balance, open_balance, post_entry
from coordinator.db.schema import accounts, jobs, ledger_entries, results, workers
from protocol.params import ImageParams
from protocol.samplers import sampler_factor

__all__ = [
    "GRANT_REASONS",
    "pay_worker",
    "pending_account",
    "record_check",
    "record_poll",
    "spot_check_rate",
]

log = logging.getLogger(__name__)

PENDING_PREFIX = "pending:"
# spot checks are scheduled only if a trusted worker polled within this many seconds
REFEREE_SEEN_SECONDS = 600.0
# Entries with these reasons create or destroy kudos (they move system:grants); every
# other entry only moves kudos between accounts.
GRANT_REASONS = frozenset({"grant", "rating", "uptime", "verify", "forfeit"})


async def _system_id(conn: AsyncConnection, name: str) -> int:
    found = (await conn.execute(select(accounts.c.id).where(accounts.c.name == name))).scalar_one()
    return int(found)


async def pending_account(conn: AsyncConnection, worker_id: str) -> int:
    """The account holding `worker_id`'s unverified earnings (created on first use)."""
    name = PENDING_PREFIX + worker_id
    query = select(accounts.c.id).where(accounts.c.name == name)
    found = (await conn.execute(query)).scalar_one_or_none()
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


async def pay_worker(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker_id: str,
    account_id: int,
    amount: int,
    job_id: str | None,
    key: str,
    *,
    reason: str = "settle",
    source: int | None = None,
) -> tuple[int, int]:
    """Pay `amount` kudos for `worker_id`'s work into `account_id`, in the caller's transaction.

    `source` is the paying account (default: system:escrow, for a job's reserved cost; use
    system:grants for uptime and the like). While the worker is untrusted,
    `trust_hold_fraction` of the amount (rounded down) goes to its pending account instead.
    One ledger entry with idempotency key `key`. Returns (paid now, held).
    """
    if amount <= 0:
        return 0, 0
    trusted = (
        await conn.execute(select(workers.c.trusted).where(workers.c.id == worker_id))
    ).scalar_one()
    held = 0 if trusted else math.floor(amount * config.trust_hold_fraction)
    payer = source if source is not None else await _system_id(conn, ESCROW)
    moves = [(payer, -amount)]
    if amount - held:
        moves.append((account_id, amount - held))
    if held:
        moves.append((await pending_account(conn, worker_id), held))
    await post_entry(conn, reason=reason, key=key, job_id=job_id, moves=moves)
    return amount - held, held


def spot_check_rate(config: CoordinatorConfig, worker: Row[Any]) -> float:
    """The chance that one of this worker's results is re-run by a trusted worker."""
    if worker.trusted:
        return config.trusted_spot_check_rate
    passed = int(worker.checks_passed)
    adaptive = max(config.spot_check_min_rate, config.spot_check_rate / float(2**passed))
    return min(config.spot_check_rate, adaptive)


def _work(params: ImageParams) -> int:
    return params.pixels * params.steps * sampler_factor(params.sampler) * params.n


async def _suspect(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, why: str
) -> None:
    row = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
    suspicion = row.suspicion + 1
    values: dict[str, Any] = {"suspicion": suspicion, "trusted": 0}
    if suspicion >= config.pause_after_suspicions and not row.paused:
        values["paused"] = 1
        values["pause_reason"] = (
            f"paused after {suspicion} suspicions (last: {why}); its jobs go to other workers"
        )
        log.warning("worker %s paused: %s", worker_id, why)
    await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))


async def after_result(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker_id: str,
    job: Row[Any],
    now: float,
    verification_account: int,
) -> None:
    """Speed check and maybe schedule a spot check of a finished ordinary image job."""
    worker = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
    params = ImageParams.model_validate_json(job.params)
    work = _work(params)
    elapsed = max(now - (job.leased_at or now), 1e-3)
    limit = config.max_pixel_steps_per_second
    too_fast = work >= limit * 0.5 and work / elapsed > limit
    if too_fast:
        await _suspect(
            conn,
            config,
            worker_id,
            f"job {job.id}: {work / elapsed:.3g} pixel-steps/s is beyond any GPU",
        )
    if not too_fast and random.random() >= spot_check_rate(config, worker):
        return
    # Only when a trusted worker is around to run it; otherwise the held kudos wait.
    referee = (
        await conn.execute(
            select(workers.c.id)
            .where(
                (workers.c.trusted == 1)
                & (workers.c.paused == 0)
                & (workers.c.id != worker_id)
                & (workers.c.last_seen >= now - REFEREE_SEEN_SECONDS)
            )
            .limit(1)
        )
    ).first()
    if referee is None:
        return
    await conn.execute(
        jobs.insert().values(
            id=str(uuid.uuid4()),
            kind="image",
            account_id=verification_account,
            state="queued",
            params=job.params,
            params_hash=job.params_hash,
            model=job.model,
            pixels=job.pixels,
            steps=job.steps,
            n=job.n,
            cost=0,
            priority_class=2,
            created_at=now,
            lease_seconds=job.lease_seconds,
            attempts=0,
            image=0,
            step=0,
            steps_total=job.steps,
            verify_of=job.id,
        )
    )


async def record_check(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    check: Row[Any],
    verifier_id: str,
    verifier_account: int,
    agree: bool,
    verified_images: list[tuple[int, str, str]],
) -> tuple[int, int]:
    """Apply the outcome of verification job `check` (its images: index, sha256, signature);
    returns what the verifier was paid (now, held)."""
    original = (await conn.execute(select(jobs).where(jobs.c.id == check.verify_of))).one()
    suspect_id = original.worker_id
    suspect = (await conn.execute(select(workers).where(workers.c.id == suspect_id))).one()
    pending = await pending_account(conn, suspect_id)
    held = await balance(conn, pending)
    grants = await _system_id(conn, GRANTS)
    if agree:
        passed = suspect.checks_passed + 1
        values: dict[str, Any] = {"checks_passed": passed}
        if passed >= config.trust_after_checks and suspect.suspicion == 0:
            values["trusted"] = 1
        await conn.execute(update(workers).where(workers.c.id == suspect_id).values(values))
        if held:
            await post_entry(
                conn,
                reason="release",
                key=f"release:{check.id}",
                job_id=original.id,
                moves=[(pending, -held), (suspect.account_id, held)],
            )
    else:
        await conn.execute(
            update(workers)
            .where(workers.c.id == suspect_id)
            .values(checks_failed=workers.c.checks_failed + 1)
        )
        await _suspect(conn, config, suspect_id, f"spot check of job {original.id} disagreed")
        if held:
            await post_entry(
                conn,
                reason="forfeit",
                key=f"forfeit:{check.id}",
                job_id=original.id,
                moves=[(pending, -held), (grants, held)],
            )
        # The requester gets the images the trusted worker made.
        for index, sha256, signature in verified_images:
            await conn.execute(
                update(results)
                .where((results.c.job_id == original.id) & (results.c.idx == index))
                .values(sha256=sha256, signature=signature, worker_id=verifier_id)
            )
    # The verifier did real work: paid like the original, from the grants account.
    return await pay_worker(
        conn,
        config,
        verifier_id,
        verifier_account,
        int(original.cost),
        check.id,
        f"verify:{check.id}",
        reason="verify",
        source=grants,
    )


async def record_poll(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker_id: str,
    now: float,
    ip: str | None = None,
) -> int:
    """Note that the worker is polling (from `ip`, when known); pay uptime kudos for the
    last full period it was online through, if it served recently. Returns the kudos paid
    (0 if none)."""
    row = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
    online_since = row.online_since
    if online_since is None or now - row.last_seen > config.uptime_grace:
        online_since = now
    values: dict[str, Any] = {"last_seen": now, "online_since": online_since}
    if ip is not None:
        values["ip"] = ip
    await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))
    if config.uptime_reward <= 0 or row.paused:
        return 0
    period = config.uptime_period
    last_full = math.floor(now / period) - 1
    if online_since > last_full * period:
        return 0
    served = (
        await conn.execute(
            select(func.count())
            .select_from(jobs)
            .where(
                (jobs.c.worker_id == worker_id)
                & (jobs.c.state == "done")
                & (jobs.c.finished_at >= now - config.uptime_serve_window)
            )
        )
    ).scalar_one()
    if not served:
        return 0
    key = f"uptime:{worker_id}:{last_full}"
    seen = select(ledger_entries.c.id).where(ledger_entries.c.idempotency_key == key)
    if (await conn.execute(seen)).first() is not None:
        return 0
    paid, held = await pay_worker(
        conn,
        config,
        worker_id,
        row.account_id,
        config.uptime_reward,
        None,
        key,
        reason="uptime",
        source=await _system_id(conn, GRANTS),
    )
    return paid + held
