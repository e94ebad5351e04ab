"""Conversation reuse: swarm sessions kept after their job for the same requester's next turn.

A chat's next turn resends the whole conversation, and prefilling it again costs the block
servers (and the user's first token) as much as the history is long. So when a job ends,
the gateway keeps its `InferenceSession` (the servers keep their attention caches) for
`keep_seconds`, filed under the requester the coordinator named (an opaque tag, never
shown to anyone else) and the exact tokens the servers hold: the prompt and every
generated token but the last (the last one is picked, never sent through the blocks).

A next job of the same requester whose prompt tokens start with exactly those tokens, and
go on past them, takes the session: only the new tokens are prefilled. A job whose prompt
matches none of its requester's kept sessions closes them (they hold a branch of the
conversation that was edited or regenerated). Another requester never sees them: a kept
cache is reused only under the tag it was kept under, and anonymous jobs carry no tag.

Kept sessions are bounded: at most `max_kept`, and they only use the gateway's idle slots
(`make_room` closes the oldest ones when running jobs need them), since every kept
session holds a stream and cache tokens on each server of its route, counted against the
gateway's per-peer share there. They expire after `keep_seconds`, which should stay below
the servers' `--session-idle-timeout`; a server that dropped a kept session anyway is
found out when the next turn asks it for room (`InferenceSession.extend`), and the turn
goes to a new session: the same text, only not faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from worker.llm.swarm.session import InferenceSession

__all__ = ["KeptSessions", "KeptStats"]

log = logging.getLogger(__name__)

Close = Callable[[], Awaitable[object]]


@dataclass
class _Kept:
    requester: str
    # what the servers hold, position by position
    tokens: tuple[int, ...]
    session: InferenceSession
    close: Close
    expires: float


@dataclass
class KeptStats:
    """What conversation reuse did since the gateway started (tests and benchmarks)."""

    kept: int = 0
    reused: int = 0
    # prompt tokens the servers did not have to prefill again
    reused_tokens: int = 0
    # kept sessions closed unused: expired, evicted, or their requester's prompt went elsewhere
    closed: int = 0
    # reuses given up because a server had no room or had dropped the session
    fallbacks: int = 0
    # per job: prompt tokens sent to the servers (the whole prompt, or only the new suffix)
    prefilled: list[int] = field(default_factory=list)


class KeptSessions:
    """The kept sessions of one gateway engine; used on its event loop only. `aclose()`
    closes them all."""

    def __init__(
        self,
        keep_seconds: float,
        max_kept: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep_seconds = keep_seconds
        self.max_kept = max_kept
        self._clock = clock
        self._kept: list[_Kept] = []  # oldest first
        self._changed = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self.stats = KeptStats()

    @property
    def enabled(self) -> bool:
        return self.keep_seconds > 0 and self.max_kept > 0

    def __len__(self) -> int:
        return len(self._kept)

    async def take(
        self, requester: str | None, prompt: Sequence[int]
    ) -> tuple[InferenceSession, Close, int] | None:
        """The kept session of `requester` sharing the longest start with `prompt` (at most
        all of the prompt but its last token), with its closer and the length of that common
        start, the tokens reused; the first step cuts the session back to them (a
        rollback, `InferenceSession.step(start_position=...)`), so a turn whose history
        re-tokenizes differently from what was generated still reuses what agrees. None if
        no kept session shares a token (then the requester's kept sessions are closed)."""
        if requester is None or not self.enabled:
            return None
        await self._expire()
        mine = [kept for kept in self._kept if kept.requester == requester]
        shared = [(_common(kept.tokens, prompt), kept) for kept in mine]
        held, best = max(shared, key=lambda pair: pair[0], default=(0, None))
        if best is None or held == 0:
            for kept in mine:
                await self._close(kept)
            return None
        self._kept.remove(best)
        return best.session, best.close, held

    async def put(
        self, requester: str | None, tokens: Sequence[int], session: InferenceSession, close: Close
    ) -> None:
        """Keep `session` (holding `tokens`, then maybe a speculative step's rejected drafts,
        cut back when it is reused) for `requester`'s next turn, or close it when reuse is
        off or the job has no requester."""
        if requester is None or not self.enabled or session.position < len(tokens):
            await close()
            return
        while len(self._kept) >= self.max_kept:
            await self._close(self._kept[0])
        self._kept.append(
            _Kept(requester, tuple(tokens), session, close, self._clock() + self.keep_seconds)
        )
        self.stats.kept += 1
        self._ensure_sweeper()

    async def make_room(self, kept_at_most: int) -> None:
        """Close the oldest kept sessions until at most `kept_at_most` are left."""
        while self._kept and len(self._kept) > max(0, kept_at_most):
            await self._close(self._kept[0])

    async def _close(self, kept: _Kept) -> None:
        with contextlib.suppress(ValueError):
            self._kept.remove(kept)
        self.stats.closed += 1
        try:
            await kept.close()
        except Exception:  # a server that vanished meanwhile: nothing left to free
            log.debug("closing a kept session failed", exc_info=True)
        self._changed.set()

    async def _expire(self) -> None:
        now = self._clock()
        for kept in [k for k in self._kept if k.expires <= now]:
            await self._close(kept)

    def _ensure_sweeper(self) -> None:
        self._changed.set()
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep(), name="kept-sessions")

    async def _sweep(self) -> None:
        """Close kept sessions as they expire (their servers' caches are freed then)."""
        while self._kept:
            self._changed.clear()
            wait = min(k.expires for k in self._kept) - self._clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
            await self._expire()

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for kept in list(self._kept):
            await self._close(kept)


def _common(kept: Sequence[int], prompt: Sequence[int]) -> int:
    """The length of the common start of `kept` and `prompt`, short of the prompt's last
    token (a job sends at least one token through the servers)."""
    most = min(len(kept), len(prompt) - 1)
    for i in range(most):
        if kept[i] != prompt[i]:
            return i
    return max(most, 0)
