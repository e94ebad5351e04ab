"""OpenAI function tools with the official `openai` client against an in-process
coordinator (127.0.0.1) and a gateway that runs the leased jobs on the tiny model."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam, ChatCompletionMessageParam
from pydantic import ValidationError

from protocol.openai_tools import Tool, parse_call, tools_of
from protocol.text import ChatMessage, TextParams, token_bound
from tests.coordinator.http.test_kobold_samplers import (  # noqa: F401  (fixtures)
    MODEL,
    coordinator_config,
    core,
    grid,
)
from tests.coordinator.http.test_structured_output import answered, client
from worker.llm.gateway.chat_format import render_chat
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


def prompt(gateway: GenerationCore, params: TextParams) -> str:
    """The prompt the gateway gives the model for a chat job."""
    assert params.messages is not None
    messages = [m.model_dump() for m in params.messages]
    return render_chat(gateway.tokenizer, messages, *tools_of(params))


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
        completion, jobs = await answered(
            gateway,
            core,
            oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=TOOLS,
                tool_choice={"type": "function", "function": {"name": "weather"}},
                temperature=1.0,
                max_tokens=48,
                n=3,
                seed=11,
            ),
            n=3,
        )
    # the job carries the tools as sent; the tiny model's template has no tools section, so
    # the gateway puts them in its system prompt; the answer is constrained to a call
    for job in jobs:
        assert job.params.tools is not None
        assert [t["function"]["name"] for t in job.params.tools] == ["weather", "time"]
        assert job.params.tool_choice == {"type": "function", "function": {"name": "weather"}}
        assert "<|system|>\nYou can call these tools" in prompt(core, job.params)
        assert '{"name":"weather","description":"The weather"' in prompt(core, job.params)
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
        completion, (job,) = await answered(
            gateway,
            core,
            oai.chat.completions.create(
                model=MODEL.name,
                messages=history,
                # short: the tiny model's context is 512 tokens of a small vocabulary
                tools=[TOOLS[1], PING],
                tool_choice="required",
                temperature=0.0,
                max_tokens=48,
            ),
        )
    messages = job.params.messages
    assert messages is not None and messages[0].content == "You help."
    assert "<|system|>\nYou help.\n\nYou can call these tools" in prompt(core, job.params)
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

        chunks, _ = await answered(gateway, core, collect())
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
        completion, (job,) = await answered(
            gateway,
            core,
            oai.chat.completions.create(
                model=MODEL.name,
                messages=[{"role": "user", "content": "Hello"}],
                tools=TOOLS,
                tool_choice="none",
                max_tokens=8,
                seed=1,
            ),
        )
    assert job.params.response_format is None and job.params.tools is None
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
        ('<tool_call>\n{"name": "time", "arguments": {}}\n</tool_call>', "time"),
        ('<tool_call>{"name": "time", "arguments": {}}', None),
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


def test_a_jobs_tools_are_checked_where_it_is_made() -> None:
    chat = [ChatMessage(role="user", content="hi")]
    bad = [{"type": "function", "function": {"name": "bad name"}}]
    with pytest.raises(ValidationError, match="tools: not OpenAI's form"):
        TextParams(messages=chat, tools=bad)
    with pytest.raises(ValidationError, match="tools need messages"):
        TextParams(prompt="hi", tools=[dict(PING)])
    with pytest.raises(ValidationError, match="tool_choice needs tools"):
        TextParams(messages=chat, tool_choice="required")
    # a job without tools is stored and hashed as before they existed
    plain = TextParams(messages=chat)
    assert "tools" not in plain.model_dump() and "tool_choice" not in plain.model_dump()
    # the reservation counts the definitions the template will write, and what it writes
    # around them
    with_tools = TextParams(messages=chat, tools=[dict(t) for t in TOOLS])
    written = len(json.dumps(with_tools.tools).encode())
    assert token_bound(with_tools) >= token_bound(plain) + written + 1024
