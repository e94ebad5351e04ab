"""Statements built once (coordinator.db.prepared) and SQLite's reads without a store
transaction (coordinator.db.sqlite_reads)."""

from __future__ import annotations

import pytest
from sqlalchemy import Boolean, bindparam, cast, literal, select, update

from coordinator.config import CoordinatorConfig
from coordinator.db.prepared import Shapes
from coordinator.db.schema import accounts
from coordinator.db.sqlite_reads import Reads
from coordinator.store import Store

BY_NAME = select(accounts.c.name, accounts.c.floor).where(accounts.c.name == bindparam("name"))


def test_shapes_build_once_and_forget_the_least_recently_used() -> None:
    built: list[str] = []
    shapes: Shapes[str] = Shapes(size=2)

    def get(shape: str) -> str:
        def build() -> str:
            built.append(shape)
            return shape.upper()

        return shapes.get(shape, build)

    assert [get("a"), get("b"), get("a")] == ["A", "B", "A"]
    get("c")  # drops b, the least recently used
    get("a")
    get("b")
    assert built == ["a", "b", "c", "b"]


async def test_a_read_sees_what_was_committed_not_a_transaction_in_progress(
    sqlite_only_config: CoordinatorConfig,
) -> None:
    sqlite_only_config.data_dir.mkdir(parents=True, exist_ok=True)
    store = await Store.open(sqlite_only_config)
    try:
        account, _ = await store.accounts.create_account("alice")
        before = await store.db.read_first(BY_NAME, {"name": "alice"})
        assert (before.name, before.floor) == ("alice", account.floor)
        async with store.db.begin() as conn:
            await conn.execute(update(accounts).where(accounts.c.id == account.id).values(floor=-5))
            # the store's own connection sees its change; a read does not, until it commits
            during = await store.db.read_first(BY_NAME, {"name": "alice"})
            assert during.floor == account.floor
        assert (await store.db.read_first(BY_NAME, {"name": "alice"})).floor == -5
        assert await store.db.read_first(BY_NAME, {"name": "bob"}) is None
        assert [row.name for row in await store.db.read_all(BY_NAME, {"name": "alice"})] == [
            "alice"
        ]
    finally:
        await store.aclose()


async def test_reads_refuse_statements_whose_values_sqlite_would_not_return_as_is(
    store: Store,
) -> None:
    if not store.db.inline_reads:
        pytest.skip("SQLite only")
    reads = Reads(str(store.db.engine.url.database), store.db.engine.dialect)
    try:
        with pytest.raises(ValueError, match="type conversions"):
            reads.first(select(cast(literal(1), Boolean)), {})
    finally:
        reads.close()
