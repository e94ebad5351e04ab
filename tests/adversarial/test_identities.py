"""Finding 3 of issue 26, "Identities cost nothing": a paused AI Horde worker served again
under a new name at once; three pop-and-`faulted` calls failed any job that was not
signed-only for its requester; a requester could dispute every result, get every refund
and keep the images.

The attacker holds an API key and plain HTTP, as an AI Horde bridge does. Against a real
coordinator: new worker names run out (the account's cap, the registration rate limit);
give-backs in a row pause the worker and its owner, so a fresh name gets 403 too (a native
worker's drains do not count); the job it gave back twice waits for another owner's
worker, which finishes it; disputes stop at
the share and the daily cap, and a disputed image is gone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from client.sdk import AsyncClient
from coordinator.config import DEFAULT_RATE_LIMITS, CoordinatorConfig, RateLimit
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.coordinator.http.test_horde import Horde, request, webp
from tests.fakes import CAPS, FakeWorker, register_accounts
from worker.errors import CoordinatorRejected

AppFactory = Callable[..., Awaitable[LiveApp]]


@pytest.fixture
async def make_app(coordinator_config: CoordinatorConfig) -> AsyncIterator[AppFactory]:
    runners: list[Any] = []

    async def make(**overrides: Any) -> LiveApp:
        runner, app = await start_app(dataclasses.replace(coordinator_config, **overrides))
        runners.append(runner)
        return app

    yield make
    for runner in runners:
        await runner.cleanup()


def _pop(name: str) -> dict[str, Any]:
    return {"name": name, "models": ["tiny"], "max_pixels": 512 * 512, "amount": 1}


async def test_worker_names_run_out(make_app: AppFactory) -> None:
    live = await make_app()
    (key,) = await register_accounts(live.url, "farmer")
    farmer = Horde(live.url, key)
    for i in range(20):  # --max-workers-per-account
        assert (await farmer.ok("POST", "/v2/generate/pop", _pop(f"name{i}")))["id"] is None
    status, refused = await farmer.call("POST", "/v2/generate/pop", _pop("name20"))
    assert status == 403 and "--max-workers-per-account 20" in refused["message"], refused
    # the names it has keep working
    assert (await farmer.ok("POST", "/v2/generate/pop", _pop("name0")))["id"] is None

    # a new name is a registration: the `worker` rate limit (here 3 at once) applies
    tight = dict(DEFAULT_RATE_LIMITS)
    tight["worker"] = RateLimit(1 / 3600, 3, 1 / 3600, 3)
    limited = await make_app(rate_limits=tight)  # (on the same database)
    (key,) = await register_accounts(limited.url, "farmer2")
    farmer = Horde(limited.url, key)
    for i in range(3):
        await farmer.ok("POST", "/v2/generate/pop", _pop(f"name{i}"))
    status, refused = await farmer.call("POST", "/v2/generate/pop", _pop("name3"))
    assert status == 429, refused
    await farmer.ok("POST", "/v2/generate/pop", _pop("name0"))


async def test_give_backs_pause_the_owner_and_cannot_fail_a_job(make_app: AppFactory) -> None:
    live = await make_app()
    alice_key, griefer_key, honest_key = await register_accounts(
        live.url, "alice", "griefer", "honest"
    )
    alice, griefer = Horde(live.url, alice_key), Horde(live.url, griefer_key)
    first = await alice.ok("POST", "/v2/generate/async", request(), 202)
    second = await alice.ok("POST", "/v2/generate/async", request(seed="12"), 202)

    async def fault(name: str) -> str:
        leased = await griefer.ok("POST", "/v2/generate/pop", _pop(name))
        assert leased["id"] is not None, leased
        body = {"id": leased["id"], "seed": 11, "state": "faulted", "generation": "Faulted"}
        assert await griefer.ok("POST", "/v2/generate/submit", body) == {"reward": 0.0}
        return str(leased["id"])

    # the griefer's owner gave the first job back twice: its next pop gets the other job
    assert [await fault("grief") for _ in range(3)] == [first["id"], first["id"], second["id"]]
    # three give-backs in a row paused it; a fresh name of the same owner is paused too
    for name in ("grief", "fresh name"):
        status, refused = await griefer.call("POST", "/v2/generate/pop", _pop(name))
        assert status == 403 and "paused" in refused["message"], (name, refused)
    # the first job did not fail for alice: it waits, and another owner's worker serves it
    check = await alice.ok("GET", f"/v2/generate/check/{first['id']}")
    assert check["faulted"] is False and check["done"] is False, check
    honest = Horde(live.url, honest_key)
    leased = await honest.ok("POST", "/v2/generate/pop", _pop("honest"))
    assert leased["id"] == first["id"]
    body = {"id": first["id"], "seed": 11, "state": "ok", "generation": webp((9, 9, 9))}
    await honest.ok("POST", "/v2/generate/submit", body)
    assert (await alice.ok("GET", f"/v2/generate/check/{first['id']}"))["done"] is True


async def _served(live: LiveApp, alice: Horde, bridge: Horde, count: int) -> list[str]:
    """`count` jobs of alice's that bridge's AI Horde worker finished; their ids."""
    done = []
    for i in range(count):
        job = await alice.ok("POST", "/v2/generate/async", request(seed=str(i)), 202)
        leased = await bridge.ok("POST", "/v2/generate/pop", _pop("bridge"))
        assert leased["id"] == job["id"]
        body = {"id": job["id"], "seed": i, "state": "ok", "generation": webp((i, 9, 9))}
        await bridge.ok("POST", "/v2/generate/submit", body)
        done.append(str(job["id"]))
    return done


async def _dispute(url: str, key: str, job_id: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/v1/jobs/{job_id}/dispute",
            json={"reason": "noise"},
            headers={"apikey": key},
        ) as resp,
    ):
        return resp.status, await resp.json()


async def _image_status(url: str, key: str, job_id: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v1/jobs/{job_id}/images/0", headers={"apikey": key}) as resp,
    ):
        return resp.status


async def test_disputes_are_limited_and_give_up_the_images(make_app: AppFactory) -> None:
    live = await make_app()
    alice_key, bridge_key = await register_accounts(live.url, "alice", "bridge")
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, bridge_key)
    jobs = await _served(live, alice, bridge, 5)
    assert await _image_status(live.url, alice_key, jobs[0]) == 200
    status, refund = await _dispute(live.url, alice_key, jobs[0])
    assert status == 200 and refund["refunded"] > 0, refund
    # the requester who disputed does not keep the image
    assert await _image_status(live.url, alice_key, jobs[0]) == 404
    status, refused = await _dispute(live.url, alice_key, jobs[1])
    assert status == 403 and "--max-dispute-share" in refused["error"]["message"], refused
    assert await _image_status(live.url, alice_key, jobs[1]) == 200

    # and at most --max-disputes-per-day, whatever the share
    capped = await make_app(max_dispute_share=1.0, max_disputes_per_day=2)
    alice_key, bridge_key = await register_accounts(capped.url, "alice2", "bridge2")
    jobs = await _served(capped, Horde(capped.url, alice_key), Horde(capped.url, bridge_key), 3)
    for job_id in jobs[:2]:
        assert (await _dispute(capped.url, alice_key, job_id))[0] == 200
    status, refused = await _dispute(capped.url, alice_key, jobs[2])
    assert status == 403 and "--max-disputes-per-day 2" in refused["error"]["message"], refused


async def test_a_native_worker_that_gives_jobs_back_is_paused(make_app: AppFactory) -> None:
    live = await make_app()
    (alice_key,) = await register_accounts(live.url, "alice")
    async with AsyncClient(live.url, alice_key) as alice:
        for seed in range(3):
            await alice.submit_image(ImageParams(prompt="x", width=64, height=64, seed=seed))
    async with FakeWorker(live.url, "flaky") as worker:

        async def give_back(reason: str) -> str:
            job = await worker.link.pop(CAPS, wait=0)
            assert job is not None
            await worker.link.fail(job.id, reason)
            return job.id

        # a drain does not count: three in a row leave it serving
        drained = [await give_back("worker shutting down") for _ in range(3)]
        assert drained[0] == drained[1] != drained[2]  # its owner gave the first back twice
        for _ in range(3):
            await give_back("EngineCrashed: out of memory")
        with pytest.raises(CoordinatorRejected) as paused:
            await worker.link.pop(CAPS, wait=0)
        assert paused.value.status == 403 and "in a row" in str(paused.value)
