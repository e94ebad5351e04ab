"""Finding 1: "Workers set the price of text" -- a fresh worker offered model `anon-trap`
with parameters=7e16, a 16-token anonymous request reserved 896 875 000 kudos, and the
attacker was paid half of it for a made-up span.

The attacker here is a freshly registered gateway on the real HTTP API. It tries the same
moves: offer a model the operator never configured, re-offer `llm` with inflated sizes, be
the most recent offer so that requests without `model` go to it, and settle an anonymous
job with a made-up span. Text models, their sizes and so their prices come from the
coordinator's catalog (built-in here: `llm` and `smollm2`, default `llm`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from client.errors import ApiError
from client.sdk import AsyncClient
from protocol.cost import text_cost
from protocol.signing import Identity
from protocol.text import TextModel, TextParams, token_bound
from tests.conftest import LiveApp
from worker.common.link import CoordinatorLink
from worker.errors import CoordinatorRejected

# the sizes `idlegrid models tiny` builds into DIR/llm (the coordinator's built-in entry)
LLM = TextModel(name="llm", blocks=4, parameters=276_032, max_context=512)
TRAP = TextModel(name="anon-trap", blocks=1024, parameters=7 * 10**16, max_context=2048)
INFLATED = LLM.model_copy(update={"blocks": 1024, "parameters": 7 * 10**16})
MADE_UP_PEER = "12D3KooWMadeUpMadeUpMadeUpMadeUpMadeUpMadeUpMadeUpMa"
# 2 prompt bytes + 32 template tokens + 16 new tokens = 50; x 1025 blocks x 7e7 / 4000
# = 896 875 000: the finding's reservation
REQUEST = TextParams(prompt="hi", max_tokens=16)


def llm_price(params: TextParams) -> int:
    return text_cost(token_bound(params), LLM.blocks + 1, LLM.parameters)


async def offer(gateway: CoordinatorLink, model: TextModel) -> CoordinatorRejected | None:
    """The gateway's text pop offering `model`: its refusal, or None when accepted."""
    try:
        assert await gateway.pop_text([model], wait=0) is None
    except CoordinatorRejected as refused:
        return refused
    return None


async def quote(live: LiveApp, params: TextParams) -> int:
    body = params.model_dump(exclude_none=True)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{live.url}/api/v1/quotes/text", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return int((await resp.json())["kudos_cost"])


@pytest.fixture
async def gateways(live: LiveApp) -> AsyncIterator[tuple[CoordinatorLink, CoordinatorLink]]:
    """(attacker, honest): two freshly registered gateways; the honest one serves llm."""
    attacker = CoordinatorLink(live.url, Identity.generate(), "mallory-gateway", None)
    honest = CoordinatorLink(live.url, Identity.generate(), "honest-gateway", None)
    try:
        await attacker.register()
        await honest.register()
        assert await offer(honest, LLM) is None
        yield attacker, honest
    finally:
        await attacker.aclose()
        await honest.aclose()


async def test_a_model_the_operator_never_configured_is_refused(
    live: LiveApp, gateways: tuple[CoordinatorLink, CoordinatorLink]
) -> None:
    attacker, _ = gateways
    refused = await offer(attacker, TRAP)
    async with AsyncClient(live.url) as anon:
        with pytest.raises(ApiError) as unknown:
            await anon.submit_text(REQUEST.model_copy(update={"model": "anon-trap"}))
    assert unknown.value.status == 400 and "llm, smollm2" in unknown.value.message
    assert unknown.value.fields[0][0] == "model"
    # and the gateway is told why it gets no jobs for it
    assert refused is not None and refused.status == 400
    assert "anon-trap" in str(refused) and "llm, smollm2" in str(refused)


async def test_inflated_sizes_are_refused_and_leave_the_price_alone(
    live: LiveApp, gateways: tuple[CoordinatorLink, CoordinatorLink]
) -> None:
    attacker, _ = gateways
    refused = await offer(attacker, INFLATED)
    assert await quote(live, REQUEST.model_copy(update={"model": "llm"})) == llm_price(REQUEST)
    assert refused is not None and refused.status == 400
    # the message names what the coordinator expects and what was offered
    assert "276032" in str(refused) and "1024" in str(refused)


async def test_a_request_without_model_gets_the_default_and_a_made_up_span_is_not_paid(
    live: LiveApp, gateways: tuple[CoordinatorLink, CoordinatorLink]
) -> None:
    attacker, _ = gateways
    await offer(attacker, TRAP)  # the most recent offer
    async with AsyncClient(live.url) as anon:
        created = await anon.submit_text(REQUEST)
        assert (await anon.text_job(created.id)).model == "llm"
    assert created.kudos_cost == llm_price(REQUEST) < 100
    # the attacker (offering the real llm now) pops the job and makes up a span
    job = await attacker.pop_text([LLM], wait=5)
    assert job is not None and job.id == created.id
    made_up = {"peer_id": MADE_UP_PEER, "start": 0, "end": 1024, "tokens": 10**9}
    with pytest.raises(CoordinatorRejected, match=r"spans\[0\]\.end"):
        await attacker.submit_text(job, "x", "stop", 34, 16, [made_up])
    inside = {"peer_id": MADE_UP_PEER, "start": 0, "end": 4, "tokens": 49}
    with pytest.raises(CoordinatorRejected, match="not linked"):
        await attacker.submit_text(job, "x", "stop", 34, 16, [inside])
    # claiming tokens that no server covered is refused too
    with pytest.raises(CoordinatorRejected, match="cover"):
        await attacker.submit_text(job, "x", "stop", 34, 16, [])
    # the most it can settle without servers: one token, through no block
    settled = await attacker.submit_text(job, "x", "stop", 0, 1, [])
    assert settled.kudos_charged == 1 and settled.kudos_earned <= 1
    balances = await live.store.ledger.balances()
    assert balances["anonymous"] >= -llm_price(REQUEST)
    audit = await live.store.ledger.audit()
    assert audit["unbalanced_entries"] == 0 and audit["sum"] == 0
