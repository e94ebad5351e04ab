"""Running a worker service: its pop-and-serve loop, in the foreground until SIGINT or
SIGTERM.

A service that passes a `Drain` stops gently: the first signal stops popping and lets
the job in hand finish and be paid, the second gives that job back at once. Without
one, the first signal cancels the service (its cleanup gives a held job back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from protocol.signals import StopSignals
from worker.common.link import CoordinatorLink, retrying
from worker.common.status import WorkerStatus
from worker.errors import CoordinatorRejected, CoordinatorUnavailable

__all__ = ["Drain", "Gate", "run_until_signalled", "serve_jobs"]

log = logging.getLogger(__name__)


class _Job(Protocol):
    @property
    def id(self) -> str: ...


J = TypeVar("J", bound=_Job)
T = TypeVar("T")


class Gate(Protocol):
    """Donor controls (worker.common.donor.DonorGate): asked before every pop."""

    async def reason(self) -> str | None:
        """Why no job may be taken now, or None."""
        ...

    def job_started(self) -> None: ...


class Drain:
    """Set by the first SIGINT/SIGTERM: the serve loop takes no more jobs, finishes the
    one it holds, and returns."""

    def __init__(self, on_start: Callable[[], None] | None = None) -> None:
        self._event = asyncio.Event()
        self._on_start = on_start
        # the job the serve loop holds (the drain's log line names it)
        self.current_job: str | None = None

    @property
    def draining(self) -> bool:
        return self._event.is_set()

    def start(self) -> None:
        if self.current_job is not None:
            log.info(
                "draining: finishing job %s, then stopping (signal again to give it back now)",
                self.current_job,
            )
        else:
            log.info("draining: no job in hand, stopping")
        self._event.set()
        if self._on_start is not None:
            self._on_start()

    async def wait(self, seconds: float) -> None:
        """Return when draining starts, or after `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                await self._event.wait()
        except TimeoutError:
            pass

    async def unless_draining(self, work: Awaitable[T]) -> T | None:
        """`work`'s result; None (and `work` cancelled) if draining starts first."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            return None
        return task.result()


async def serve_jobs(
    link: CoordinatorLink,
    pop: Callable[[], Awaitable[J | None]],
    serve: Callable[[J], Awaitable[None]],
    *,
    gate: Gate | None = None,
    drain: Drain | None = None,
    status: WorkerStatus | None = None,
    gate_poll: float = 1.0,
) -> None:
    """Pop and serve jobs until cancelled or drained. Registers again if the coordinator
    forgot our token; a job whose coordinator calls keep failing is abandoned (its lease
    runs out and it is requeued) without stopping the worker.

    While `gate` names a reason the loop pops nothing and asks again every `gate_poll`
    seconds. A pop already waiting for work is allowed to end (a job it brings is served);
    a drain cancels it at once. (A pop cancelled just as the coordinator leased a job
    leaves that job to be requeued when its lease runs out.)"""
    drain = drain or Drain()
    paused: str | None = None
    while not drain.draining:
        if gate is not None:
            reason = await gate.reason()
            if reason is not None:
                if reason != paused:
                    log.info("paused: %s", reason)
                    paused = reason
                if status is not None:
                    status.set_state("paused", reason)
                await drain.wait(gate_poll)
                continue
            if paused is not None:
                log.info("serving again")
                paused = None
        if status is not None:
            status.set_state("idle")
        try:
            job = await drain.unless_draining(retrying("pop", pop))
        except CoordinatorRejected as exc:
            if exc.status == 403:
                log.error("the coordinator gives this worker no jobs: %s", exc)
            if exc.status != 401:
                raise
            log.warning("coordinator forgot our token; registering again")
            await retrying("register", link.register)
            continue
        if job is not None:
            if gate is not None:
                gate.job_started()
            drain.current_job = job.id
            if status is not None:
                status.job_started(job.id)
            try:
                await serve(job)
            except (CoordinatorRejected, CoordinatorUnavailable) as exc:
                log.error("job %s abandoned: %s", job.id, exc)
            finally:
                drain.current_job = None
                if status is not None:
                    status.job_ended()


async def run_until_signalled(
    service: Coroutine[Any, Any, None], drain: Drain | None = None
) -> bool:
    """Run `service` until it returns or SIGINT/SIGTERM stops it. Returns True when a
    signal stopped it.

    Without `drain`, the first signal cancels the service (its cleanup runs). With one,
    the first signal starts the drain (the service finishes its job and returns) and the
    second cancels."""
    task = asyncio.ensure_future(service)

    def on_signal(count: int) -> None:
        if drain is not None and not drain.draining:
            drain.start()
            return
        if drain is not None:
            log.info("second signal: giving the job in hand back and stopping now")
        task.cancel()

    with StopSignals(on_signal) as signals:
        try:
            await task
        except asyncio.CancelledError:
            return True
    return signals.count > 0
