"""The database handle every part of the store builds on: engine, transactions, clock,
system accounts.

Every public store method is one transaction (`begin`), so a job's state change and the
ledger entry it causes commit together or not at all. State changes are conditional updates
(`WHERE state = ...`), which makes them safe with several coordinators on one database.
A transaction has one timestamp (`now(conn)`), read from the store's clock when it begins;
tests pass their own clock instead of patching `time.time`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import Select, event, make_url, select
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from coordinator.config import CoordinatorConfig
from coordinator.db import inline_sqlite
from coordinator.db.ledger import open_balance
from coordinator.db.raw import RAW, begun
from coordinator.db.schema import accounts, migrate
from coordinator.db.sqlite_reads import Reads
from coordinator.db.sqlite_tx import NOMINAL, Held
from coordinator.db.tx import NOW, SYSTEM, SYSTEM_BY_NAME, TOUCHED, now

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

T = TypeVar("T")

Clock = Callable[[], float]
# runs inside a transaction just before it commits, with the accounts whose balance changed
CommitHook = Callable[[AsyncConnection, set[int]], Awaitable[None]]


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
        # can fail with SQLITE_BUSY instead of waiting. (Straight to sqlite3: a statement
        # through SQLAlchemy costs more than the BEGIN.) Not for the held connection's
        # nominal transaction: the store's transactions begin themselves (sqlite_tx).
        if conn.info.pop(NOMINAL, False):
            return
        inline_sqlite.begin_immediate(conn.connection.driver_connection)


def _engine(url: str) -> tuple[AsyncEngine, str | None]:
    """The engine, and for SQLite the database file. SQLite: one sqlite3 connection, run on
    the event loop, for every transaction (see coordinator.db.inline_sqlite); PostgreSQL: a
    pool of asyncpg ones."""
    if not url.startswith("sqlite"):
        return create_async_engine(url, pool_pre_ping=True), None
    path = make_url(url).database or ":memory:"
    engine = create_async_engine(inline_sqlite.engine_url(url), pool_size=1, max_overflow=0)
    _configure_sqlite(engine)
    return engine, path


def _sqlite_rows(path: str, sql: str, build: Callable[[list[Any]], T]) -> T:
    """On a helper thread: run a read-only query on its own connection and build the result."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return build(conn.execute(sql).fetchall())
    finally:
        conn.close()


class Database:
    """The shared database handle every part of the store receives (coordinator.store):
    engine, transactions, clock, configuration and the system accounts' ids."""

    def __init__(
        self, engine: tuple[AsyncEngine, str | None], config: CoordinatorConfig, clock: Clock
    ) -> None:
        self._engine, self._sqlite_path = engine
        self._config = config
        self.clock = clock
        self._system: dict[str, int] = {}
        self._system_ids: frozenset[int] = frozenset()
        self._commit_hooks: list[CommitHook] = []
        self._reads: Reads | None = None
        # SQLite: the one connection, held between the store's transactions
        self._held = None if self._sqlite_path is None else Held(self._engine)

    @classmethod
    async def open(cls, config: CoordinatorConfig, clock: Clock = time.time) -> Database:
        db = cls(_engine(config.resolved_database_url), config, clock)
        try:
            async with db._engine.begin() as conn:
                await migrate(conn)
            if db._sqlite_path not in (None, "", ":memory:"):
                db._reads = Reads(str(db._sqlite_path), db._engine.dialect)
            await db._ensure_system_accounts()
        except BaseException:
            await db.aclose()
            raise
        return db

    async def aclose(self) -> None:
        if self._reads is not None:
            self._reads.close()
        if self._held is not None:
            await self._held.close()
        await self._engine.dispose()

    async def read_first(self, query: Select[Any], params: Mapping[str, Any]) -> Any:
        """The first row of a one-statement read (`query` built once, its bind parameters'
        values in `params`), or None. On SQLite it comes from a read-only connection
        without a transaction of the store's one connection (coordinator.db.sqlite_reads):
        what was committed before, as a transaction would see it."""
        if self._reads is not None:
            return self._reads.first(query, params)
        async with self.begin() as conn:
            return (await conn.execute(query, params)).first()

    async def read_all(self, query: Select[Any], params: Mapping[str, Any]) -> list[Any]:
        """Every row of a short one-statement read, as `read_first` reads it."""
        if self._reads is not None:
            return self._reads.all(query, params)
        async with self.begin() as conn:
            return list((await conn.execute(query, params)).all())

    @property
    def inline_reads(self) -> bool:
        """Whether `read_all` reads without a transaction (SQLite)."""
        return self._reads is not None

    async def read_rows(self, query: Select[Any], build: Callable[[list[Any]], T]) -> T:
        """`build(rows)` of a long read-only query (the queue ranking). On SQLite both run on
        a helper thread with a connection of their own, so the event loop (and the one inline
        connection) keep serving meanwhile; on PostgreSQL the rows come from the pool."""
        if self._sqlite_path is None:
            async with self._engine.connect() as conn:
                rows = list((await conn.execute(query)).all())
            return build(rows)
        sql = str(
            query.compile(dialect=self._engine.dialect, compile_kwargs={"literal_binds": True})
        )
        return await asyncio.to_thread(_sqlite_rows, self._sqlite_path, sql, build)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """One transaction; commit hooks run inside it just before it commits."""
        if self._held is not None:
            # SQLite: BEGIN IMMEDIATE and COMMIT on the held connection (sqlite_tx)
            async with self._held.transaction() as (conn, driver):
                # the transaction's sqlite3 connection, for coordinator.db.raw
                self._start(conn, driver)
                yield conn
                await self._before_commit(conn)
            return
        async with self._engine.begin() as conn:
            self._start(conn, None)
            yield conn
            await self._before_commit(conn)

    def _start(self, conn: AsyncConnection, driver: sqlite3.Connection | None) -> None:
        info = conn.info
        info[NOW] = self.clock()
        info[TOUCHED] = set()
        info[SYSTEM] = self._system_ids
        info[SYSTEM_BY_NAME] = self._system
        info[RAW] = driver
        begun(conn, driver)

    async def _before_commit(self, conn: AsyncConnection) -> None:
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
