"""Idempotency keys of requests that move money (transfers, job submits): a replay of the
same key with the same body gets the first answer and changes nothing.

The key is looked up and stored in the transaction that does the work, after the
spender's lock (coordinator.db.ledger.lock_spender), so two concurrent requests with one
key cannot both do it; a unique-key violation at commit means another process won, and
the caller retries once to read its answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from coordinator.db import raw
from coordinator.db.schema import request_keys
from coordinator.db.tx import now
from coordinator.errors import Conflict

__all__ = ["Idempotent", "remember", "replayed"]


# built once (coordinator.db.raw)
_SEEN = select(request_keys.c.request_hash, request_keys.c.response).where(
    (request_keys.c.account_id == bindparam("account_id"))
    & (request_keys.c.key == bindparam("key"))
)
_REMEMBER = request_keys.insert()  # its columns are the keys of the parameters


@dataclass(frozen=True)
class Idempotent:
    """A request's Idempotency-Key and the digest of its body."""

    key: str
    digest: str


async def replayed(
    conn: AsyncConnection, account_id: int, key: str, digest: str, what: str
) -> str | None:
    """The stored answer to `account_id`'s earlier request with `key`, or None if there is
    none. Conflict when that request had another body (`digest`); `what` names it."""
    seen = (await raw.execute(conn, _SEEN, {"account_id": account_id, "key": key})).first()
    if seen is None:
        return None
    if seen.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key {key!r} was used for a different {what}; use a new key for a "
            f"new {what}",
            [("Idempotency-Key", "was used with a different body")],
        )
    return str(seen.response)


async def remember(
    conn: AsyncConnection, account_id: int, key: str, digest: str, response: str
) -> None:
    """Store the answer to the request with `key` in the caller's transaction."""
    await raw.execute(
        conn,
        _REMEMBER,
        {
            "account_id": account_id,
            "key": key,
            "request_hash": digest,
            "response": response,
            "created_at": now(conn),
        },
    )
