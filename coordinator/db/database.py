"""The database handle every part of the store builds on: engine, transactions, clock,
system accounts.

Every public store method is one transaction (`begin`), so a job's state change and the
ledger entry it causes commit together or not at all. State changes are conditional updates
(`WHERE state = ...`), which makes them safe with several coordinators on one database.
A transaction has one timestamp (`now(conn)`), read from the store's clock when it begins;
tests pass their own clock instead of patching `time.time`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, make_url, select
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from coordinator.config import CoordinatorConfig
from coordinator.db import inline_sqlite
from coordinator.db.ledger import open_balance
from coordinator.db.schema import accounts, migrate
from coordinator.db.tx import NOW, SYSTEM, TOUCHED, now

__all__ = [
    "ANONYMOUS",
    "ESCROW",
    "GRANTS",
    "UNBOUNDED_FLOOR",
    "VERIFICATION",
    "Clock",
    "CommitHook",
    "Database",
    "now",
]

# the ledger's system accounts, in one place
GRANTS = "system:grants"
ESCROW = "system:escrow"
VERIFICATION = "system:verification"
ANONYMOUS = "anonymous"
UNBOUNDED_FLOOR = -(2**62)

Clock = Callable[[], float]
# runs inside a transaction just before it commits, with the accounts whose balance changed
CommitHook = Callable[[AsyncConnection, set[int]], Awaitable[None]]


def _configure_sqlite(engine: AsyncEngine, writer: bool) -> None:
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
        # can fail with SQLITE_BUSY instead of waiting. (The read engine only reads.)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def _engines(url: str) -> tuple[AsyncEngine, AsyncEngine]:
    """(the engine, the engine for long reads). SQLite: one inline connection for every
    transaction and a threaded aiosqlite engine for long reads (see
    coordinator.db.inline_sqlite); PostgreSQL: one asyncpg engine for both."""
    if not url.startswith("sqlite"):
        engine = create_async_engine(url, pool_pre_ping=True)
        return engine, engine
    path = make_url(url).database or ":memory:"
    engine = create_async_engine(
        url, async_creator=inline_sqlite.connect(path), pool_size=1, max_overflow=0
    )
    reads = create_async_engine(url)
    _configure_sqlite(engine, writer=True)
    _configure_sqlite(reads, writer=False)
    return engine, reads


class Database:
    """Async access to the database. Create a store with `await Store.open(config)`."""

    def __init__(
        self, engines: tuple[AsyncEngine, AsyncEngine], config: CoordinatorConfig, clock: Clock
    ) -> None:
        self._engine, self._reads = engines
        self._config = config
        self.clock = clock
        self._system: dict[str, int] = {}
        self._system_ids: frozenset[int] = frozenset()
        self._commit_hooks: list[CommitHook] = []

    @classmethod
    async def open(cls, config: CoordinatorConfig, clock: Clock = time.time) -> Any:
        engines = _engines(config.resolved_database_url)
        db = cls(engines, config, clock)
        try:
            async with db._engine.begin() as conn:
                await migrate(conn)
            await db._ensure_system_accounts()
            await db._started()
        except BaseException:
            await db.aclose()
            raise
        return db

    async def _started(self) -> None:
        """Subclasses' start-up work, after migrations and system accounts."""

    async def aclose(self) -> None:
        await self._engine.dispose()
        if self._reads is not self._engine:
            await self._reads.dispose()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction for long reads (the queue ranking): on SQLite it runs on
        a helper thread, so the event loop serves other requests meanwhile."""
        async with self._reads.begin() as conn:
            yield conn

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """One transaction; commit hooks run inside it just before it commits."""
        async with self._engine.begin() as conn:
            conn.info[NOW] = self.clock()
            conn.info[TOUCHED] = set()
            conn.info[SYSTEM] = self._system_ids
            yield conn
            touched: set[int] = conn.info[TOUCHED]
            for hook in self._commit_hooks:
                await hook(conn, touched)

    def add_commit_hook(self, hook: CommitHook) -> None:
        self._commit_hooks.append(hook)

    def now(self) -> float:
        return self.clock()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def config(self) -> CoordinatorConfig:
        return self._config

    def system_account(self, name: str) -> int:
        """Id of a system account: GRANTS, ESCROW, VERIFICATION or ANONYMOUS."""
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
                async with self.begin() as conn:
                    found = (
                        await conn.execute(select(accounts.c.id).where(accounts.c.name == name))
                    ).scalar_one_or_none()
                    if found is None:
                        found = (
                            await conn.execute(
                                accounts.insert()
                                .values(name=name, kind=kind, floor=floor, created_at=now(conn))
                                .returning(accounts.c.id)
                            )
                        ).scalar_one()
                        if kind != "system":
                            await open_balance(conn, int(found))
            except IntegrityError:
                # another coordinator created it at the same moment
                async with self.begin() as conn:
                    found = (
                        await conn.execute(select(accounts.c.id).where(accounts.c.name == name))
                    ).scalar_one()
            self._system[name] = int(found)
            if kind == "system":
                self._system_ids = self._system_ids | {int(found)}
