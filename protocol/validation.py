"""Turn pydantic's validation errors into messages that name the field and the fix."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.errors import ValidationFailed

__all__ = ["describe", "parse"]

M = TypeVar("M", bound=BaseModel)


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "body"


def _message(error: Any, model: type[BaseModel]) -> str:
    kind = error["type"]
    got = type(error.get("input")).__name__
    if kind == "extra_forbidden":
        return "unknown field; remove it (check the spelling against the API description)"
    if kind == "missing":
        return "is required; add it"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{error['msg'].lower()}, got {got}"
    message = str(error["msg"])
    # pydantic prefixes messages of custom validators; ours already say how to fix it.
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    limit = error.get("ctx", {})
    if limit:
        return f"{message[0].lower()}{message[1:]} (got {error.get('input')!r})"
    return message


def describe(exc: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """(field, message) pairs for every problem pydantic found."""
    return [(_field_path(tuple(e["loc"])), _message(e, model)) for e in exc.errors()]


def parse(model: type[M], data: Any) -> M:
    """Validate `data` as `model`, raising ValidationFailed with readable problems."""
    if not isinstance(data, dict):
        raise ValidationFailed([("body", f"must be a JSON object, got {type(data).__name__}")])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(describe(exc, model)) from None
