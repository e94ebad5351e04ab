"""The hot statements of a store transaction, on SQLite run straight on sqlite3.

Inside a transaction, `conn.execute` costs SQLAlchemy's execution context, its result
machinery and a greenlet switch for each statement: measured here, several times what SQLite
spends on the lifecycle's small indexed statements, and a job runs some thirty of them.
`execute(conn, statement, params)` runs a statement built once (coordinator.db.prepared)
on the store's own sqlite3 connection (coordinator.db.inline_sqlite), in the same
transaction (the one connection, between the BEGIN IMMEDIATE and the commit that
SQLAlchemy issues), compiled once by SQLAlchemy's SQLite dialect into its SQL text and the
order of its parameters, and returns a small result (`first`, `scalar_one`,
`scalar_one_or_none`, `all`, `rowcount`) whose rows are named tuples, as SQLAlchemy's are.

Only statements that need nothing else of SQLAlchemy's execution are taken this way: no
type conversion of a column read, no Python-side column default; a list parameter (an
expanding IN) is rendered once per length of its list, as SQLAlchemy renders it per execution;
parameters get the dialect's conversions (a Float column's float()). Any
other statement, and every statement on PostgreSQL, goes through `conn.execute` as before
(the result offers the same methods). sqlite3's errors come out as SQLAlchemy's
(IntegrityError for a duplicate idempotency key), so callers catch the same exceptions on
both paths.
"""

from __future__ import annotations

import operator
import sqlite3
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from sqlalchemy import exc
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.sql.expression import Executable

__all__ = ["RAW", "Result", "begun", "execute", "sqlalchemy_error"]

# the transaction's sqlite3 connection, or None (PostgreSQL): set by Database.begin
RAW = "idlegrid.raw_sqlite"


# the connection of the last store transaction begun, its sqlite3 connection (or None) and
# its dialect: what `conn.info` and `conn.dialect` say, without SQLAlchemy's properties
_current: tuple[AsyncConnection | None, sqlite3.Connection | None, Dialect | None] = (
    None,
    None,
    None,
)


def begun(conn: AsyncConnection, driver: sqlite3.Connection | None) -> None:
    """Note the transaction just begun on `conn` (Database.begin, after setting RAW)."""
    global _current
    _current = (conn, driver, conn.dialect)


class Result:
    """The rows (named tuples) of one statement, and how many rows it changed."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def all(self) -> list[Any]:
        return self._rows

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise _not_one(self._rows)
        return self._rows[0]

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._rows]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise exc.MultipleResultsFound("expected at most one row")
        return self._rows[0][0] if self._rows else None


def _not_one(rows: list[Any]) -> exc.InvalidRequestError:
    if not rows:
        return exc.NoResultFound("No row was found when one was required")
    return exc.MultipleResultsFound("Multiple rows were found when exactly one was required")


class _Compiled:
    def __init__(
        self,
        statement: Executable,
        dialect: Dialect,
        keys: Sequence[str],
        lengths: Mapping[str, int],
    ) -> None:
        compiled = cast(ClauseElement, statement).compile(dialect=dialect, column_keys=list(keys))
        assert isinstance(compiled, SQLCompiler)
        self.statement = statement
        expanding = {bind.key for bind in compiled.post_compile_params if bind.expanding}
        # False: SQLAlchemy must run it (conversions or Python-side defaults)
        self.usable = not (
            # a list parameter not given as a list (SQLAlchemy says what is wrong)
            expanding != set(lengths)
            or any(not bind.expanding for bind in compiled.post_compile_params)
            or compiled.literal_execute_params
            or compiled.insert_prefetch
            or compiled.update_prefetch
            or any(
                entry.type._cached_result_processor(dialect, None) is not None
                for entry in compiled._result_columns
            )
        )
        self.defaults = {
            name: bind.effective_value for name, bind in compiled.binds.items() if not bind.required
        }
        convert = dict(cast(dict[str, Callable[[Any], Any]], compiled._bind_processors))
        self.sql = compiled.string
        self.order = list(compiled.positiontup or ())
        # an expanding IN's value i is the parameter name_{i+1}: (name, i)
        self.items: dict[str, tuple[str, int]] = {}
        if self.usable and expanding:
            # rendered once for these list lengths, as SQLAlchemy renders it per execution
            dummy: dict[str, Any] = {name: None for name in self.order}
            dummy.update({name: [None] * length for name, length in lengths.items()})
            state = compiled.construct_expanded_state(dummy)
            self.sql = state.statement
            self.order = list(state.positiontup or ())
            convert.update(state.processors)
            for name, expanded in state.parameter_expansion.items():
                for i, item in enumerate(expanded):
                    self.items[item] = (name, i)
        # SQLAlchemy's conversions of parameters (e.g. a Float column's float())
        self.converters = [
            (i, convert[name]) for i, name in enumerate(self.order) if name in convert
        ]
        columns = [entry.keyname for entry in compiled._result_columns]
        self.row = namedtuple("row", columns, rename=True) if columns else None
        # whether the statement has a list parameter (its form depends on the lengths)
        self.expands = bool(expanding)
        # the common case, no defaults, no lists, no conversions: one C call
        self.pick: Callable[[Mapping[str, Any]], Any] | None = None
        if not (self.defaults or self.items or self.converters):
            if len(self.order) == 1:
                only = self.order[0]
                self.pick = lambda params: (params[only],)
            elif self.order:
                self.pick = operator.itemgetter(*self.order)
            else:
                self.pick = lambda params: ()

    def values(self, params: Mapping[str, Any]) -> Sequence[Any]:
        if self.pick is not None:
            return self.pick(params)  # type: ignore[no-any-return]
        merged = {**self.defaults, **params}
        if self.items:
            items = self.items
            values = [
                merged[items[name][0]][items[name][1]] if name in items else merged[name]
                for name in self.order
            ]
        else:
            values = [merged[name] for name in self.order]
        for i, convert in self.converters:
            values[i] = convert(values[i])
        return values


_compiled: dict[tuple[int, tuple[str, ...], tuple[tuple[str, int], ...]], _Compiled] = {}
# statements without a list parameter, by the names of their parameters as given (no
# sorting, no look at the values: what most executions find)
_plain: dict[tuple[int, tuple[str, ...]], _Compiled] = {}


def _find(statement: Executable, dialect: Dialect, params: Mapping[str, Any]) -> _Compiled:
    plain_key = (id(statement), tuple(params))
    found = _plain.get(plain_key)
    if found is not None and found.statement is statement:
        return found
    found = _find_compiled(statement, dialect, params)
    if not found.expands and found.usable:
        _plain[plain_key] = found
    return found


def _find_compiled(statement: Executable, dialect: Dialect, params: Mapping[str, Any]) -> _Compiled:
    # a list parameter (an expanding IN) is rendered once per length
    lengths = tuple(
        (name, len(value)) for name, value in params.items() if isinstance(value, list | tuple)
    )
    key = (id(statement), tuple(sorted(params)), lengths)
    found = _compiled.get(key)
    if found is None or found.statement is not statement:
        found = _compiled[key] = _Compiled(statement, dialect, key[1], dict(lengths))
    return found


def sqlalchemy_error(error: sqlite3.Error, sql: str) -> exc.DBAPIError:
    """sqlite3's `error` as SQLAlchemy raises it (IntegrityError for a duplicate key)."""
    if isinstance(error, sqlite3.IntegrityError):
        return exc.IntegrityError(sql, None, error)
    return exc.OperationalError(sql, None, error)


async def execute(
    conn: AsyncConnection,
    statement: Executable,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    built_once: bool = True,
) -> Result:
    """Run `statement` (built once) in `conn`'s transaction with `params` (a list: many
    rows, as executemany) and return its rows. A statement built for this one execution
    (`built_once` False) goes through SQLAlchemy: its compiled form is not kept."""
    raw: sqlite3.Connection | None
    dialect: Dialect | None
    if not built_once:
        raw, dialect = None, None
    elif conn is _current[0]:
        raw, dialect = _current[1], _current[2]
    else:
        raw, dialect = conn.info.get(RAW), conn.dialect
    many = isinstance(params, Sequence) and not isinstance(params, Mapping)
    rows_in: Sequence[Mapping[str, Any]] = (
        params if many else [params or {}]  # type: ignore[list-item,assignment]
    )
    if raw is not None and dialect is not None and rows_in:
        found = _find(statement, dialect, rows_in[0])
        if found.usable:
            return _run(raw, found, rows_in, many)
    result = await conn.execute(statement, params)
    rows = list(result.all()) if result.returns_rows else []
    return Result(rows, result.rowcount)


def _run(
    raw: sqlite3.Connection, found: _Compiled, rows_in: Sequence[Mapping[str, Any]], many: bool
) -> Result:
    try:
        if many:
            cursor = raw.executemany(found.sql, [found.values(row) for row in rows_in])
        else:
            cursor = raw.execute(found.sql, found.values(rows_in[0]))
        fetched = cursor.fetchall() if found.row is not None else []
    except sqlite3.Error as error:
        raise sqlalchemy_error(error, found.sql) from error
    make = found.row
    rows = [make(*row) for row in fetched] if make is not None else []
    return Result(rows, cursor.rowcount)
