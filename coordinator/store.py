"""The coordinator's persistent state: accounts, workers, jobs, results and the ledger.

Every public method is one database transaction, so a job's state change and the ledger
entry it causes commit together or not at all. State changes are conditional updates
(`WHERE state = ...`), which makes them safe with several coordinators on one database.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, event, func, select, update
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from coordinator import queue, trust
from coordinator.config import CoordinatorConfig
from coordinator.errors import Conflict, InsufficientKudos, NotFound, WorkerPaused
from coordinator.ledger import balance, post_entry
from coordinator.schema import accounts, jobs, ledger_entries, migrate, postings, results, workers
from protocol.params import ImageParams
from protocol.signing import params_hash

__all__ = ["Account", "Job", "ResultRecord", "Store", "Worker", "hash_secret"]

GRANTS = trust.GRANTS
ESCROW = trust.ESCROW
VERIFICATION = trust.VERIFICATION
ANONYMOUS = "anonymous"
UNBOUNDED_FLOOR = -(2**62)


def hash_secret(secret: str) -> str:
    # API keys and tokens are 256-bit random strings, so a plain hash is enough.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    kind: str
    floor: int

    @property
    def anonymous(self) -> bool:
        return self.kind == "anonymous"


@dataclass(frozen=True)
class Worker:
    id: str
    name: str
    public_key: str
    account_id: int
    trusted: bool = False
    paused: bool = False
    pause_reason: str | None = None


@dataclass(frozen=True)
class Job:
    id: str
    account_id: int
    state: str
    params: ImageParams
    params_hash: str
    cost: int
    created_at: float
    worker_id: str | None
    lease_seconds: float
    lease_deadline: float | None
    attempts: int
    image: int
    step: int
    steps_total: int
    error: str | None
    leased_at: float | None = None
    # set on verification jobs: the job this one re-runs
    verify_of: str | None = None
    shared: bool = False

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


@dataclass(frozen=True)
class ResultRecord:
    index: int
    seed: int
    sha256: str
    signature: str


def _account(row: Row[Any]) -> Account:
    return Account(id=row.id, name=row.name, kind=row.kind, floor=row.floor)


def _job(row: Row[Any]) -> Job:
    return Job(
        id=row.id,
        account_id=row.account_id,
        state=row.state,
        params=ImageParams.model_validate_json(row.params),
        params_hash=row.params_hash,
        cost=row.cost,
        created_at=row.created_at,
        worker_id=row.worker_id,
        lease_seconds=row.lease_seconds,
        lease_deadline=row.lease_deadline,
        attempts=row.attempts,
        image=row.image,
        step=row.step,
        steps_total=row.steps_total,
        error=row.error,
        leased_at=row.leased_at,
        verify_of=row.verify_of,
        shared=bool(row.shared),
    )


def _worker(row: Row[Any]) -> Worker:
    return Worker(
        id=row.id,
        name=row.name,
        public_key=row.public_key,
        account_id=row.account_id,
        trusted=bool(row.trusted),
        paused=bool(row.paused),
        pause_reason=row.pause_reason,
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # Let us issue BEGIN ourselves (below) instead of the driver's implicit one.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=NORMAL",
            "PRAGMA busy_timeout=10000",
            "PRAGMA foreign_keys=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Take the write lock up front: a deferred transaction that reads and then writes
        # can fail with SQLITE_BUSY instead of waiting.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class Store:
    """Async access to the database. Create with `await Store.open(config)`."""

    def __init__(self, engine: AsyncEngine, config: CoordinatorConfig) -> None:
        self._engine = engine
        self._config = config
        self._system: dict[str, int] = {}

    @classmethod
    async def open(cls, config: CoordinatorConfig) -> Store:
        url = config.resolved_database_url
        engine = create_async_engine(url, pool_pre_ping=url.startswith("postgresql"))
        if engine.dialect.name == "sqlite":
            _configure_sqlite(engine)
        store = cls(engine, config)
        try:
            async with engine.begin() as conn:
                await migrate(conn)
            await store._ensure_system_accounts()
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def aclose(self) -> None:
        await self._engine.dispose()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def engine(self) -> AsyncEngine:
        """For the store's companion modules (e.g. coordinator.text_store)."""
        return self._engine

    @property
    def config(self) -> CoordinatorConfig:
        return self._config

    def system_account(self, name: str) -> int:
        """Id of a system account: GRANTS, ESCROW or ANONYMOUS."""
        return self._system[name]

    async def _ensure_system_accounts(self) -> None:
        wanted = {
            GRANTS: ("system", UNBOUNDED_FLOOR),
            ESCROW: ("system", 0),
            VERIFICATION: ("system", 0),
            ANONYMOUS: ("anonymous", self._config.anonymous_floor),
        }
        for name, (kind, floor) in wanted.items():
            try:
                async with self._engine.begin() as conn:
                    found = (
                        await conn.execute(select(accounts.c.id).where(accounts.c.name == name))
                    ).scalar_one_or_none()
                    if found is None:
                        found = (
                            await conn.execute(
                                accounts.insert()
                                .values(name=name, kind=kind, floor=floor, created_at=time.time())
                                .returning(accounts.c.id)
                            )
                        ).scalar_one()
            except IntegrityError:
                # another coordinator created it at the same moment
                async with self._engine.begin() as conn:
                    found = (
                        await conn.execute(select(accounts.c.id).where(accounts.c.name == name))
                    ).scalar_one()
            self._system[name] = int(found)

    # --- accounts ---------------------------------------------------------------------

    async def create_account(self, name: str) -> tuple[Account, str]:
        """A new user account with the configured grant; returns it and its API key."""
        api_key = secrets.token_urlsafe(32)
        grant = self._config.new_account_grant
        try:
            async with self._engine.begin() as conn:
                account_id = (
                    await conn.execute(
                        accounts.insert()
                        .values(
                            name=name,
                            kind="user",
                            api_key_hash=hash_secret(api_key),
                            floor=self._config.account_floor,
                            created_at=time.time(),
                        )
                        .returning(accounts.c.id)
                    )
                ).scalar_one()
                if grant:
                    await post_entry(
                        conn,
                        reason="grant",
                        key=f"grant:new-account:{account_id}",
                        moves=[(self._system[GRANTS], -grant), (account_id, grant)],
                    )
        except IntegrityError:
            raise Conflict(
                f"account name {name!r} is taken; choose another name", [("name", "is taken")]
            ) from None
        return Account(account_id, name, "user", self._config.account_floor), api_key

    async def account_by_key(self, api_key: str) -> Account | None:
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    select(accounts).where(accounts.c.api_key_hash == hash_secret(api_key))
                )
            ).first()
        return _account(row) if row else None

    async def anonymous_account(self) -> Account:
        return Account(
            self._system[ANONYMOUS], ANONYMOUS, "anonymous", self._config.anonymous_floor
        )

    async def balance(self, account_id: int) -> int:
        async with self._engine.begin() as conn:
            return await balance(conn, account_id)

    async def balances(self) -> dict[str, int]:
        """Every account's balance by name (for audits and tests)."""
        query = (
            select(accounts.c.name, func.coalesce(func.sum(postings.c.amount), 0))
            .select_from(accounts.outerjoin(postings, postings.c.account_id == accounts.c.id))
            .group_by(accounts.c.name)
        )
        async with self._engine.begin() as conn:
            return {name: int(total) for name, total in (await conn.execute(query)).all()}

    # --- workers ----------------------------------------------------------------------

    async def register_worker(
        self, name: str, public_key: str, owner: Account | None
    ) -> tuple[Worker, str]:
        """Register (or re-register) the worker holding `public_key`; returns a new token."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(select(workers).where(workers.c.public_key == public_key))
            ).first()
            if owner is not None:
                account_id = owner.id
            elif row is not None:
                account_id = row.account_id
            else:
                account_id = (
                    await conn.execute(
                        accounts.insert()
                        .values(
                            name=f"worker:{public_key[:16]}",
                            kind="worker",
                            floor=0,
                            created_at=now,
                        )
                        .returning(accounts.c.id)
                    )
                ).scalar_one()
            values: dict[str, Any] = {
                "name": name,
                "token_hash": hash_secret(token),
                "account_id": account_id,
                "last_seen": now,
            }
            # Seeded trust (see coordinator.trust); re-registering never removes trust.
            if public_key in self._config.trusted_workers or (
                owner is not None and owner.name in self._config.trusted_accounts
            ):
                values["trusted"] = 1
            if row is None:
                worker_id = uuid.uuid4().hex
                await conn.execute(
                    workers.insert().values(
                        id=worker_id, public_key=public_key, created_at=now, **values
                    )
                )
                await trust.pending_account(conn, worker_id)
            else:
                worker_id = row.id
                await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))
            saved = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
        return _worker(saved), token

    async def worker_by_token(self, token: str) -> Worker | None:
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    select(workers).where(workers.c.token_hash == hash_secret(token))
                )
            ).first()
        if row is None:
            return None
        return _worker(row)

    # --- jobs -------------------------------------------------------------------------

    async def queue_job(self, account: Account, cost: int, values: dict[str, Any], fix: str) -> str:
        """Queue a job and reserve `cost` from the requester, in one transaction; returns
        its id. `values` are the kind's columns (kind, params, model, ...); `fix` ends the
        message of the 402 when the requester cannot spend `cost`."""
        job_id = str(uuid.uuid4())
        async with self._engine.begin() as conn:
            # Serialise spending per account (PostgreSQL; SQLite already serialises writes).
            await conn.execute(
                select(accounts.c.id)
                .where(accounts.c.id == account.id)
                .with_for_update(key_share=True)
            )
            available = await balance(conn, account.id) - account.floor
            if cost > available:
                raise InsufficientKudos(
                    f"this job costs {cost} kudos but you can spend {max(available, 0)}; {fix}"
                )
            await conn.execute(
                jobs.insert().values(
                    id=job_id,
                    account_id=account.id,
                    state="queued",
                    cost=cost,
                    priority_class=0 if account.anonymous else 1,
                    created_at=time.time(),
                    attempts=0,
                    image=0,
                    step=0,
                    **values,
                )
            )
            await post_entry(
                conn,
                reason="reserve",
                key=f"reserve:{job_id}",
                job_id=job_id,
                moves=[(account.id, -cost), (self._system[ESCROW], cost)],
            )
        return job_id

    async def create_image_job(self, account: Account, params: ImageParams, cost: int) -> Job:
        """Queue an image job and reserve its cost from the requester."""
        job_id = await self.queue_job(
            account,
            cost,
            {
                "kind": "image",
                "params": params.model_dump_json(),
                "params_hash": params_hash(params),
                "model": params.model,
                "pixels": params.pixels,
                "steps": params.steps,
                "n": params.n,
                "lease_seconds": self._config.lease_seconds(params.pixels, params.steps, params.n),
                "steps_total": params.steps,
            },
            "make it smaller (size, steps, n) or earn kudos by running a worker",
        )
        job = await self.get_job(job_id)
        assert job is not None
        return job

    async def get_job(self, job_id: str) -> Job | None:
        """The image job with this id (None for no job, or a job of another kind)."""
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    select(jobs).where((jobs.c.id == job_id) & (jobs.c.kind == "image"))
                )
            ).first()
        return _job(row) if row else None

    async def queue_info(self, job_id: str) -> tuple[int | None, float | None]:
        """(queue position, ETA seconds) of any job; see coordinator.queue for the method."""
        async with self._engine.begin() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
            if row is None:
                return None, None
            return await queue.queue_info(conn, self._config, row)

    @staticmethod
    def _queue_order() -> list[Any]:
        requester_balance = (
            select(func.coalesce(func.sum(postings.c.amount), 0))
            .where(postings.c.account_id == jobs.c.account_id)
            .scalar_subquery()
        )
        return [
            jobs.c.priority_class.desc(),
            requester_balance.desc(),
            jobs.c.created_at.asc(),
            jobs.c.id.asc(),
        ]

    def queue_order(self) -> list[Any]:
        """Approximate ORDER BY clauses of the queue (no aging). Prefer
        `coordinator.queue.ranked`, which applies the real order of protocol.priority."""
        return self._queue_order()

    async def queue_position(self, job_id: str) -> int | None:
        """0 = next to be popped; None when the job is not queued."""
        return (await self.queue_info(job_id))[0]

    async def pop_job(
        self, worker: Worker, models: Sequence[str], max_pixels: int, max_steps: int
    ) -> Job | None:
        """Lease the best queued job that fits the worker, if any (WorkerPaused if paused).

        Trusted workers take pending spot checks of other workers first; every worker
        takes its owner's own jobs before others'; then the order of protocol.priority.
        """
        fits = (
            (jobs.c.kind == "image")
            & (jobs.c.pixels <= max_pixels)
            & (jobs.c.steps <= max_steps)
            & (jobs.c.model.is_(None) | jobs.c.model.in_(list(models)))
        )
        async with self._engine.begin() as conn:
            me = (await conn.execute(select(workers).where(workers.c.id == worker.id))).one()
            if me.paused:
                raise WorkerPaused(
                    f"worker {me.name} is paused: {me.pause_reason}; "
                    "ask the coordinator's operator to review it"
                )
            candidates: list[str] = []
            if me.trusted:
                original = jobs.alias("original")
                checks = (
                    select(jobs.c.id)
                    .join(original, original.c.id == jobs.c.verify_of)
                    .where((jobs.c.state == "queued") & fits & (original.c.worker_id != worker.id))
                    .order_by(jobs.c.created_at)
                    .limit(4)
                )
                candidates += list((await conn.execute(checks)).scalars().all())
            best = await queue.ranked(
                conn, self._config, fits & jobs.c.verify_of.is_(None), owner=worker.account_id
            )
            candidates += [row.id for row in best[:8]]
            for job_id in candidates:
                now = time.time()
                taken = await conn.execute(
                    update(jobs)
                    .where((jobs.c.id == job_id) & (jobs.c.state == "queued"))
                    .values(
                        state="leased",
                        worker_id=worker.id,
                        lease_deadline=now + jobs.c.lease_seconds,
                        leased_at=now,
                        image=0,
                        step=0,
                    )
                )
                if taken.rowcount == 1:
                    await conn.execute(
                        update(workers).where(workers.c.id == worker.id).values(last_seen=now)
                    )
                    row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
                    return _job(row)
        return None

    async def record_poll(self, worker: Worker) -> int:
        """A worker asked for work: keep its uptime stretch, pay uptime kudos when due."""
        async with self._engine.begin() as conn:
            return await trust.record_poll(conn, self._config, worker.id, time.time())

    def _leased_to(self, worker: Worker, job_id: str) -> Any:
        return (jobs.c.id == job_id) & (jobs.c.state == "leased") & (jobs.c.worker_id == worker.id)

    async def _not_leased(self, conn: AsyncConnection, worker: Worker, job_id: str) -> Exception:
        row = (await conn.execute(select(jobs.c.state).where(jobs.c.id == job_id))).first()
        if row is None:
            return NotFound(f"no job {job_id}")
        return Conflict(
            f"job {job_id} is not leased to this worker (it is {row.state}); "
            "its lease may have expired and been given to another worker"
        )

    async def report_progress(
        self, worker: Worker, job_id: str, image: int, step: int, steps: int
    ) -> Job:
        """Record progress and extend the lease by the job's lease length."""
        async with self._engine.begin() as conn:
            now = time.time()
            done = await conn.execute(
                update(jobs)
                .where(self._leased_to(worker, job_id))
                .values(
                    image=image,
                    step=step,
                    steps_total=steps,
                    lease_deadline=now + jobs.c.lease_seconds,
                )
            )
            if done.rowcount != 1:
                raise await self._not_leased(conn, worker, job_id)
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
        return _job(row)

    async def complete_job(self, worker: Worker, job: Job, images: list[ResultRecord]) -> int:
        """Mark done, store result rows and pay the worker, in one transaction; returns
        the kudos earned (paid now plus held pending)."""
        paid, held = await self.finish_job(worker, job, images)
        return paid + held

    async def finish_job(
        self,
        worker: Worker,
        job: Job,
        images: list[ResultRecord],
        check_agrees: bool | None = None,
    ) -> tuple[int, int]:
        """Complete a leased job in one transaction: state, results, payment (part held
        while the worker is untrusted), speed check and maybe a spot check. For a
        verification job pass `check_agrees`: whether its images match the original's.
        Returns (kudos paid now, kudos held pending)."""
        now = time.time()
        async with self._engine.begin() as conn:
            done = await conn.execute(
                update(jobs)
                .where(self._leased_to(worker, job.id))
                .values(state="done", finished_at=now, lease_deadline=None)
            )
            if done.rowcount != 1:
                raise await self._not_leased(conn, worker, job.id)
            await conn.execute(
                results.insert(),
                [
                    {
                        "job_id": job.id,
                        "idx": image.index,
                        "seed": image.seed,
                        "sha256": image.sha256,
                        "signature": image.signature,
                        "worker_id": worker.id,
                    }
                    for image in images
                ],
            )
            await conn.execute(
                update(workers)
                .where(workers.c.id == worker.id)
                .values(jobs_done=workers.c.jobs_done + 1, last_seen=now)
            )
            row = (await conn.execute(select(jobs).where(jobs.c.id == job.id))).one()
            if row.verify_of is not None:
                if check_agrees is None:
                    raise ValueError(f"job {job.id} is a spot check: pass check_agrees")
                return await trust.record_check(
                    conn,
                    self._config,
                    row,
                    worker.id,
                    worker.account_id,
                    check_agrees,
                    [(image.index, image.sha256, image.signature) for image in images],
                )
            paid, held = await trust.pay_worker(
                conn,
                self._config,
                worker.id,
                worker.account_id,
                job.cost,
                job.id,
                f"settle:{job.id}",
            )
            await trust.after_result(
                conn, self._config, worker.id, row, now, self._system[VERIFICATION]
            )
        return paid, held

    async def original_results(self, job: Job) -> list[ResultRecord]:
        """For a verification job: the results of the job it re-runs."""
        if job.verify_of is None:
            return []
        return await self.results(job.verify_of)

    async def cancel_job(self, job_id: str) -> int:
        """Cancel a queued or running job and refund its reserved kudos, in one
        transaction; returns the kudos refunded. A worker holding the lease gets 409 later."""
        async with self._engine.begin() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
            if row is None:
                raise NotFound(f"no job {job_id}")
            changed = await conn.execute(
                update(jobs)
                .where((jobs.c.id == job_id) & jobs.c.state.in_(("queued", "leased")))
                .values(
                    state="cancelled",
                    finished_at=time.time(),
                    lease_deadline=None,
                    error="cancelled by the requester",
                )
            )
            if changed.rowcount != 1:
                raise Conflict(f"job {job_id} is already {row.state}; nothing to cancel")
            # What is still in escrow for the job (a text job may have settled a part).
            held = (
                await conn.execute(
                    select(func.coalesce(func.sum(postings.c.amount), 0))
                    .select_from(postings.join(ledger_entries))
                    .where(
                        (ledger_entries.c.job_id == job_id)
                        & (postings.c.account_id == self._system[ESCROW])
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
                    moves=[(self._system[ESCROW], -refund), (row.account_id, refund)],
                )
        return refund

    async def set_shared(self, job_id: str, shared: bool) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(jobs).where(jobs.c.id == job_id).values(shared=1 if shared else 0)
            )

    async def set_engine(self, worker: Worker, engine_json: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(workers).where(workers.c.id == worker.id).values(engine=engine_json)
            )

    async def worker_row(self, worker_id: str) -> Row[Any] | None:
        async with self._engine.begin() as conn:
            return (await conn.execute(select(workers).where(workers.c.id == worker_id))).first()

    async def _requeue_or_fail(self, conn: AsyncConnection, row: Row[Any], reason: str) -> None:
        """Give a leased job back to the queue, or fail and refund it after max attempts."""
        attempts = row.attempts + 1
        guard = (
            (jobs.c.id == row.id) & (jobs.c.state == "leased") & (jobs.c.worker_id == row.worker_id)
        )
        if attempts >= self._config.max_attempts:
            changed = await conn.execute(
                update(jobs)
                .where(guard)
                .values(
                    state="failed",
                    attempts=attempts,
                    error=f"failed after {attempts} attempts; last: {reason}",
                    finished_at=time.time(),
                    lease_deadline=None,
                )
            )
            if changed.rowcount == 1 and row.cost > 0:
                await post_entry(
                    conn,
                    reason="refund",
                    key=f"refund:{row.id}",
                    job_id=row.id,
                    moves=[(self._system[ESCROW], -row.cost), (row.account_id, row.cost)],
                )
        else:
            await conn.execute(
                update(jobs)
                .where(guard)
                .values(
                    state="queued",
                    attempts=attempts,
                    worker_id=None,
                    lease_deadline=None,
                    image=0,
                    step=0,
                    error=reason,
                )
            )

    async def fail_job(self, worker: Worker, job_id: str, reason: str) -> Job:
        async with self._engine.begin() as conn:
            row = (await conn.execute(select(jobs).where(self._leased_to(worker, job_id)))).first()
            if row is None:
                raise await self._not_leased(conn, worker, job_id)
            await self._requeue_or_fail(conn, row, f"worker reported: {reason}")
            updated = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
        return _job(updated)

    async def reap_expired(self) -> list[str]:
        """Requeue (or fail) every leased job whose lease ran out; returns their ids."""
        async with self._engine.begin() as conn:
            expired = (
                await conn.execute(
                    select(jobs).where(
                        (jobs.c.state == "leased") & (jobs.c.lease_deadline < time.time())
                    )
                )
            ).all()
            for row in expired:
                await self._requeue_or_fail(conn, row, "lease expired: the worker went silent")
        return [row.id for row in expired]

    async def results(self, job_id: str) -> list[ResultRecord]:
        query = select(results).where(results.c.job_id == job_id).order_by(results.c.idx)
        async with self._engine.begin() as conn:
            rows = (await conn.execute(query)).all()
        return [ResultRecord(r.idx, r.seed, r.sha256, r.signature) for r in rows]

    async def ledger_audit(self) -> dict[str, int]:
        """Totals used by tests and operators: every entry must sum to zero."""
        per_entry = (
            select(postings.c.entry_id, func.sum(postings.c.amount).label("total"))
            .group_by(postings.c.entry_id)
            .subquery()
        )
        async with self._engine.begin() as conn:
            unbalanced = (
                await conn.execute(
                    select(func.count()).select_from(per_entry).where(per_entry.c.total != 0)
                )
            ).scalar_one()
            entries = (
                await conn.execute(select(func.count()).select_from(ledger_entries))
            ).scalar_one()
            supply = (
                await conn.execute(select(func.coalesce(func.sum(postings.c.amount), 0)))
            ).scalar_one()
        return {"entries": int(entries), "unbalanced_entries": int(unbalanced), "sum": int(supply)}
