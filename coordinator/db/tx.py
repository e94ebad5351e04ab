"""What a transaction carries in its connection's `info` (set by Database.begin)."""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["NOW", "SYSTEM", "SYSTEM_BY_NAME", "TOUCHED", "now"]

# the transaction's timestamp, read once from the store's clock
NOW = "idlegrid.now"
# the non-system accounts whose balance the transaction changed (their queued jobs'
# ranks are refreshed before it commits: coordinator.jobs.queue.refresh_ranks)
TOUCHED = "idlegrid.touched_accounts"
# the ids of the system accounts (no balance row: the ledger skips them)
SYSTEM = "idlegrid.system_accounts"
# the system accounts' ids by name (e.g. "system:escrow"), as far as they are known yet
SYSTEM_BY_NAME = "idlegrid.system_accounts_by_name"


def now(conn: AsyncConnection) -> float:
    """The timestamp of the transaction `conn` is in (the wall clock outside a store
    transaction, e.g. in a migration)."""
    found = conn.info.get(NOW)
    return time.time() if found is None else float(found)
