"""Alembic migrations on SQLite and PostgreSQL: a fresh database, one left by the release
before Alembic (tests/coordinator/db/data/released_v3.sql, written by that release's own code
with data/make_released_v3.py), repeated and concurrent start-ups, and drift between
coordinator.db.schema and the revisions."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, event, inspect, select, table, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from coordinator.db import migrations
from coordinator.db.schema import metadata, migrate

RELEASED_DUMP = Path(__file__).parent / "data" / "released_v3.sql"
REPO = Path(__file__).resolve().parents[3]
HEAD = ScriptDirectory.from_config(migrations.config()).get_current_head()
NEW_INDEXES = {
    "jobs": {"ix_jobs_queue", "ix_jobs_checks", "ix_jobs_leases", "ix_jobs_finished"},
    "postings": {"ix_postings_entry"},
    "ledger_entries": {"ix_ledger_entries_job_id"},
}


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a fresh SQLite file or a fresh PostgreSQL database (conftest)."""
    created = create_async_engine(database_url)
    try:
        yield created
    finally:
        await created.dispose()


@pytest.fixture(scope="module")
def released() -> Iterator[sqlite3.Connection]:
    """The released database, in memory, to read the expected rows from."""
    db = sqlite3.connect(":memory:")
    db.executescript(RELEASED_DUMP.read_text())
    try:
        yield db
    finally:
        db.close()


def _released_rows(db: sqlite3.Connection, name: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    cursor = db.execute(f'SELECT * FROM "{name}"')
    columns = [d[0] for d in cursor.description]
    return columns, cursor.fetchall()


def _released_tables(db: sqlite3.Connection) -> list[str]:
    query = "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'schema_version'"
    return [name for (name,) in db.execute(query)]


async def _load_released(engine: AsyncEngine, db: sqlite3.Connection) -> None:
    """Make `engine`'s database what the released coordinator left: schema_version 3, its
    tables and the dump's rows, and no alembic_version."""
    if engine.dialect.name == "sqlite":
        path = make_url(str(engine.url)).database
        assert path
        target = sqlite3.connect(path)
        try:
            target.executescript(RELEASED_DUMP.read_text())
        finally:
            target.close()
        return
    # PostgreSQL: the released schema through 0001_released (which also writes
    # schema_version 1-3), the same rows, then forget Alembic was ever there.
    async with engine.begin() as conn:
        await conn.run_sync(migrations.upgrade, migrations.RELEASED)
        reflected = MetaData()
        await conn.run_sync(reflected.reflect)
        for target_table in reflected.sorted_tables:
            if target_table.name in ("schema_version", "alembic_version"):
                continue
            columns, rows = _released_rows(db, target_table.name)
            if rows:
                await conn.execute(
                    target_table.insert(), [dict(zip(columns, row, strict=True)) for row in rows]
                )
        for name in ("accounts", "ledger_entries", "postings"):
            await conn.execute(
                text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), max(id)) FROM {name}")
            )
        await conn.execute(text("DROP TABLE alembic_version"))


def _current(sync: Connection) -> str | None:
    return MigrationContext.configure(sync).get_current_revision()


def _drift(sync: Connection) -> list[Any]:
    context = MigrationContext.configure(
        sync, opts={"compare_type": True, "include_object": migrations.include_object}
    )
    return list(compare_metadata(context, metadata))


def _indexes(sync: Connection) -> dict[str, dict[str, list[str | None]]]:
    found = inspect(sync)
    return {
        name: {ix["name"] or "": list(ix["column_names"]) for ix in found.get_indexes(name)}
        for name in ("jobs", "postings", "ledger_entries")
    }


async def test_fresh_database_runs_every_revision_and_matches_the_schema(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        assert await migrate(conn) == HEAD
    async with engine.connect() as conn:
        assert await conn.run_sync(_current) == HEAD
        assert await conn.run_sync(_drift) == [], (
            "coordinator.db.schema and the migrations differ: add a revision "
            '(python -m coordinator.db.migrations revision -m "..." --autogenerate)'
        )
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    assert tables == set(metadata.tables) | {"alembic_version"}
    assert "schema_version" not in tables


async def test_released_database_is_stamped_and_upgraded(
    engine: AsyncEngine, released: sqlite3.Connection
) -> None:
    await _load_released(engine, released)
    async with engine.begin() as conn:
        assert await migrate(conn) == HEAD

    async with engine.connect() as conn:
        assert await conn.run_sync(_current) == HEAD
        assert await conn.run_sync(_drift) == []
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert "schema_version" not in tables

        # 0005 recorded what was transferable then as the operator's "opening" entry
        opening = (
            await conn.execute(text("SELECT id FROM ledger_entries WHERE reason = 'opening'"))
        ).scalar_one()
        opened = (
            await conn.execute(
                text(f"SELECT amount FROM postings WHERE entry_id = {opening} AND amount > 0")
            )
        ).scalar_one()
        # (balances above zero, and escrow but for open anonymous jobs: credit, not earned)
        (transferable,) = released.execute(
            "SELECT (SELECT sum(max(total, 0)) FROM (SELECT sum(p.amount) AS total"
            "  FROM postings p JOIN accounts a ON a.id = p.account_id"
            "  WHERE a.kind != 'system' GROUP BY a.id))"
            " + (SELECT sum(p.amount) FROM postings p JOIN accounts a ON a.id = p.account_id"
            "  WHERE a.name = 'system:escrow')"
            " - (SELECT coalesce(sum(j.cost), 0) FROM jobs j JOIN accounts a"
            "  ON a.id = j.account_id WHERE a.kind = 'anonymous'"
            "  AND j.state IN ('queued', 'leased'))"
        ).fetchone()
        assert opened == transferable > 0
        # every row the release wrote is still there, unchanged
        for name in _released_tables(released):
            columns, rows = _released_rows(released, name)
            query = select(*(text(f'"{c}"') for c in columns)).select_from(table(name))
            if name == "ledger_entries":
                query = query.where(text(f"id != {opening}"))
            elif name == "postings":
                query = query.where(text(f"entry_id != {opening}"))
            found = (await conn.execute(query)).all()
            assert sorted(map(tuple, found), key=repr) == sorted(rows, key=repr), name

        # balances: the ledger sum of every non-system account, none for system accounts
        expected = dict(
            released.execute(
                "SELECT a.id, coalesce(sum(p.amount), 0) FROM accounts a"
                " LEFT JOIN postings p ON p.account_id = a.id"
                " WHERE a.kind != 'system' GROUP BY a.id"
            ).fetchall()
        )
        assert len(expected) >= 6 and len(set(expected.values())) >= 4  # a telling fixture
        balances = (
            await conn.execute(text("SELECT account_id, amount, ranked FROM balances"))
        ).all()
        assert {account: amount for account, amount, _ in balances} == expected
        assert all(ranked == amount for _, amount, ranked in balances)

        # ranks: queued (and leased) jobs by submit time, finished ones untouched
        jobs = (await conn.execute(text("SELECT state, created_at, rank FROM jobs"))).all()
        assert {state for state, _, _ in jobs} >= {"queued", "leased", "done", "cancelled"}
        for state, created_at, rank in jobs:
            assert rank == (created_at if state in ("queued", "leased") else 0), state

        indexes = await conn.run_sync(_indexes)
    for name, wanted in NEW_INDEXES.items():
        assert wanted <= set(indexes[name]), name
    assert indexes["jobs"]["ix_jobs_account"] == ["account_id", "state"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_older_database_is_refused_with_the_way_out(
    engine: AsyncEngine, released: sqlite3.Connection
) -> None:
    await _load_released(engine, released)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM schema_version WHERE version = 3"))
    with pytest.raises(migrations.LegacySchemaError, match="schema_version 2.*previous release"):
        async with engine.begin() as conn:
            await migrate(conn)
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    assert "alembic_version" not in tables and "balances" not in tables


async def test_second_migrate_is_a_no_op(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await migrate(conn)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        async with engine.begin() as conn:
            assert await migrate(conn) == HEAD
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    writes = [
        s
        for s in statements
        if s.lstrip().split(None, 1)[0].upper() in {"CREATE", "ALTER", "DROP", "INSERT", "UPDATE"}
    ]
    assert statements and writes == []


async def test_concurrent_migrates_in_one_process(database_url: str) -> None:
    engines = [create_async_engine(database_url) for _ in range(3)]

    async def start(engine: AsyncEngine) -> str | None:
        async with engine.begin() as conn:
            return await migrate(conn)

    try:
        assert await asyncio.gather(*(start(e) for e in engines)) == [HEAD] * len(engines)
    finally:
        for engine in engines:
            await engine.dispose()


MIGRATE_ONCE = """
import asyncio, sys
from sqlalchemy.ext.asyncio import create_async_engine
from coordinator.db.schema import migrate

async def main():
    engine = create_async_engine(sys.argv[1])
    async with engine.begin() as conn:
        print(await migrate(conn))
    await engine.dispose()

asyncio.run(main())
"""


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_coordinators_starting_together_migrate_one_after_the_other(
    database_url: str,
) -> None:
    async def start() -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            MIGRATE_ONCE,
            database_url,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        return out.decode().strip()

    assert await asyncio.gather(*(start() for _ in range(4))) == [HEAD] * 4
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_current) == HEAD
            assert await conn.run_sync(_drift) == []
    finally:
        await engine.dispose()


async def test_downgrade_to_base_and_back(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await migrate(conn)
        await conn.run_sync(lambda sync: command.downgrade(migrations.config(sync), "base"))
        tables = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        assert tables == {"alembic_version"}
    async with engine.begin() as conn:
        assert await migrate(conn) == HEAD
        assert await conn.run_sync(_drift) == []


async def test_an_old_text_jobs_max_tokens_moves_to_its_column_and_back(
    engine: AsyncEngine,
) -> None:
    """0007_job_max_tokens: a text job queued before it (max_tokens in `steps` and
    `steps_total`) has it in `max_tokens` after the upgrade; an image job keeps its steps;
    the downgrade puts it back."""
    old = {"kind": "text", "steps": 77, "steps_total": 77, "pixels": 0, "n": 1, "model": "m"}
    image = {"kind": "image", "steps": 4, "steps_total": 4, "pixels": 4096, "n": 1, "model": None}
    async with engine.begin() as conn:
        await conn.run_sync(migrations.upgrade, "0006_identities")
        await conn.execute(
            text(
                "INSERT INTO accounts (name, kind, floor, created_at) "
                "VALUES ('alice', 'user', 0, 1.0)"
            )
        )
        for job_id, row in (("text-1", old), ("image-1", image)):
            await conn.execute(
                text(
                    "INSERT INTO jobs (id, kind, account_id, state, params, params_hash, model, "
                    "pixels, steps, n, cost, priority_class, created_at, lease_seconds, "
                    "attempts, image, step, steps_total) VALUES (:id, :kind, "
                    "(SELECT id FROM accounts WHERE name = 'alice'), 'queued', '{}', 'h', :model, "
                    ":pixels, :steps, :n, 5, 1, 1.0, 60.0, 0, 0, 0, :steps_total)"
                ),
                {"id": job_id, **row},
            )
    columns = "SELECT id, steps, steps_total, max_tokens FROM jobs ORDER BY id"
    async with engine.begin() as conn:
        assert await migrate(conn) == HEAD
        rows = (await conn.execute(text(columns))).all()
        assert [tuple(r) for r in rows] == [("image-1", 4, 4, None), ("text-1", 0, 0, 77)]
    async with engine.begin() as conn:
        await conn.run_sync(
            lambda sync: command.downgrade(migrations.config(sync), "0006_identities")
        )
        back = (
            await conn.execute(text("SELECT id, steps, steps_total FROM jobs ORDER BY id"))
        ).all()
        assert [tuple(r) for r in back] == [("image-1", 4, 4), ("text-1", 77, 77)]


def test_revision_ids_number_on_from_the_head() -> None:
    assert HEAD == "0013_coordinator_secrets"
    assert (
        migrations.next_revision_id("Add jobs.priority, again!") == "0014_add_jobs_priority_again"
    )
