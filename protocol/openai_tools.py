"""OpenAI's function tools over plain text generation (README: Tools).

A job carries the tool definitions as sent (TextParams' `tools`, `tool_choice`: `job_tools`,
`tools_of`). The gateway gives them to the model through its chat template when that has a
tools section (transformers' `apply_chat_template(tools=...)`); otherwise they go into the
system prompt, in the form `tools_prompt` writes: one JSON line per tool (name,
description, parameters), then how to call one. The model calls a tool by answering with
one JSON object, `{"name": ..., "arguments": {...}}` (`parse_call` reads it back, also
inside the `<tool_call>` tags such templates teach). `tool_choice` "required" or a named
function constrains the answer to that form with the JSON-schema grammar (`call_schema`),
so the arguments always validate; "auto" leaves the model free, and an answer that is such
an object naming a given tool is a call; "none" leaves the tools out of the prompt. History
messages of role `tool` and assistant `tool_calls` are rendered as text in the same form.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protocol.text import MAX_PROMPT_CHARS, TextParams, compilable_schema

MAX_TOOL_CALLS = 16
_NAME = r"^[A-Za-z0-9_-]{1,64}$"
# JSON in prompts without spaces: fewer prompt tokens
_COMPACT = (",", ":")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FunctionDef(_Request):
    name: str = Field(pattern=_NAME, description="1-64 letters, digits, _ or -")
    description: str | None = Field(default=None, max_length=4096)
    parameters: Annotated[dict[str, Any], AfterValidator(compilable_schema)] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="a JSON Schema of the arguments (an object)",
    )
    strict: bool | None = Field(default=None, description="accepted; see README: Tools")


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request):
    name: str = Field(pattern=_NAME)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(_Request):
    name: str = Field(pattern=_NAME)
    arguments: str = Field(max_length=MAX_PROMPT_CHARS, description="a JSON object, as text")


class ToolCall(_Request):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


def _call_object(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def call_schema(tools: list[Tool], choice: ToolChoice) -> dict[str, Any] | None:
    """The JSON schema the answer must follow: a call of the named tool, or of any tool
    ("required"); None where the model is free ("auto", "none")."""
    if isinstance(choice, NamedToolChoice):
        (tool,) = [t for t in tools if t.function.name == choice.function.name]
        return _call_object(tool.function.name, tool.function.parameters)
    if choice != "required":
        return None
    calls = [_call_object(t.function.name, t.function.parameters) for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def tools_prompt(tools: list[Tool], choice: ToolChoice) -> str:
    """The system prompt section that tells the model its tools and how to call one."""
    lines = ["You can call these tools (functions); each is a JSON line:"]
    for tool in tools:
        function = tool.function
        entry: dict[str, Any] = {"name": function.name}
        if function.description:
            entry["description"] = function.description
        entry["parameters"] = function.parameters
        lines.append(json.dumps(entry, ensure_ascii=False, separators=_COMPACT))
    lines.append(
        'To call a tool, answer with only one JSON object: {"name":"<tool name>",'
        '"arguments":{<its arguments>}}.'
    )
    if isinstance(choice, NamedToolChoice):
        lines.append(f"Call the tool {choice.function.name} now.")
    elif choice == "required":
        lines.append("Call one of the tools now.")
    else:
        lines.append("Otherwise answer in plain text.")
    return "\n".join(lines)


_TOOLS = TypeAdapter(list[Tool])
_CHOICE: TypeAdapter[ToolChoice] = TypeAdapter(ToolChoice)


def tools_of(params: TextParams) -> tuple[list[Tool], ToolChoice]:
    """A job's tools and tool_choice (TextParams carries them as plain JSON, as sent:
    `ToolsRequest.job_tools`); ValueError naming the field when they are not OpenAI's."""
    if not params.tools:
        return [], "none"
    try:
        tools = _TOOLS.validate_python(params.tools)
    except ValidationError as exc:
        raise ValueError(f"tools: not OpenAI's form ({exc.errors()[0]['msg']})") from None
    try:
        choice = _CHOICE.validate_python(params.tool_choice)
    except ValidationError as exc:
        raise ValueError(f"tool_choice: not OpenAI's form ({exc.errors()[0]['msg']})") from None
    return ([], "none") if choice == "none" else (tools, choice)


def job_tools(tools: list[Tool], choice: ToolChoice) -> dict[str, Any]:
    """TextParams' `tools` and `tool_choice` for a request's tools (none for "none")."""
    if not tools or choice == "none":
        return {}
    return {
        "tools": [tool.model_dump(exclude_none=True) for tool in tools],
        "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
    }


def render_call(call: ToolCall) -> str:
    """An assistant's earlier call, as the model would have written it."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    call_object = {"name": call.function.name, "arguments": arguments}
    return json.dumps(call_object, ensure_ascii=False, separators=_COMPACT)


def render_result(tool_call_id: str | None, content: str) -> str:
    """A tool's answer (a message of role `tool`), as a user turn."""
    return f"Result of tool call {tool_call_id}:\n{content}"


def _json_object(text: str) -> dict[str, Any] | None:
    body = text.strip()
    # templates with a tools section (Hermes, Qwen) teach this wrapper
    if body.startswith("<tool_call>") and body.endswith("</tool_call>"):
        body = body.removeprefix("<tool_call>").removesuffix("</tool_call>").strip()
    if body.startswith("```"):
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_call(text: str, tools: list[Tool], call_id: str) -> ToolCall | None:
    """The call an answer makes: exactly `{"name": <a given tool>, "arguments": {...}}`
    (alone, in a ``` fence, or in <tool_call> tags); None: the answer is plain text."""
    value = _json_object(text)
    if value is None or set(value) != {"name", "arguments"}:
        return None
    names = {tool.function.name for tool in tools}
    if value["name"] not in names or not isinstance(value["arguments"], dict):
        return None
    arguments = json.dumps(value["arguments"], ensure_ascii=False)
    return ToolCall(id=call_id, function=FunctionCall(name=value["name"], arguments=arguments))
