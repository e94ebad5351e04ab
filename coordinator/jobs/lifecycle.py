"""One lifecycle for every job kind: queue, lease, extend, finish, requeue, fail, refund,
cancel, reap.

    queued --pop--> leased --finish--> done
      ^               |  \\--fail (no retry, or out of attempts)--> failed (+ refund)
      +---requeue-----+   (worker gave it back, or its lease expired)
    queued/leased --cancel--> cancelled (+ refund)

A lease lasts `lease_seconds` from the pop or the worker's last report, and never longer
than `lease_cap` after the pop, however often the worker reports.

Image and text jobs differ only in what they store beside the row (result files, streamed
text) and how they settle; those live in coordinator.jobs.image and coordinator.jobs.text and
build on this class. Every method is one transaction; every state change is a conditional
update, so two coordinators (or a worker racing the reaper) cannot both win.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Row, Select, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.accounts import Account
from coordinator.config import CoordinatorConfig
from coordinator.db import raw, request_keys
from coordinator.db.database import ESCROW, Database, now
from coordinator.db.ledger import balance, lock_balance, lock_spender, post_entry
from coordinator.db.prepared import Shapes
from coordinator.db.request_keys import Idempotent
from coordinator.db.schema import jobs, ledger_entries, postings, workers
from coordinator.economy import checks, suspicion
from coordinator.economy.check_refiner import refiner_setup_of
from coordinator.errors import Conflict, InsufficientKudos, NotFound, WorkerPaused
from coordinator.jobs import hot, queue
from coordinator.workers import Worker

__all__ = ["VAE_PASSES", "Lifecycle", "OnLease", "Requeued", "lease_cap", "lease_end"]

# kind-specific work done in the transaction that leases a job (e.g. reset streamed text)
OnLease = Callable[[AsyncConnection, Row[Any]], Awaitable[None]]
# a worker's poll noted in a pop's transaction (Workers.poll_note)
PollNote = Callable[[AsyncConnection], Awaitable[int]]
# (job id, kind, model) of a job that went back to the queue
Requeued = tuple[str, str, str | None]

FINISHED = ("done", "failed", "cancelled")
# queued jobs looked at per pop (another pop may take some of them first)
POP_CANDIDATES = 4
# the reaper's round (every `reap_interval`), built once: leased jobs of a kind past their lease
_EXPIRED = select(jobs).where(
    queue.LEASED
    & (jobs.c.kind == bindparam("kind"))
    & (jobs.c.lease_deadline < bindparam("at", type_=jobs.c.lease_deadline.type))
)


# `jobs.gave_back` holds one "[account id]" per give-back
GIVEN_BACK_BY = re.compile(r"\[(\d+)\]")


def _owner_mark(account_id: int) -> str:
    return f"[{account_id}]"


def gave_back_twice(account_id: int) -> str:
    """The LIKE pattern (for `contains`) of a `jobs.gave_back` in which `account_id`'s
    workers gave the job back at least twice."""
    return f"{_owner_mark(account_id)}%{_owner_mark(account_id)}"


# VAE passes per image besides its sampling steps, by source processing: the result's
# decode; with a source image its encode; inpainting and outpainting also encode the masked
# image (an inpainting checkpoint's conditioning)
VAE_PASSES = {"txt2img": 1, "img2img": 2, "inpainting": 3, "outpainting": 3}


def lease_cap(config: CoordinatorConfig, row: Row[Any]) -> float:
    """The most seconds a job stays leased after its pop, however often the worker reports:
    `lease_ttl_factor` times its work at the slowest acceptable pace, or its fixed lease if
    that is longer. The work of an image job counts every phase: its sampling steps and
    its VAE passes (`VAE_PASSES`, each `lease_vae_steps` steps) for each image; of a text
    job, its new tokens."""
    slow: float
    if row.kind == "text":
        slow = row.max_tokens / config.text_min_tokens_per_second
    else:
        processing = json.loads(row.params).get("source_processing", "txt2img")
        passes = VAE_PASSES.get(processing, max(VAE_PASSES.values()))
        steps = row.steps + passes * config.lease_vae_steps
        slow = row.pixels * steps * row.n / config.lease_pixel_steps_per_second
    return config.lease_ttl_factor * max(float(row.lease_seconds), config.lease_base_seconds + slow)


def lease_end(config: CoordinatorConfig, row: Row[Any]) -> float:
    """The time past which a leased job's lease cannot be extended."""
    leased_at = row.leased_at if row.leased_at is not None else row.created_at
    return float(leased_at) + lease_cap(config, row)


class Lifecycle:
    """The lifecycle of one job kind (`kind`): what every kind shares, written once.
    coordinator.jobs.image.ImageJobs and coordinator.jobs.text.TextJobs subclass it (one
    level) with what they add; the store holds one of each (coordinator.store)."""

    kind: ClassVar[str]

    def __init__(self, db: Database, ranking: queue.Ranking) -> None:
        self._db = db
        # the queue order and ETAs, shared by every kind (it keeps one snapshot per kind)
        self.ranking = ranking
        # a pop's spot-check statement by the shape of its filter (they depend on the config)
        self._checks: Shapes[Select[Any]] = Shapes()
        # a pop's filter with "not given back twice by the worker's owner", by its shape
        self._not_given_back: Shapes[ColumnElement[bool]] = Shapes()

    # --- queue ------------------------------------------------------------------------

    async def _queue(
        self,
        account: Account,
        cost: int,
        values: dict[str, Any],
        fix: str,
        idempotent: Idempotent | None = None,
    ) -> Row[Any]:
        """Queue a job and reserve `cost` from the requester, in one transaction; returns
        its row. `values` are the kind's columns (kind, params, model, ...); `fix` ends the
        message of the 402 when the requester cannot spend `cost`. The reservation spends
        the requester's unspent grants first (coordinator.db.ledger). With `idempotent`, a
        request with the same key and body as an earlier one gets the earlier job's row:
        no second job, no second charge (coordinator.db.request_keys)."""
        for _ in range(2):
            try:
                return await self._queue_once(account, cost, values, fix, idempotent)
            except IntegrityError:
                if idempotent is None:
                    raise
                # a concurrent request with the same key won the race: read its job
        assert idempotent is not None
        raise Conflict(f"Idempotency-Key {idempotent.key!r} is in use by a concurrent request")

    async def _queue_once(
        self,
        account: Account,
        cost: int,
        values: dict[str, Any],
        fix: str,
        idempotent: Idempotent | None,
    ) -> Row[Any]:
        job_id = str(uuid.uuid4())
        async with self._db.begin() as conn:
            at = now(conn)
            await lock_spender(conn, account.id)
            if idempotent is not None:
                first = await request_keys.replayed(
                    conn, account.id, idempotent.key, idempotent.digest, "job"
                )
                if first is not None:
                    return (await conn.execute(select(jobs).where(jobs.c.id == first))).one()
            # (a row of balances holds both; a system account has none: its postings' sum)
            held = (
                await raw.execute(conn, hot.BALANCE_AND_RANKED, {"account_id": account.id})
            ).first()
            if held is None:
                amount, kudos = await balance(conn, account.id), 0
            else:
                amount, kudos = int(held.amount), int(held.ranked)
            available = amount - account.floor
            if cost > available:
                raise InsufficientKudos(
                    f"this job costs {cost} kudos but you can spend {max(available, 0)}; {fix}"
                )
            if account.anonymous and account.requester is not None:
                await self._check_reserved_per_ip(conn, account, cost)
            await raw.execute(
                conn,
                hot.INSERT_JOB,
                {
                    "id": job_id,
                    "account_id": account.id,
                    "state": "queued",
                    "cost": cost,
                    "priority_class": 0 if account.anonymous else 1,
                    "created_at": at,
                    "rank": queue.rank_of(at, kudos, account.anonymous, self._db.config.aging),
                    "attempts": 0,
                    "image": 0,
                    "step": 0,
                    "client_ip": account.requester if account.anonymous else None,
                    **values,
                },
            )
            await post_entry(
                conn,
                reason="reserve",
                key=f"reserve:{job_id}",
                job_id=job_id,
                moves=[(account.id, -cost), (self._db.system_account(ESCROW), cost)],
            )
            if idempotent is not None:
                await request_keys.remember(
                    conn, account.id, idempotent.key, idempotent.digest, job_id
                )
            row: Row[Any] = (await raw.execute(conn, hot.JOB_BY_ID, {"job_id": job_id})).one()
        self.ranking.changed(row.kind)
        return row

    async def _check_reserved_per_ip(
        self, conn: AsyncConnection, account: Account, cost: int
    ) -> None:
        """One address may hold at most `anonymous_reserved_per_ip` kudos reserved on the
        shared anonymous account, so no one requester can sink it to its floor."""
        held = (
            await conn.execute(
                select(func.coalesce(func.sum(jobs.c.cost), 0)).where(
                    (jobs.c.account_id == account.id)
                    & jobs.c.state.in_(("queued", "leased"))
                    & (jobs.c.client_ip == account.requester)
                )
            )
        ).scalar_one()
        limit = self._db.config.anonymous_reserved_per_ip
        if int(held) + cost > limit:
            raise InsufficientKudos(
                f"anonymous jobs from your address hold {held} kudos reserved in queued and "
                f"running jobs and this one costs {cost}; at most {limit} may be reserved at "
                "once without an API key: wait for those jobs to finish, or register an "
                "account (`idlegrid account register NAME`) and send its API key"
            )

    async def queue_info(self, job_id: str, job: Any = None) -> tuple[int | None, float | None]:
        """(queue position, ETA seconds) of any job, from the shared ranking. `job`: the
        job as just read, when the caller has it (a row, or an ImageJob: see queue.eta_of)."""
        row = job
        if row is None:
            async with self._db.begin() as conn:
                row = (await raw.execute(conn, hot.JOB_BY_ID, {"job_id": job_id})).first()
        if row is None:
            return None, None
        snapshot = await self.ranking.snapshot(row.kind)
        at = self._db.now()
        if row.state != "queued":
            return None, queue.eta_of(row, 0, snapshot.rate, at)
        place = snapshot.place(row.id, float(row.rank))
        return place, queue.eta_of(row, snapshot.ahead(place), snapshot.rate, at)

    async def queue_position(self, job_id: str) -> int | None:
        """0 = next to be popped; None when the job is not queued."""
        return (await self.queue_info(job_id))[0]

    async def quote_place(self, account: Account, cost: int) -> tuple[int, int, float | None]:
        """For a job of this kind not yet submitted: (queue length, position it would get,
        ETA seconds)."""
        snapshot = await self.ranking.snapshot(self.kind)
        async with self._db.begin() as conn:
            kudos = await queue.ranked_kudos(conn, account.id)
        # the reservation will lower the balance before the job is ranked
        rank = queue.rank_of(self._db.now(), kudos - cost, account.anonymous, self._db.config.aging)
        place = snapshot.place(None, rank)
        eta = None if snapshot.rate is None else (snapshot.ahead(place) + cost) / snapshot.rate
        return snapshot.length, place, eta

    # --- lease ------------------------------------------------------------------------

    async def _pop(
        self,
        worker: Worker,
        fits: ColumnElement[bool],
        *,
        take_checks: bool = False,
        on_lease: OnLease | None = None,
        shape: Hashable | None = None,
        params: Mapping[str, Any] | None = None,
        poll: PollNote | None = None,
    ) -> Row[Any] | None:
        """Lease the best queued job matching `fits` to `worker`, if any; its row.

        Raises WorkerPaused for a paused worker. With `take_checks`, a trusted worker takes
        pending spot checks it is independent for first (coordinator.economy.checks); every
        worker takes its owner's own jobs before others'; then rank order. `fits` may hold
        bind parameters, their values in `params`; give the same `shape` for every `fits`
        built the same way and the statements are built once (coordinator.db.prepared).

        `poll` (the first attempt of a request): note the worker's poll (uptime, address,
        offer: payments.record_poll) in this transaction, after the lease (a worker's row after
        its job's, as a result takes them), instead of a transaction of its own; a paused
        worker's poll is noted too, before WorkerPaused is raised."""
        async with self._db.begin() as conn:
            me = (await raw.execute(conn, hot.WORKER_BY_ID, {"worker_id": worker.id})).one()
            # paused by name, or through its owner (suspicion.account_paused)
            why = (
                me.pause_reason
                if me.paused
                else await suspicion.account_paused(conn, me.account_id)
            )
            if why is None:
                return await self._lease(
                    conn, worker, fits, take_checks, on_lease, shape, params, me, poll
                )
            if poll is not None:
                await poll(conn)
        raise WorkerPaused(
            f"worker {me.name} is paused: {why}; ask the coordinator's operator to review it"
        )

    async def _lease(
        self,
        conn: AsyncConnection,
        worker: Worker,
        fits: ColumnElement[bool],
        take_checks: bool,
        on_lease: OnLease | None,
        shape: Hashable | None,
        params: Mapping[str, Any] | None,
        me: Row[Any],
        poll: PollNote | None,
    ) -> Row[Any] | None:
        """Pop's transaction for a worker that is not paused."""
        skip_locked = self._db.dialect == "postgresql"
        values = dict(params or {})
        # not a job its owner's workers gave back twice: that goes to another owner (a
        # bound parameter: the statement is built once per `shape`, for every worker)
        fitting = fits

        def build() -> ColumnElement[bool]:
            return fitting & ~jobs.c.gave_back.contains(bindparam("me_gave_back"))

        fits = build() if shape is None else self._not_given_back.get(shape, build)
        values["me_gave_back"] = gave_back_twice(me.account_id)
        found: list[str] = []
        if take_checks and me.trusted:
            # only checks it is independent for: not its owner's, nor (by default) its IP's
            checks = self._checks_query(fits, shape)
            me_values = {
                "me_id": me.id,
                "me_account": me.account_id,
                "me_ip": me.ip,
                "me_refiner": refiner_setup_of(me.engine),
            }
            found += (
                await raw.execute(
                    conn, checks, {**values, **me_values}, built_once=shape is not None
                )
            ).scalars()
        best = await queue.candidates(
            conn,
            fits,
            worker.account_id,
            1 if skip_locked else POP_CANDIDATES,
            skip_locked,
            shape=shape,
            params=values,
        )
        found += [row.id for row in best]
        for job_id in found:
            at = now(conn)
            row: Row[Any] | None = (
                await raw.execute(
                    conn, hot.LEASE, {"job_id": job_id, "worker": worker.id, "at": at}
                )
            ).first()
            if row is None:
                continue
            if poll is None:
                await raw.execute(conn, hot.WORKER_SEEN, {"worker_id": worker.id, "at": at})
            if on_lease is not None:
                await on_lease(conn, row)
            if poll is not None:
                # sets last_seen too (to the same transaction time)
                await poll(conn)
            self.ranking.changed(row.kind)
            return row
        if poll is not None:
            await poll(conn)
        return None

    def _checks_query(self, fits: ColumnElement[bool], shape: Hashable | None) -> Select[Any]:
        """The spot checks a trusted worker may take (checks.checks_for), for the worker
        whose id, account, IP and refiner setup are the parameters me_id, me_account, me_ip
        and me_refiner."""

        def build() -> Select[Any]:
            return checks.checks_for(self._db.config, hot.ME, queue.CHECKS & fits, POP_CANDIDATES)

        return build() if shape is None else self._checks.get(shape, build)

    @staticmethod
    def _leased_to(worker: Worker, job_id: str) -> ColumnElement[bool]:
        return (jobs.c.id == job_id) & (jobs.c.state == "leased") & (jobs.c.worker_id == worker.id)

    @staticmethod
    async def _not_leased(conn: AsyncConnection, job_id: str) -> Exception:
        """The error for a worker acting on a job it does not hold (any more)."""
        row = (await conn.execute(select(jobs.c.state).where(jobs.c.id == job_id))).first()
        if row is None:
            return NotFound(f"no job {job_id}")
        return Conflict(
            f"job {job_id} is not leased to this worker (it is {row.state}); "
            "its lease may have expired and been given to another worker"
        )

    async def _extend(
        self, conn: AsyncConnection, worker: Worker, job_id: str, **values: Any
    ) -> Row[Any]:
        """In the caller's transaction: extend `worker`'s lease on the job by its lease
        length but never past its cap (`lease_cap`), and set `values`; NotFound/Conflict
        when it does not hold the lease, Conflict once the cap has passed."""
        row = (await conn.execute(select(jobs).where(self._leased_to(worker, job_id)))).first()
        if row is None:
            raise await self._not_leased(conn, job_id)
        at = now(conn)
        end = lease_end(self._db.config, row)
        if at >= end:
            raise Conflict(
                f"job {job_id} ran past its time limit of {lease_cap(self._db.config, row):.0f} s "
                "after the pop; it goes back to the queue"
            )
        done = await conn.execute(
            update(jobs)
            .where(self._leased_to(worker, job_id))
            .values(lease_deadline=min(at + row.lease_seconds, end), **values)
        )
        if done.rowcount != 1:
            raise await self._not_leased(conn, job_id)
        return (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()

    async def _finish(self, conn: AsyncConnection, worker: Worker, job_id: str) -> Row[Any]:
        """In the caller's transaction: mark `worker`'s leased job done; its row."""
        at = now(conn)
        row: Row[Any] | None = (
            await raw.execute(conn, hot.FINISH, {"job_id": job_id, "worker": worker.id, "at": at})
        ).first()
        if row is None:
            raise await self._not_leased(conn, job_id)
        await raw.execute(conn, hot.WORKER_DONE, {"worker_id": worker.id, "at": at})
        return row

    # --- give back, fail, cancel, reap -----------------------------------------------

    async def _refund_held(self, conn: AsyncConnection, job_id: str, account_id: int) -> int:
        """Return to the requester whatever of the job's reservation is still in escrow
        (a text job may have settled part of it); the kudos refunded."""
        held = (
            await conn.execute(
                select(func.coalesce(func.sum(postings.c.amount), 0))
                .select_from(postings.join(ledger_entries))
                .where(
                    (ledger_entries.c.job_id == job_id)
                    & (postings.c.account_id == self._db.system_account(ESCROW))
                )
            )
        ).scalar_one()
        refund = int(held)
        if refund > 0:
            await post_entry(
                conn,
                reason="refund",
                key=f"refund:{job_id}",
                job_id=job_id,
                moves=[(self._db.system_account(ESCROW), -refund), (account_id, refund)],
            )
        return refund

    async def _requeue_or_fail(
        self, conn: AsyncConnection, row: Row[Any], reason: str, *, retry: bool = True
    ) -> bool:
        """Give a leased job back to the queue or, without `retry` or after `max_attempts`,
        fail it and refund the requester. True when it went back to the queue."""
        attempts = row.attempts + 1
        guard = (
            (jobs.c.id == row.id) & (jobs.c.state == "leased") & (jobs.c.worker_id == row.worker_id)
        )
        owner = (
            await conn.execute(select(workers.c.account_id).where(workers.c.id == row.worker_id))
        ).scalar_one()
        gave_back = row.gave_back + _owner_mark(owner)
        # One owner's workers cannot fail a job for its requester (they pop it and give it
        # back at no cost): until two owners gave it back, it stays in the queue.
        one_owner = len(set(GIVEN_BACK_BY.findall(gave_back))) < 2
        if retry and (attempts < self._db.config.max_attempts or one_owner):
            await conn.execute(
                update(jobs)
                .where(guard)
                .values(
                    state="queued",
                    attempts=attempts,
                    gave_back=gave_back,
                    worker_id=None,
                    lease_deadline=None,
                    image=0,
                    step=0,
                    error=reason,
                )
            )
            self.ranking.changed(row.kind)
            return True
        changed = await conn.execute(
            update(jobs)
            .where(guard)
            .values(
                state="failed",
                attempts=attempts,
                gave_back=gave_back,
                error=f"failed after {attempts} attempts; last: {reason}" if retry else reason,
                finished_at=now(conn),
                lease_deadline=None,
            )
        )
        if changed.rowcount == 1:
            await self._refund_held(conn, row.id, row.account_id)
        return False

    async def _fail(
        self, worker: Worker, job_id: str, reason: str, *, retry: bool = True, counts: bool = True
    ) -> Row[Any]:
        """The worker gives the job back (retry) or reports it cannot be done; its row.
        When it `counts` (not a drain, nor a failure the worker cannot help), it adds to the
        worker's run of give-backs (suspicion.gave_back)."""
        async with self._db.begin() as conn:
            row = (await conn.execute(select(jobs).where(self._leased_to(worker, job_id)))).first()
            if row is None:
                raise await self._not_leased(conn, job_id)
            await suspicion.gave_back(conn, self._db.config, worker.id, counts=counts)
            await self._requeue_or_fail(conn, row, f"worker reported: {reason}", retry=retry)
            return (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()

    async def cancel(self, job_id: str) -> int:
        """Cancel a queued or running job and refund its reserved kudos, in one
        transaction; returns the kudos refunded. A worker holding the lease gets 409 later."""
        async with self._db.begin() as conn:
            mine = (jobs.c.id == job_id) & (jobs.c.kind == self.kind)
            row = (await conn.execute(select(jobs).where(mine))).first()
            if row is None:
                raise NotFound(f"no {self.kind} job {job_id}")
            # balance row before job row, the order every writer keeps (a submit's rank
            # refresh updates the requester's queued jobs while holding their balance)
            await lock_balance(conn, row.account_id)
            changed = await conn.execute(
                update(jobs)
                .where((jobs.c.id == job_id) & jobs.c.state.in_(("queued", "leased")))
                .values(
                    state="cancelled",
                    finished_at=now(conn),
                    lease_deadline=None,
                    error="cancelled by the requester",
                )
            )
            if changed.rowcount != 1:
                raise Conflict(f"job {job_id} is already {row.state}; nothing to cancel")
            refund = await self._refund_held(conn, job_id, row.account_id)
        self.ranking.changed(row.kind)
        return refund

    async def reap_expired(self) -> list[Requeued]:
        """Requeue (or fail) every leased job of this kind whose lease ran out: (id, kind,
        model) of each."""
        async with self._db.begin() as conn:
            values = {"kind": self.kind, "at": now(conn)}
            expired = (await conn.execute(_EXPIRED, values)).all()
            for row in expired:
                reason = (
                    f"lease expired: the job ran past its time limit of "
                    f"{lease_cap(self._db.config, row):.0f} s"
                    if row.lease_deadline >= lease_end(self._db.config, row) - 1e-6
                    else "lease expired: the worker went silent"
                )
                await self._requeue_or_fail(conn, row, reason)
        return [(row.id, row.kind, row.model) for row in expired]
