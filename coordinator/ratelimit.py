"""Token-bucket rate limits per API key (or worker) and per client IP, in memory.

Each coordinator process keeps its own buckets, so N coordinators behind a load balancer
allow up to N times the configured rates; that is fine for what these limits are for
(stopping floods and reward farming, not metering).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.config import RateLimit
from coordinator.errors import RateLimited

__all__ = ["RateLimiter"]

# buckets kept per process; the least recently used are forgotten first (a forgotten
# bucket is a full one, so forgetting can only be generous)
MAX_BUCKETS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self, limits: dict[str, RateLimit], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str, str], _Bucket] = OrderedDict()

    def _take(self, key: tuple[str, str, str], rate: float, burst: float) -> float:
        """Take one token; returns 0 on success, else seconds until one is available."""
        now = self._clock()
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        self._buckets[key] = bucket
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / rate if rate > 0 else 3600.0

    def check(self, scope: str, identity: str | None, ip: str | None) -> None:
        """Count one `scope` request by `identity` (API key hash or worker id) from `ip`;
        raise RateLimited (429 with Retry-After) when either bucket is empty."""
        limit = self._limits.get(scope)
        if limit is None:
            return
        waits = []
        if identity is not None:
            waits.append(
                (self._take((scope, "key", identity), limit.per_second, limit.burst), "API key")
            )
        if ip is not None:
            waits.append(
                (self._take((scope, "ip", ip), limit.ip_per_second, limit.ip_burst), "address")
            )
        wait, who = max(waits, default=(0.0, ""))
        if wait > 0:
            raise RateLimited(
                f"too many {scope} requests from this {who}; retry in {wait:.1f} s "
                "(see the Retry-After header)",
                wait,
            )
