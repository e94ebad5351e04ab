"""Earned (transferable) kudos for test accounts, as uptime pays them: granted kudos are
not transferable (coordinator.db.ledger), so tests of transfers first earn some."""

from __future__ import annotations

import itertools

from sqlalchemy import select

from coordinator.db.database import GRANTS
from coordinator.db.ledger import post_entry
from coordinator.db.schema import accounts
from coordinator.store import Store

__all__ = ["earn"]

_keys = itertools.count()


async def earn(store: Store, name: str, amount: int) -> None:
    """Pay the user `name` `amount` earned kudos from the network's grants account."""
    async with store.begin() as conn:
        account_id = (
            await conn.execute(select(accounts.c.id).where(accounts.c.name == name))
        ).scalar_one()
        await post_entry(
            conn,
            reason="uptime",
            key=f"uptime:test:{account_id}:{next(_keys)}",
            moves=[(store.system_account(GRANTS), -amount), (account_id, amount)],
        )
