"""Queue order: who runs next. Pure functions, the same for image and text jobs.

Every waiting job gets an *effective time*: when it was submitted, moved earlier by a head
start that grows with the logarithm of the requester's kudos, or later by a fixed handicap
for anonymous requests. The queue runs in effective-time order. Because every job's
priority (`now - effective time`) grows by one per second of waiting and the head start is
bounded (`max_head_start`), a job submitted `max_head_start` seconds before another always
runs before it: nobody starves, however rich the others are.

A worker serves its owner's own jobs before anyone else's (the owner paid for the GPU).
That preference applies only on that worker; every other worker still ages the queue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "KUDOS_CAP",
    "Aging",
    "Waiting",
    "effective_time",
    "max_head_start",
    "order",
    "position",
    "priority",
]

# Balances beyond this give no further head start (and keep the head start bounded).
KUDOS_CAP = 2**62


@dataclass(frozen=True)
class Aging:
    """How kudos and anonymity translate into seconds of waiting."""

    # one doubling of the requester's kudos is worth this many seconds of waiting
    seconds_per_doubling: float = 60.0
    # anonymous jobs start this many seconds behind a registered job with no kudos
    anonymous_penalty: float = 600.0

    def __post_init__(self) -> None:
        if self.seconds_per_doubling < 0 or self.anonymous_penalty < 0:
            raise ValueError("seconds_per_doubling and anonymous_penalty must be >= 0")


@dataclass(frozen=True)
class Waiting:
    """A queued job as the ordering sees it."""

    job_id: str
    account_id: int
    # the requester's kudos balance right now (ignored for anonymous requests)
    kudos: int
    created_at: float
    anonymous: bool = False


def _head_start(kudos: int, aging: Aging) -> float:
    return aging.seconds_per_doubling * math.log2(1 + min(max(kudos, 0), KUDOS_CAP))


def effective_time(job: Waiting, aging: Aging) -> float:
    """Submit time minus the kudos head start (plus the anonymous handicap): earlier runs first."""
    if job.anonymous:
        return job.created_at + aging.anonymous_penalty
    return job.created_at - _head_start(job.kudos, aging)


def priority(job: Waiting, now: float, aging: Aging) -> float:
    """Seconds-equivalent priority at `now`; grows by exactly 1 per second of waiting."""
    return now - effective_time(job, aging)


def max_head_start(aging: Aging) -> float:
    """The most any job can jump ahead of one submitted earlier, in seconds."""
    return _head_start(KUDOS_CAP, aging) + aging.anonymous_penalty


def _key(job: Waiting, aging: Aging, owner: int | None) -> tuple[int, float, int, int, float, str]:
    # After the effective time, ties (including float rounding) go to registered requesters,
    # then to more kudos, then to the earlier submission.
    kudos = 0 if job.anonymous else min(max(job.kudos, 0), KUDOS_CAP)
    return (
        0 if owner is not None and job.account_id == owner else 1,
        effective_time(job, aging),
        1 if job.anonymous else 0,
        -kudos,
        job.created_at,
        job.job_id,
    )


def order(jobs: Iterable[Waiting], aging: Aging, owner: int | None = None) -> list[Waiting]:
    """The jobs in the order they should run; `owner`'s jobs first (a worker's owner)."""
    return sorted(jobs, key=lambda job: _key(job, aging, owner))


def position(jobs: Sequence[Waiting], job_id: str, aging: Aging) -> int | None:
    """0 = runs next on any worker; None when `job_id` is not among `jobs`."""
    target = next((job for job in jobs if job.job_id == job_id), None)
    if target is None:
        return None
    mine = _key(target, aging, None)
    return sum(1 for job in jobs if _key(job, aging, None) < mine)
