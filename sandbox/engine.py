"""The contract between the sandbox and the engine it hosts, and what a call returns.

This is the raw level: JSON objects and blobs. An engine whose calls are typed
(`protocol.engine.EngineCall`) implements `handle` by delegating to a
`sandbox.calls.CallTable`, and its worker calls it with `Sandbox.run`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Emit", "Engine", "EngineResult", "ProgressCallback"]

# Called by the engine inside `handle` to send one progress message to the parent.
Emit = Callable[[dict[str, Any]], None]
# Receives those messages in the parent, in order; may be a plain or an async function.
ProgressCallback = Callable[[dict[str, Any]], Awaitable[None] | None]


@dataclass
class EngineResult:
    """What one `Sandbox.call` returns."""

    data: dict[str, Any]  # JSON-able result
    blobs: list[bytes]  # binary payloads (e.g. PNG files)


class Engine(Protocol):
    """What the child process hosts, named to the sandbox as "package.module:ClassName".

    The child constructs it once and then calls `handle` for one request at a time, on
    its main thread. `emit` may also be called from other threads while `handle` runs,
    but not after it returns.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        """Load the model; may take minutes (see SandboxPolicy.start_timeout)."""

    def handle(
        self, kind: str, payload: dict[str, Any], emit: Emit
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Do one job; the result dict must be JSON-able, the blobs are raw bytes.

        A call made with binary input (`Sandbox.call(..., blobs=...)`) passes it as an extra
        keyword argument, `blobs: list[bytes]`; engines that take none need not accept it.
        An exception raised here reaches the caller as EngineFailed and the engine stays up.
        """
        ...
