"""Random keys shared by every coordinator process on one database (`coordinator_secrets`).

`shared_key(engine, name)` returns the key stored under `name`, making it on first use. Two
processes starting at once both try to insert; the primary key lets one win, and both then
read the winner's key. The keys never leave the coordinator: they key HMACs whose outputs
must agree between processes and restarts (coordinator.http.text's requester tags).
"""

from __future__ import annotations

import secrets
import time

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.db.schema import coordinator_secrets

__all__ = ["KEY_BYTES", "REQUESTER_TAGS", "shared_key"]

KEY_BYTES = 32
# the key of text jobs' requester tags (coordinator.http.text.requester_tag)
REQUESTER_TAGS = "requester_tags"


async def shared_key(engine: AsyncEngine, name: str) -> bytes:
    """The key stored under `name`, made (KEY_BYTES random bytes) if there is none yet."""
    query = select(coordinator_secrets.c.value).where(coordinator_secrets.c.name == name)
    async with engine.connect() as conn:
        stored = (await conn.execute(query)).scalar_one_or_none()
    if stored is not None:
        return bytes(stored)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                coordinator_secrets.insert().values(
                    name=name, value=secrets.token_bytes(KEY_BYTES), created_at=time.time()
                )
            )
    except IntegrityError:
        pass  # another process made it first: theirs is the key
    async with engine.connect() as conn:
        return bytes((await conn.execute(query)).scalar_one())
