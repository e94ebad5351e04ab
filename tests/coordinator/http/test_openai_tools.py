"""OpenAI function tools with the official `openai` client against an in-process
coordinator (127.0.0.1) and a gateway that runs the leased jobs on the tiny model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam

from protocol.openai_tools import Tool, parse_call
from tests.coordinator.http.test_kobold_samplers import (  # noqa: F401  (fixtures)
    MODEL,
    coordinator_config,
    core,
    grid,
)
from tests.coordinator.http.test_structured_output import client, serve_all
from worker.llm.gateway.core import GenerationCore

WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"enum": ["utc", "local"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionFunctionToolParam] = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "The weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "time", "parameters": TIME}},
]
PING: ChatCompletionFunctionToolParam = {"type": "function", "function": {"name": "ping"}}
SCHEMAS = {"weather": WEATHER, "time": TIME, "ping": {"type": "object", "properties": {}}}


def assert_valid_calls(completion: Any, names: set[str]) -> int:
    """Every choice that stops is a call of one of `names` whose arguments validate;
    returns how many calls there are."""
    calls = 0
    for choice in completion.choices:
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        assert jsonschema_rs.validator_for(SCHEMAS[call.function.name]).is_valid(arguments)
        calls += 1
    return calls


async def test_a_named_tool_call_validates_at_temperature_1(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    async with client(live.url, key) as oai:
        request = asyncio.create_task(
            oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "weather"}},
                temperature=1.0,
                max_tokens=48,
                n=3,
                seed=11,
            )
        )
        jobs = await serve_all(gateway, core, 3)
        completion = await request
    # the tools are in the system prompt; the answer is constrained to a call
    for job in jobs:
        messages = job.params.messages
        assert messages is not None and messages[0].role == "system"
        assert '{"name":"weather","description":"The weather"' in messages[0].content
        assert job.params.response_format is not None
    assert assert_valid_calls(completion, {"weather"}) >= 1, completion


async def test_required_calls_one_of_the_tools_and_history_is_rendered(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    history: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Time?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "time", "arguments": '{"zone": "utc"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "user", "content": "And the weather?"},
    ]
    async with client(live.url, key) as oai:
        request = asyncio.create_task(
            oai.chat.completions.create(
                model=MODEL.name,
                messages=history,
                # short: the tiny model's context is 512 tokens of a small vocabulary
                tools=[TOOLS[1], PING],
                tool_choice="required",
                temperature=0.0,
                max_tokens=48,
            )
        )
        (job,) = await serve_all(gateway, core, 1)
        completion = await request
    messages = job.params.messages
    assert messages is not None
    assert messages[0].content.startswith("You help.\n\nYou can call these tools")
    assert messages[2].role == "assistant"
    assert json.loads(messages[2].content) == {"name": "time", "arguments": {"zone": "utc"}}
    assert messages[3].role == "user" and messages[3].content.endswith("12:00")
    assert assert_valid_calls(completion, {"time", "ping"}) in (0, 1)


async def test_a_streamed_call_comes_whole_with_the_usage(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    async with client(live.url, key) as oai:

        async def collect() -> list[Any]:
            stream = await oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "Time?"}],
                tools=[TOOLS[1]],
                tool_choice="required",
                temperature=0.0,
                max_tokens=48,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in stream]

        request = asyncio.create_task(collect())
        await serve_all(gateway, core, 1)
        chunks = await request
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    finish = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    calls = [c.choices[0].delta.tool_calls for c in chunks[:-1] if c.choices[0].delta.tool_calls]
    if finish == ["length"]:
        return  # (the arguments did not fit max_tokens)
    assert finish == ["tool_calls"] and len(calls) == 1, chunks
    (call,) = calls[0]
    assert call.index == 0 and call.function is not None and call.function.name == "time"
    assert jsonschema_rs.validator_for(TIME).is_valid(json.loads(call.function.arguments or ""))


async def test_tool_choice_none_answers_text(
    grid: dict[str, Any],  # noqa: F811
    core: GenerationCore,  # noqa: F811
) -> None:
    live, gateway, key = grid["live"], grid["gateway"], grid["keys"]["alice"]
    async with client(live.url, key) as oai:
        request = asyncio.create_task(
            oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "Hello"}],
                tools=TOOLS,
                tool_choice="none",
                max_tokens=8,
                seed=1,
            )
        )
        (job,) = await serve_all(gateway, core, 1)
        completion = await request
    assert job.params.response_format is None
    assert job.params.messages is not None and len(job.params.messages) == 1
    (choice,) = completion.choices
    assert choice.message.tool_calls is None and choice.message.content is not None
    assert choice.finish_reason in ("stop", "length")


async def test_bad_tool_requests_are_refused_by_name(grid: dict[str, Any]) -> None:  # noqa: F811
    live, key = grid["live"], grid["keys"]["alice"]
    body: dict[str, Any] = {"model": MODEL.name, "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tool_choice": "auto"}, "tool_choice needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not one of the tools",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools.0.function.name",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "x"}}}
                ]
            },
            "tools.0.function.parameters",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "tool_call_id"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "assistant"}]}, "content or tool_calls"),
    ]
    async with aiohttp.ClientSession() as http:
        for extra, expected in cases:
            async with http.post(
                f"{live.url}/v1/chat/completions",
                json={**body, **extra},
                headers={"Authorization": f"Bearer {key}"},
            ) as r:
                answer = await r.text()
                assert r.status == 400 and expected in answer.replace("[", ".").replace(
                    "].", "."
                ), (extra, answer)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('{"name": "time", "arguments": {"zone": "utc"}}', "time"),
        ('```json\n{"name": "time", "arguments": {}}\n```', "time"),
        ('{"name": "nope", "arguments": {}}', None),
        ('{"name": "time", "arguments": "x"}', None),
        ('{"name": "time", "arguments": {}, "more": 1}', None),
        ("It is noon.", None),
        ("[1, 2]", None),
    ],
)
def test_auto_reads_a_call_only_in_the_documented_form(text: str, name: str | None) -> None:
    tools = [Tool.model_validate(tool) for tool in TOOLS]
    call = parse_call(text, tools, "call_x")
    assert (call.function.name if call else None) == name
