"""AI Horde's text workers (a KoboldCpp bridge: a test double speaking AI Horde's text worker
API over HTTP) serving our text queue on a live coordinator: what they get and never get,
what they are paid (held, disputable, grants staying grants), and bad submits.

The shapes are written from AI Horde's published models (Haidra-Org/AI-Horde
horde/apis/models/kobold_v2.py: PopInputKobold, GenerationPayloadKobold, ModelPayloadKobold,
SubmitInputKobold), not from ours.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client.errors import ApiError
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from coordinator.http.state import CONFIG
from protocol.signing import Identity
from protocol.text import TextModel, TextParams
from tests.clock import MockClock, reaper_round
from tests.conftest import LiveApp
from tests.coordinator.http.test_horde import Horde, shaped
from tests.fakes import register_accounts
from worker.common.link import CoordinatorLink

# big enough that a few tokens cost whole kudos: 5 x 100 / 4000 = 0.125 kudos a token
MODEL = TextModel(name="tiny-llm", blocks=4, parameters=100_000_000_000, max_context=2048)
POP = {
    "name": "Kobold Bridge",
    "models": ["koboldcpp/tiny-llm"],
    "max_length": 80,
    "max_context_length": 1024,
    "softprompts": [],
    "bridge_agent": "AI Horde Worker reGen:9:https://github.com/Haidra-Org",
    "priority_usernames": [],
    "nsfw": False,
    "threads": 1,
    "amount": 1,
}
JOB_POP = {"payload": dict, "id": str, "ids": list, "skipped": dict, "model": str, "ttl": int}
PAYLOAD = {"prompt": str, "n": int, "max_length": int, "max_context_length": int}
PROMPT = "You are a storyteller. Tell me about a fox in the forest, one short line please.\n"


@pytest.fixture
def coordinator_config(tmp_path: Path, database_url: str) -> CoordinatorConfig:
    return CoordinatorConfig(
        data_dir=tmp_path / "data",
        database_url=database_url,
        port=0,
        text_models=(MODEL,),
        default_text_model=MODEL.name,
    )


def request(**params: Any) -> dict[str, Any]:
    base = {"max_length": 40, "max_context_length": 1024, "rep_pen": 1.1, "temperature": 0.5}
    return {
        "prompt": PROMPT,
        "params": {**base, "stop_sequence": ["\nYou:"], **params},
        "models": ["tiny-llm"],
    }


def price(prompt: str, text: str) -> int:
    """The documented estimate (README): UTF-8 bytes / 4 per token, through the 4 blocks and
    the embeddings and head, at 100 billion parameters: 0.125 kudos a token, rounded up."""
    tokens = math.ceil(len(prompt.encode()) / 4) + math.ceil(len(text.encode()) / 4)
    return math.ceil(tokens * (MODEL.blocks + 1) * 100 / 4000)


async def _me(url: str, key: str) -> tuple[int, int, int]:
    async with AsyncClient(url, key) as client:
        me = await client.me()
    return me.kudos, me.unspent_grants, me.transferable


async def test_an_ai_horde_text_worker_serves_our_queue_with_its_pay_held(
    clocked: LiveApp, clock: MockClock
) -> None:
    live = clocked
    alice_key, owner_key, stranger_key = await register_accounts(
        live.url, "alice", "bridge", "stranger"
    )
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, owner_key)
    await Horde(live.url).error("POST", "/v2/generate/text/pop", POP, 403, "AnonForbiddenWorker")
    empty = await bridge.ok("POST", "/v2/generate/text/pop", POP)
    assert empty["id"] is None and empty["ids"] == [] and "skipped" in empty
    # served by the bridge alone, the model takes only the requests it may serve
    async with AsyncClient(live.url, alice_key) as client:
        with pytest.raises(ApiError, match="no gateway is serving model tiny-llm"):
            await client.submit_text(TextParams(prompt="Once upon a time", max_tokens=20))
    trusted = {**request(), "trusted_workers": True}
    await alice.error("POST", "/v2/generate/text/async", trusted, 400, "BadRequest")
    # jobs it must never get, once a gateway serves the model too: trusted workers asked
    # for, a job made through /api/v1, more tokens than it generates
    gateway = CoordinatorLink(live.url, Identity.generate(), "gateway", owner_key)
    await gateway.register()
    assert await gateway.pop_text([MODEL], wait=0) is None
    await alice.ok("POST", "/v2/generate/text/async", trusted, 202)
    async with AsyncClient(live.url, alice_key) as client:
        await client.submit_text(TextParams(prompt="Once upon a time", max_tokens=20))
    await alice.ok("POST", "/v2/generate/text/async", request(max_length=100), 202)
    assert (await bridge.ok("POST", "/v2/generate/text/pop", POP))["id"] is None
    await gateway.aclose()
    # worker lists are not served: named, not dropped
    listed = {**request(), "workers": ["a-worker-id"]}
    assert "workers" in await alice.error(
        "POST", "/v2/generate/text/async", listed, 400, "BadRequest"
    )

    wanted = await alice.ok("POST", "/v2/generate/text/async", request(), 202)
    leased = shaped(await bridge.ok("POST", "/v2/generate/text/pop", POP), JOB_POP)
    assert leased["id"] == wanted["id"] and leased["ids"] == [wanted["id"]]
    assert leased["model"] == "koboldcpp/tiny-llm"  # the worker's name for it
    payload = shaped(leased["payload"], PAYLOAD)
    assert payload["prompt"] == PROMPT and payload["max_length"] == 40
    assert payload["max_context_length"] == 1024 and payload["n"] == 1
    assert payload["rep_pen"] == 1.1 and payload["temperature"] == 0.5
    assert payload["stop_sequence"] == ["\nYou:"] and isinstance(payload["sampler_seed"], int)
    # nothing it does extends its lease: it gets time for every token, and is told so
    job = await live.store.text_jobs.get(leased["id"])
    assert job is not None and job.lease_deadline is not None
    assert leased["ttl"] == int(live.app[CONFIG].lease_base_seconds + 40 * 0.5)
    assert job.lease_deadline == pytest.approx(clock() + leased["ttl"], abs=1)

    # bad submits: 400 naming the problem, 403 for another account, 404 for no such job
    submit = {"id": leased["id"], "seed": 0, "state": "ok"}
    too_long = {**submit, "generation": "x" * (40 * 128 + 1)}
    message = await bridge.error("POST", "/v2/generate/text/submit", too_long, 400, "BadRequest")
    assert "generation" in message
    await bridge.error(
        "POST", "/v2/generate/text/submit", {**submit, "state": "great"}, 400, "BadRequest"
    )
    for hostile, says in (("a\x00b", "generation"), ("a\ud800b", "surrogate")):
        message = await bridge.error(
            "POST", "/v2/generate/text/submit", {**submit, "generation": hostile}, 400, "BadRequest"
        )
        assert says in message
    await bridge.error(
        "POST",
        "/v2/generate/text/submit",
        {**submit, "id": "00000000-0000-0000-0000-000000000000", "generation": "x"},
        404,
        "InvalidJobID",
    )
    await Horde(live.url, stranger_key).error(
        "POST", "/v2/generate/text/submit", {**submit, "generation": "x"}, 403, "WrongCredentials"
    )
    before = await _me(live.url, alice_key)
    # KoboldAI backends keep the stop sequence; it is never part of the answer here
    text = "There was a fox in the wood."
    reward = await bridge.ok(
        "POST", "/v2/generate/text/submit", {**submit, "generation": text + "\nYou: more"}
    )
    expected = price(PROMPT, text)
    assert reward == {"reward": float(expected)}
    await bridge.error(
        "POST", "/v2/generate/text/submit", {**submit, "generation": text}, 400, "DuplicateGen"
    )
    status = await alice.ok("GET", f"/v2/generate/text/status/{wanted['id']}")
    (generation,) = status["generations"]
    assert generation["text"] == text and generation["worker_name"] == "Kobold Bridge"
    # the rest of the reservation came back; the price is held, not paid
    assert (await _me(live.url, alice_key))[0] == before[0] + int(wanted["kudos"]) - expected
    assert (await _me(live.url, owner_key))[0] == 100

    # disputable by the requester while held: the kudos back, the text gone, a suspicion
    v1 = f"{live.url}/api/v1/text/jobs/{wanted['id']}"
    async with aiohttp.ClientSession() as http, http.get(v1, headers={"apikey": alice_key}) as r:
        assert (await r.json())["disputable"] is True
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{live.url}/api/v1/text/jobs/{wanted['id']}/dispute",
            json={"reason": "nonsense"},
            headers={"apikey": alice_key},
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["refunded"] == expected
    assert (await _me(live.url, alice_key))[0] == before[0] + int(wanted["kudos"])
    status = await alice.ok("GET", f"/v2/generate/text/status/{wanted['id']}")
    assert status["generations"][0]["text"] == ""
    async with aiohttp.ClientSession() as http, http.get(v1, headers={"apikey": alice_key}) as r:
        assert (await r.json())["disputable"] is False
    worker = await live.store.workers.worker_row(generation["worker_id"])
    assert worker is not None and worker.suspicion == 1

    # a faulted report gives the job back; an undisputed text is paid when the hold ends,
    # as grants (alice paid with her new-account grant)
    again = await alice.ok("POST", "/v2/generate/text/async", request(), 202)
    leased = await bridge.ok("POST", "/v2/generate/text/pop", POP)
    assert leased["id"] == again["id"]
    faulted = {"id": again["id"], "state": "faulted", "generation": ""}
    assert await bridge.ok("POST", "/v2/generate/text/submit", faulted) == {"reward": 0.0}
    assert (await alice.ok("GET", f"/v2/generate/text/status/{again['id']}"))["waiting"] == 1
    leased = await bridge.ok("POST", "/v2/generate/text/pop", POP)
    short = "A fox."
    await bridge.ok(
        "POST", "/v2/generate/text/submit", {**submit, "id": again["id"], "generation": short}
    )
    hold = live.app[CONFIG].horde_hold_seconds
    await reaper_round(clock, hold - 1)
    assert await _me(live.url, owner_key) == (100, 100, 0)
    await reaper_round(clock, 2)
    paid = price(PROMPT, short)
    assert await _me(live.url, owner_key) == (100 + paid, 100 + paid, 0)
    audit = await live.store.ledger.audit()
    assert (audit["unbalanced_entries"], audit["balance_rows_off"], audit["grants_off"]) == (
        0,
        0,
        0,
    ), audit
    assert audit["transferable_excess"] == 0 and audit["sum"] == 0
