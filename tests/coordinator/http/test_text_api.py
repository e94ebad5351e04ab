"""Text jobs through the coordinator's HTTP API, with a scripted gateway on the real link."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client.errors import ApiError, JobFailed
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.economy.text_settlement import grant_parts, split_kudos
from coordinator.http.state import CONFIG, REQUESTER_KEY
from coordinator.http.text import requester_tag
from protocol.signing import Identity
from protocol.text import (
    BUILTIN_TEXT_MODELS,
    ChatMessage,
    LeasedTextJob,
    TextModel,
    TextParams,
)
from tests.conftest import LiveApp, start_app
from worker.common.link import CoordinatorLink
from worker.errors import CoordinatorRejected, LeaseLost
from worker.llm.swarm.peer_proof import PeerKey

# the operator's catalog here: big enough that the split of the charge is visible in
# whole kudos
MODEL = TextModel(name="tiny-llm", blocks=4, parameters=70_000_000_000, max_context=2048)
OTHER = TextModel(name="other", blocks=2, parameters=1_000_000, max_context=512)
PEER_A, PEER_B, PEER_UNLINKED = PeerKey.generate(), PeerKey.generate(), PeerKey.generate()


def cover(tokens: int) -> list[dict[str, Any]]:
    """A usage report: PEER_A ran all 4 blocks for `tokens` tokens."""
    return [{"peer_id": PEER_A.peer_id, "start": 0, "end": 4, "tokens": tokens}]


@pytest.fixture
def coordinator_config(tmp_path: Path, database_url: str) -> CoordinatorConfig:
    return CoordinatorConfig(
        data_dir=tmp_path / "data",
        database_url=database_url,
        port=0,
        text_models=(MODEL, OTHER),
        default_text_model=MODEL.name,
    )


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
    await parties["server"].link.link_peer(PEER_B)
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
    params = TextParams(messages=[ChatMessage(role="user", content="hi")], max_tokens=100)
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
        {"peer_id": PEER_A.peer_id, "start": 0, "end": 2, "tokens": 149},
        {"peer_id": PEER_B.peer_id, "start": 2, "end": 4, "tokens": 149},
    ]
    accepted = await gateway.link.submit_text(job, "Hello", "stop", 50, 100, spans)
    final = await asyncio.wait_for(requester, 10)
    assert final.state == "done" and final.text == "Hello" and "".join(pieces) == "Hello"
    # block-tokens: bob's two servers 2 x 149 + 2 x 149, the gateway 150 (its head);
    # 746 x 70 (billions) / 4000 = 13.06 -> 14 kudos, split 596:150 -> 11 and 3
    assert accepted.kudos_charged == 14 and accepted.kudos_earned == 3
    assert final.kudos_cost == 14 and final.prompt_tokens == 50 and final.completion_tokens == 100
    balances = await live.store.ledger.balances()
    assert balances["alice"] == 100 - 14
    # new workers are untrusted: half of their pay (rounded down) waits for verification
    server_id, gateway_id = grid["server"].link.worker_id, grid["gateway"].link.worker_id
    assert balances["bob"] == 100 + 11 - 5 and balances[f"pending:{server_id}"] == 5
    assert balances["donor"] == 100 + 3 - 1 and balances[f"pending:{gateway_id}"] == 1
    assert balances["system:escrow"] == 0
    audit = await live.store.ledger.audit()
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
    assert (await live.store.ledger.balances())["alice"] == 100


async def test_a_retryable_failure_requeues_and_restarts_the_text(grid: dict[str, Any]) -> None:
    alice, gateway = grid["alice"], grid["gateway"]
    await offer(gateway)
    created = await alice.submit_text(TextParams(prompt="x", max_tokens=10, temperature=0.0))
    job = await gateway.pop()
    await gateway.link.text_delta(job.id, 0, "par")
    assert (await gateway.link.fail_text(job.id, "server died", retry=True)).state == "queued"
    again = await gateway.pop()
    assert again.id == created.id and (await alice.text_job(created.id)).text == ""
    await gateway.link.submit_text(again, "done", "length", 1, 10, cover(10))
    assert (await alice.text_job(created.id)).text == "done"


async def test_quote_tells_the_reservation_without_submitting(grid: dict[str, Any]) -> None:
    live, gateway = grid["live"], grid["gateway"]
    await offer(gateway)
    params = TextParams(messages=[ChatMessage(role="user", content="hi")], max_tokens=100)
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
    assert (await live.store.ledger.balances())["alice"] == 100
    created = await grid["alice"].submit_text(params)
    assert created.kudos_cost == 15


async def test_cancel_refunds_and_stops_the_gateway(grid: dict[str, Any]) -> None:
    live, alice, gateway = grid["live"], grid["alice"], grid["gateway"]
    await offer(gateway)
    created = await alice.submit_text(TextParams(prompt="x", max_tokens=50))
    assert (await live.store.ledger.balances())["alice"] == 100 - created.kudos_cost
    job = await gateway.pop()
    await gateway.link.text_delta(job.id, 0, "so far")
    cancelled = await alice.cancel_text(job.id)
    assert cancelled.refunded == created.kudos_cost
    assert (await live.store.ledger.balances())["alice"] == 100
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
    assert (await live.store.ledger.audit())["unbalanced_entries"] == 0


async def test_bad_reports_and_signatures_are_refused(grid: dict[str, Any]) -> None:
    alice, gateway, server = grid["alice"], grid["gateway"], grid["server"]
    await offer(gateway)
    await alice.submit_text(TextParams(prompt="x", max_tokens=10))
    job = await gateway.pop()
    too_far = [{"peer_id": PEER_A.peer_id, "start": 0, "end": 9, "tokens": 5}]
    with pytest.raises(CoordinatorRejected, match=r"spans\[0\]\.end"):
        await gateway.link.submit_text(job, "t", "stop", 1, 5, too_far)
    with pytest.raises(CoordinatorRejected, match="completion_tokens"):
        await gateway.link.submit_text(job, "t", "stop", 1, 11, cover(11))
    # the spans must cover every block for the tokens claimed, and not many times over
    half = [{"peer_id": PEER_A.peer_id, "start": 0, "end": 2, "tokens": 5}]
    with pytest.raises(CoordinatorRejected, match="block 2 ran 0"):
        await gateway.link.submit_text(job, "t", "stop", 1, 5, half)
    # (6 tokens: at most 8 runs each, MAX_REPLAYS_PER_TOKEN)
    with pytest.raises(CoordinatorRejected, match="block 0 ran 49 tokens"):
        await gateway.link.submit_text(job, "t", "stop", 1, 5, cover(49))
    # only block servers linked to a worker can be named (and paid)
    unlinked = [{**cover(5)[0], "peer_id": PEER_UNLINKED.peer_id}]
    with pytest.raises(CoordinatorRejected, match="not linked"):
        await gateway.link.submit_text(job, "t", "stop", 1, 5, unlinked)
    # another worker cannot finish it, and a forged signature is refused
    with pytest.raises(LeaseLost):
        await server.link.submit_text(job, "t", "stop", 1, 5, [])
    forged = job.model_copy(update={"params_hash": "0" * 64})
    with pytest.raises(CoordinatorRejected, match="signature"):
        await gateway.link.submit_text(forged, "t", "stop", 1, 5, [])
    # replays are paid to who ran them, but the requester pays each token once:
    # 6 tokens x 5 blocks x 70 / 4000 = 0.5 -> 1 kudo
    replayed = await gateway.link.submit_text(job, "t", "stop", 1, 5, cover(24))
    assert replayed.kudos_charged == 1


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
        ({"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
        (
            {
                "model": "tiny-llm",
                "messages": [{"role": "user", "content": "hi"}],
                "stream_options": {"include_usage": True},
            },
            "stream_options",
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
        await gateway.link.submit_text(job, text, "length", 3, 5, cover(7))

    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{live.url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["tiny-llm", "other"]
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
            f"{live.url}/v1/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
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
    # include_usage: a last chunk of no choices and the usage, as OpenAI sends it
    assert decoded[-1]["choices"] == [] and decoded[-1]["usage"] == completion["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in decoded[:-1])
    assert text == "vwxyz" and decoded[-2]["choices"][0]["finish_reason"] == "length"


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


async def test_the_catalog_names_the_models_their_sizes_and_the_default(
    grid: dict[str, Any],
) -> None:
    live, gateway, alice = grid["live"], grid["gateway"], grid["alice"]
    # a gateway may offer only catalog models, with the catalog's sizes
    llm = BUILTIN_TEXT_MODELS[0]
    with pytest.raises(CoordinatorRejected) as refused:
        await gateway.link.pop_text([OTHER, llm], wait=0)
    assert refused.value.status == 400
    assert "model 'llm' is not in this coordinator's catalog (it prices only: tiny-llm, other)" in (
        str(refused.value)
    )
    bigger = MODEL.model_copy(update={"max_context": 4096})
    with pytest.raises(CoordinatorRejected, match="context 2048 here, not .*context 4096"):
        await gateway.link.pop_text([bigger], wait=0)
    # nothing of a refused offer counts as served
    with pytest.raises(ApiError, match="no gateway is serving model other"):
        await alice.submit_text(TextParams(model="other", prompt="x"))
    assert await gateway.link.pop_text([OTHER], wait=0) is None
    # unknown models are refused by name, on our API, quotes and OpenAI's alike
    with pytest.raises(ApiError, match="choose one of: tiny-llm, other") as unknown:
        await alice.submit_text(TextParams(model="anon-trap", prompt="x"))
    assert unknown.value.status == 400 and unknown.value.fields[0][0] == "model"
    headers = {"apikey": grid["keys"]["alice"]}
    async with aiohttp.ClientSession(headers=headers) as http:
        body = {"model": "anon-trap", "prompt": "x"}
        async with http.post(f"{live.url}/api/v1/quotes/text", json=body) as resp:
            assert resp.status == 400 and "tiny-llm, other" in await resp.text()
        async with http.post(f"{live.url}/v1/completions", json=body) as resp:
            assert resp.status == 400 and "tiny-llm, other" in await resp.text()
    # the default is tiny-llm even though "other" was offered last; it says what is served
    with pytest.raises(ApiError, match=r"tiny-llm \(the default\).*served now: other"):
        await alice.submit_text(TextParams(prompt="x"))
    await offer(gateway)
    created = await alice.submit_text(TextParams(prompt="x", max_tokens=10))
    # (1 + 32 + 10 tokens) x (4 + 1 blocks) x 70 (billions) / 4000 = 3.8 -> 4
    assert created.kudos_cost == 4 and (await alice.text_job(created.id)).model == "tiny-llm"


def _coordinator(tmp_path: Path, catalog: str) -> subprocess.CompletedProcess[str]:
    """`idlegrid coordinator --models FILE` with a file that must make it exit."""
    path = tmp_path / "models.toml"
    path.write_text(catalog)
    return subprocess.run(
        [sys.executable, "-m", "client.cli", "coordinator", "--data-dir", str(tmp_path)]
        + ["--port", "0", "--models", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("catalog", "says"),
    [
        ('[[models]]\nname = "a"\nparameters = 1\nblocks = 2\n', "models[0].context: missing"),
        (
            '[[models]]\nname = "a"\nparameters = 1e9\nblocks = 2\ncontext = 512\n',
            "models[0].parameters: 1000000000.0 is not the model's total parameter count",
        ),
        (
            '[[models]]\nname = "a"\nparameters = 1\nblocks = 2000\ncontext = 512\n',
            "models[0].blocks: 2000 is not its decoder blocks (num_hidden_layers), a whole "
            "number 1-1024",
        ),
        (
            '[[models]]\nname = "a"\nparameters = 1\nblocks = 2\ncontext = 512\n' * 2,
            "models[1].name: 'a' is listed twice",
        ),
        (
            'default = "c"\n'
            + "".join(
                f'[[models]]\nname = "{n}"\nparameters = 1\nblocks = 2\ncontext = 512\n'
                for n in "ab"
            ),
            "default: must name one of the models (a, b)",
        ),
        ("[[models]\n", "not valid TOML"),
        ('default = "a"\nprices = 3\n', "prices: unknown key"),
    ],
)
def test_a_bad_models_file_stops_the_coordinator_naming_the_key(
    tmp_path: Path, catalog: str, says: str
) -> None:
    done = _coordinator(tmp_path, catalog)
    assert done.returncode != 0 and f"--models {tmp_path / 'models.toml'}: {says}" in (
        done.stderr
    ), done.stderr


def test_split_kudos_is_exact_and_proportional() -> None:
    assert split_kudos(8, [300, 150]) == [5, 3]
    assert split_kudos(10, [1, 1, 1]) == [4, 3, 3]
    assert split_kudos(0, [5, 5]) == [0, 0]
    assert split_kudos(7, [0, 0]) == [0, 0]
    assert sum(split_kudos(1001, [3, 7, 11, 13])) == 1001


def test_grant_parts_are_exact_proportional_and_within_each_share() -> None:
    # the grant-funded part of a text job's pay, over its payees' shares
    assert grant_parts(6, [10, 5, 5]) == [3, 2, 1]
    assert grant_parts(20, [10, 5, 5]) == [10, 5, 5]
    assert grant_parts(0, [3, 4]) == [0, 0]
    for granted in range(0, 23):
        shares = [1, 0, 7, 2, 13]
        parts = grant_parts(granted, shares)
        assert sum(parts) == granted and all(
            0 <= p <= s for p, s in zip(parts, shares, strict=True)
        )
    with pytest.raises(ValueError, match="do not fit"):
        grant_parts(5, [2, 2])


async def test_ai_horde_text_requests_run_on_the_same_queue(grid: dict[str, Any]) -> None:
    """AI Horde's /v2/generate/text (KoboldAI-style): submit, poll, the text, cancel; the
    shapes are AI Horde's (RequestAsync, RequestStatusKobold), the job and its price ours."""
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    headers = {"apikey": key}
    await offer(gateway)
    body = {
        "prompt": "Once upon a time",
        "params": {"max_length": 20, "max_context_length": 1024, "rep_pen": 1.1, "n": 1},
        "models": ["tiny-llm"],
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{live.url}/api/v2/generate/text/async", json=body, headers=headers
        ) as r:
            assert r.status == 202
            created = await r.json()
        assert isinstance(created["id"], str) and isinstance(created["kudos"], float)
        job = await gateway.pop()
        assert job.id == created["id"] and job.params.prompt == "Once upon a time"
        assert job.params.max_tokens == 20 and job.params.repetition_penalty == 1.1
        status_url = f"{live.url}/api/v2/generate/text/status/{job.id}"
        async with http.get(status_url) as r:
            running = await r.json()
        assert r.status == 200 and running["processing"] == 1 and running["done"] is False
        assert running["generations"] == []
        await gateway.link.text_delta(job.id, 0, "there was")
        spans = [{"peer_id": PEER_A.peer_id, "start": 0, "end": 4, "tokens": 7}]
        await gateway.link.submit_text(job, "there was", "stop", 4, 3, spans)
        async with http.get(status_url, headers=headers) as r:
            done = await r.json()
        assert done["done"] is True and done["finished"] == 1 and done["faulted"] is False
        (generation,) = done["generations"]
        assert generation["text"] == "there was" and generation["model"] == "tiny-llm"
        assert generation["worker_name"] == "gateway" and isinstance(generation["seed"], int)
        assert isinstance(done["kudos"], float)
        # more than one generation per request is not served: the field is named
        async with http.post(
            f"{live.url}/api/v2/generate/text/async",
            json={**body, "params": {"n": 2}},
            headers=headers,
        ) as r:
            assert r.status == 400 and (await r.json())["rc"] == "BadRequest"
        # cancel: done, and the reservation back
        async with http.post(
            f"{live.url}/api/v2/generate/text/async", json=body, headers=headers
        ) as r:
            second = await r.json()
        before = (await live.store.ledger.balances())["alice"]
        async with http.delete(
            f"{live.url}/api/v2/generate/text/status/{second['id']}", headers=headers
        ) as r:
            cancelled = await r.json()
        assert r.status == 200 and cancelled["done"] is True
        assert (await live.store.ledger.balances())["alice"] == before + int(second["kudos"])


async def test_a_replayed_submit_makes_one_job_and_one_charge(grid: dict[str, Any]) -> None:
    live, keys, gateway = grid["live"], grid["keys"], grid["gateway"]
    await offer(gateway)
    body = {"prompt": "once", "max_tokens": 10}

    async def submit(key: str, payload: dict[str, Any]) -> tuple[int, Any]:
        headers = {"apikey": keys["alice"], "Idempotency-Key": key}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{live.url}/api/v1/text/jobs", json=payload, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    (first_status, first), (again_status, again) = [await submit("k-1", body) for _ in range(2)]
    assert first_status == again_status == 202
    assert again["id"] == first["id"] and again["kudos_cost"] == first["kudos_cost"]
    assert (await live.store.ledger.balances())["alice"] == 100 - first["kudos_cost"]
    status, refused = await submit("k-1", {**body, "prompt": "twice"})
    assert status == 409 and refused["error"]["fields"][0]["field"] == "Idempotency-Key"


async def test_ai_horde_text_models_take_the_first_one_served(grid: dict[str, Any]) -> None:
    """AI Horde's `models` lists the acceptable models: the first one a worker serves now is
    used, whatever its place; none served is a 400 naming the first."""
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    headers = {"apikey": key}
    url = f"{live.url}/api/v2/generate/text/async"
    body = {"prompt": "Once upon a time", "params": {"max_length": 20}}

    async def model_of(models: list[str]) -> str:
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json={**body, "models": models}, headers=headers) as r,
        ):
            assert r.status == 202, await r.text()
            job = await live.store.text_jobs.get((await r.json())["id"])
        assert job is not None
        await live.store.text_jobs.cancel(job.id)
        return str(job.model)

    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json={**body, "models": ["other", "tiny-llm"]}, headers=headers) as r,
    ):
        assert r.status == 400 and "no gateway is serving model other" in await r.text()
    await offer(gateway)  # tiny-llm is served, other is not
    assert await model_of(["other", "unknown", "tiny-llm"]) == "tiny-llm"
    assert await model_of(["tiny-llm", "other"]) == "tiny-llm"
    assert await gateway.link.pop_text([OTHER], wait=0) is None  # now both are
    assert await model_of(["other", "tiny-llm"]) == "other"
    assert await model_of(["unknown", "tiny-llm", "other"]) == "tiny-llm"


async def test_a_leased_job_tags_its_requester_for_that_gateway_only(
    grid: dict[str, Any],
) -> None:
    """Conversation reuse is keyed by this tag (worker.llm.gateway.kept): one account's jobs
    share it on one gateway; other accounts, other gateways and anonymous jobs do not."""
    gateway, live = grid["gateway"], grid["live"]
    other = Party(live.url, "gateway-2", grid["keys"]["donor"])
    await other.link.register()
    await offer(gateway)
    params = TextParams(prompt="x", max_tokens=10)

    async def tag(requester: AsyncClient, party: Party) -> str | None:
        await requester.submit_text(params)
        return (await party.pop()).requester

    try:
        alice = await tag(grid["alice"], gateway)
        assert alice is not None and len(alice) == 32
        assert await tag(grid["alice"], gateway) == alice
        assert await tag(grid["bob"], gateway) not in (None, alice)
        assert await tag(grid["alice"], other) not in (None, alice)
        async with AsyncClient(live.url) as anon:
            assert await tag(anon, gateway) is None
        # another process on the database (--processes N, another host, a restart) tags
        # alice's next turn the same: the key is the database's
        runner, second = await start_app(live.app[CONFIG])
        try:
            key = second.app[REQUESTER_KEY]
            account = await live.store.accounts.account_by_key(grid["keys"]["alice"])
            assert account is not None and gateway.link.worker_id is not None
            assert requester_tag(key, gateway.link.worker_id, account.id) == alice
        finally:
            await runner.cleanup()
    finally:
        await other.link.aclose()
