"""The store's SQLite transactions on the held connection (coordinator.db.sqlite_tx): BEGIN
IMMEDIATE and COMMIT or ROLLBACK issued on sqlite3 itself, statements through SQLAlchemy
inside them in the same transaction, and the connection given back to the engine's pool
when the store goes idle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from coordinator.config import CoordinatorConfig
from coordinator.db import raw
from coordinator.db.schema import accounts
from coordinator.store import Store

NAMES = select(accounts.c.name).order_by(accounts.c.name)


@pytest.fixture
async def sqlite_store(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[Store]:
    sqlite_only_config.data_dir.mkdir(parents=True, exist_ok=True)
    opened = await Store.open(sqlite_only_config)
    try:
        yield opened
    finally:
        await opened.aclose()


async def _names(store: Store) -> list[str]:
    async with store.db.begin() as conn:
        return list((await conn.execute(NAMES)).scalars())


async def test_a_raising_block_rolls_back_both_paths_and_the_next_commits(
    sqlite_store: Store,
) -> None:
    before = await _names(sqlite_store)
    add = text("INSERT INTO accounts (name, kind, floor, created_at) VALUES (:n, 'user', 0, 1)")
    drivers = []

    async def failing() -> None:
        async with sqlite_store.db.begin() as conn:
            driver = conn.info[raw.RAW]
            drivers.append(driver)
            assert driver.in_transaction  # BEGIN IMMEDIATE: the write lock is held
            await conn.execute(add, {"n": "through-sqlalchemy"})
            driver.execute(
                "INSERT INTO accounts (name, kind, floor, created_at) "
                "VALUES ('through-sqlite3', 'user', 0, 1)"
            )
            raise RuntimeError("the block fails")

    with pytest.raises(RuntimeError):
        await failing()
    driver = drivers[0]
    assert not driver.in_transaction
    assert await _names(sqlite_store) == before
    async with sqlite_store.db.begin() as conn:
        await conn.execute(add, {"n": "kept"})
    assert not driver.in_transaction
    assert "kept" in await _names(sqlite_store)

    # a failing statement is SQLAlchemy's error on either path, and rolls back its transaction
    async def twice() -> None:
        async with sqlite_store.db.begin() as conn:
            await conn.execute(add, {"n": "once"})
            await conn.execute(add, {"n": "kept"})

    with pytest.raises(IntegrityError):
        await twice()
    assert "once" not in await _names(sqlite_store)


async def test_the_held_connection_goes_back_to_the_pool_when_idle(sqlite_store: Store) -> None:
    await _names(sqlite_store)
    # the engine's own transaction waits for the store to go idle, then gets the connection,
    # with its BEGIN IMMEDIATE (the "begin" event) and sees what the store committed
    async with asyncio.timeout(5):
        async with sqlite_store.db.engine.begin() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None and driver.in_transaction
            assert "anonymous" in (await conn.execute(NAMES)).scalars().all()
    # and the store takes it again
    assert "anonymous" in await _names(sqlite_store)


async def test_a_failing_begin_is_sqlalchemys_error_and_leaves_the_store_usable(
    sqlite_store: Store,
) -> None:
    async with sqlite_store.db.begin() as conn:
        driver = conn.info[raw.RAW]
    driver.execute("BEGIN")  # as if a transaction were left open: BEGIN IMMEDIATE fails
    with pytest.raises(OperationalError):
        async with sqlite_store.db.begin():
            pass
    driver.rollback()
    assert "anonymous" in await _names(sqlite_store)
