"""Single-use challenge nonces (coordinator.db.nonces) on SQLite and PostgreSQL: used once,
for one purpose, before they expire, and by only one of two coordinators that race."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import func, select

from coordinator.config import CoordinatorConfig
from coordinator.db import nonces
from coordinator.db.schema import nonces as nonces_table
from coordinator.errors import ChallengeRejected
from coordinator.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clocked(coordinator_config: CoordinatorConfig) -> AsyncIterator[tuple[Store, Clock]]:
    coordinator_config.data_dir.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    opened = await Store.open(coordinator_config, clock=clock)
    try:
        yield opened, clock
    finally:
        await opened.aclose()


async def _consume(store: Store, nonce: str, purpose: str) -> None:
    async with store.db.begin() as conn:
        await nonces.consume(conn, nonce, purpose)


async def _count(store: Store) -> int:
    async with store.db.begin() as conn:
        return (await conn.execute(select(func.count()).select_from(nonces_table))).scalar_one()


async def test_a_nonce_is_used_once_for_its_purpose_before_it_expires(
    clocked: tuple[Store, Clock],
) -> None:
    store, clock = clocked
    nonce, expires_at = await store.workers.challenge("register")
    assert expires_at == clock.now + nonces.NONCE_SECONDS
    with pytest.raises(ChallengeRejected, match="register challenge nonce is unknown"):
        await _consume(store, "f" * 32, "register")
    with pytest.raises(ChallengeRejected):
        await _consume(store, nonce, "peer")  # issued for a registration
    await _consume(store, nonce, "register")
    with pytest.raises(ChallengeRejected, match="already used"):
        await _consume(store, nonce, "register")

    late, _ = await store.workers.challenge("peer")
    clock.now += nonces.NONCE_SECONDS + 1
    with pytest.raises(ChallengeRejected, match="expired"):
        await _consume(store, late, "peer")


async def test_a_failed_transaction_gives_its_nonce_back(clocked: tuple[Store, Clock]) -> None:
    store, _ = clocked
    nonce, _ = await store.workers.challenge("register")
    with pytest.raises(RuntimeError):
        await _consume_then_fail(store, nonce)
    await _consume(store, nonce, "register")


async def _consume_then_fail(store: Store, nonce: str) -> None:
    async with store.db.begin() as conn:
        await nonces.consume(conn, nonce, "register")
        raise RuntimeError("the registration failed after the nonce")


async def test_expired_nonces_are_reaped_as_new_ones_are_issued(
    clocked: tuple[Store, Clock],
) -> None:
    store, clock = clocked
    for _ in range(5):
        await store.workers.challenge("register")
    assert await _count(store) == 5
    clock.now += nonces.NONCE_SECONDS + 1
    await store.workers.challenge("register")
    assert await _count(store) == 1


async def test_two_coordinators_racing_for_one_nonce_use_it_once(
    coordinator_config: CoordinatorConfig,
) -> None:
    """Two stores on one database, as two coordinator processes: 20 rounds, both present
    the same nonce at once, exactly one of them gets it."""
    coordinator_config.data_dir.mkdir(parents=True, exist_ok=True)
    first = await Store.open(coordinator_config)
    second = await Store.open(coordinator_config)
    try:
        for _ in range(20):
            nonce, _ = await first.workers.challenge("peer")
            results = await asyncio.gather(
                _consume(first, nonce, "peer"),
                _consume(second, nonce, "peer"),
                return_exceptions=True,
            )
            assert sorted(type(r).__name__ for r in results) == ["ChallengeRejected", "NoneType"]
    finally:
        await first.aclose()
        await second.aclose()
