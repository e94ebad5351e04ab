"""The hot statements run straight on sqlite3 (coordinator.db.raw): the same rows, the same
row counts, the same exceptions as through SQLAlchemy, inside the store's transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError

from coordinator.db import raw
from coordinator.db.schema import accounts, ledger_entries
from coordinator.store import Store

BY_NAME = select(accounts.c.id, accounts.c.name, accounts.c.floor).where(
    accounts.c.name == bindparam("name")
)
SET_FLOOR = (
    update(accounts)
    .where(accounts.c.name == bindparam("b_name"))
    .values(floor=bindparam("b_floor", type_=accounts.c.floor.type))
)
ENTRY = ledger_entries.insert().returning(ledger_entries.c.id)


async def test_rows_and_counts_match_sqlalchemy_in_the_same_transaction(store: Store) -> None:
    account, _ = await store.accounts.create_account("alice")
    async with store.db.begin() as conn:
        # SQLite takes the sqlite3 path; PostgreSQL SQLAlchemy's
        assert (conn.info[raw.RAW] is not None) == (store.db.dialect == "sqlite")
        changed = await raw.execute(conn, SET_FLOOR, {"b_name": "alice", "b_floor": -7})
        assert changed.rowcount == 1
        # the change is in this transaction: SQLAlchemy on the same connection sees it
        through_sqlalchemy = (await conn.execute(BY_NAME, {"name": "alice"})).one()
        row = (await raw.execute(conn, BY_NAME, {"name": "alice"})).one()
        assert tuple(row) == tuple(through_sqlalchemy) == (account.id, "alice", -7)
        assert (row.id, row.floor) == (account.id, -7)
        assert (await raw.execute(conn, BY_NAME, {"name": "bob"})).first() is None
        missing = await raw.execute(conn, SET_FLOOR, {"b_name": "bob", "b_floor": 1})
        assert missing.rowcount == 0
    async with store.db.begin() as conn:
        assert (await raw.execute(conn, BY_NAME, {"name": "alice"})).one().floor == -7


async def test_a_duplicate_key_is_sqlalchemys_integrity_error_and_rolls_back(
    store: Store,
) -> None:
    entry = {"reason": "grant", "job_id": None, "idempotency_key": "k1", "created_at": 1.0}
    async with store.db.begin() as conn:
        first = (await raw.execute(conn, ENTRY, entry)).scalar_one()

    async def both() -> None:
        async with store.db.begin() as conn:
            await raw.execute(conn, ENTRY, {**entry, "idempotency_key": "k2"})
            await raw.execute(conn, ENTRY, entry)

    with pytest.raises(IntegrityError):
        await both()
    async with store.db.begin() as conn:
        keys = (await conn.execute(select(ledger_entries.c.idempotency_key))).scalars().all()
    # the failed transaction's first insert was rolled back with it
    assert "k1" in keys and "k2" not in keys
    assert first is not None


NAMED = (
    select(accounts.c.name)
    .where(accounts.c.name.in_(bindparam("names", expanding=True)) & (accounts.c.floor <= 0))
    .order_by(accounts.c.name)
)


@pytest.mark.parametrize(
    "names", [["alice"], ["alice", "carol", "nobody"], [], ["carol", "alice"]], ids=str
)
async def test_a_list_parameter_gets_sqlalchemys_rows_for_every_length(
    store: Store, names: list[str]
) -> None:
    # an expanding IN: rendered once per length of the list on the sqlite3 path
    for name in ("alice", "bob", "carol"):
        await store.accounts.create_account(name)
    async with store.db.begin() as conn:
        through_sqlalchemy = (await conn.execute(NAMED, {"names": names})).scalars().all()
        for _ in range(2):  # the second time from the kept compiled form
            assert (await raw.execute(conn, NAMED, {"names": names})).scalars() == list(
                through_sqlalchemy
            )
        expected = sorted(set(names) & {"alice", "bob", "carol"})
        assert list(through_sqlalchemy) == expected
        if store.db.dialect == "sqlite":  # it did take the sqlite3 path
            assert raw._find(NAMED, conn.dialect, {"names": names}).usable
