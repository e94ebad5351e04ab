"""Single-statement reads on SQLite without a transaction of the store's one connection.

A read such as "the worker with this token" or "the job with this id" is one indexed
SELECT, microseconds for SQLite, but a store transaction around it (pool checkout, BEGIN
IMMEDIATE, commit, SQLAlchemy's execution context, a greenlet switch per call) costs a
hundred times that, and every request makes one or more. `Reads` answers them from a
read-only sqlite3 connection of its own, inline on the event loop: in WAL mode a reader
never waits for the writer and sees every transaction committed before it starts, which is
what a transaction of its own would see (each store method commits before it returns).

A statement is compiled once (SQLAlchemy's SQLite dialect) into its SQL text and the order
of its parameters; its rows come back as named tuples, so callers read `row.state` as
from SQLAlchemy. Only statements whose parameters and columns need no conversion between
Python and SQLite (text, numbers, NULL) are taken; `Reads.first` refuses others.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["Reads"]


class _Compiled:
    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        if compiled._bind_processors or any(
            entry.type._cached_result_processor(dialect, None) is not None
            for entry in compiled._result_columns
        ):
            raise ValueError("Reads takes only statements without type conversions")
        self.statement = statement
        self.sql = compiled.string
        # the values fixed in the statement (e.g. kind == "image"); the rest come per call
        self.defaults = {
            name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required
        }
        self.order = list(compiled.positiontup or ())
        self.row = namedtuple("row", [entry.keyname for entry in compiled._result_columns])  # type: ignore[misc]


class Reads:
    """Reads through a read-only connection to the database file at `path`."""

    def __init__(self, path: str, dialect: Dialect) -> None:
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._dialect = dialect
        self._compiled: dict[int, _Compiled] = {}

    def close(self) -> None:
        self._conn.close()

    def first(self, statement: Select[Any], params: Mapping[str, Any]) -> Any:
        """The first row of `statement` (built once: coordinator.db.prepared) with `params`
        bound, or None."""
        found, cursor = self._execute(statement, params)
        row = cursor.fetchone()
        return None if row is None else found.row(*row)

    def all(self, statement: Select[Any], params: Mapping[str, Any]) -> list[Any]:
        """Every row of `statement` (keep it short: this runs on the event loop)."""
        found, cursor = self._execute(statement, params)
        return [found.row(*row) for row in cursor.fetchall()]

    def _execute(
        self, statement: Select[Any], params: Mapping[str, Any]
    ) -> tuple[_Compiled, sqlite3.Cursor]:
        found = self._compiled.get(id(statement))
        if found is None or found.statement is not statement:
            found = self._compiled[id(statement)] = _Compiled(statement, self._dialect)
        values = {**found.defaults, **params}
        return found, self._conn.execute(found.sql, [values[name] for name in found.order])
