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

from coordinator.config import CoordinatorConfig
from coordinator.errors import Conflict, InsufficientKudos, NotFound
from coordinator.ledger import balance, post_entry
from coordinator.schema import accounts, jobs, ledger_entries, migrate, postings, results, workers
from protocol.params import ImageParams
from protocol.signing import params_hash

__all__ = ["Account", "Job", "ResultRecord", "Store", "Worker", "hash_secret"]

GRANTS = "system:grants"
ESCROW = "system:escrow"
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

    async def _ensure_system_accounts(self) -> None:
        wanted = {
            GRANTS: ("system", UNBOUNDED_FLOOR),
            ESCROW: ("system", 0),
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
            values = {
                "name": name,
                "token_hash": hash_secret(token),
                "account_id": account_id,
                "last_seen": now,
            }
            if row is None:
                worker_id = uuid.uuid4().hex
                await conn.execute(
                    workers.insert().values(
                        id=worker_id, public_key=public_key, created_at=now, **values
                    )
                )
            else:
                worker_id = row.id
                await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))
        return Worker(worker_id, name, public_key, account_id), token

    async def worker_by_token(self, token: str) -> Worker | None:
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    select(workers).where(workers.c.token_hash == hash_secret(token))
                )
            ).first()
        if row is None:
            return None
        return Worker(row.id, row.name, row.public_key, row.account_id)

    # --- jobs -------------------------------------------------------------------------

    async def create_image_job(self, account: Account, params: ImageParams, cost: int) -> Job:
        """Queue a job and reserve its cost from the requester, in one transaction."""
        job_id = str(uuid.uuid4())
        now = time.time()
        lease = self._config.lease_seconds(params.pixels, params.steps, params.n)
        async with self._engine.begin() as conn:
            # Serialise spending per account (PostgreSQL; SQLite already serialises writes).
            await conn.execute(
                select(accounts.c.id).where(accounts.c.id == account.id).with_for_update()
            )
            available = await balance(conn, account.id) - account.floor
            if cost > available:
                raise InsufficientKudos(
                    f"this job costs {cost} kudos but you can spend {max(available, 0)}; "
                    "make it smaller (size, steps, n) or earn kudos by running a worker"
                )
            await conn.execute(
                jobs.insert().values(
                    id=job_id,
                    kind="image",
                    account_id=account.id,
                    state="queued",
                    params=params.model_dump_json(),
                    params_hash=params_hash(params),
                    model=params.model,
                    pixels=params.pixels,
                    steps=params.steps,
                    n=params.n,
                    cost=cost,
                    priority_class=0 if account.anonymous else 1,
                    created_at=now,
                    lease_seconds=lease,
                    attempts=0,
                    image=0,
                    step=0,
                    steps_total=params.steps,
                )
            )
            await post_entry(
                conn,
                reason="reserve",
                key=f"reserve:{job_id}",
                job_id=job_id,
                moves=[(account.id, -cost), (self._system[ESCROW], cost)],
            )
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).one()
        return _job(row)

    async def get_job(self, job_id: str) -> Job | None:
        async with self._engine.begin() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
        return _job(row) if row else None

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

    async def queue_position(self, job_id: str) -> int | None:
        """0 = next to be popped; None when the job is not queued."""
        query = select(jobs.c.id).where(jobs.c.state == "queued").order_by(*self._queue_order())
        async with self._engine.begin() as conn:
            ids = (await conn.execute(query)).scalars().all()
        try:
            return ids.index(job_id)
        except ValueError:
            return None

    async def pop_job(
        self, worker: Worker, models: Sequence[str], max_pixels: int, max_steps: int
    ) -> Job | None:
        """Lease the highest-priority queued job that fits the worker, if any."""
        fits = (
            (jobs.c.state == "queued")
            & (jobs.c.kind == "image")
            & (jobs.c.pixels <= max_pixels)
            & (jobs.c.steps <= max_steps)
            & (jobs.c.model.is_(None) | jobs.c.model.in_(list(models)))
        )
        query = select(jobs.c.id, jobs.c.lease_seconds).where(fits).order_by(*self._queue_order())
        async with self._engine.begin() as conn:
            for job_id, lease_seconds in (await conn.execute(query.limit(8))).all():
                now = time.time()
                taken = await conn.execute(
                    update(jobs)
                    .where((jobs.c.id == job_id) & (jobs.c.state == "queued"))
                    .values(
                        state="leased",
                        worker_id=worker.id,
                        lease_deadline=now + lease_seconds,
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
        """Mark done, store result rows and pay the worker, in one transaction."""
        async with self._engine.begin() as conn:
            done = await conn.execute(
                update(jobs)
                .where(self._leased_to(worker, job.id))
                .values(state="done", finished_at=time.time(), lease_deadline=None)
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
            await post_entry(
                conn,
                reason="settle",
                key=f"settle:{job.id}",
                job_id=job.id,
                moves=[(self._system[ESCROW], -job.cost), (worker.account_id, job.cost)],
            )
        return job.cost

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
            if changed.rowcount == 1:
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
