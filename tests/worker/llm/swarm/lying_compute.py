"""A block compute engine that answers outputs of the wrong size (a compromised or broken
compute process); it runs inside the sandbox child, never in pytest."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from protocol.engine import BLOCK_FORWARD, BLOCK_STEP, HiddenPass, HiddenShape, NoMessage
from sandbox.calls import CallTable, Emit


class ShortAnswerEngine:
    def __init__(self, options: Mapping[str, object]) -> None:
        self.calls = CallTable()
        self.calls.add_binary(BLOCK_STEP, self.answer)
        self.calls.add_binary(BLOCK_FORWARD, self.answer)

    def handle(
        self,
        kind: str,
        payload: Mapping[str, object],
        emit: Callable[[dict[str, object]], None],
        blobs: list[bytes] | None = None,
    ) -> tuple[dict[str, object], list[bytes]]:
        return self.calls.handle(kind, payload, emit, blobs)

    def answer(
        self, request: HiddenPass, blobs: list[bytes], emit: Emit[NoMessage]
    ) -> tuple[HiddenShape, list[bytes]]:
        # claims the input's shape, sends 5 bytes
        return HiddenShape(shape=request.shape), [b"short"]
