"""Transferable kudos for test accounts, as the operator's `--mint` gives them: granted
kudos (and pay for grant-funded jobs) are not transferable (coordinator.db.ledger), so
tests of transfers first get some."""

from __future__ import annotations

from coordinator.store import Store

__all__ = ["earn"]


async def earn(store: Store, name: str, amount: int) -> None:
    """Give the user `name` `amount` transferable kudos (an operator's mint)."""
    await store.ledger.mint(name, amount)
