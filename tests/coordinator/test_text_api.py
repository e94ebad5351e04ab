"""Text jobs through the coordinator's HTTP API, with a scripted gateway on the real link."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from client.errors import ApiError, JobFailed
from client.sdk import AsyncClient
from coordinator.jobs.text import split_kudos
from protocol.signing import Identity
from protocol.text import LeasedTextJob, TextModel, TextParams
from tests.conftest import LiveApp
from worker.common.link import CoordinatorLink
from worker.errors import CoordinatorRejected, LeaseLost

# big enough that the split of the charge is visible in whole kudos
MODEL = TextModel(name="tiny-llm", blocks=4, parameters=70_000_000_000, max_context=2048)
PEER_A = "12D3KooWAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
PEER_UNLINKED = "12D3KooWBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


class Party:
    """A worker identity on the real link (a gateway or a block server)."""

    def __init__(self, url: str, name: str, api_key: str | None) -> None:
        self.link = CoordinatorLink(url, Identity.generate(), name, api_key)

    async def pop(self, wait: float = 5.0) -> LeasedTextJob:
        job = await self.link.pop_text([MODEL], wait)
        assert job is not None
        return job


@pytest.fixture
async def grid(live: LiveApp) -> AsyncIterator[dict[str, Any]]:
    async with AsyncClient(live.url) as anon:
        keys = {name: (await anon.register(name)).api_key for name in ("alice", "donor", "bob")}
    parties = {
        "gateway": Party(live.url, "gateway", keys["donor"]),
        "server": Party(live.url, "server", keys["bob"]),
    }
    for party in parties.values():
        await party.link.register()
    await parties["server"].link.link_peer(PEER_A)
    clients = {name: AsyncClient(live.url, key) for name, key in keys.items()}
    try:
        yield {"live": live, "keys": keys, **parties, **clients}
    finally:
        for party in parties.values():
            await party.link.aclose()
        for client in clients.values():
            await client.aclose()


async def offer(gateway: Party) -> None:
    # a pop with no queued job still records the model as served
    assert await gateway.link.pop_text([MODEL], wait=0) is None


async def test_chat_job_streams_text_and_settles_in_one_entry(grid: dict[str, Any]) -> None:
    live, alice, gateway = grid["live"], grid["alice"], grid["gateway"]
    await offer(gateway)
    params = TextParams(messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    pieces: list[str] = []
    requester = asyncio.create_task(alice.complete(params, pieces.append))
    job = await gateway.pop()
    assert job.model == "tiny-llm" and job.params.seed is not None  # fixed at submit
    assert (await gateway.link.text_delta(job.id, 0, "Hel")).length == 3
    assert (await gateway.link.text_delta(job.id, 0, "Hel")).length == 3  # a retry is harmless
    with pytest.raises(LeaseLost, match="offset"):
        await gateway.link.text_delta(job.id, 7, "x")
    await gateway.link.text_delta(job.id, 3, "lo")
    spans = [
        {"peer_id": PEER_A, "start": 0, "end": 2, "tokens": 150},
        {"peer_id": PEER_UNLINKED, "start": 2, "end": 4, "tokens": 150},
    ]
    accepted = await gateway.link.submit_text(job, "Hello", "stop", 50, 100, spans)
    final = await asyncio.wait_for(requester, 10)
    assert final.state == "done" and final.text == "Hello" and "".join(pieces) == "Hello"
    # paid block-tokens: server 2 x 150, gateway 150 (the unlinked server is not charged)
    # 450 x 70 (billions) / 4000 = 7.9 -> 8 kudos, split 300:150 -> 5 and 3
    assert accepted.kudos_charged == 8 and accepted.kudos_earned == 3
    assert final.kudos_cost == 8 and final.prompt_tokens == 50 and final.completion_tokens == 100
    balances = await live.store.balances()
    assert balances["alice"] == 100 - 8
    # new workers are untrusted: half of their pay (rounded down) waits for verification
    server_id, gateway_id = grid["server"].link.worker_id, grid["gateway"].link.worker_id
    assert balances["bob"] == 100 + 5 - 2 and balances[f"pending:{server_id}"] == 2
    assert balances["donor"] == 100 + 3 - 1 and balances[f"pending:{gateway_id}"] == 1
    assert balances["system:escrow"] == 0
    audit = await live.store.ledger_audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0


async def test_a_failed_job_refunds_and_the_requester_is_told(grid: dict[str, Any]) -> None:
    live, alice, gateway = grid["live"], grid["alice"], grid["gateway"]
    await offer(gateway)
    requester = asyncio.create_task(alice.complete(TextParams(prompt="x", max_tokens=10)))
    job = await gateway.pop()
    status = await gateway.link.fail_text(job.id, "no server serves blocks 2:4", retry=False)
    assert status.state == "failed"
    with pytest.raises(JobFailed, match="blocks 2:4"):
        await asyncio.wait_for(requester, 10)
    assert (await live.store.balances())["alice"] == 100


async def test_a_retryable_failure_requeues_and_restarts_the_text(grid: dict[str, Any]) -> None:
    alice, gateway = grid["alice"], grid["gateway"]
    await offer(gateway)
    created = await alice.submit_text(TextParams(prompt="x", max_tokens=10, temperature=0.0))
    job = await gateway.pop()
    await gateway.link.text_delta(job.id, 0, "par")
    assert (await gateway.link.fail_text(job.id, "server died", retry=True)).state == "queued"
    again = await gateway.pop()
    assert again.id == created.id and (await alice.text_job(created.id)).text == ""
    await gateway.link.submit_text(again, "done", "length", 1, 10, [])
    assert (await alice.text_job(created.id)).text == "done"


async def test_quote_tells_the_reservation_without_submitting(grid: dict[str, Any]) -> None:
    live, gateway = grid["live"], grid["gateway"]
    await offer(gateway)
    params = TextParams(messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    headers = {"apikey": grid["keys"]["alice"]}
    body = params.model_dump(exclude_none=True)
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.post(f"{live.url}/api/v1/quotes/text", json=body) as resp,
    ):
        quote = await resp.json()
    # (2 + 32 + 32 + 100 tokens) x (4 + 1 blocks) x 70 (billions) / 4000 = 14.5 -> 15
    assert quote["kudos_cost"] == 15 and quote["available"] == 100 and quote["affordable"]
    assert quote["queue_length"] == 0 and quote["queue_position"] == 0
    assert (await live.store.balances())["alice"] == 100
    created = await grid["alice"].submit_text(params)
    assert created.kudos_cost == 15


async def test_cancel_refunds_and_stops_the_gateway(grid: dict[str, Any]) -> None:
    live, alice, gateway = grid["live"], grid["alice"], grid["gateway"]
    await offer(gateway)
    created = await alice.submit_text(TextParams(prompt="x", max_tokens=50))
    assert (await live.store.balances())["alice"] == 100 - created.kudos_cost
    job = await gateway.pop()
    await gateway.link.text_delta(job.id, 0, "so far")
    cancelled = await alice.cancel_text(job.id)
    assert cancelled.refunded == created.kudos_cost
    assert (await live.store.balances())["alice"] == 100
    # the gateway learns at its next piece of text, and cannot finish it
    with pytest.raises(LeaseLost):
        await gateway.link.text_delta(job.id, 6, " more")
    with pytest.raises(LeaseLost):
        await gateway.link.submit_text(job, "so far", "stop", 1, 2, [])
    with pytest.raises(ApiError, match="already cancelled"):
        await alice.cancel_text(job.id)
    # nobody else can cancel alice's job
    other = await alice.submit_text(TextParams(prompt="x", max_tokens=5))
    with pytest.raises(ApiError, match="no text job"):
        await grid["bob"].cancel_text(other.id)
    assert (await live.store.ledger_audit())["unbalanced_entries"] == 0


async def test_bad_reports_and_signatures_are_refused(grid: dict[str, Any]) -> None:
    alice, gateway, server = grid["alice"], grid["gateway"], grid["server"]
    await offer(gateway)
    await alice.submit_text(TextParams(prompt="x", max_tokens=10))
    job = await gateway.pop()
    too_far = [{"peer_id": PEER_A, "start": 0, "end": 9, "tokens": 5}]
    with pytest.raises(CoordinatorRejected, match=r"spans\[0\]\.end"):
        await gateway.link.submit_text(job, "t", "stop", 1, 5, too_far)
    with pytest.raises(CoordinatorRejected, match="completion_tokens"):
        await gateway.link.submit_text(job, "t", "stop", 1, 11, [])
    # another worker cannot finish it, and a forged signature is refused
    with pytest.raises(LeaseLost):
        await server.link.submit_text(job, "t", "stop", 1, 5, [])
    forged = job.model_copy(update={"params_hash": "0" * 64})
    with pytest.raises(CoordinatorRejected, match="signature"):
        await gateway.link.submit_text(forged, "t", "stop", 1, 5, [])
    # a peer id belongs to the worker that linked it first
    with pytest.raises(LeaseLost, match="linked to another worker"):
        await gateway.link.link_peer(PEER_A)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        (
            {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            {
                "model": "tiny-llm",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 100000,
            },
            "max_tokens",
        ),
        (
            {"model": "tiny-llm", "messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role",
        ),
        ({"model": "tiny-llm", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "tiny-llm", "messages": []}, "messages"),
        ({"model": "tiny-llm", "messages": "hi"}, "messages"),
        ({"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        (
            {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "tools": []},
            "tools",
        ),
    ],
)
async def test_openai_bad_input_names_the_field(
    grid: dict[str, Any], body: dict[str, Any], field: str
) -> None:
    await offer(grid["gateway"])
    headers = {"Authorization": f"Bearer {grid['keys']['alice']}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{grid['live'].url}/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert field in [f["field"] for f in error["fields"]], error


async def test_openai_chat_completions_plain_and_streaming(grid: dict[str, Any]) -> None:
    live, gateway = grid["live"], grid["gateway"]
    await offer(gateway)
    headers = {"Authorization": f"Bearer {grid['keys']['alice']}"}
    body = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    async def serve(text: str) -> None:
        job = await gateway.pop()
        await gateway.link.text_delta(job.id, 0, text[:2])
        await gateway.link.text_delta(job.id, 2, text[2:])
        await gateway.link.submit_text(job, text, "length", 3, 5, [])

    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{live.url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny-llm"]
        serving = asyncio.create_task(serve("abcde"))
        async with http.post(f"{live.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            completion = await resp.json()
        await serving
        assert completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"] == {"role": "assistant", "content": "abcde"}
        assert completion["choices"][0]["finish_reason"] == "length"
        assert completion["usage"] == {
            "prompt_tokens": 3,
            "completion_tokens": 5,
            "total_tokens": 8,
        }

        serving = asyncio.create_task(serve("vwxyz"))
        chunks = []
        async with http.post(
            f"{live.url}/v1/chat/completions", json={**body, "stream": True}
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    chunks.append(line[6:])
        await serving
    assert chunks[-1] == "[DONE]"
    decoded = [json.loads(c) for c in chunks[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in decoded)
    assert decoded[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in decoded)
    assert text == "vwxyz" and decoded[-1]["choices"][0]["finish_reason"] == "length"


async def test_no_served_model_and_anonymous_limits(grid: dict[str, Any]) -> None:
    async with AsyncClient(grid["live"].url) as anon:
        with pytest.raises(ApiError, match="no gateway is serving") as error:
            await anon.submit_text(TextParams(prompt="x"))
        assert error.value.fields[0][0] == "model"
        await offer(grid["gateway"])
        with pytest.raises(ApiError, match="anonymous") as error:
            await anon.submit_text(TextParams(prompt="x", max_tokens=1000))
        assert error.value.fields[0][0] == "max_tokens"
        created = await anon.submit_text(TextParams(prompt="x", max_tokens=10))
    # someone else's key cannot see alice's jobs; anonymous jobs are visible by id
    mine = await grid["alice"].submit_text(TextParams(prompt="x", max_tokens=10))
    with pytest.raises(ApiError, match="no text job"):
        await grid["bob"].text_job(mine.id)
    assert (await grid["bob"].text_job(created.id)).state == "queued"


def test_split_kudos_is_exact_and_proportional() -> None:
    assert split_kudos(8, [300, 150]) == [5, 3]
    assert split_kudos(10, [1, 1, 1]) == [4, 3, 3]
    assert split_kudos(0, [5, 5]) == [0, 0]
    assert split_kudos(7, [0, 0]) == [0, 0]
    assert sum(split_kudos(1001, [3, 7, 11, 13])) == 1001
