"""Typed engine calls (`protocol.engine.EngineCall`) over the untyped frames, both ends.

The frames carry JSON objects; this module turns them into the call's pydantic models.

Parent side: `parse_message` validates what the child sent for a call (a progress message
or the result); what does not fit raises `EngineMisbehaved` naming the field
(`Sandbox.run` kills that child). The engine's words never reach the message: only field
names and pydantic's description of what is wrong.

Child side: `CallTable` is what a typed engine's `handle` delegates to: it validates the
request into the call's model, hands the handler an `emit` that takes the progress model,
checks that the handler returned the result model, and dumps both back to JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.engine import EngineCall
from protocol.validation import describe
from sandbox.errors import EngineMisbehaved

__all__ = ["CallResult", "CallTable", "Emit", "parse_message"]

RequestT = TypeVar("RequestT", bound=BaseModel)
ProgressT = TypeVar("ProgressT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel)
M = TypeVar("M", bound=BaseModel)

# Problems named in one EngineMisbehaved message; the rest are counted.
_MAX_PROBLEMS = 5
# A problem's description is cut here: it may quote a (hostile) value.
_MAX_PROBLEM_CHARS = 200

# A JSON object as it crosses the pipe (the raw `Engine.handle` interface).
_Json = dict[str, object]
_Result = tuple[_Json, list[bytes]]
# A handler as the table keeps it: raw payload and emit in, raw result out.
_Handler = Callable[[Mapping[str, object], Callable[[_Json], None], list[bytes]], _Result]
# What a typed handler gets to report progress with.
Emit = Callable[[ProgressT], None]
# What a typed handler returns.
_Typed = tuple[ResultT, list[bytes]]


@dataclass(frozen=True)
class CallResult(Generic[ResultT]):
    """What `Sandbox.run` returns: the validated result and the blobs beside it."""

    data: ResultT
    blobs: list[bytes]


def parse_message(engine: str, kind: str, what: str, model: type[M], data: object) -> M:
    """`data` (a `what` message the child sent during a `kind` call) as `model`.

    EngineMisbehaved naming each bad field if it does not fit.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{field}: {message[:_MAX_PROBLEM_CHARS]}"
            for field, message in describe(exc, model)[:_MAX_PROBLEMS]
        ]
        more = exc.error_count() - len(problems)
        if more > 0:
            problems.append(f"and {more} more")
        raise EngineMisbehaved(
            f"engine {engine!r} sent a malformed {what} during a {kind!r} call "
            f"({model.__name__}): {'; '.join(problems)}"
        ) from None


class CallTable:
    """The typed handlers of one engine, by call kind (used inside the child)."""

    def __init__(self) -> None:
        self._handlers: dict[str, _Handler] = {}

    def add(
        self,
        call: EngineCall[RequestT, ProgressT, ResultT],
        handler: Callable[[RequestT, Emit[ProgressT]], tuple[ResultT, list[bytes]]],
    ) -> None:
        """Route `call.kind` to `handler(request, emit) -> (result, blobs)`; the call takes
        no binary input."""

        def run(request: RequestT, blobs: list[bytes], emit: Emit[ProgressT]) -> _Typed[ResultT]:
            if blobs:
                raise ValueError(f"a {call.kind!r} call takes no binary input")
            return handler(request, emit)

        self.add_binary(call, run)

    def add_binary(
        self,
        call: EngineCall[RequestT, ProgressT, ResultT],
        handler: Callable[[RequestT, list[bytes], Emit[ProgressT]], tuple[ResultT, list[bytes]]],
    ) -> None:
        """Route `call.kind` to `handler(request, blobs, emit) -> (result, blobs)`, for a
        call with binary input (`Sandbox.run(..., blobs=...)`)."""

        def run(
            payload: Mapping[str, object], emit: Callable[[_Json], None], blobs: list[bytes]
        ) -> _Result:
            request = call.request.model_validate(payload)

            def typed_emit(message: ProgressT) -> None:
                _check(call.kind, "progress", call.progress, message)
                emit(message.model_dump(mode="json", by_alias=True))

            result, answer = handler(request, blobs, typed_emit)
            _check(call.kind, "result", call.result, result)
            return result.model_dump(mode="json", by_alias=True), answer

        self._handlers[call.kind] = run

    def handle(
        self,
        kind: str,
        payload: Mapping[str, object],
        emit: Callable[[_Json], None],
        blobs: list[bytes] | None = None,
    ) -> _Result:
        """`Engine.handle`: run the handler of `kind`; ValueError for another kind."""
        run = self._handlers.get(kind)
        if run is None:
            known = ", ".join(repr(name) for name in sorted(self._handlers))
            raise ValueError(f"this engine handles {known} calls, not {kind!r}")
        return run(payload, emit, blobs or [])


def _check(kind: str, what: str, model: type[BaseModel] | None, message: object) -> None:
    if model is None:
        raise TypeError(f"a {kind!r} call emits no progress; do not call emit()")
    if not isinstance(message, model):
        raise TypeError(
            f"the {what} of a {kind!r} call must be a {model.__name__}, "
            f"got {type(message).__name__}"
        )
