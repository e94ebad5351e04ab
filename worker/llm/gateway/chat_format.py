"""Chat messages -> the prompt text a model expects.

`render_chat` uses the tokenizer's own chat template when it has one (transformers'
`apply_chat_template(..., add_generation_prompt=True)`), so each model family gets the
format it was trained on. Without a template it falls back to this format:

    system: You are terse.
    user: Hello
    assistant:

one `<role>: <content>` line per message, then `assistant:` for the model to continue.
Templates usually start with the BOS token themselves: tokenize their output with
`add_special_tokens=False` or the prompt begins with two.

A job's tools (OpenAI's function tools: protocol.openai_tools) go through the template when
it has a tools section (`apply_chat_template(..., tools=...)`: Qwen, Llama 3.1, Hermes and
other tool-trained families get the form they were trained on); a template without one
(SmolLM2's) or no template gets them in the system prompt (`tools_prompt`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from protocol.openai_tools import Tool, ToolChoice, tools_prompt
from worker.errors import InvalidGenerationInput

__all__ = ["ROLES", "check_messages", "render_chat", "template_takes_tools"]

ROLES = ("system", "user", "assistant")


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """Raise InvalidGenerationInput naming the first bad message field, if any."""
    given: object = messages  # checked as untrusted input, whatever the annotation says
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise InvalidGenerationInput("messages", "must be a list of {role, content} objects")
    if not messages:
        raise InvalidGenerationInput("messages", "is empty; give at least one message")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise InvalidGenerationInput(where, f"is {type(message).__name__}; use an object")
        unknown = sorted(set(message) - {"role", "content"})
        if unknown:
            raise InvalidGenerationInput(
                f"{where}.{unknown[0]}", "is not a message field; use only role and content"
            )
        role = message.get("role")
        if role not in ROLES:
            raise InvalidGenerationInput(
                f"{where}.role", f"is {role!r}; use one of {', '.join(ROLES)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidGenerationInput(
                f"{where}.content", f"is {type(content).__name__}; use a string"
            )


# a tool for telling whether a template writes tools at all
_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "probe_tool_7f3a",
        "description": "probe",
        "parameters": {"type": "object", "properties": {}},
    },
}
_PROBE_MESSAGES = [{"role": "user", "content": "x"}]


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template has a tools section: a tool given to it shows
    in what it writes (a template that ignores `tools`, or fails with them, has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        with_tool = tokenizer.apply_chat_template(
            _PROBE_MESSAGES, tools=[_PROBE_TOOL], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - any template error: it cannot take tools
        return False
    return isinstance(with_tool, str) and "probe_tool_7f3a" in with_tool


def _with_system_section(plain: list[dict[str, str]], section: str) -> list[dict[str, str]]:
    """The messages with `section` ending the system prompt (a new one if there is none)."""
    if plain and plain[0]["role"] == "system":
        first = {"role": "system", "content": plain[0]["content"] + "\n\n" + section}
        return [first, *plain[1:]]
    return [{"role": "system", "content": section}, *plain]


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    tools: Sequence[Tool] = (),
    tool_choice: ToolChoice = "auto",
) -> str:
    """The prompt text for `messages` (and `tools`, module docstring), ending where the
    assistant's reply should begin."""
    check_messages(messages)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tools and template_takes_tools(tokenizer):
        definitions = [tool.model_dump(exclude_none=True) for tool in tools]
        rendered = tokenizer.apply_chat_template(
            plain, tools=definitions, tokenize=False, add_generation_prompt=True
        )
        assert isinstance(rendered, str)
        return rendered
    if tools:
        plain = _with_system_section(plain, tools_prompt(list(tools), tool_choice))
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        assert isinstance(rendered, str)
        return rendered
    lines = [f"{m['role']}: {m['content']}\n" for m in plain]
    return "".join(lines) + "assistant:"
