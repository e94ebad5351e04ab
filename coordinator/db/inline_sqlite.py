"""SQLite on the event loop's own thread: a small SQLAlchemy dialect, `sqlite+idlegrid`.

aiosqlite runs every call (cursor, execute, fetch, close, commit) on a helper thread and
hops back to the event loop for each: measured here, about 0.5 ms per statement, ten times
what SQLite itself takes for the queue's small indexed statements. Statements are
microseconds (WAL, synchronous=NORMAL: a commit does not wait for the disk), so running
them inline costs less than one thread hop.

How, with nothing private of SQLAlchemy or aiosqlite: SQLAlchemy's asyncio extension runs
the engine's synchronous code in a greenlet and leaves it only where the driver awaits
(`sqlalchemy.util.await_only`). This dialect is SQLAlchemy's pysqlite dialect (the standard
library's sqlite3) declared async (`Dialect.is_async`) and registered under
`sqlite.idlegrid` with `sqlalchemy.dialects.registry`, the documented way to add a dialect,
so `create_async_engine` takes it. Its DBAPI is sqlite3 itself but for `connect`, whose
connection (`Connection`, a thin PEP 249 facade) runs every call at once on the loop's
thread. `AsyncConnection.execute` refuses a driver that never awaits (its guard against a
blocking driver under asyncio), so a statement ends by awaiting an awaitable that is already
finished: two greenlet switches, no trip through the event loop. The dialect's
`get_driver_connection` is the sqlite3 connection itself, which coordinator.db.raw runs its
hot statements on. The one name with an underscore here is a method SQLAlchemy calls on
an async driver's cursor (`Cursor._async_soft_close`); nothing of SQLAlchemy's or aiosqlite's
is read or patched. The pool is the asyncio queue pool: a transaction waiting for the
connection yields to the loop.

Two rules keep the loop from ever blocking on a lock: the engine has one connection (a
second transaction waits for the pool, which yields, instead of waiting on SQLite's busy
lock), and long reads (the shared queue ranking) run on a helper thread with a sqlite3
connection of their own (`Database.read_rows`). Another process on the same file (a second
coordinator) can still make a write wait up to busy_timeout; SQLite is the embedded
single-process default.

`engine_url(url)` turns any SQLite URL (`sqlite+aiosqlite:///file.db`, the configured
default, or `sqlite:///file.db`) into this dialect's; `begin_immediate` is the engine's
"begin" event.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import URL, make_url, pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.util import await_only

__all__ = ["DRIVER", "Connection", "InlineSQLiteDialect", "begin_immediate", "engine_url"]

DRIVER = "idlegrid"

Parameters = Sequence[Any] | Mapping[str, Any]


class _Done:
    """An awaitable that is already finished."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


_DONE = _Done()


class Cursor:
    """A sqlite3 cursor whose statements tell SQLAlchemy's asyncio layer they awaited."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    def execute(self, sql: str, parameters: Parameters = ()) -> Cursor:
        self._cursor.execute(sql, parameters)
        await_only(_DONE)
        return self

    def executemany(self, sql: str, parameters: Iterable[Parameters]) -> Cursor:
        self._cursor.executemany(sql, parameters)
        await_only(_DONE)
        return self

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    def close(self) -> None:
        self._cursor.close()

    async def _async_soft_close(self) -> None:
        """SQLAlchemy's asyncio layer calls this on an async driver's cursor before handing
        a result to sync code (SQLAlchemy >= 2.0.44), so that closing it later needs no
        await. sqlite3's close never waits: nothing to do."""

    def setinputsizes(self, *sizes: Any) -> None:
        pass

    def setoutputsize(self, *size: Any) -> None:
        pass

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


class Connection:
    """The DBAPI connection SQLAlchemy holds: a sqlite3 connection, run inline."""

    __slots__ = ("sqlite",)

    def __init__(self, sqlite: sqlite3.Connection) -> None:
        self.sqlite = sqlite

    def cursor(self) -> Cursor:
        return Cursor(self.sqlite.cursor())

    def commit(self) -> None:
        self.sqlite.commit()

    def rollback(self) -> None:
        self.sqlite.rollback()

    def close(self) -> None:
        self.sqlite.close()

    def create_function(self, *args: Any, **kw: Any) -> None:
        self.sqlite.create_function(*args, **kw)

    @property
    def isolation_level(self) -> str | None:
        return self.sqlite.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        self.sqlite.isolation_level = value  # type: ignore[assignment]


class _DBAPI:
    """The sqlite3 module, but `connect` gives a `Connection`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(sqlite3, name)

    @staticmethod
    def connect(*args: Any, **kw: Any) -> Connection:
        return Connection(sqlite3.connect(*args, **kw))


class InlineSQLiteDialect(SQLiteDialect_pysqlite):
    """pysqlite for `create_async_engine`: sqlite3 called on the event loop's thread."""

    driver = DRIVER
    is_async = True
    supports_statement_cache = True
    # a connection the garbage collector finds is closed; sqlite3's close never waits
    has_terminate = True

    @classmethod
    def import_dbapi(cls) -> Any:
        return _DBAPI()

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.AsyncAdaptedQueuePool

    def get_driver_connection(self, connection: Any) -> sqlite3.Connection:
        adapted: Connection = connection
        return adapted.sqlite

    def do_terminate(self, dbapi_connection: Any) -> None:
        dbapi_connection.close()


registry.register(f"sqlite.{DRIVER}", __name__, InlineSQLiteDialect.__name__)


def engine_url(url: str | URL) -> URL:
    """`url` (a SQLite URL with any driver) with this dialect as its driver."""
    return make_url(url).set(drivername=f"sqlite+{DRIVER}")


def begin_immediate(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE on `conn` now (the engine's "begin" event)."""
    conn.execute("BEGIN IMMEDIATE")
