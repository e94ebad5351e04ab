"""Keys shared by every coordinator process on one database (coordinator.db.secrets), on
SQLite and PostgreSQL: made once, even by processes starting together, and kept."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import create_async_engine

from coordinator.db.schema import migrate
from coordinator.db.secrets import KEY_BYTES, shared_key


async def test_processes_starting_together_share_one_key(database_url: str) -> None:
    engines = [create_async_engine(database_url) for _ in range(4)]
    try:
        async with engines[0].begin() as conn:
            await migrate(conn)
        made = await asyncio.gather(*(shared_key(e, "tags") for e in engines))
        assert len(made[0]) == KEY_BYTES and made == [made[0]] * 4
        # kept: the next start reads it; another name is another key
        assert await shared_key(engines[1], "tags") == made[0]
        other = await shared_key(engines[2], "other")
        assert len(other) == KEY_BYTES and other != made[0]
    finally:
        for engine in engines:
            await engine.dispose()
