"""Read-only views of the network that anyone may ask for, computed at most once per
`network_view_seconds` and shared: a crowd of concurrent readers costs one query.

`SharedViews.get(key, compute)` returns the value computed for `key` within the last `ttl`
seconds, or computes it; readers that arrive while it is being computed wait for that one
computation (a lock per key) instead of starting their own.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["SharedViews"]

T = TypeVar("T")


class SharedViews:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._values: dict[str, tuple[float, Any]] = {}

    async def get(self, key: str, compute: Callable[[], Awaitable[T]]) -> T:
        async with self._locks[key]:
            cached = self._values.get(key)
            if cached is None or self._clock() - cached[0] >= self._ttl:
                cached = (self._clock(), await compute())
                self._values[key] = cached
            value: T = cached[1]
            return value
