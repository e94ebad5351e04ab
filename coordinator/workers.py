"""Workers: registration by public key (signed challenges), tokens, engine info, polling
(uptime), public records."""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.accounts import Account, hash_secret
from coordinator.db import nonces
from coordinator.db.database import Database, now
from coordinator.db.ledger import open_balance
from coordinator.db.schema import accounts, ratings, workers
from coordinator.economy import payments, suspicion
from coordinator.errors import Forbidden, NotFound
from protocol.messages import EngineInfo, WorkerInfo

__all__ = ["Controls", "Worker", "Workers"]

# built once (coordinator.db.prepared): every request of a worker runs it
_BY_TOKEN = select(workers).where(workers.c.token_hash == bindparam("token_hash"))
_BY_PUBLIC_KEY = select(workers).where(workers.c.public_key == bindparam("public_key"))
_BY_ID = select(workers).where(workers.c.id == bindparam("worker_id"))


# (control types, annotators) an image worker advertises
Controls = tuple[tuple[str, ...], tuple[str, ...]]


@dataclass(frozen=True)
class Worker:
    id: str
    name: str
    public_key: str
    account_id: int
    trusted: bool = False
    paused: bool = False
    pause_reason: str | None = None
    # what its engine report said (None: no report, or an older worker that does not say)
    sandboxed: bool | None = None
    # idlegrid (signed results) or horde (an AI Horde worker through /api/v2: unsigned)
    protocol: str = "idlegrid"
    # what it serves (image | text | blocks) and the models it offered, from its polls
    kind: str | None = None
    models: tuple[str, ...] = ()
    # the ControlNet types it serves, and those it makes control maps for (its last poll)
    controls: Controls = ((), ())

    @property
    def signs(self) -> bool:
        """Whether its results carry its signature (and may be spot-checked)."""
        return self.protocol == "idlegrid"


def _worker(row: Row[Any]) -> Worker:
    sandboxed = json.loads(row.engine).get("sandboxed") if row.engine else None
    return Worker(
        id=row.id,
        name=row.name,
        public_key=row.public_key,
        account_id=row.account_id,
        trusted=bool(row.trusted),
        paused=bool(row.paused),
        pause_reason=row.pause_reason,
        sandboxed=sandboxed if isinstance(sandboxed, bool) else None,
        protocol=row.protocol,
        kind=row.kind,
        models=tuple(json.loads(row.models)) if row.models else (),
        controls=_controls(row.controls),
    )


def _controls(text: str | None) -> Controls:
    if not text:
        return (), ()
    types, annotators = json.loads(text)
    return tuple(types), tuple(annotators)


def _horde_key(owner: Account, name: str) -> str:
    """The `public_key` column of an AI Horde worker: unique per owner and name."""
    return "horde-" + hashlib.sha256(f"{owner.id}/{name}".encode()).hexdigest()[:58]


def _offer(
    worker: Worker, kind: str, models: Sequence[str], controls: Controls = ((), ())
) -> dict[str, Any]:
    """The columns to write when `worker` offers `models` (and ControlNet `controls`) for
    `kind` (none if unchanged)."""
    if worker.kind == kind and worker.models == tuple(models) and worker.controls == controls:
        return {}
    return {
        "kind": kind,
        "models": json.dumps(list(models)),
        "controls": json.dumps([list(controls[0]), list(controls[1])]) if controls[0] else None,
    }


class Workers:
    """Registering, finding and noting workers. Part of coordinator.store.Store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def challenge(self, purpose: str) -> tuple[str, float]:
        """A single-use nonce for a worker to sign (coordinator.db.nonces) and its expiry."""
        async with self._db.begin() as conn:
            return await nonces.issue(conn, purpose)

    async def register_worker(
        self,
        name: str,
        public_key: str,
        owner: Account | None,
        ip: str | None = None,
        *,
        nonce: str | None = None,
    ) -> tuple[Worker, str]:
        """Register (or re-register) the worker holding `public_key`, using up the
        registration `nonce` it signed (the HTTP route always has one; None is for callers
        inside the coordinator that registered nothing signed); returns a new token."""
        token = secrets.token_urlsafe(32)
        async with self._db.begin() as conn:
            if nonce is not None:
                await nonces.consume(conn, nonce, "register")
            at = now(conn)
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
                            created_at=at,
                        )
                        .returning(accounts.c.id)
                    )
                ).scalar_one()
                await open_balance(conn, account_id)
            values: dict[str, Any] = {
                "name": name,
                "token_hash": hash_secret(token),
                "account_id": account_id,
                "last_seen": at,
                "ip": ip,
            }
            # Seeded trust (see coordinator.economy.checks); re-registering never removes it.
            if public_key in self._db.config.trusted_workers or (
                owner is not None and owner.name in self._db.config.trusted_accounts
            ):
                values["trusted"] = 1
            if row is None or row.account_id != account_id:
                await self._check_worker_cap(conn, account_id)
            if row is None:
                worker_id = uuid.uuid4().hex
                await conn.execute(
                    workers.insert().values(
                        id=worker_id,
                        public_key=public_key,
                        created_at=at,
                        **values,
                        **await suspicion.inherited_pause(conn, account_id),
                    )
                )
                await payments.pending_account(conn, worker_id)
            else:
                worker_id = row.id
                await conn.execute(update(workers).where(workers.c.id == worker_id).values(values))
            saved = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
        return _worker(saved), token

    async def worker_by_token(self, token: str) -> Worker | None:
        row = await self._db.read_first(_BY_TOKEN, {"token_hash": hash_secret(token)})
        return None if row is None else _worker(row)

    async def record_poll(
        self,
        worker: Worker,
        ip: str | None = None,
        *,
        kind: str = "image",
        models: Sequence[str] = (),
    ) -> int:
        """A worker asked for work (from `ip`) for `models` of `kind`: keep its uptime
        stretch, address and offer, pay uptime kudos when due."""
        async with self._db.begin() as conn:
            return await self.poll_note(worker, ip, kind=kind, models=models)(conn)

    def poll_note(
        self,
        worker: Worker,
        ip: str | None = None,
        *,
        kind: str = "image",
        models: Sequence[str] = (),
        controls: Controls = ((), ()),
    ) -> Callable[[AsyncConnection], Awaitable[int]]:
        """`record_poll` to run in a transaction of the caller's: a pop's (Lifecycle._pop),
        so that a poll that leases a job costs one transaction, not two (`controls`: an
        image worker's ControlNet types and annotators)."""
        offer = _offer(worker, kind, models, controls)

        async def note(conn: AsyncConnection) -> int:
            return await payments.record_poll(
                conn, self._db.config, worker.id, now(conn), ip, offer
            )

        return note

    async def serves_control(self, control_type: str, annotator: bool, within: float) -> bool:
        """Whether an image worker that polled in the last `within` seconds serves ControlNet
        `control_type` (with `annotator`: and makes its control maps)."""
        async with self._db.begin() as conn:
            since = now(conn) - within
            query = select(workers.c.controls).where(
                (workers.c.kind == "image")
                & workers.c.controls.is_not(None)
                & (workers.c.last_seen >= since)
                & (workers.c.paused == 0)
            )
            offers = [_controls(text) for text in (await conn.execute(query)).scalars()]
        return any(
            control_type in types and (not annotator or control_type in annotators)
            for types, annotators in offers
        )

    async def note_offer(self, worker: Worker, kind: str, models: Sequence[str]) -> None:
        """A gateway or block server is there, serving `models` of `kind` (the network view)."""
        async with self._db.begin() as conn:
            values = {"last_seen": now(conn), **_offer(worker, kind, models)}
            await conn.execute(update(workers).where(workers.c.id == worker.id).values(values))

    async def horde_worker(self, owner: Account, name: str) -> Worker | None:
        """The AI Horde worker `name` of `owner`, if it popped before (else `new_horde_worker`)."""
        row = await self._db.read_first(_BY_PUBLIC_KEY, {"public_key": _horde_key(owner, name)})
        return None if row is None else _worker(row)

    async def new_horde_worker(self, owner: Account, name: str, ip: str | None) -> Worker:
        """Create the AI Horde worker `name` of `owner` (on its first pop; the caller took
        the `worker` rate limit). It has no key: its results are unsigned, so it is never
        trusted and never spot-checked, and what it earns is held
        (coordinator.economy.payments.hold_for_dispute). Forbidden past
        `max_workers_per_account`; paused from the start when its account is paused."""
        key = _horde_key(owner, name)
        async with self._db.begin() as conn:
            at = now(conn)
            row = (await conn.execute(select(workers).where(workers.c.public_key == key))).first()
            if row is None:
                await self._check_worker_cap(conn, owner.id)
                worker_id = uuid.uuid4().hex
                await conn.execute(
                    workers.insert().values(
                        id=worker_id,
                        name=name,
                        public_key=key,
                        # nobody holds a token: it authenticates with its owner's API key
                        token_hash=hash_secret(secrets.token_urlsafe(32)),
                        account_id=owner.id,
                        created_at=at,
                        last_seen=at,
                        ip=ip,
                        protocol="horde",
                        kind="image",
                        **await suspicion.inherited_pause(conn, owner.id),
                    )
                )
                await payments.pending_account(conn, worker_id)
                row = (await conn.execute(select(workers).where(workers.c.id == worker_id))).one()
        return _worker(row)

    async def _check_worker_cap(self, conn: AsyncConnection, account_id: int) -> None:
        """Forbidden when `account_id` has `max_workers_per_account` workers already: names
        cost nothing, so a cap keeps one account from spreading over unlimited identities."""
        cap = self._db.config.max_workers_per_account
        count = (
            await conn.execute(
                select(func.count()).select_from(workers).where(workers.c.account_id == account_id)
            )
        ).scalar_one()
        if int(count) >= cap:
            raise Forbidden(
                f"this account has {count} workers, the most one account may have here "
                f"(--max-workers-per-account {cap}); reuse a worker name (or key) you "
                "registered before, or ask the coordinator's operator to raise the limit",
                [("name", f"at most {cap} workers per account")],
            )

    async def set_engine(self, worker: Worker, engine_json: str) -> None:
        async with self._db.begin() as conn:
            await conn.execute(
                update(workers).where(workers.c.id == worker.id).values(engine=engine_json)
            )

    async def worker_by_id(self, worker_id: str) -> Worker | None:
        row = await self.worker_row(worker_id)
        return None if row is None else _worker(row)

    async def account_workers(self, account_id: int) -> list[Row[Any]]:
        """The workers whose earnings go to `account_id`, oldest first."""
        query = (
            select(workers).where(workers.c.account_id == account_id).order_by(workers.c.created_at)
        )
        async with self._db.begin() as conn:
            return list((await conn.execute(query)).all())

    async def worker_row(self, worker_id: str) -> Row[Any] | None:
        row: Row[Any] | None = await self._db.read_first(_BY_ID, {"worker_id": worker_id})
        return row

    async def worker_info(self, worker_id: str) -> WorkerInfo:
        """A worker's public record: trust, checks, jobs done, ratings, engine."""
        async with self._db.begin() as conn:
            row = (await conn.execute(select(workers).where(workers.c.id == worker_id))).first()
            if row is None:
                raise NotFound(f"no worker {worker_id}")
            mean, count = (
                await conn.execute(
                    select(func.avg(ratings.c.score), func.count()).where(
                        ratings.c.worker_id == worker_id
                    )
                )
            ).one()
        return WorkerInfo(
            id=row.id,
            name=row.name,
            trusted=bool(row.trusted),
            paused=bool(row.paused),
            pause_reason=row.pause_reason,
            suspicion=row.suspicion,
            checks_passed=row.checks_passed,
            checks_failed=row.checks_failed,
            jobs_done=row.jobs_done,
            rating=float(mean) if count else None,
            ratings=int(count),
            engine=EngineInfo.model_validate_json(row.engine) if row.engine else None,
            last_seen=row.last_seen,
        )
