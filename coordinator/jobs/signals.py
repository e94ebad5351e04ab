"""Wake-ups: a job changed, or a job a waiting worker could take was queued.

Only who must wake wakes: an event stream watches its own job, a long-polling worker waits
for jobs of its kind (and models). Waiters always re-read the database after waking and wake
at least every `poll_fallback` seconds (on the app's clock: coordinator.clock). With several
coordinator processes a `publisher` (coordinator.jobs.notify, PostgreSQL LISTEN/NOTIFY)
carries each change to the others, which `deliver` it to their own waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from coordinator.clock import SYSTEM_CLOCK, Clock

__all__ = ["JOB", "QUEUE", "Signals", "Watch"]

# publisher topics
JOB = "job"
QUEUE = "queue"


@dataclass
class _Entry:
    """One watched job: its change count and the event its watchers sleep on."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    changes: int = 0
    watchers: int = 0

    def fire(self) -> None:
        self.changes += 1
        self.event.set()
        self.event = asyncio.Event()


class Watch:
    """A watcher of one job (from `Signals.watch`). A change between two `wait` calls is
    never lost: `wait` returns at once when the job changed since the last one returned."""

    def __init__(self, entry: _Entry, clock: Clock) -> None:
        self._entry = entry
        self._clock = clock
        self._seen = entry.changes

    async def wait(self, seconds: float) -> bool:
        """True if the job changed (since the last wait), False after `seconds`."""
        entry = self._entry
        if entry.changes == self._seen:
            with contextlib.suppress(TimeoutError):
                async with self._clock.timeout(seconds):
                    await entry.event.wait()
        changed = entry.changes != self._seen
        self._seen = entry.changes
        return changed


@dataclass(eq=False)
class _Popper:
    kind: str
    # None = any model
    models: frozenset[str] | None
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def wants(self, kind: str, model: str | None) -> bool:
        if kind != self.kind:
            return False
        return model is None or self.models is None or model in self.models


class Signals:
    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._jobs: dict[str, _Entry] = {}
        self._poppers: set[_Popper] = set()
        # set when the coordinator shuts down: long-polls and streams end at once
        self.closing = False
        # (topic, payload) -> None; sends a local change to the other coordinator processes
        self.publisher: Callable[[str, str], None] | None = None

    # --- waiting ------------------------------------------------------------------------

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """Watch one job for as long as the block runs; its entry goes with its last watcher."""
        entry = self._jobs.get(job_id)
        if entry is None:
            entry = self._jobs[job_id] = _Entry()
        entry.watchers += 1
        try:
            yield Watch(entry, self._clock)
        finally:
            entry.watchers -= 1
            if entry.watchers == 0 and self._jobs.get(job_id) is entry:
                del self._jobs[job_id]

    async def wait_for_work(
        self, kind: str, models: Collection[str] | None, seconds: float
    ) -> bool:
        """Sleep until a job of `kind` (for one of `models`; None = any) is queued, or
        `seconds` pass; True when woken."""
        popper = _Popper(kind, None if models is None else frozenset(models))
        self._poppers.add(popper)
        try:
            async with self._clock.timeout(seconds):
                await popper.event.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._poppers.discard(popper)

    @property
    def watched_jobs(self) -> int:
        return len(self._jobs)

    @property
    def waiting_workers(self) -> int:
        return len(self._poppers)

    # --- changes ------------------------------------------------------------------------

    def job_changed(self, job_id: str) -> None:
        """A job's state or progress changed (in this process)."""
        self._job_changed(job_id)
        if self.publisher is not None:
            self.publisher(JOB, job_id)

    def job_queued(self, kind: str, model: str | None) -> None:
        """A job of `kind` for `model` became available (submitted or given back)."""
        self._job_queued(kind, model)
        if self.publisher is not None:
            self.publisher(QUEUE, f"{kind}\t{model or ''}")

    def deliver(self, topic: str, payload: str) -> None:
        """A change published by another coordinator process: wake our own waiters only."""
        if topic == JOB:
            self._job_changed(payload)
        elif topic == QUEUE:
            kind, _, model = payload.partition("\t")
            self._job_queued(kind, model or None)

    def _job_changed(self, job_id: str) -> None:
        entry = self._jobs.get(job_id)
        if entry is not None:
            entry.fire()

    def _job_queued(self, kind: str, model: str | None) -> None:
        # One job, one worker: wake a single waiter that can take it (not a thundering
        # herd of pops racing for it); if that one misses, the fallback re-check covers it.
        for popper in self._poppers:
            if popper.wants(kind, model) and not popper.event.is_set():
                popper.event.set()
                return

    def close(self) -> None:
        self.closing = True
        for popper in self._poppers:
            popper.event.set()
        for entry in self._jobs.values():
            entry.fire()
