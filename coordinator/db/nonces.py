"""Single-use challenge nonces: what a worker signs so that its signature cannot be
replayed (registration, peer-id proof).

A nonce lives in the `nonces` table, so every coordinator process on one database
accepts the nonces of the others. `consume` deletes it inside the caller's transaction:
of two transactions that present the same nonce, one deletes the row and the other
finds nothing, and a transaction that fails later puts it back by rolling back.
"""

from __future__ import annotations

import secrets

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.db.schema import nonces
from coordinator.db.tx import now
from coordinator.errors import ChallengeRejected

__all__ = ["NONCE_SECONDS", "consume", "issue"]

# how long a nonce can be used: a worker signs and sends it right away
NONCE_SECONDS = 60.0
# expired nonces deleted per issued one (bounds the work of one request; since each
# request adds one nonce, expired ones never pile up)
REAP_BATCH = 100


async def issue(conn: AsyncConnection, purpose: str) -> tuple[str, float]:
    """A new nonce for `purpose` and when it expires; reaps expired ones."""
    at = now(conn)
    expired = (
        select(nonces.c.nonce)
        .where(nonces.c.expires_at < at)
        .order_by(nonces.c.expires_at)
        .limit(REAP_BATCH)
        # another process reaping the same rows skips them instead of waiting (no deadlock)
        .with_for_update(skip_locked=True)
    )
    await conn.execute(delete(nonces).where(nonces.c.nonce.in_(expired.scalar_subquery())))
    nonce, expires_at = secrets.token_hex(16), at + NONCE_SECONDS
    await conn.execute(nonces.insert().values(nonce=nonce, purpose=purpose, expires_at=expires_at))
    return nonce, expires_at


async def consume(conn: AsyncConnection, nonce: str, purpose: str) -> None:
    """Use up `nonce` for `purpose`; ChallengeRejected if it is unknown, already used,
    expired or was issued for something else."""
    used = await conn.execute(
        delete(nonces).where(
            nonces.c.nonce == nonce,
            nonces.c.purpose == purpose,
            nonces.c.expires_at >= now(conn),
        )
    )
    if used.rowcount != 1:
        raise ChallengeRejected(
            f"the {purpose} challenge nonce is unknown, already used or expired; "
            "ask POST /api/v1/workers/challenge for a new one and sign it right away",
            [("nonce", "must be a fresh nonce from /api/v1/workers/challenge")],
        )
