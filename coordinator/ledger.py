"""Double-entry kudos ledger: every movement is an entry whose postings sum to zero.

Entries are written inside the caller's transaction, together with the state change that
causes them, and carry an idempotency key so a movement can never happen twice.
"""

from __future__ import annotations

import time

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.errors import Conflict
from coordinator.schema import ledger_entries, postings

__all__ = ["balance", "post_entry", "total_supply"]


async def post_entry(
    conn: AsyncConnection,
    *,
    reason: str,
    key: str,
    moves: list[tuple[int, int]],
    job_id: str | None = None,
) -> int:
    """Write one entry of (account_id, amount) postings; amounts must sum to zero."""
    if sum(amount for _, amount in moves) != 0:
        raise ValueError(f"ledger entry {key!r} does not balance: {moves}")
    if not moves:
        raise ValueError(f"ledger entry {key!r} has no postings")
    seen = select(ledger_entries.c.id).where(ledger_entries.c.idempotency_key == key)
    if (await conn.execute(seen)).first() is not None:
        raise Conflict(f"ledger entry {key!r} was already written")
    # The unique key is the backstop if two transactions race past the check above.
    entry_id = (
        await conn.execute(
            ledger_entries.insert()
            .values(reason=reason, job_id=job_id, idempotency_key=key, created_at=time.time())
            .returning(ledger_entries.c.id)
        )
    ).scalar_one()
    await conn.execute(
        postings.insert(),
        [{"entry_id": entry_id, "account_id": acc, "amount": amount} for acc, amount in moves],
    )
    return int(entry_id)


async def balance(conn: AsyncConnection, account_id: int) -> int:
    query = select(func.coalesce(func.sum(postings.c.amount), 0)).where(
        postings.c.account_id == account_id
    )
    return int((await conn.execute(query)).scalar_one())


async def total_supply(conn: AsyncConnection) -> int:
    """Sum of every posting: zero whenever the ledger is consistent."""
    return int(
        (await conn.execute(select(func.coalesce(func.sum(postings.c.amount), 0)))).scalar_one()
    )
