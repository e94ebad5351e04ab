"""Finding 8 of issue 26, "Invites grow without bound": with `--invites-per-account 2` one
operator code became 31 accounts in four generations, each with its grant.

Against a real invite-only coordinator, the attacker spends one operator code and then
invites as far as the coordinator lets it, over HTTP: the operator's invitee makes its
two codes, but the accounts those made cannot invite until one of their workers has
passed an independent spot check. One code is 3 accounts, not 31.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import update

from client.errors import AuthError
from client.sdk import AsyncClient
from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from coordinator.db.schema import workers
from tests.conftest import LiveApp, start_app
from tests.fakes import FakeWorker

# the operator's invitee and four generations of invitees after it
GENERATIONS = 5


@pytest.fixture
async def live(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    # the attacker registers from many addresses: the per-address registration limit is
    # not what stops it here
    limits = {**DEFAULT_RATE_LIMITS, "register": RateLimit(100, 100, 100, 100)}
    config = dataclasses.replace(
        coordinator_config, registration="invite", invites_per_account=2, rate_limits=limits
    )
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def test_one_invite_code_does_not_become_an_army(live: LiveApp) -> None:
    (operator_code,) = await live.store.accounts.create_invites(1)  # `--make-invites 1`
    codes, accounts, keys = [operator_code], 0, []
    refusals: list[tuple[int, str]] = []
    async with AsyncClient(live.url) as anon:
        for generation in range(GENERATIONS):
            made: list[str] = []
            for code in codes:
                account = await anon.register(f"g{generation}-{accounts}", code)
                accounts += 1
                keys.append(account.api_key)
                async with AsyncClient(live.url, account.api_key) as member:
                    try:
                        made += await member.invite(2)
                    except AuthError as refused:
                        refusals.append((generation, refused.message))
            codes = made
    assert accounts == 3  # was 1 + 2 + 4 + 8 + 16 = 31
    # the operator's invitee made its codes; the two it invited were refused
    assert [generation for generation, _ in refusals] == [1, 1]
    assert all("passed a spot check" in message for _, message in refusals), refusals

    # an invitee that did verified work (one of its workers passed a check) may invite
    async with FakeWorker(live.url, "donor", api_key=keys[-1]) as donor:
        # (the check itself: tests/coordinator/economy/test_trust)
        async with live.store.db.begin() as conn:
            await conn.execute(
                update(workers).where(workers.c.id == donor.link.worker_id).values(checks_passed=1)
            )
        async with AsyncClient(live.url, keys[-1]) as member:
            assert len(await member.invite(2)) == 2
