"""OpenAI's `logprobs` and `top_logprobs` with the official `openai` client against an
in-process coordinator (127.0.0.1) and a gateway core on the tiny model."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import pytest

from tests.coordinator.http.test_kobold_samplers import (  # noqa: F401  (fixtures)
    MODEL,
    coordinator_config,
    core,
    grid,
)
from tests.coordinator.http.test_structured_output import answered, client
from worker.llm.gateway.core import GenerationCore


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_logprobs_are_consistent_with_the_text(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
    temperature: float,
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    async with client(live.url, key) as oai:
        completion, (job,) = await answered(
            gateway,
            core,
            oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "Tell me a story"}],
                temperature=temperature,
                max_tokens=24,
                seed=5,
                logprobs=True,
                top_logprobs=20,
            ),
        )
    assert job.params.logprobs and job.params.top_logprobs == 20
    (choice,) = completion.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert completion.usage is not None
    assert len(content) == completion.usage.completion_tokens
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        tops = [top.logprob for top in entry.top_logprobs]
        assert len(tops) == 20 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(lp) for lp in tops) <= 1 + 1e-4
        # the chosen token is at most as likely as the likeliest
        assert entry.logprob <= tops[0] + 1e-5
    if temperature == 0.0:
        # greedy over the raw logits (no penalties): the likeliest token each time
        assert all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-4 for e in content[:-1])


async def test_without_logprobs_there_are_none(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    async with client(live.url, key) as oai:
        completion, (job,) = await answered(
            gateway,
            core,
            oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                logprobs=True,
            ),
        )
        without, (plain,) = await answered(
            gateway,
            core,
            oai.chat.completions.create(
                model=MODEL.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            ),
        )
    # logprobs alone: the chosen tokens, no alternatives
    content = completion.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(entry.top_logprobs == [] for entry in content)
    # a job that asks for none keeps its params (and their hash) as before
    assert "logprobs" not in plain.params.model_dump() and without.choices[0].logprobs is None


async def test_legacy_completions_logprobs(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    async with client(live.url, key) as oai:
        completion, (job,) = await answered(
            gateway,
            core,
            oai.completions.create(
                model=MODEL.name, prompt="Once upon", max_tokens=12, seed=2, logprobs=5
            ),
        )
    assert job.params.top_logprobs == 5
    (choice,) = completion.choices
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.text_offset
    assert "".join(logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in logprobs.token_logprobs or [])
    assert all(len(top) <= 5 for top in logprobs.top_logprobs or [])
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert logprobs.text_offset == offsets


async def test_bad_logprobs_requests_are_refused_by_name(grid: dict[str, Any]) -> None:  # noqa: F811
    live, key = grid["live"], grid["keys"]["alice"]
    body: dict[str, Any] = {"model": MODEL.name, "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
        ({"logprobs": True, "stream": True}, "stream"),
    ]
    legacy: list[tuple[dict[str, Any], str]] = [
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": 2, "stream": True}, "not supported with stream"),
    ]
    async with aiohttp.ClientSession() as http:
        for extra, expected in cases:
            async with http.post(
                f"{live.url}/v1/chat/completions",
                json={**body, **extra},
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                answer = await r.text()
                assert r.status == 400 and expected in answer, (extra, answer)
        for extra, expected in legacy:
            async with http.post(
                f"{live.url}/v1/completions",
                json={"model": MODEL.name, "prompt": "hi", **extra},
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                answer = await r.text()
                assert r.status == 400 and expected in answer, (extra, answer)
