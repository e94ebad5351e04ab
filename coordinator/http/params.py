"""Typed path and query parameters: a handler declares each one once, in its signature,

    async def list_jobs(
        request: web.Request,
        call: UserCall[None],
        limit: Annotated[int, WholeNumber("jobs to return", 1, 100)] = 20,
    ) -> JobList: ...

and the route table (coordinator.http.api) reads it from there: the value parsed from the
request (or 400 naming the parameter), the parameter of the OpenAPI document, and whether
it is required (no default). A name that is a `{placeholder}` of the route's path is a path
parameter, any other a query parameter; `name=` gives the HTTP name where it is no good
Python name (`type`). The declared Python type must be the declaration's (`int` for a
WholeNumber; `int | None` with the default None); `declared` checks it when the route is
registered, so a disagreement fails at import.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal, get_args, get_origin, get_type_hints

from coordinator.errors import BadRequest

__all__ = ["Choice", "Declared", "Param", "Text", "WholeNumber", "declared"]

Where = Literal["path", "query"]
# a JSON schema
Schema = dict[str, object]


@dataclass(frozen=True)
class Param:
    """What every declaration has: its description and, optionally, its HTTP name."""

    description: str
    name: str | None = field(default=None, kw_only=True)

    # the Python type of a parsed value
    type_of_value: ClassVar[type] = str

    def schema(self) -> Schema:
        return {"type": "string"}

    def parse(self, where: Where, name: str, raw: str) -> object:
        return raw


@dataclass(frozen=True)
class Text(Param):
    """Text as sent (an empty value is the empty text)."""


@dataclass(frozen=True)
class Choice(Param):
    """One of `choices`; an empty value counts as absent (AI Horde's clients send `type=`
    for the default)."""

    choices: tuple[str, ...]

    def schema(self) -> Schema:
        return {"type": "string", "enum": list(self.choices)}

    def parse(self, where: Where, name: str, raw: str) -> object:
        if raw not in self.choices:
            among = " or ".join(self.choices)
            raise BadRequest(f"{name}={raw!r}: choose {among}", [(name, f"must be {among}")])
        return raw


@dataclass(frozen=True)
class WholeNumber(Param):
    """A whole number from `low` to `high`, in ASCII digits."""

    low: int
    high: int
    type_of_value: ClassVar[type] = int

    def schema(self) -> Schema:
        return {"type": "integer", "minimum": self.low, "maximum": self.high}

    def parse(self, where: Where, name: str, raw: str) -> object:
        # ASCII digits, and no more than `high` has: `isdigit` also accepts "²", which
        # `int` refuses, and `int` refuses more than 4 300 digits
        if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(self.high))) or not (
            self.low <= int(raw) <= self.high
        ):
            raise BadRequest(
                f"{where} parameter {name}={raw!r} must be a whole number from {self.low} "
                f"to {self.high}",
                [(name, f"must be {self.low}..{self.high}")],
            )
        return int(raw)


@dataclass(frozen=True)
class Declared:
    """One parameter of a route as its handler declares it."""

    # the handler's keyword argument
    argument: str
    # the HTTP name
    name: str
    where: Where
    param: Param
    required: bool
    # the default when absent (not required)
    default: object = None

    def value(self, raw: str | None) -> object:
        """The parsed value of `raw` (None: absent, or empty for a Choice); 400 naming the
        parameter when it is bad or missing."""
        if raw is None or (raw == "" and isinstance(self.param, Choice)):
            if self.required:
                raise BadRequest(
                    f"{self.where} parameter {self.name} is missing",
                    [(self.name, "is required")],
                )
            return self.default
        return self.param.parse(self.where, self.name, raw)

    def openapi(self) -> Schema:
        schema = self.param.schema()
        if not self.required and self.default is not None:
            schema["default"] = self.default
        return {
            "name": self.name,
            "in": self.where,
            "required": self.where == "path" or self.required,
            "description": self.param.description,
            "schema": schema,
        }


def declared(
    handler: Callable[..., object], placeholders: list[str], fixed: int = 2
) -> tuple[Declared, ...]:
    """The parameters `handler` declares after its first `fixed` (request, call): each must
    be `Annotated[T, <a Param>]` with T the declaration's type (`T | None` with the default
    None); raises TypeError naming the handler and the parameter otherwise."""
    where = f"handler {handler.__module__}.{handler.__qualname__}"
    hints = get_type_hints(handler, include_extras=True)
    found = []
    for parameter in list(inspect.signature(handler).parameters.values())[fixed:]:
        hint = hints.get(parameter.name)
        metadata = get_args(hint)[1:] if get_origin(hint) is Annotated else ()
        params = [m for m in metadata if isinstance(m, Param)]
        if len(params) != 1:
            raise TypeError(
                f"{where}: parameter {parameter.name} must be declared "
                "Annotated[type, WholeNumber(...) | Text(...) | Choice(...)]"
            )
        param = params[0]
        name = param.name or parameter.name
        required = parameter.default is inspect.Parameter.empty
        default = None if required else parameter.default
        expected: object = param.type_of_value
        if not required and default is None:
            expected = param.type_of_value | None
        actual = get_args(hint)[0]
        if actual != expected and not _same_union(actual, expected):
            raise TypeError(
                f"{where}: parameter {parameter.name} is declared {actual}, but a "
                f"{type(param).__name__} with default {default!r} gives {expected}"
            )
        if default is not None and not isinstance(default, param.type_of_value):
            raise TypeError(f"{where}: the default of {parameter.name} is not {expected}")
        in_path = name in placeholders
        if in_path and not required:
            raise TypeError(f"{where}: path parameter {name} cannot have a default")
        found.append(
            Declared(parameter.name, name, "path" if in_path else "query", param, required, default)
        )
    return tuple(found)


def _same_union(a: object, b: object) -> bool:
    """`Optional[int]` and `int | None` are the same type, spelled apart."""
    union = (types.UnionType, type(int | None))
    return isinstance(a, union) and isinstance(b, union) and set(get_args(a)) == set(get_args(b))
