"""Store transactions on SQLite without SQLAlchemy's per-transaction machinery.

Through `AsyncEngine.begin()` a transaction costs a pool checkout and checkin (with its
reset), SQLAlchemy's begin and commit, each in a greenlet: measured here, more than the
BEGIN IMMEDIATE and COMMIT themselves, on the three transactions of every job. On SQLite the
store has one connection anyway (coordinator.db.inline_sqlite), so `Held` keeps it checked
out while transactions come, one at a time (an asyncio lock, as the pool of one did), and
issues BEGIN IMMEDIATE and COMMIT (or ROLLBACK) on its sqlite3 connection itself.
SQLAlchemy's own transaction on it is nominal: begun once when the connection is taken (the
engine's "begin" event issues nothing for it: `NOMINAL`), so a statement run through
SQLAlchemy inside a store transaction runs in the sqlite3 transaction, as before.

The connection goes back to the pool once no store transaction has come for `idle` seconds
(and at close), so anything else using the engine waits at most that long. sqlite3's errors
come out as SQLAlchemy's (coordinator.db.raw), as they did through the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from coordinator.db import inline_sqlite
from coordinator.db.raw import sqlalchemy_error

__all__ = ["NOMINAL", "Held"]

# set in a connection's info just before SQLAlchemy begins its nominal transaction: the
# engine's "begin" event pops it and issues no BEGIN
NOMINAL = "idlegrid.nominal_begin"
# seconds without a store transaction after which the connection goes back to the pool
IDLE_SECONDS = 0.05


def driver_of(conn: AsyncConnection) -> sqlite3.Connection:
    """The sqlite3 connection of a checked-out connection (no await needed)."""
    sync: Any = conn.sync_connection
    driver: sqlite3.Connection = sync.connection.driver_connection
    return driver


def _run(sql: str, driver: sqlite3.Connection) -> None:
    try:
        if sql == "COMMIT":
            driver.commit()
        else:
            inline_sqlite.begin_immediate(driver)
    except sqlite3.Error as error:
        raise sqlalchemy_error(error, sql) from error


class Held:
    """The store's SQLite connection, held between transactions (see the module)."""

    def __init__(self, engine: AsyncEngine, idle: float = IDLE_SECONDS) -> None:
        self._engine = engine
        self._idle = idle
        self._lock = asyncio.Lock()
        self._conn: AsyncConnection | None = None
        self._users = 0
        self._release: asyncio.TimerHandle | None = None
        self._releasing: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[tuple[AsyncConnection, sqlite3.Connection]]:
        """One BEGIN IMMEDIATE ... COMMIT on the held connection (ROLLBACK when the block
        raises): the connection and its sqlite3 connection."""
        self._users += 1
        try:
            async with self._lock:
                conn = self._conn if self._conn is not None else await self._take()
                driver = driver_of(conn)
                _run("BEGIN IMMEDIATE", driver)
                try:
                    yield conn, driver
                    _run("COMMIT", driver)
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        driver.rollback()
                    if conn.invalidated or not conn.in_transaction():
                        # SQLAlchemy gave up on the connection (a lost one): take a new one
                        self._conn = None
                        with contextlib.suppress(Exception):
                            await conn.close()
                    raise
        finally:
            self._users -= 1
            if self._users == 0 and self._conn is not None and self._release is None:
                loop = asyncio.get_running_loop()
                self._release = loop.call_later(self._idle, self._release_soon)

    async def _take(self) -> AsyncConnection:
        conn = await self._engine.connect()
        try:
            conn.info[NOMINAL] = True
            await conn.begin()
        except BaseException:
            conn.info.pop(NOMINAL, None)
            await conn.close()
            raise
        self._conn = conn
        return conn

    def _release_soon(self) -> None:
        self._release = None
        if self._users == 0 and self._conn is not None and self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._give_back())

    async def _give_back(self) -> None:
        try:
            async with self._lock:
                if self._users == 0:
                    await self.close()
        finally:
            self._releasing = None

    async def close(self) -> None:
        """Give the connection back to the pool (ending SQLAlchemy's nominal transaction:
        sqlite3 has none open between store transactions)."""
        if self._release is not None:
            self._release.cancel()
            self._release = None
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.rollback()
            finally:
                await conn.close()
