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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from worker.errors import InvalidGenerationInput

__all__ = ["ROLES", "check_messages", "render_chat"]

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


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text for `messages`, ending where the assistant's reply should begin."""
    check_messages(messages)
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        assert isinstance(rendered, str)
        return rendered
    lines = [f"{m['role']}: {m['content']}\n" for m in plain]
    return "".join(lines) + "assistant:"
