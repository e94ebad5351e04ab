"""Running a worker service: its pop-and-serve loop, in the foreground until SIGINT or
SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from worker.common.link import CoordinatorLink, retrying
from worker.errors import CoordinatorRejected, CoordinatorUnavailable

__all__ = ["run_until_signalled", "serve_jobs"]

log = logging.getLogger(__name__)


class _Job(Protocol):
    @property
    def id(self) -> str: ...


J = TypeVar("J", bound=_Job)


async def serve_jobs(
    link: CoordinatorLink,
    pop: Callable[[], Awaitable[J | None]],
    serve: Callable[[J], Awaitable[None]],
) -> None:
    """Pop and serve jobs until cancelled. Registers again if the coordinator forgot our
    token; a job whose coordinator calls keep failing is abandoned (its lease runs out and
    it is requeued) without stopping the worker."""
    while True:
        try:
            job = await retrying("pop", pop)
        except CoordinatorRejected as exc:
            if exc.status == 403:
                log.error("the coordinator gives this worker no jobs: %s", exc)
            if exc.status != 401:
                raise
            log.warning("coordinator forgot our token; registering again")
            await retrying("register", link.register)
            continue
        if job is not None:
            try:
                await serve(job)
            except (CoordinatorRejected, CoordinatorUnavailable) as exc:
                log.error("job %s abandoned: %s", job.id, exc)


async def run_until_signalled(service: Coroutine[Any, Any, None]) -> bool:
    """Run `service` until it returns or SIGINT/SIGTERM cancels it (its cleanup runs on
    cancellation). Returns True when a signal stopped it."""
    task = asyncio.ensure_future(service)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return True
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return False
