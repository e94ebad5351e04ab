"""Errors raised by the sandbox package.

    SandboxError                  base of everything raised here
    ├── SandboxClosed             the caller used a sandbox after aclose() (caller's bug)
    ├── ChannelError              a frame broke the wire format (too large, malformed)
    │   ├── FrameTooLarge         a frame exceeds SandboxPolicy.max_frame_bytes
    │   └── ChannelClosed         the other end of the pipe is gone (EOF)
    ├── EngineStartFailed         the engine could not be constructed (import or constructor
    │                             raised, the child died, or start_timeout passed)
    ├── EngineCrashed             the child died or broke the protocol during a call;
    │   │                         a fresh child is started before the next call
    │   └── EngineMisbehaved      the child sent a message that does not fit its typed
    │                             call (`Sandbox.run`); the message names the fields
    ├── EngineTimedOut            a call exceeded its timeout; the child was killed and a
    │                             fresh one is started before the next call
    └── EngineFailed              engine.handle raised; the child is alive and usable

Callers of `Sandbox.call` see a `ChannelError` only as `FrameTooLarge` for an oversized
request (nothing was sent, the child is untouched); a bad frame *from* the child is
reported as `EngineCrashed`.
"""

from __future__ import annotations

__all__ = [
    "ChannelClosed",
    "ChannelError",
    "EngineCrashed",
    "EngineFailed",
    "EngineMisbehaved",
    "EngineStartFailed",
    "EngineTimedOut",
    "FrameTooLarge",
    "SandboxClosed",
    "SandboxError",
]


class SandboxError(Exception):
    """Base class of the sandbox package's errors."""


class SandboxClosed(SandboxError):
    """The sandbox was used after (or closed during) `aclose()`."""


class ChannelError(SandboxError):
    """A frame on the parent-child pipe broke the wire format."""


class FrameTooLarge(ChannelError):
    """A frame is larger than the configured cap; `size` and `limit` are in bytes."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"frame of {size} bytes exceeds the cap of {limit} bytes; pass large inputs as "
            "files in Sandbox.workdir or raise SandboxPolicy.max_frame_bytes"
        )
        self.size = size
        self.limit = limit

    def __reduce__(self) -> tuple[type[FrameTooLarge], tuple[int, int]]:
        # The default reduce passes the formatted message back to __init__, which
        # takes two arguments; keep the error picklable for logging/multiprocessing.
        return (type(self), (self.size, self.limit))


class ChannelClosed(ChannelError):
    """The other end closed the pipe (normally because its process exited)."""


class ConfinementUnavailable(SandboxError):
    """The policy asks for confinement and this machine cannot provide it; the message
    names what is missing and how to get it."""


class EngineStartFailed(SandboxError):
    """The child could not construct the engine; the message carries the child's error."""


class EngineCrashed(SandboxError):
    """The child process died or sent garbage during a call."""


class EngineMisbehaved(EngineCrashed):
    """The child sent a progress message or result that does not fit the call's model;
    the child was killed (its output cannot be trusted) and restarts before the next call."""


class EngineTimedOut(SandboxError):
    """A call ran past its timeout and the child was killed."""


class EngineFailed(SandboxError):
    """`engine.handle` raised `error_type` with `message`; the engine is still usable."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message

    def __reduce__(self) -> tuple[type[EngineFailed], tuple[str, str]]:
        return (type(self), (self.error_type, self.message))
