"""Spot checks: who may check whom, scheduling checks, verdicts (a quorum of two).

How it works (see README "The kudos economy" and "Threat model"):
- A new worker is untrusted, unless its public key is in `trusted_workers` or it was
  registered with the API key of an account in `trusted_accounts` (the operator's way to
  seed trust: somebody has to be believed first).
- A completed image job of an untrusted worker is re-run by a trusted worker (a
  *verification job*, same seed and parameters) with probability `spot_check_rate`,
  halved for every check it passed (BOINC-style adaptive replication), never below
  `spot_check_min_rate`.
- Checks are independent (`checks_for`, `related`): never by a worker of the checked
  worker's owner, nor (`verify_distinct_ip`) at its client IP, nor by anyone who already
  checked that job (or their owner or IP).
- A check of a job an SDXL refiner may finish goes only to a checker of the checked
  worker's refiner setup (coordinator.economy.check_refiner). When independent trusted
  workers are around but none of that setup (`unrefereed`), an untrusted worker's job is
  settled as an AI Horde worker's: held `horde_hold_seconds` for dispute, then paid
  (coordinator.economy.payments.hold_for_dispute).
- Each finished check records its `verdict`. Agreement releases what is held
  (coordinator.economy.payments) and, after `trust_after_checks` passes without
  suspicion, makes the worker trusted. One verifier's disagreement is not final (quorum:
  two of three): the job goes to a second independent verifier while the pay stays held.
  If it disagrees too, the worker forfeits everything held (back to the grants account),
  takes a suspicion (coordinator.economy.suspicion), loses trust, and the requester's
  images are replaced with the verifier's; if it agrees, the worker is released and the
  first verifier takes the suspicion. An image the coordinator cannot decode (within the
  job's size) counts against whoever made it: the original's concludes the check against
  its worker; the verifier's voids the check (suspicion for the verifier, a new check).
- A result faster than `max_pixel_steps_per_second` adds a suspicion and forces a check,
  for every job size. The time is counted from the lease, or from the worker's previous
  result if that came later: leasing many jobs at once buys no time.
- Text jobs use the same verdicts (`pass_check`, `fail_check`, `judge`): gateways are
  re-run by gateways, block servers checked by gateways (coordinator.economy.text_checks).
"""

from __future__ import annotations

import json
import random
import uuid
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    bindparam,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.config import CoordinatorConfig
from coordinator.db import raw
from coordinator.db.database import GRANTS, now
from coordinator.db.ledger import balance, post_entry
from coordinator.db.prepared import Shapes
from coordinator.db.schema import jobs, ledger_entries, postings, results, workers
from coordinator.economy.check_refiner import check_refiner, refiner_setup_of, sdxl_engine
from coordinator.economy.payments import (
    DONE,
    Pay,
    grants_first,
    pay_worker,
    pending_account,
    system_id,
)
from coordinator.economy.suspicion import suspect
from coordinator.economy.verification import Outcome
from protocol.adapted import pinned
from protocol.loras import ResolvedAdapter
from protocol.params import ImageParams, stored_params
from protocol.samplers import sampler_factor
from protocol.signing import params_hash

__all__ = [
    "after_result",
    "checks_for",
    "fail_check",
    "independent",
    "judge",
    "pass_check",
    "queue_check_if_refereed",
    "record_check",
    "related",
    "speed_check",
    "spot_check_rate",
    "unrefereed",
]

# spot checks are scheduled only if a trusted worker polled within this many seconds
REFEREE_SEEN_SECONDS = 600.0

# built once (coordinator.db.prepared): every image result's speed check runs it
_LAST_RESULT = select(func.max(jobs.c.finished_at)).where(
    (jobs.c.kind == "image")
    & DONE  # (literal, so that SQLite uses the partial index ix_jobs_finished)
    & (jobs.c.finished_at >= bindparam("since", type_=jobs.c.finished_at.type))
    & (jobs.c.worker_id == bindparam("worker", type_=jobs.c.worker_id.type))
    & (jobs.c.id != bindparam("job_id", type_=jobs.c.id.type))
)


# the checked worker as `_referees` sees it, its values bound at execution (as
# coordinator.jobs.hot.ME): checked_id, checked_account, checked_ip
_CHECKED = SimpleNamespace(
    id=bindparam("checked_id", type_=workers.c.id.type),
    account_id=bindparam("checked_account", type_=workers.c.account_id.type),
    ip=bindparam("checked_ip", type_=workers.c.ip.type),
)
# (verify_distinct_ip) -> the statement of `_referees`, built once
_REFEREES: Shapes[Select[Any]] = Shapes()


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
    that already checked (or holds a check of) the same job, and its refiner setup
    (`me.refiner`: coordinator.economy.check_refiner.refiner_setup_of) is the one the check
    requires, if any. `me` is bind parameters in place of a row of `workers`
    (coordinator.jobs.hot.ME)."""
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
        .where(
            pending
            & (jobs.c.check_refiner.is_(None) | (jobs.c.check_refiner == me.refiner))
            & ~related(config, checked.c, me)
            & ~conflict
        )
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


def _pinned(original: Row[Any]) -> tuple[str, str]:
    """The params (JSON) and params hash of a re-run of `original`: its own, or with LoRAs
    and TIs, pinned to the versions and files its result used (protocol.adapted.pinned), so
    a later change on CivitAI cannot convict an honest worker."""
    if original.kind != "image" or not original.adapters:
        return original.params, original.params_hash
    used = [ResolvedAdapter.model_validate(a) for a in json.loads(original.adapters)]
    params = pinned(ImageParams.model_validate_json(original.params), used)
    params = ImageParams.model_validate_json(params.model_dump_json())
    return params.model_dump_json(), params_hash(params)


async def _queue_check(
    conn: AsyncConnection, original: Row[Any], account_id: int, refiner: str | None
) -> None:
    """Queue a verification job re-running `original`, an image or a text job (same seed
    and parameters; only trusted workers pop it: coordinator.jobs.lifecycle), for a checker
    of the refiner setup `refiner` (None: any)."""
    params, digest = _pinned(original)
    await conn.execute(
        jobs.insert().values(
            id=str(uuid.uuid4()),
            kind=original.kind,
            account_id=account_id,
            state="queued",
            params=params,
            params_hash=digest,
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
            max_tokens=original.max_tokens,
            verify_of=original.id,
            check_refiner=refiner,
        )
    )


async def _busy_since(conn: AsyncConnection, worker_id: str, job: Row[Any]) -> float:
    """When the worker could have started on `job`: its lease, or the worker's last other
    image result after that (a worker runs one job at a time)."""
    leased_at = float(job.leased_at if job.leased_at is not None else job.finished_at)
    values = {"since": leased_at, "worker": worker_id, "job_id": job.id}
    previous = (await raw.execute(conn, _LAST_RESULT, values)).scalar_one()
    return leased_at if previous is None else max(leased_at, float(previous))


async def speed_check(
    conn: AsyncConnection, config: CoordinatorConfig, worker_id: str, job: Row[Any], now: float
) -> bool:
    """Whether `worker_id` finished the image job `job` faster than any GPU (then it
    takes a suspicion)."""
    work = _work(stored_params(job.params))
    # Lease to result is an upper bound of the compute time (it adds the round trips and
    # the upload), so an honest worker never looks faster than its GPU, at any job size.
    elapsed = max(now - await _busy_since(conn, worker_id, job), 1e-3)
    too_fast = work / elapsed > config.max_pixel_steps_per_second
    if too_fast:
        await suspect(
            conn,
            config,
            worker_id,
            f"job {job.id}: {work / elapsed:.3g} pixel-steps/s is beyond any GPU",
        )
    return too_fast


async def after_result(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker: Row[Any],
    job: Row[Any],
    now: float,
    verification_account: int,
) -> None:
    """Speed check and maybe schedule a spot check of a finished ordinary image job
    (`worker`: its worker's row)."""
    too_fast = await speed_check(conn, config, worker.id, job, now)
    if not too_fast and random.random() >= spot_check_rate(config, worker):
        return
    refiner = check_refiner(worker.engine, stored_params(job.params))
    await queue_check_if_refereed(
        conn, config, worker, job, now, verification_account, refiner=refiner
    )


async def _referees(
    conn: AsyncConnection, config: CoordinatorConfig, worker: Any, now: float
) -> list[str | None]:
    """The engine reports (one of each) of the trusted workers seen lately that are
    independent of `worker` (a row of `workers`): who could run a check of its work."""

    def build() -> Select[Any]:
        return (
            select(workers.c.engine)
            .where(
                (workers.c.trusted == 1)
                & (workers.c.paused == 0)
                & (workers.c.last_seen >= bindparam("since", type_=workers.c.last_seen.type))
                & ~related(config, workers.c, _CHECKED)
            )
            .distinct()
        )

    values = {
        "checked_id": worker.id,
        "checked_account": worker.account_id,
        "checked_ip": worker.ip,
        "since": now - REFEREE_SEEN_SECONDS,
    }
    statement = _REFEREES.get(config.verify_distinct_ip, build)
    return (await raw.execute(conn, statement, values)).scalars()


async def unrefereed(
    conn: AsyncConnection, config: CoordinatorConfig, worker: Row[Any], job: Row[Any], now: float
) -> bool:
    """Whether the untrusted `worker`'s finished image job `job` is one no referee can check
    for its refiner setup: independent trusted workers are around, but none has the setup a
    check of it requires (coordinator.economy.check_refiner). Such a job is settled as an
    unsigned one (held for dispute, then paid), not held until a check that cannot come."""
    if worker.trusted or not sdxl_engine(worker.engine):
        return False  # (without parsing the params: this runs on every result)
    refiner = check_refiner(worker.engine, stored_params(job.params))
    if refiner is None:
        return False
    engines = await _referees(conn, config, worker, now)
    return bool(engines) and all(refiner_setup_of(engine) != refiner for engine in engines)


async def queue_check_if_refereed(
    conn: AsyncConnection,
    config: CoordinatorConfig,
    worker: Row[Any],
    job: Row[Any],
    now: float,
    verification_account: int,
    *,
    refiner: str | None = None,
) -> None:
    """Queue a check of `job` by `worker`, only when an independent trusted worker is around
    to run it (of the refiner setup `refiner`, if not None); else the held kudos wait."""
    engines = await _referees(conn, config, worker, now)
    if refiner is not None:
        engines = [engine for engine in engines if refiner_setup_of(engine) == refiner]
    if engines:
        await _queue_check(conn, job, verification_account, refiner)


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
        moved = await grants_first(conn, pending, releasable)
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
    await suspect(conn, config, worker_id, why)
    pending = await pending_account(conn, worker_id)
    held = await balance(conn, pending)
    if held:
        await post_entry(
            conn,
            reason="forfeit",
            key=f"forfeit:{key}",
            job_id=job_id,
            moves=[(pending, -held), (await system_id(conn, GRANTS), held)],
            granted={pending: -await grants_first(conn, pending, held)},
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
            await suspect(
                conn, config, dissenter, f"outvoted on its spot check of job {original.id}"
            )
        return False
    if convict is not None or dissenters:
        why = convict or f"two spot checks of job {original.id} disagreed"
        await fail_check(conn, config, original.worker_id, original.id, check.id, why)
        return True
    # One verifier's word is not final: a second, independent one decides (of the same
    # refiner setup).
    await _queue_check(conn, original, check.account_id, check.check_refiner)
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
        await suspect(conn, config, verifier_id, f"its spot check {check.id} sent a broken PNG")
        await _queue_check(conn, original, check.account_id, check.check_refiner)
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
        Pay(
            verifier_id,
            verifier_account,
            int(original.cost),
            check.id,
            f"verify:{check.id}",
            reason="verify",
            source=await system_id(conn, GRANTS),
        ),
    )
