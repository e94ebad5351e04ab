"""KoboldAI's samplers through AI Horde's v2 text API (and the OpenAI route's extras).

A SillyTavern-shaped request goes through an in-process coordinator to a gateway on the
real link, which runs the leased parameters on the tiny model (all decoder layers in this
process instead of the swarm) and submits the answer; the requester polls it as AI Horde's
clients do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from transformers import AutoTokenizer

from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.signing import Identity
from protocol.text import (
    BUILTIN_TEXT_MODELS,
    KOBOLD_SAMPLER_ORDER,
    MAX_CONTEXT_TOKENS,
    LeasedTextJob,
)
from tests.conftest import LiveApp
from tests.worker.llm.gateway.test_kobold import LocalSwarm, long_text
from worker.common.link import CoordinatorLink
from worker.llm.gateway.core import CoreSettings, GenerationCore
from worker.llm.gateway.lm_head import LMHead
from worker.llm.gateway.logprobs import report
from worker.llm.swarm.peer_proof import PeerKey

MODEL = BUILTIN_TEXT_MODELS[0]  # the tiny model: 512 tokens of context
PEER = PeerKey.generate()


def sillytavern_request(prompt: str) -> dict[str, Any]:
    """What SillyTavern posts to /api/v2/generate/text/async for a KoboldAI-style model:
    getKoboldGenerationData(..., isHorde=true) as its params, with generateHorde's fixed
    n and frmt* fields (SillyTavern's public/scripts/kai-settings.js and horde.js)."""
    return {
        "prompt": prompt,
        "params": {
            "gui_settings": False,
            "sampler_order": [6, 0, 1, 3, 4, 2, 5],
            "max_context_length": 512,
            "max_length": 24,
            "rep_pen": 1.1,
            "rep_pen_range": 320,
            "rep_pen_slope": 0.9,
            "temperature": 0.7,
            "tfs": 1,
            "top_a": 0,
            "top_k": 40,
            "top_p": 0.92,
            "min_p": 0.05,
            "typical": 1,
            "use_world_info": False,
            "singleline": False,
            "stop_sequence": ["\nYou:", "\nAlice:", "</s>", "<|im_end|>", "\n\n\n", "###"],
            "streaming": False,
            "can_abort": False,
            "mirostat": 0,
            "mirostat_tau": 5,
            "mirostat_eta": 0.1,
            "use_default_badwordsids": False,
            "grammar": "",
            "api_server": "",
            "n": 1,
            "frmtadsnsp": False,
            "frmtrmblln": False,
            "frmtrmspch": False,
            "frmttriminc": False,
        },
        "trusted_workers": False,
        "models": [MODEL.name],
    }


@pytest.fixture
def coordinator_config(tmp_path: Path, database_url: str) -> CoordinatorConfig:
    return CoordinatorConfig(
        data_dir=tmp_path / "data",
        database_url=database_url,
        port=0,
        text_models=(MODEL,),
        default_text_model=MODEL.name,
    )


@pytest.fixture(scope="module")
def core(tiny_models: Path) -> GenerationCore:
    llm = tiny_models / "llm"
    settings = CoreSettings(model=llm, model_name="llm", initial_peers=(), check_rate=0.0)
    tokenizer = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    return GenerationCore(
        settings,
        LMHead.load(llm),
        tokenizer,
        swarm=None,  # type: ignore[arg-type]  # no swarm: the blocks run here
        open_session=LocalSwarm(llm).session,  # type: ignore[arg-type]
    )


@pytest.fixture
async def grid(live: LiveApp) -> AsyncIterator[dict[str, Any]]:
    async with AsyncClient(live.url) as anon:
        keys = {name: (await anon.register(name)).api_key for name in ("alice", "donor")}
    gateway = CoordinatorLink(live.url, Identity.generate(), "gateway", keys["donor"])
    await gateway.register()
    await gateway.link_peer(PEER)
    try:
        assert await gateway.pop_text([MODEL], wait=0) is None  # the model is now served
        yield {"live": live, "keys": keys, "gateway": gateway}
    finally:
        await gateway.aclose()


async def serve(gateway: CoordinatorLink, core: GenerationCore) -> LeasedTextJob:
    """Pop one job, generate it on the tiny model (streaming the text), submit it."""
    job = await gateway.pop_text([MODEL], wait=5)
    assert job is not None
    sent = 0

    async def on_text(delta: str) -> None:
        nonlocal sent
        await gateway.text_delta(job.id, sent, delta)
        sent += len(delta)

    generated = await core.run(job.params, on_text)
    result = generated.result
    tokens = result.prompt_tokens + result.completion_tokens - 1
    spans = [{"peer_id": PEER.peer_id, "start": 0, "end": MODEL.blocks, "tokens": tokens}]
    logprobs = (
        None
        if result.logprobs is None
        else [e.model_dump() for e in report(core.tokenizer, result.logprobs, result.text)]
    )
    await gateway.submit_text(
        job,
        result.text,
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
        spans,
        None,
        logprobs,
    )
    return job


async def poll(http: aiohttp.ClientSession, url: str, key: str) -> dict[str, Any]:
    for _ in range(100):
        async with http.get(url, headers={"apikey": key}) as r:
            status: dict[str, Any] = await r.json()
        if status["done"]:
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"not done: {status}")


async def test_a_sillytavern_request_round_trips(
    grid: dict[str, Any], core: GenerationCore
) -> None:
    """A 4 000-token SillyTavern prompt with max_context_length 512 is cut, not refused:
    its kudos are reserved for 512 tokens, the gateway keeps the last 512 - 24 and answers."""
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    prompt = long_text(core.tokenizer, 4000) + "\nAlice:"
    body = sillytavern_request(prompt)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{live.url}/api/v2/generate/text/async", json=body, headers={"apikey": key}
        ) as r:
            created = await r.json()
            assert r.status == 202, created
        # the reservation covers 512 tokens, not the whole prompt
        whole = {**body, "dry_run": True, "params": {**body["params"], "max_context_length": 10**6}}
        async with http.post(
            f"{live.url}/api/v2/generate/text/async", json=whole, headers={"apikey": key}
        ) as r:
            assert r.status == 200 and (await r.json())["kudos"] > created["kudos"]
        job = await serve(gateway, core)
        assert job.id == created["id"]
        p, sent = job.params, body["params"]
        assert (p.max_tokens, p.max_context_length) == (24, 512)
        assert (p.repetition_penalty, p.rep_pen_range, p.rep_pen_slope) == (1.1, 320, 0.9)
        assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.7, 40, 0.92, 0.05)
        assert (p.tfs, p.top_a, p.typical) == (1.0, 0.0, 1.0)
        assert p.sampler_order == sent["sampler_order"] and p.stop == sent["stop_sequence"]
        assert not (p.singleline or p.use_default_badwordsids or p.frmttriminc)
        done = await poll(http, f"{live.url}/api/v2/generate/text/status/{job.id}", key)
    (generation,) = done["generations"]
    assert done["faulted"] is False and generation["model"] == MODEL.name
    async with AsyncClient(live.url, key) as alice:
        status = await alice.text_job(job.id)
    assert status.prompt_tokens == 512 - 24 and 1 <= status.completion_tokens <= 24
    assert generation["text"] == status.text
    for stop in sent["stop_sequence"]:
        assert stop not in generation["text"]


async def test_kobold_fields_reach_the_job_and_bad_values_are_named(
    grid: dict[str, Any],
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    every = {
        "n": 1,
        "max_context_length": 300,
        "max_length": 20,
        "rep_pen": 1.2,
        "rep_pen_range": 64,
        "rep_pen_slope": 0.7,
        "temperature": 1.3,
        "top_k": 50,
        "top_p": 0.9,
        "top_a": 0.1,
        "tfs": 0.95,
        "typical": 0.8,
        "min_p": 0.05,
        "smoothing_factor": 0.4,
        "dynatemp_range": 0.5,
        "dynatemp_exponent": 1.5,
        "sampler_order": [0, 1, 2, 3, 4, 5, 6],
        "stop_sequence": ["\nUser:"],
        "use_default_badwordsids": True,
        "singleline": True,
        "frmttriminc": True,
        "frmtrmblln": True,
        "frmtrmspch": True,
        "frmtadsnsp": True,
        "sampler_seed": 1234,
    }
    url = f"{live.url}/api/v2/generate/text/async"
    headers = {"apikey": key}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"prompt": "Hi", "params": every}, headers=headers) as r:
            assert r.status == 202, await r.text()
        job = await gateway.pop_text([MODEL], wait=5)
        assert job is not None
        got = job.params.model_dump()
        renamed = {"rep_pen": "repetition_penalty", "max_length": "max_tokens"}
        renamed |= {"stop_sequence": "stop", "sampler_seed": "seed"}
        for name, value in every.items():
            if name != "n":
                assert got[renamed.get(name, name)] == value, name
        # without sampler_order: KoboldCpp's default order
        async with http.post(url, json={"prompt": "Hi"}, headers=headers) as r:
            assert r.status == 202
        default = await gateway.pop_text([MODEL], wait=5)
        assert default is not None
        assert default.params.sampler_order == list(KOBOLD_SAMPLER_ORDER)
        assert default.params.max_context_length == 1024  # AI Horde's default
        # a context beyond any model's is never refused: the model's context cuts
        huge = {"prompt": "Hi", "params": {"max_context_length": 10**9}}
        async with http.post(url, json=huge, headers=headers) as r:
            assert r.status == 202
        roomy = await gateway.pop_text([MODEL], wait=5)
        assert roomy is not None and roomy.params.max_context_length == MAX_CONTEXT_TOKENS

        bad = {
            "rep_pen": 3.5,
            "rep_pen_range": -1,
            "rep_pen_slope": 11,
            "temperature": 6,
            "top_a": 1.5,
            "tfs": -0.1,
            "typical": 1.1,
            "min_p": 2,
            "smoothing_factor": -1,
            "dynatemp_range": 9,
            "dynatemp_exponent": -1,
            "sampler_order": [0, 1, 2, 3, 4, 5, 5],
            "max_context_length": 10,  # no room for max_length 80
            "sampler_seed": 2**70,
            "mirostat": 2,
            "grammar": "root ::= 'x'",
            "use_world_info": True,
        }
        for name, value in bad.items():
            async with http.post(
                url, json={"prompt": "Hi", "params": {name: value}}, headers=headers
            ) as r:
                answer = await r.json()
                assert r.status == 400, (name, answer)
            assert f"params.{name}" in answer["message"], (name, answer)
            assert answer["rc"] == "BadRequest"


async def test_the_openai_route_takes_the_samplers_as_extras(grid: dict[str, Any]) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    extras = {
        "min_p": 0.1,
        "top_a": 0.2,
        "tfs": 0.9,
        "typical": 0.7,
        "rep_pen_range": 16,
        "rep_pen_slope": 1.0,
        "smoothing_factor": 0.5,
        "dynatemp_range": 0.3,
        "dynatemp_exponent": 2.0,
        "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "max_context_length": 256,
        "use_default_badwordsids": True,
    }
    body = {"model": MODEL.name, "prompt": "Hi", "max_tokens": 8, **extras}
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(
            http.post(f"{live.url}/v1/completions", json=body, headers=headers)
        )
        job = await gateway.pop_text([MODEL], wait=5)
        assert job is not None
        got = job.params.model_dump()
        assert {name: got[name] for name in extras} == extras
        spans = [{"peer_id": PEER.peer_id, "start": 0, "end": MODEL.blocks, "tokens": 3}]
        await gateway.submit_text(job, "ok", "stop", 2, 2, spans)
        async with await request as r:
            assert r.status == 200 and (await r.json())["choices"][0]["text"] == "ok"
        # bad values are named; KoboldAI's output flags are not OpenAI extras
        for name, value in (("min_p", 1.5), ("sampler_order", [1]), ("max_context_length", 8)):
            async with http.post(
                f"{live.url}/v1/completions", json={**body, name: value}, headers=headers
            ) as r:
                assert r.status == 400 and name in await r.text(), name
        async with http.post(
            f"{live.url}/v1/completions", json={**body, "frmttriminc": True}, headers=headers
        ) as r:
            assert r.status == 400 and "frmttriminc" in await r.text()
