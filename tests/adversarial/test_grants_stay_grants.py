"""Issue 26, findings 1 and 2 ("No kudos from nothing"), through real HTTP, each through AI
Horde's worker door and the native v1 worker protocol.

1. Uptime farming: throwaway worker names, each serving one cheap job of its own owner and
   then only polling, made 88 transferable kudos in 40 s with a 10 s uptime period.
2. Grant funnel: sybil accounts spent their grants on jobs that a colluder's garbage worker
   served (solid-colour images), and the pay landed as transferable kudos: 3 sybils turned
   300 granted kudos into 300 transferable ones.

The rule (README "Threat model: no kudos from nothing"): transferable kudos are created only
by an explicit operator action, and pay moves them only when they funded the job; what grants
paid reaches the worker's owner as grants, and uptime goes only to verified work, as grants.
The coordinator's clock is injected: 40 s of polling take no real time.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from PIL import Image

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.earnings import earn
from tests.fakes import CAPS, FakeWorker, job_pngs, register_accounts

NAMES = 8
SYBILS = 3
GRANT = 100  # CoordinatorConfig.new_account_grant
PERIOD = 10.0
# 64x64, 4 steps: 1 kudo (the cheapest job); 512x512, 50 steps: 25 kudos
CHEAP = {"width": 64, "height": 64, "steps": 4, "sampler_name": "k_euler_a", "seed": "11"}
BIG = {"width": 512, "height": 512, "steps": 50, "sampler_name": "k_euler_a", "seed": "5"}
BIG_COST = 25


class Clock:
    """The coordinator's clock: near real time (native workers sign registrations with the
    real time), moved only by the test."""

    def __init__(self) -> None:
        self.now = math.floor(time.time() / 100) * 100 - 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def grid(coordinator_config: CoordinatorConfig) -> AsyncIterator[tuple[LiveApp, Clock]]:
    """A coordinator with default flags but a 10 s uptime period, behind a reverse proxy on
    127.0.0.1 (so that sybils register from different addresses)."""
    config = dataclasses.replace(
        coordinator_config, uptime_period=PERIOD, trusted_proxies=("127.0.0.1/32",)
    )
    runner, app = await start_app(config)
    clock = Clock()
    app.store.db.clock = clock
    try:
        yield app, clock
    finally:
        await runner.cleanup()


async def _call(url: str, key: str, method: str, path: str, body: object = None) -> object:
    headers = {"apikey": key, "Client-Agent": "idlegrid-tests:1:loopback"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url + path, json=body, headers=headers) as resp,
    ):
        assert resp.status < 300, (path, resp.status, await resp.text())
        answer: object = await resp.json()
        return answer


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


def _webp(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(out, format="WEBP", lossless=True)
    return base64.b64encode(out.getvalue()).decode()


class HordeWorker:
    """An AI Horde worker: a name, its owner's API key, plain HTTP."""

    def __init__(self, url: str, key: str, name: str) -> None:
        self.url, self.key = url, key
        self.pop_body = {"name": name, "models": ["tiny"], "max_pixels": 512 * 512}

    async def pop(self) -> dict[str, object]:
        popped = await _call(self.url, self.key, "POST", "/api/v2/generate/pop", self.pop_body)
        assert isinstance(popped, dict)
        return popped

    async def serve(self, job: dict[str, object]) -> None:
        """Garbage: one solid colour at the job's size."""
        payload = job["payload"]
        assert isinstance(payload, dict)
        body = {
            "id": job["id"],
            "seed": 1,
            "state": "ok",
            "generation": _webp(payload["width"], payload["height"]),
        }
        await _call(self.url, self.key, "POST", "/api/v2/generate/submit", body)


async def _me(url: str, key: str) -> tuple[int, int, int]:
    """(kudos, unspent grants, transferable) of the account of `key`."""
    async with AsyncClient(url, key) as client:
        me = await client.me()
    return me.kudos, me.unspent_grants, me.transferable


async def _reasons(url: str, key: str) -> set[str]:
    """The reasons of the ledger entries of the account of `key`."""
    page = await _call(url, key, "GET", "/api/v1/accounts/me/history?limit=100")
    assert isinstance(page, dict)
    return {entry["reason"] for entry in page["entries"]}


async def _books_hold(app: LiveApp) -> None:
    audit = await app.store.ledger.audit()
    assert (audit["unbalanced_entries"], audit["balance_rows_off"], audit["grants_off"]) == (
        0,
        0,
        0,
    ), audit
    assert audit["transferable_excess"] == 0, audit


async def _end_holds(app: LiveApp, clock: Clock) -> None:
    """Let every held pay come due (AI Horde workers' dispute hold) and release it."""
    clock.now += app.store.db.config.horde_hold_seconds + 1
    await app.store.image_jobs.release_held()


async def _poll_for(clock: Clock, seconds: float, poll: Callable[[], Awaitable[None]]) -> None:
    """Every name polls every 3 s (never a gap over the uptime grace) for `seconds`."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now += 3.0
        await poll()


# --- finding 1: uptime farming -------------------------------------------------------------


async def test_throwaway_ai_horde_names_that_only_poll_earn_nothing_transferable(
    grid: tuple[LiveApp, Clock],
) -> None:
    app, clock = grid
    (owner,) = await register_accounts(app.url, "farmer")
    for _ in range(NAMES):  # one cheap job each, of their own owner
        await _call(
            app.url,
            owner,
            "POST",
            "/api/v2/generate/async",
            {"prompt": "x", "params": CHEAP, "models": ["tiny"]},
        )
    names = [HordeWorker(app.url, owner, f"throwaway-{i}") for i in range(NAMES)]
    for name in names:
        job = await name.pop()
        assert job["id"] is not None, job
        await name.serve(job)

    async def poll() -> None:
        for name in names:
            assert (await name.pop())["id"] is None

    await _poll_for(clock, 40.0, poll)
    await _end_holds(app, clock)
    # the 8 kudos it paid itself came back, as grants: nothing was minted for the polling
    assert await _me(app.url, owner) == (GRANT, GRANT, 0)
    assert "uptime" not in await _reasons(app.url, owner)
    await _books_hold(app)


async def test_throwaway_native_workers_that_only_poll_earn_nothing_transferable(
    grid: tuple[LiveApp, Clock],
) -> None:
    app, clock = grid
    (owner,) = await register_accounts(app.url, "farmer")
    workers = [FakeWorker(app.url, f"throwaway-{i}", owner) for i in range(NAMES)]
    try:
        async with AsyncClient(app.url, owner) as farmer:
            for worker in workers:
                await worker.link.register()
                await farmer.submit_image(ImageParams(prompt="x", width=64, height=64, steps=4))
                job = await worker.link.pop(CAPS, wait=0)
                assert job is not None
                await worker.link.submit(job, job.params.seeds(), job_pngs(job))

        async def poll() -> None:
            for worker in workers:
                assert await worker.link.pop(CAPS, wait=0) is None

        await _poll_for(clock, 40.0, poll)
    finally:
        for worker in workers:
            await worker.link.aclose()
    # the 8 kudos it paid itself came back (1 kudo each: nothing held), as grants
    assert await _me(app.url, owner) == (GRANT, GRANT, 0)
    assert "uptime" not in await _reasons(app.url, owner)
    await _books_hold(app)


# --- finding 2: the grant funnel -------------------------------------------------------------


async def _sybils(url: str) -> list[str]:
    # documentation addresses (RFC 5737), only ever written into a header
    return [await _register(url, f"sybil{i}", f"203.0.113.{i + 1}") for i in range(SYBILS)]


async def test_sybil_grants_through_a_colluding_ai_horde_worker_stay_grants(
    grid: tuple[LiveApp, Clock],
) -> None:
    app, clock = grid
    sybils = await _sybils(app.url)
    colluder = await _register(app.url, "colluder", "198.51.100.1")
    garbage = HordeWorker(app.url, colluder, "garbage")
    for sybil in sybils:
        for _ in range(GRANT // BIG_COST):
            await _call(
                app.url,
                sybil,
                "POST",
                "/api/v2/generate/async",
                {"prompt": "x", "params": BIG, "models": ["tiny"]},
            )
            job = await garbage.pop()
            assert job["id"] is not None, job
            await garbage.serve(job)
        assert await _me(app.url, sybil) == (0, 0, 0)
    await _end_holds(app, clock)  # the full price is released after the hold
    kudos, unspent, transferable = await _me(app.url, colluder)
    assert (kudos, unspent, transferable) == (GRANT + SYBILS * GRANT, GRANT + SYBILS * GRANT, 0)
    await _books_hold(app)


async def test_sybil_grants_through_a_colluding_native_worker_stay_grants(
    grid: tuple[LiveApp, Clock],
) -> None:
    app, clock = grid
    sybils = await _sybils(app.url)
    colluder = await _register(app.url, "colluder", "198.51.100.1")
    async with FakeWorker(app.url, "garbage", colluder) as garbage:
        for sybil in sybils:
            async with AsyncClient(app.url, sybil) as client:
                for _ in range(GRANT // BIG_COST):
                    await client.submit_image(
                        ImageParams(prompt="x", width=512, height=512, steps=50, seed=5)
                    )
                    job = await garbage.link.pop(CAPS, wait=0)
                    assert job is not None
                    clock.now += 1.0  # slow enough for the speed check
                    await garbage.link.submit(job, job.params.seeds(), job_pngs(job))
            assert await _me(app.url, sybil) == (0, 0, 0)
    kudos, unspent, transferable = await _me(app.url, colluder)
    # 13 of each 25 paid now, 12 held pending a check that never comes: all of it grants
    assert (kudos, unspent, transferable) == (GRANT + 12 * 13, GRANT + 12 * 13, 0)
    await _books_hold(app)


async def test_pay_keeps_the_share_of_what_funded_the_job(grid: tuple[LiveApp, Clock]) -> None:
    """Pay from earned or transferred kudos stays transferable; in a job funded partly by
    grants, that part arrives as grants. Refunds give back what paid."""
    app, clock = grid
    requester, owner = await register_accounts(app.url, "requester", "owner")
    await earn(app.store, "requester", 40)  # the operator's mint: transferable
    big = ImageParams(prompt="x", width=512, height=512, steps=50, seed=5)  # 25 kudos
    small = ImageParams(prompt="x", width=512, height=512, steps=20, seed=5)  # 10 kudos
    async with (
        AsyncClient(app.url, requester) as client,
        FakeWorker(app.url, "honest", owner) as worker,
    ):
        for _ in range(3):  # 75 of the 100 grants
            await client.submit_image(big)
        cancelled = await client.submit_image(small)  # 10 grants, 15 left ...
        mixed = await client.submit_image(big)  # ... so 15 grants and 10 transferable
        await client.cancel(cancelled.id)  # its 10 grants come back as grants
        assert await _me(app.url, requester) == (140 - 100, 10, 30)
        for _ in range(4):
            job = await worker.link.pop(CAPS, wait=0)
            assert job is not None
            clock.now += 1.0  # slow enough for the speed check
            await worker.link.submit(job, job.params.seeds(), job_pngs(job))
        assert (await client.job(mixed.id)).state == "done"
    # each job pays 13 now and holds 12 (the worker is untrusted); the grant-funded ones
    # all as grants, the mixed one 15/25 grants: 8 of the 13 now (the held part's share is
    # rounded down), so 5 of its 10 transferable kudos arrive now and 5 wait, held
    assert await _me(app.url, owner) == (GRANT + 4 * 13, GRANT + 3 * 13 + 8, 5)
    balances = await app.store.ledger.balances()
    assert balances[f"pending:{worker.link.worker_id}"] == 4 * 12
    await _books_hold(app)
