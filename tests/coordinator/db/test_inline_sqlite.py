"""The store's SQLite engine (coordinator.db.inline_sqlite): SQLAlchemy's asyncio engine on a
dialect of ours that runs sqlite3 on the event loop's thread, with one connection that a
second transaction waits for without blocking the loop, and no aiosqlite."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from coordinator.config import CoordinatorConfig
from coordinator.db import inline_sqlite
from coordinator.db.raw import RAW
from coordinator.db.schema import accounts
from coordinator.store import Store


@pytest.fixture
async def sqlite_store(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[Store]:
    sqlite_only_config.data_dir.mkdir(parents=True, exist_ok=True)
    opened = await Store.open(sqlite_only_config)
    try:
        yield opened
    finally:
        await opened.aclose()


def test_any_sqlite_url_gets_our_driver() -> None:
    for url in ("sqlite+aiosqlite:////data/x.db", "sqlite:////data/x.db"):
        converted = inline_sqlite.engine_url(url)
        assert converted.drivername == "sqlite+idlegrid"
        assert converted.database == "/data/x.db"


async def test_statements_run_on_the_loops_thread_in_one_transaction(sqlite_store: Store) -> None:
    assert sqlite_store.db.engine.dialect.driver == "idlegrid"
    assert sqlite_store.db.engine.dialect.is_async
    async with sqlite_store.db.begin() as conn:
        # SQLAlchemy's statements and coordinator.db.raw's share the one sqlite3 connection
        conn.info[RAW].create_function("thread_id", 0, threading.get_ident)
        ran_on = (await conn.execute(text("SELECT thread_id()"))).scalar_one()
        assert ran_on == threading.get_ident()
        # BEGIN IMMEDIATE was issued: the write lock is held before any write
        assert conn.info[RAW].in_transaction


async def test_a_second_transaction_waits_for_the_connection_and_the_loop_keeps_running(
    sqlite_store: Store,
) -> None:
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def first() -> None:
        async with sqlite_store.db.begin() as conn:
            await conn.execute(accounts.update().values(floor=accounts.c.floor))
            order.append("first in")
            first_in.set()
            await release.wait()
            order.append("first out")

    async def second() -> None:
        await first_in.wait()
        async with sqlite_store.db.begin() as conn:
            order.append("second in")
            await conn.execute(select(accounts.c.id))

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await first_in.wait()
    for _ in range(20):  # the loop serves other tasks while the second one waits
        await asyncio.sleep(0)
    assert order == ["first in"]
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert order == ["first in", "first out", "second in"]


async def test_errors_are_sqlalchemys_and_roll_the_transaction_back(sqlite_store: Store) -> None:
    await sqlite_store.accounts.create_account("alice")

    async def change_then_duplicate() -> None:
        async with sqlite_store.db.begin() as conn:
            await conn.execute(accounts.update().values(floor=-5).where(accounts.c.name == "alice"))
            await conn.execute(
                accounts.insert().values(name="alice", kind="user", floor=0, created_at=0.0)
            )

    with pytest.raises(IntegrityError):
        await change_then_duplicate()
    async with sqlite_store.db.begin() as conn:
        floor = (
            await conn.execute(select(accounts.c.floor).where(accounts.c.name == "alice"))
        ).scalar_one()
    assert floor != -5


def test_the_store_does_not_load_aiosqlite(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from coordinator.config import CoordinatorConfig
        from coordinator.store import Store

        async def main():
            config = CoordinatorConfig(
                data_dir=Path({str(tmp_path)!r}),
                database_url="sqlite+aiosqlite:///{tmp_path}/s.db",
                port=0,
            )
            store = await Store.open(config)
            await store.accounts.create_account("bob")
            await store.aclose()
            print("aiosqlite" in sys.modules)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "False", done.stderr
