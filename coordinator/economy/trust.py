"""Worker trust: held earnings, spot checks, suspicion, pausing, uptime kudos.

How it works (see README "The kudos economy" and "Threat model"):
- A new worker is untrusted, unless its public key is in `trusted_workers` or it was
  registered with the API key of an account in `trusted_accounts` (the operator's way to
  seed trust: somebody has to be believed first).
- `pay_worker` pays every worker through one ledger entry; for an untrusted worker
  `trust_hold_fraction` of it goes to the worker's pending account `pending:<worker id>`.
- A completed image job of an untrusted worker is re-run by a trusted worker (a
  *verification job*, same seed and parameters) with probability `spot_check_rate`,
  halved for every check it passed (BOINC-style adaptive replication), never below
  `spot_check_min_rate`.
- Checks are independent (`checks_for`, `related`): never by a worker of the checked
  worker's owner, nor (`verify_distinct_ip`) at its client IP, nor by anyone who already
  checked that job (or their owner or IP).
- Each finished check records its `verdict`. Agreement releases what is held and, after
  `trust_after_checks` passes without suspicion, makes the worker trusted. One verifier's
  disagreement is not final (quorum: two of three): the job goes to a second independent
  verifier while the pay stays held. If it disagrees too, the worker forfeits everything
  held (back to the grants account), takes a suspicion, loses trust, and the requester's
  images are replaced with the verifier's; if it agrees, the worker is released and the
  first verifier takes the suspicion. An image the coordinator cannot decode (within the
  job's size) counts against whoever made it: the original's concludes the check against
  its worker; the verifier's voids the check (suspicion for the verifier, a new check).
- A result faster than `max_pixel_steps_per_second` adds a suspicion and forces a check,
  for every job size. The time is counted from the lease, or from the worker's previous
  result if that came later: leasing many jobs at once buys no time.
- `pause_after_suspicions` suspicions pause the worker: its pops get 403. Pause,
  suspicion and trust belong to the owning account as well as the name: suspicions add
  up over the owner's workers, one suspicion takes trust from all of them, and while one
  is paused none of them (nor a new name) gets jobs.
- `faulted_run` give-backs in a row (`gave_back`) pause a worker too.
- Disputes of unsigned results are limited per day and to a share of the requester's
  finished jobs, and delete the disputed images.
- Pay keeps what funded it: the part of a job that grants paid reaches the worker's owner
  (and its pending account) as grants; uptime and check pay are minted, so grants too
  (README "Threat model: no kudos from nothing").
- Text jobs use the same verdicts (`pass_check`, `fail_check`, `judge`): gateways are
  re-run by gateways, block servers checked by gateways (coordinator.economy.text_checks).
"""

from __future__ import annotations

import logging
import math
import random
import uuid
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
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
from coordinator.db.ledger import GRANTED, balance, grants, open_balance, post_entry
from coordinator.db.schema import accounts, jobs, ledger_entries, postings, results, workers
from coordinator.economy.verification import Outcome
from coordinator.errors import Forbidden
from protocol.params import ImageParams
from protocol.samplers import sampler_factor

__all__ = [
    "GRANT_REASONS",
    "RELEASE_BATCH",
    "account_paused",
    "after_result",
    "checks_for",
    "dispute",
    "fail_check",
    "gave_back",
    "independent",
    "job_grants",
    "judge",
    "pay_worker",
    "pass_check",
    "hold_for_dispute",
    "inherited_pause",
    "pending_account",
    "queue_check_if_refereed",
    "record_check",
    "record_poll",
    "related",
    "release_held",
    "spot_check_rate",
]

log = logging.getLogger(__name__)

PENDING_PREFIX = "pending:"
DONE = text("jobs.state = 'done'")
# spot checks are scheduled only if a trusted worker polled within this many seconds
REFEREE_SEEN_SECONDS = 600.0
# Entries with these reasons create or destroy kudos (they move system:grants); every
# other entry only moves kudos between accounts.
GRANT_REASONS = frozenset({"grant", "rating", "uptime", "verify", "forfeit", "mint", "opening"})
# held pay of at most this many jobs is released per transaction
RELEASE_BATCH = 100
# the window of `max_disputes_per_day`
DISPUTE_DAY = 86400.0


# built once (coordinator.db.prepared): every job's settlement runs these
_ACCOUNT_BY_NAME = select(accounts.c.id).where(accounts.c.name == bindparam("name"))
_WORKER = select(workers).where(workers.c.id == bindparam("worker_id"))
_TRUSTED = select(workers.c.trusted).where(workers.c.id == bindparam("worker_id"))
_SET_WORKER = update(workers).where(workers.c.id == bindparam("worker_id"))  # SET: the params
_LAST_RESULT = select(func.max(jobs.c.finished_at)).where(
    (jobs.c.kind == "image")
    & DONE  # (literal, so that SQLite uses the partial index ix_jobs_finished)
    & (jobs.c.finished_at >= bindparam("since", type_=jobs.c.finished_at.type))
    & (jobs.c.worker_id == bindparam("worker", type_=jobs.c.worker_id.type))
    & (jobs.c.id != bindparam("job_id", type_=jobs.c.id.type))
)


_GRANT_FUNDED = select(jobs.c.grant_funded).where(jobs.c.id == bindparam("job_id"))


async def _system_id(conn: AsyncConnection, name: str) -> int:
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
    granted: int = 0,
) -> tuple[int, int]:
    """Pay `amount` kudos for `worker_id`'s work into `account_id`, in the caller's transaction.

    `source` is the paying account (default: system:escrow, for a job's reserved cost; use
    system:grants for uptime and the like). `granted`: how much of `amount` grants funded
    (`job_grants`); that part arrives as grants, in proportion on the paid and the held
    part (a minted reason, such as uptime, is all grants anyway). While the worker is
    untrusted, `trust_hold_fraction` of the amount (rounded down) goes to its pending
    account instead. One ledger entry with idempotency key `key`. Returns (paid now, held).
    """
    if amount <= 0:
        return 0, 0
    trusted = (await raw.execute(conn, _TRUSTED, {"worker_id": worker_id})).scalar_one()
    held = 0 if trusted else math.floor(amount * config.trust_hold_fraction)
    payer = source if source is not None else await _system_id(conn, ESCROW)
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
        reason=reason,
        key=key,
        job_id=job_id,
        moves=moves,
        granted=None if reason in GRANTED else grants,
    )
    return amount - held, held


async def job_grants(conn: AsyncConnection, job_id: str) -> int:
    """How much of what `job_id` still holds in escrow grants funded (its requester's unspent
    grants, or credit below zero): that part of its pay arrives as grants."""
    funded = (await raw.execute(conn, _GRANT_FUNDED, {"job_id": job_id})).scalar_one()
    return int(funded)


async def _grants_first(conn: AsyncConnection, account_id: int, amount: int) -> int:
    """The grants among `amount` kudos leaving `account_id` (a pending account), taken first:
    what leaves as grants arrives as grants."""
    return min(await grants(conn, account_id), amount)


def _work(params: ImageParams) -> int:
    return params.pixels * params.steps * sampler_factor(params.sampler) * params.n


# --- who may check whom ----------------------------------------------------------------


def related(config: CoordinatorConfig, candidate: Any, other: Any) -> ColumnElement[bool]:
    """SQL: the worker `candidate` (the columns of `workers` or an alias) is not independent
    of `other` (another alias's columns, or a row): the same worker, the same owner account
    or, with `verify_distinct_ip`, seen at the same client IP. Never NULL (an unknown IP
    matches nothing), so its negation is safe in a WHERE."""
    same: ColumnElement[bool] = (candidate.id == other.id) | (
        candidate.account_id == other.account_id
    )
    if config.verify_distinct_ip:
        if isinstance(other.ip, ColumnElement):
            same = same | (
                candidate.ip.is_not(None) & other.ip.is_not(None) & (candidate.ip == other.ip)
            )
        elif other.ip is not None:
            same = same | (candidate.ip.is_not(None) & (candidate.ip == other.ip))
    return same


def independent(config: CoordinatorConfig, one: Any, other: Any) -> bool:
    """Two rows of `workers` are independent: `related`'s rule, in Python."""
    if one.id == other.id or one.account_id == other.account_id:
        return False
    return not (config.verify_distinct_ip and one.ip is not None and one.ip == other.ip)


# (built once: an alias copies every column of its table)
_original = jobs.alias("original")
_checked = workers.alias("checked")
_other_check = jobs.alias("other_check")
_other_referee = workers.alias("other_referee")


def checks_for(
    config: CoordinatorConfig, me: Any, pending: ColumnElement[bool], limit: int
) -> Select[Any]:
    """The ids of queued spot checks (`pending`: a condition on `jobs`) that the worker `me`
    may run, oldest first: it is independent of the checked worker and of every worker
    that already checked (or holds a check of) the same job. `me` is a row of `workers`,
    or bind parameters in its place (coordinator.jobs.hot.ME)."""
    original, checked = _original, _checked
    other_check, other_referee = _other_check, _other_referee
    conflict = exists().where(
        (other_check.c.verify_of == jobs.c.verify_of)
        & (other_check.c.id != jobs.c.id)
        & (other_referee.c.id == other_check.c.worker_id)
        & related(config, other_referee.c, me)
    )
    return (
        select(jobs.c.id)
        .join(original, original.c.id == jobs.c.verify_of)
        .join(checked, checked.c.id == original.c.worker_id)
        .where(pending & ~related(config, checked.c, me) & ~conflict)
        .order_by(jobs.c.created_at)
        .limit(limit)
    )


# --- scheduling checks -----------------------------------------------------------------


def spot_check_rate(config: CoordinatorConfig, worker: Row[Any]) -> float:
    """The chance that one of this worker's results is re-run by a trusted worker."""
    if worker.trusted:
        return config.trusted_spot_check_rate
    passed = int(worker.checks_passed)
    adaptive = max(config.spot_check_min_rate, config.spot_check_rate / float(2**passed))
    return min(config.spot_check_rate, adaptive)


async def account_paused(conn: AsyncConnection, account_id: int) -> str | None:
    """Why a worker of `account_id` is paused, if one is: a pause belongs to the owner as
    well as the name, so a new name (or another worker) of that owner gets no jobs either."""
    reason = (
        await conn.execute(
            select(workers.c.pause_reason)
            .where((workers.c.account_id == account_id) & (workers.c.paused == 1))
            .limit(1)
        )
    ).first()
    return None if reason is None else str(reason[0] or "paused")


async def inherited_pause(conn: AsyncConnection, account_id: int) -> dict[str, Any]:
    """The columns of a new worker of `account_id`: paused if its owner is."""
    why = await account_paused(conn, account_id)
    if why is None:
        return {}
    return {"paused": 1, "pause_reason": f"its owner's other worker is paused ({why})"}


async def _suspect(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, why: str
) -> None:
    """One more suspicion against `worker_id`. Suspicion and trust belong to the owner as
    well as the name: the owner's suspicions add up across its workers (a fresh name starts
    from the owner's count), and every worker of the owner loses trust."""
    row = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
    suspicion = row.suspicion + 1
    owner_total = (
        await conn.execute(
            select(func.coalesce(func.sum(workers.c.suspicion), 0)).where(
                workers.c.account_id == row.account_id
            )
        )
    ).scalar_one() + 1
    values: dict[str, Any] = {"suspicion": suspicion, "trusted": 0}
    if owner_total >= config.pause_after_suspicions and not row.paused:
        values["paused"] = 1
        values["pause_reason"] = (
            f"paused after {owner_total} suspicions of its owner's workers (last: {why}); "
            "its jobs go to other workers"
        )
        log.warning("worker %s paused: %s", worker_id, why)
    await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))
    await conn.execute(
        update(workers)
        .where((workers.c.account_id == row.account_id) & (workers.c.trusted == 1))
        .values(trusted=0)
    )


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
    values: dict[str, Any] = {"faulted_run": run}
    if run >= config.faulted_run and not row.paused:
        values["paused"] = 1
        values["pause_reason"] = (
            f"paused after giving back {run} jobs in a row without finishing one; "
            "its jobs go to other workers"
        )
        log.warning("worker %s paused after %d give-backs in a row", worker_id, run)
    await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))


async def _queue_check(conn: AsyncConnection, original: Row[Any], account_id: int) -> None:
    """Queue a verification job re-running `original`, an image or a text job (same seed
    and parameters; only trusted workers pop it: coordinator.jobs.lifecycle)."""
    await conn.execute(
        jobs.insert().values(
            id=str(uuid.uuid4()),
            kind=original.kind,
            account_id=account_id,
            state="queued",
            params=original.params,
            params_hash=original.params_hash,
            model=original.model,
            pixels=original.pixels,
            steps=original.steps,
            n=original.n,
            cost=0,
            priority_class=2,
            created_at=now(conn),
            lease_seconds=original.lease_seconds,
            attempts=0,
            image=0,
            step=0,
            steps_total=original.steps,
            verify_of=original.id,
        )
    )


async def _busy_since(conn: AsyncConnection, worker_id: str, job: Row[Any]) -> float:
    """When the worker could have started on `job`: its lease, or the worker's last other
    image result after that (a worker runs one job at a time)."""
    leased_at = float(job.leased_at if job.leased_at is not None else job.finished_at)
    values = {"since": leased_at, "worker": worker_id, "job_id": job.id}
    previous = (await raw.execute(conn, _LAST_RESULT, values)).scalar_one()
    return leased_at if previous is None else max(leased_at, float(previous))


async def after_result(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker_id: str,
    job: Row[Any],
    now: float,
    verification_account: int,
) -> None:
    """Speed check and maybe schedule a spot check of a finished ordinary image job."""
    worker = (await raw.execute(conn, _WORKER, {"worker_id": worker_id})).one()
    work = _work(ImageParams.model_validate_json(job.params))
    # Lease to result is an upper bound of the compute time (it adds the round trips and
    # the upload), so an honest worker never looks faster than its GPU, at any job size.
    elapsed = max(now - await _busy_since(conn, worker_id, job), 1e-3)
    too_fast = work / elapsed > config.max_pixel_steps_per_second
    if too_fast:
        await _suspect(
            conn,
            config,
            worker_id,
            f"job {job.id}: {work / elapsed:.3g} pixel-steps/s is beyond any GPU",
        )
    if not too_fast and random.random() >= spot_check_rate(config, worker):
        return
    await queue_check_if_refereed(conn, config, worker, job, now, verification_account)


async def queue_check_if_refereed(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker: Row[Any],
    job: Row[Any],
    now: float,
    verification_account: int,
) -> None:
    """Queue a check of `job` by `worker`, only when an independent trusted worker is around
    to run it; else the held kudos wait."""
    referee = (
        await conn.execute(
            select(workers.c.id)
            .where(
                (workers.c.trusted == 1)
                & (workers.c.paused == 0)
                & (workers.c.last_seen >= now - REFEREE_SEEN_SECONDS)
                & ~related(config, workers.c, worker)
            )
            .limit(1)
        )
    ).first()
    if referee is not None:
        await _queue_check(conn, job, verification_account)


# --- unsigned results (AI Horde workers) -----------------------------------------------


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
            moves=[(await _system_id(conn, ESCROW), -job.cost), (pending, job.cost)],
            granted={pending: await job_grants(conn, job.id)},
        )
    held_until = job.finished_at + config.horde_hold_seconds
    await conn.execute(update(jobs).where(jobs.c.id == job.id).values(held_until=held_until))
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
    await conn.execute(update(jobs).where(jobs.c.id == job.id).values(held_until=None))
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
    conn: AsyncConnection, config: CoordinatorConfig, account_id: int, at: float
) -> None:
    """Forbidden past `max_disputes_per_day` or `max_dispute_share` (rounded up) of the
    account's finished image jobs: a dispute costs the requester nothing and suspects the
    worker, so unlimited disputes would be free images and a way to pause honest workers."""
    mine = jobs.c.account_id == account_id
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
            "or send signed_only: true so that only workers that sign their results serve you",
            [("job_id", "dispute limit reached")],
        )
    finished, disputed = (
        await conn.execute(
            select(
                func.count(),
                func.coalesce(func.sum(case((jobs.c.verdict == "disputed", 1), else_=0)), 0),
            ).where(mine & DONE & (jobs.c.kind == "image") & jobs.c.verify_of.is_(None))
        )
    ).one()
    allowed = math.ceil(config.max_dispute_share * finished - 1e-9)
    if int(disputed) + 1 > allowed:
        raise Forbidden(
            f"you disputed {disputed} of your {finished} finished image jobs; at most "
            f"{config.max_dispute_share:g} of them (rounded up) may be disputed here "
            "(--max-dispute-share); send signed_only: true so that only workers that sign "
            "their results serve you",
            [("job_id", "dispute share reached")],
        )


async def dispute(conn: AsyncConnection, config: CoordinatorConfig, job: Row[Any], why: str) -> int:
    """The requester disputes an unsigned result while its pay is held (within its limits:
    `_check_dispute_limits`): the price goes back to the requester (as a refund: granted
    kudos stay grants), the job's verdict is `disputed`, its images are gone (the caller
    deletes the files: whoever disputes does not keep them) and the worker takes a
    suspicion. Returns the kudos refunded."""
    await _check_dispute_limits(conn, config, job.account_id, now(conn))
    refunded = await _held_move(conn, job, "refund", job.account_id)
    await conn.execute(update(jobs).where(jobs.c.id == job.id).values(verdict="disputed"))
    await conn.execute(results.delete().where(results.c.job_id == job.id))
    await _suspect(conn, config, job.worker_id, f"job {job.id} disputed: {why}")
    return refunded


# --- verdicts --------------------------------------------------------------------------


async def _disputed_hold(conn: AsyncConnection, pending: int) -> int:
    """Kudos held on `pending` for jobs whose dispute is open (one check disagreed, the
    second is not done yet): they stay held until it is decided."""
    check = jobs.alias("check")
    second = jobs.alias("second")
    job_id = ledger_entries.c.job_id
    disputed = exists().where(
        (check.c.verify_of == job_id) & (check.c.verdict == "disagree")
    ) & exists().where((second.c.verify_of == job_id) & second.c.state.in_(("queued", "leased")))
    held = (
        await conn.execute(
            select(func.coalesce(func.sum(postings.c.amount), 0))
            .select_from(postings.join(ledger_entries))
            .where((postings.c.account_id == pending) & (postings.c.amount > 0) & disputed)
        )
    ).scalar_one()
    return int(held)


async def pass_check(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, job_id: str, key: str
) -> None:
    """A check found `worker_id`'s work on `job_id` right: count the pass, maybe trust, pay
    out what is held (except for other jobs still in dispute). `key` names the check."""
    suspect = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
    passed = suspect.checks_passed + 1
    values: dict[str, Any] = {"checks_passed": passed}
    if passed >= config.trust_after_checks and suspect.suspicion == 0:
        values["trusted"] = 1
    await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))
    pending = await pending_account(conn, worker_id)
    releasable = await balance(conn, pending) - await _disputed_hold(conn, pending)
    if releasable > 0:
        moved = await _grants_first(conn, pending, releasable)
        await post_entry(
            conn,
            reason="release",
            key=f"release:{key}",
            job_id=job_id,
            moves=[(pending, -releasable), (suspect.account_id, releasable)],
            granted={pending: -moved, suspect.account_id: moved},
        )


async def fail_check(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker_id: str,
    job_id: str,
    key: str,
    why: str,
) -> None:
    """A decided check found `worker_id`'s work on `job_id` wrong: a failed check, a
    suspicion (trust lost, maybe paused), everything held forfeited to the grants account.
    `key` names the check."""
    await conn.execute(
        update(workers)
        .where(workers.c.id == worker_id)
        .values(checks_failed=workers.c.checks_failed + 1)
    )
    await _suspect(conn, config, worker_id, why)
    pending = await pending_account(conn, worker_id)
    held = await balance(conn, pending)
    if held:
        await post_entry(
            conn,
            reason="forfeit",
            key=f"forfeit:{key}",
            job_id=job_id,
            moves=[(pending, -held), (await _system_id(conn, GRANTS), held)],
            granted={pending: -await _grants_first(conn, pending, held)},
        )


async def _replace_images(
    conn: AsyncConnection,
    original: Row[Any],
    verifier_id: str,
    verified_images: list[tuple[int, str, str]],
) -> None:
    """A convicted original: the requester gets the verifier's images."""
    for index, sha256, signature in verified_images:
        await conn.execute(
            update(results)
            .where((results.c.job_id == original.id) & (results.c.idx == index))
            .values(sha256=sha256, signature=signature, worker_id=verifier_id)
        )


async def judge(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    check: Row[Any],
    original: Row[Any],
    agree: bool,
    *,
    convict: str | None = None,
) -> bool:
    """Record verification job `check`'s verdict on `original` (a job of any kind) and
    apply the quorum of two: agreement releases the original's worker and suspects whoever
    disagreed before; a second disagreement (or `convict`, a reason to convict at once)
    fails its check; a first one queues another independent check. True if convicted (the
    caller replaces the original's results with the verifier's)."""
    verdict = "agree" if agree else "disagree"
    await conn.execute(update(jobs).where(jobs.c.id == check.id).values(verdict=verdict))
    dissenters = (
        (
            await conn.execute(
                select(jobs.c.worker_id).where(
                    (jobs.c.verify_of == original.id)
                    & (jobs.c.id != check.id)
                    & (jobs.c.verdict == "disagree")
                )
            )
        )
        .scalars()
        .all()
    )
    if agree:
        await pass_check(conn, config, original.worker_id, original.id, check.id)
        for dissenter in dissenters:
            await _suspect(
                conn, config, dissenter, f"outvoted on its spot check of job {original.id}"
            )
        return False
    if convict is not None or dissenters:
        why = convict or f"two spot checks of job {original.id} disagreed"
        await fail_check(conn, config, original.worker_id, original.id, check.id, why)
        return True
    # One verifier's word is not final: a second, independent one decides.
    await _queue_check(conn, original, check.account_id)
    return False


async def record_check(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    check: Row[Any],
    verifier_id: str,
    verifier_account: int,
    outcome: Outcome,
    verified_images: list[tuple[int, str, str]],
) -> tuple[int, int]:
    """Apply what verification job `check` found (its images: index, sha256, signature);
    returns what the verifier was paid (now, held)."""
    original = (await conn.execute(select(jobs).where(jobs.c.id == check.verify_of))).one()
    if outcome == "check unreadable":
        # The verifier's own image cannot be decoded: no verdict, no pay; another checks.
        await _suspect(conn, config, verifier_id, f"its spot check {check.id} sent a broken PNG")
        await _queue_check(conn, original, check.account_id)
        return 0, 0
    convicted = await judge(
        conn,
        config,
        check,
        original,
        outcome == "agree",
        convict=(
            f"its image of job {original.id} cannot be decoded"
            if outcome == "original unreadable"
            else None
        ),
    )
    if convicted:
        await _replace_images(conn, original, verifier_id, verified_images)
    # The verifier did real work: paid like the original, minted from the grants account,
    # so as grants (a colluder's trusted worker checking its partner's jobs must not mint
    # transferable kudos).
    return await pay_worker(
        conn,
        config,
        verifier_id,
        verifier_account,
        int(original.cost),
        check.id,
        f"verify:{check.id}",
        reason="verify",
        source=await _system_id(conn, GRANTS),
    )


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
    row = (await raw.execute(conn, _WORKER, {"worker_id": worker_id})).one()
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
        worker_id,
        row.account_id,
        config.uptime_reward,
        None,
        key,
        reason="uptime",
        source=await _system_id(conn, GRANTS),
    )
    return paid + held
