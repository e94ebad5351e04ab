"""Finding 2, "Sybil grants": account creation has no limit and each grant is transferable, so
20 new accounts moved 2 000 kudos to one account in 0.3 s.

The attacker registers 20 accounts, from 20 addresses (behind the operator's proxy, so the
per-address registration limit does not stop them), and tries to pool their grants:
directly, after laundering a grant through a reserved-and-cancelled job, and through rating
rewards. Every try is refused naming what is transferable, while the grants still pay for
jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest

from client.errors import NotEnoughKudos
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.fakes import CAPS, FakeWorker, job_pngs

SYBILS = 20
GRANT = 100  # CoordinatorConfig.new_account_grant
# 256x256, 20 steps: 3 kudos
MEDIUM = ImageParams(prompt="a blue cone", width=256, height=256, steps=20, seed=5)


@pytest.fixture
async def live(coordinator_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """A coordinator behind a reverse proxy on 127.0.0.1 (X-Forwarded-For names clients)."""
    config = dataclasses.replace(coordinator_config, trusted_proxies=("127.0.0.1/32",))
    runner, app = await start_app(config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def _register(url: str, name: str, address: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/v1/accounts", json={"name": name}, headers={"X-Forwarded-For": address}
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        key: str = (await resp.json())["api_key"]
        return key


async def test_twenty_new_accounts_cannot_pool_their_grants(live: LiveApp) -> None:
    # documentation addresses (RFC 5737), only ever written into a header
    keys = [await _register(live.url, f"sybil{i}", f"203.0.113.{i + 1}") for i in range(SYBILS)]
    collector_key = await _register(live.url, "collector", "198.51.100.1")

    async def pool(key: str) -> str:
        async with AsyncClient(live.url, key) as sybil:
            with pytest.raises(NotEnoughKudos) as refused:
                await sybil.transfer("collector", GRANT)
            return refused.value.message

    refusals = await asyncio.gather(*[pool(key) for key in keys])
    assert all("you can transfer at most 0 kudos" in message for message in refusals)
    assert all(f"of which {GRANT} are granted" in message for message in refusals)

    async with AsyncClient(live.url, keys[0]) as sybil:
        # reserve-and-cancel gives the grant back as a grant, not as transferable kudos
        queued = await sybil.submit_image(MEDIUM)
        assert (await sybil.cancel(queued.id)).refunded == 3
        with pytest.raises(NotEnoughKudos):
            await sybil.transfer("collector", 1)
        me = await sybil.me()
        assert (me.kudos, me.unspent_grants, me.transferable) == (GRANT, GRANT, 0)

    # the grant still pays for jobs, spent first
    async with (
        AsyncClient(live.url, keys[1]) as sybil,
        FakeWorker(live.url, "honest") as worker,
    ):
        created = await sybil.submit_image(MEDIUM)
        job = await worker.link.pop(CAPS, wait=10)
        assert job is not None and job.id == created.id
        await worker.link.submit(job, job.params.seeds(), job_pngs(job))
        assert (await sybil.wait(created.id)).state == "done"
        # a rating reward is granted kudos too: spendable, not transferable
        assert (await sybil.rate(created.id, 0, 9)).kudos_earned == 1
        me = await sybil.me()
        assert (me.kudos, me.spent, me.unspent_grants, me.transferable) == (98, 3, 98, 0)
        with pytest.raises(NotEnoughKudos):
            await sybil.transfer("collector", 1)

    async with AsyncClient(live.url, collector_key) as collector:
        assert (await collector.me()).kudos == GRANT
    audit = await live.store.ledger.audit()
    assert (audit["unbalanced_entries"], audit["balance_rows_off"], audit["grants_off"]) == (
        0,
        0,
        0,
    )
