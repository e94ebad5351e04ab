"""Finding 8, replayable registration: "the account binding is not signed: replaying a
captured registration with a thief's API key moves the worker's earnings to the thief."

The thief reads the victim worker's registration off the wire (a wiretap between the
worker and the coordinator) and sends it again: with its own API key, as it was, and with
a fresh challenge of its own spliced in. Each is refused, and the worker keeps both its
token and its owner.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from client.sdk import AsyncClient
from tests.adversarial.wiretap import Wiretap
from tests.conftest import LiveApp
from tests.fakes import CAPS, FakeWorker

REGISTER = "/api/v1/workers/register"


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as resp,
    ):
        return resp.status, await resp.json()


async def _owner(live: LiveApp, worker_id: str) -> int:
    row = await live.store.workers.worker_row(worker_id)
    assert row is not None
    return int(row.account_id)


async def test_a_captured_registration_cannot_be_replayed(live: LiveApp) -> None:
    async with AsyncClient(live.url) as anon:
        alice_key = (await anon.register("alice")).api_key
        mallory_key = (await anon.register("mallory")).api_key
    alice = await live.store.accounts.account_by_key(alice_key)
    assert alice is not None
    async with Wiretap(live.url) as tap, FakeWorker(tap.url, "victim", alice_key) as victim:
        captured = tap.last(REGISTER)
        # the API key travels in a header, never in the signed body
        assert alice_key not in captured.body.decode()
        worker_id = victim.link.worker_id
        assert worker_id is not None and await _owner(live, worker_id) == alice.id

        # 1. the body as captured, with the thief's API key: earnings would go to mallory
        status, answer = await _post(live.url + REGISTER, captured.body, {"apikey": mallory_key})
        assert status == 401, answer
        assert "signed for another account" in answer["error"]["message"]

        # 2. the body as captured, with the victim's key (a stolen header too): it would
        # hand the thief a fresh token for the victim's worker
        status, answer = await _post(live.url + REGISTER, captured.body, captured.headers)
        assert status == 401, answer
        assert "already used" in answer["error"]["message"]

        # 3. a fresh challenge of the thief's own spliced into the captured body
        async with (
            aiohttp.ClientSession() as http,
            http.post(live.url + "/api/v1/workers/challenge", json={}) as resp,
        ):
            assert resp.status == 200
            fresh = (await resp.json())["nonce"]
        spliced = json.dumps({**json.loads(captured.body), "nonce": fresh}).encode()
        status, answer = await _post(live.url + REGISTER, spliced, {"apikey": mallory_key})
        assert status == 401, answer

        # nothing moved: alice still owns the worker, and its token still works
        assert await _owner(live, worker_id) == alice.id
        assert await victim.link.pop(CAPS, wait=0) is None
