"""OpenAI's structured output, penalties, `n` and the anonymous key, with the official
`openai` client against an in-process coordinator (127.0.0.1) and a gateway on the real
link that runs the leased jobs on the tiny model (all decoder layers in this process)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import jsonschema_rs
import openai
import pytest

from client.sdk import AsyncClient
from coordinator.http.state import CONFIG
from protocol.horde import ANONYMOUS_KEY
from protocol.params import MAX_SEED
from protocol.text import LeasedTextJob
from tests.coordinator.http.test_kobold_samplers import (  # noqa: F401  (fixtures)
    MODEL,
    coordinator_config,
    core,
    grid,
    serve,
)
from worker.common.link import CoordinatorLink
from worker.llm.gateway.core import GenerationCore

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "sunny": {"type": "boolean"},
        "rating": {"enum": [1, 2, 3]},
    },
    "required": ["city", "sunny", "rating"],
    "additionalProperties": False,
}

T = TypeVar("T")


def client(live_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key=key, max_retries=0, timeout=60)


async def serve_all(gateway: CoordinatorLink, core: GenerationCore, n: int) -> list[LeasedTextJob]:  # noqa: F811
    return [await serve(gateway, core) for _ in range(n)]


async def answered(
    gateway: CoordinatorLink,
    core: GenerationCore,  # noqa: F811
    request: Awaitable[T],
    n: int = 1,
) -> tuple[T, list[LeasedTextJob]]:
    """`request`'s answer once the gateway has served the `n` jobs it makes, and the jobs."""
    task = asyncio.ensure_future(request)
    jobs = await serve_all(gateway, core, n)
    return await task, jobs


async def test_a_strict_schema_validates_whenever_the_answer_stops(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    """Three choices at temperature 1 (n=3: jobs seeded seed, seed + 1, seed + 2, wrapping
    past the largest seed); each choice that stops is JSON valid against the schema."""
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    async with client(live.url, key) as oai:
        completion, jobs = await answered(
            gateway,
            core,
            oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "The weather, as JSON"}],
                temperature=1.0,
                max_tokens=64,
                n=3,
                seed=MAX_SEED - 1,
                presence_penalty=0.5,
                frequency_penalty=0.25,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True},
                },
            ),
            n=3,
        )
    assert sorted(job.params.seed for job in jobs if job.params.seed is not None) == [
        0,
        MAX_SEED - 1,
        MAX_SEED,
    ]
    for job in jobs:
        params = job.params
        assert params.response_format is not None and params.response_format.json_schema
        assert params.response_format.json_schema.schema_ == SCHEMA
        assert (params.presence_penalty, params.frequency_penalty) == (0.5, 0.25)
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    validator = jsonschema_rs.validator_for(SCHEMA)
    stopped = [c for c in completion.choices if c.finish_reason == "stop"]
    assert stopped, [c.message.content for c in completion.choices]
    for choice in stopped:
        assert validator.is_valid(json.loads(choice.message.content or "")), choice
    # usage: the prompt once, the completions of all choices
    async with AsyncClient(live.url, key) as alice:
        statuses = [await alice.text_job(job.id) for job in jobs]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == statuses[0].prompt_tokens
    assert completion.usage.completion_tokens == sum(s.completion_tokens for s in statuses)


async def test_json_object_mode_answers_an_object(
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
                messages=[{"role": "user", "content": "Anything, as JSON"}],
                temperature=0.0,
                max_tokens=48,
                response_format={"type": "json_object"},
            ),
        )
    assert job.params.response_format is not None
    assert job.params.response_format.type == "json_object"
    (choice,) = completion.choices
    text = choice.message.content or ""
    assert text.startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


async def test_bad_schemas_and_options_are_refused_by_name(grid: dict[str, Any]) -> None:  # noqa: F811
    live, key = grid["live"], grid["keys"]["alice"]
    messages = [{"role": "user", "content": "hi"}]
    async with client(live.url, key) as oai:
        bad_schemas: list[dict[str, object]] = [
            {"type": "strng"},
            {"type": "string", "pattern": "(("},
        ]
        for schema in bad_schemas:
            with pytest.raises(openai.BadRequestError) as caught:
                await oai.chat.completions.create(
                    model=MODEL.name,
                    messages=[{"role": "user", "content": "hi"}],
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": "bad", "schema": schema},
                    },
                )
            assert caught.value.status_code == 400
            assert "response_format.json_schema.schema" in str(caught.value), caught.value
        for name, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("n", 9)):
            with pytest.raises(openai.BadRequestError) as caught:
                await oai.completions.create(
                    model=MODEL.name, prompt="hi", extra_body={name: value}
                )
            assert name in str(caught.value)
    # a schema only where type is json_schema; one choice when streaming
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {key}"}
        body: dict[str, Any] = {"model": MODEL.name, "messages": messages}
        for extra, field in (
            ({"response_format": {"type": "json_schema"}}, "response_format"),
            ({"stream": True, "n": 2}, "n"),
        ):
            url = f"{live.url}/v1/chat/completions"
            async with http.post(url, json={**body, **extra}, headers=headers) as r:
                answer = await r.text()
                assert r.status == 400 and field in answer, answer


async def test_the_anonymous_key_is_an_anonymous_request(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    """AI Horde's anonymous key works as the bearer token, with the anonymous limits."""
    live, gateway = grid["live"], grid["gateway"]
    async with client(live.url, ANONYMOUS_KEY) as oai:
        completion, (job,) = await answered(
            gateway,
            core,
            oai.completions.create(model=MODEL.name, prompt="Hello", max_tokens=8, seed=3),
        )
        # an anonymous job: anyone may read it without a key
        async with AsyncClient(live.url) as anyone:
            status = await anyone.text_job(job.id)
        assert completion.choices[0].text == status.text and status.state == "done"
        limit = live.app[CONFIG].anonymous_max_tokens
        with pytest.raises(openai.BadRequestError) as caught:
            await oai.completions.create(model=MODEL.name, prompt="Hello", max_tokens=limit + 1)
        assert f"anonymous requests may ask for at most {limit} tokens" in str(caught.value)
    # any other unknown key is still refused
    async with client(live.url, "not-a-key") as oai:
        with pytest.raises(openai.AuthenticationError):
            await oai.completions.create(model=MODEL.name, prompt="Hello", max_tokens=8)
