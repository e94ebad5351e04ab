"""SQLite on the event loop's own thread, behind SQLAlchemy's aiosqlite dialect.

aiosqlite runs every call (cursor, execute, fetch, close, commit) on a helper thread and
hops back to the event loop for each: measured here, about 0.5 ms per statement, ten times
what SQLite itself takes for the queue's small indexed statements. So the coordinator's
SQLite engine hands SQLAlchemy (through `create_async_engine(async_creator=...)`) this
connection instead: the same interface, but each call runs sqlite3 at once and returns an
already finished awaitable. Statements are microseconds (WAL, synchronous=NORMAL: a commit
does not wait for the disk), so running them inline costs less than one thread hop.

Two rules keep the loop from ever blocking on a lock: the engine has one connection (a
second transaction waits for the pool, which yields, instead of waiting on SQLite's busy
lock), and long reads (the shared queue ranking) run on a helper thread with a sqlite3
connection of their own (`Database.read_rows`). Another process on the same file (a second
coordinator) can still make a write wait up to busy_timeout; SQLite is the embedded
single-process default.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Generator, Iterable
from typing import Any, cast

__all__ = ["InlineConnection", "begin_immediate", "connect"]


class _Done:
    """An awaitable that is already finished (what each call returns)."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __await__(self) -> Generator[Any, None, Any]:
        yield from ()
        return self._value


def _run(call: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run `call` now; the result (or exception) comes out of the awaitable."""
    try:
        value = call(*args, **kw)
    except BaseException as error:  # re-raised where the caller awaits it
        return _Failed(error)
    return _Done(value)


class _Failed:
    __slots__ = ("_error",)

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def __await__(self) -> Generator[Any, None, Any]:
        yield from ()
        raise self._error


class _Cursor:
    """aiosqlite's Cursor interface over a sqlite3 cursor, run inline."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    def __aenter__(self) -> Any:
        return _Done(self)

    def __aexit__(self, *exc: object) -> Any:
        return _run(self._cursor.close)

    def execute(self, sql: str, parameters: Iterable[Any] = ()) -> Any:
        return _run(self._cursor.execute, sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Iterable[Any]]) -> Any:
        return _run(self._cursor.executemany, sql, parameters)

    def fetchall(self) -> Any:
        return _run(self._cursor.fetchall)

    def fetchone(self) -> Any:
        return _run(self._cursor.fetchone)

    def fetchmany(self, size: int | None = None) -> Any:
        return _run(self._cursor.fetchmany, size or self._cursor.arraysize)

    def close(self) -> Any:
        return _run(self._cursor.close)

    def setinputsizes(self, *sizes: Any) -> Any:
        return _Done(None)

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _Queue:
    """Stands in for aiosqlite's work queue, which SQLAlchemy uses to set the isolation
    level: run the function now and finish the future."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as error:
            future.set_exception(error)


class InlineConnection:
    """aiosqlite's Connection interface over a sqlite3 connection, run inline."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        # SQLAlchemy checks these aiosqlite attributes
        self._connection: sqlite3.Connection | None = conn
        self._tx = _Queue()

    def cursor(self) -> _Cursor:
        return _Cursor(self._conn.cursor())

    def commit(self) -> Any:
        return _run(self._conn.commit)

    def rollback(self) -> Any:
        return _run(self._conn.rollback)

    def close(self) -> Any:
        self._connection = None
        return _run(self._conn.close)

    def stop(self) -> None:
        self._connection = None
        self._conn.close()

    def create_function(self, *args: Any, **kw: Any) -> Any:
        return _run(self._conn.create_function, *args, **kw)

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        cast(Any, self._conn).isolation_level = value


def begin_immediate(conn: InlineConnection) -> None:
    """BEGIN IMMEDIATE on `conn` now (the engine's "begin" event)."""
    conn._conn.execute("BEGIN IMMEDIATE")


def connect(path: str) -> Callable[[], Any]:
    """An `async_creator` for create_async_engine: new inline connections to `path`."""

    async def create() -> InlineConnection:
        return InlineConnection(sqlite3.connect(path, check_same_thread=False))

    return create
