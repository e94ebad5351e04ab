"""What one peer may hold on a block server: attention-cache tokens and open streams.

The attention cache is the server's scarce resource: every session reserves `max_length`
tokens of it until its stream closes. Without a per-peer bound one peer could reserve all of
it (and keep it, see the server's idle timeout) and starve everyone else; so each peer may
hold at most `peer_share` of the cache (half by default: at least two peers always fit) and
`max_streams` streams at once. A peer id costs a key pair, so this raises the price of
starving a server (one connection and one key per share) rather than making it impossible;
the global budget still bounds the total.
"""

from __future__ import annotations

import math
from collections import Counter

__all__ = ["PeerLimits", "Refused"]


class Refused(Exception):
    """A request the server turns down; `code` tells the client what to do (see
    `worker.llm.swarm.wire.error_response`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class PeerLimits:
    """The cache tokens and streams each peer holds, against per-peer and total budgets."""

    def __init__(self, cache_tokens: int, peer_share: float, max_streams: int) -> None:
        if cache_tokens < 1:
            raise ValueError(f"cache_tokens must be at least 1, got {cache_tokens}")
        if not 0 < peer_share <= 1:
            raise ValueError(f"peer_share must be within (0, 1], got {peer_share}")
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self.cache_tokens = cache_tokens
        self.peer_share = peer_share
        self.max_streams = max_streams
        # tokens one peer may hold at once
        self.peer_quota = max(1, math.floor(cache_tokens * peer_share))
        self._held: Counter[str] = Counter()
        self._streams: Counter[str] = Counter()

    @property
    def free_tokens(self) -> int:
        return self.cache_tokens - sum(self._held.values())

    def room_for(self, peer: str) -> int:
        """Tokens `peer` could still reserve now."""
        return max(0, min(self.free_tokens, self.peer_quota - self._held[peer]))

    def streams_of(self, peer: str) -> int:
        return self._streams[peer]

    def open_stream(self, peer: str) -> None:
        if self._streams[peer] >= self.max_streams:
            raise Refused(
                "busy",
                f"this peer has {self._streams[peer]} streams open here, the most one peer "
                "may; close one first",
            )
        self._streams[peer] += 1

    def close_stream(self, peer: str) -> None:
        self._streams[peer] -= 1
        if self._streams[peer] <= 0:
            del self._streams[peer]

    def reserve(self, peer: str, tokens: int) -> None:
        held = self._held[peer]
        if held + tokens > self.peer_quota:
            raise Refused(
                "busy",
                f"a session of {tokens} tokens exceeds this peer's share of the attention "
                f"cache: it holds {held} of at most {self.peer_quota} of {self.cache_tokens} "
                "tokens per peer; close a session or ask for fewer tokens",
            )
        if tokens > self.free_tokens:
            raise Refused(
                "busy",
                f"a session of {tokens} tokens does not fit in the free attention cache "
                f"({self.free_tokens} of {self.cache_tokens} tokens)",
            )
        self._held[peer] += tokens

    def release(self, peer: str, tokens: int) -> None:
        self._held[peer] -= tokens
        if self._held[peer] <= 0:
            del self._held[peer]
