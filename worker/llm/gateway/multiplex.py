"""The gateway process's side of several text jobs at once in one engine.

`EngineJobs.generate` starts a job in the engine (TEXT_START) and waits for its result.
While jobs run, one poller asks the engine for their events (TEXT_POLL, a short call that
returns as soon as any job made text) and hands each job its text and its end; the
engine's calls stay one at a time, so starts and cancels slip in between polls. A failed
job raises `EngineFailed` with the error type the engine named, as TEXT_GENERATE would;
an engine that crashes takes every running job with it (each raises what the poll raised).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.engine import (
    TEXT_CANCEL,
    TEXT_POLL,
    TEXT_START,
    CancelText,
    GeneratedText,
    PollText,
    StartText,
)
from protocol.text import TextParams
from sandbox import Sandbox
from sandbox.errors import EngineFailed

__all__ = ["EngineJobs"]

log = logging.getLogger(__name__)


@dataclass
class _Job:
    on_text: Callable[[str], None]
    done: asyncio.Future[GeneratedText] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class EngineJobs:
    """Jobs running in `engine` (a `GenerationEngine` sandbox). `aclose()` stops polling."""

    def __init__(self, engine: Sandbox, poll_wait: float = 0.05) -> None:
        self._engine = engine
        self._poll_wait = poll_wait
        self._jobs: dict[str, _Job] = {}
        self._poller: asyncio.Task[None] | None = None

    @property
    def running(self) -> int:
        return len(self._jobs)

    async def generate(
        self,
        job_id: str,
        params: TextParams,
        on_text: Callable[[str], None],
        requester: str | None = None,
    ) -> GeneratedText:
        """The job's answer; `on_text` gets its text as it is made. Raises EngineFailed,
        EngineCrashed or EngineTimedOut as a TEXT_GENERATE call would. Cancelling it
        cancels the job in the engine."""
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} is running already")
        job = self._jobs[job_id] = _Job(on_text)
        try:
            start = StartText(job=job_id, params=params, requester=requester)
            await self._engine.run(TEXT_START, start)
            if self._poller is None or self._poller.done():
                self._poller = asyncio.create_task(self._poll(), name="engine-poll")
            return await job.done
        except asyncio.CancelledError:
            if not job.done.done():
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._engine.run(TEXT_CANCEL, CancelText(job=job_id)))
            raise
        finally:
            self._jobs.pop(job_id, None)

    async def _poll(self) -> None:
        while self._jobs:
            try:
                answer = await self._engine.run(TEXT_POLL, PollText(wait=self._poll_wait))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the engine crashed or broke the protocol
                for running in self._jobs.values():
                    if not running.done.done():
                        running.done.set_exception(exc)
                return
            for event in answer.data.events:
                job = self._jobs.get(event.job)
                if job is None or job.done.done():
                    continue  # cancelled, or given up on
                if event.text:
                    job.on_text(event.text)
                if event.result is not None:
                    job.done.set_result(event.result)
                elif event.error_type is not None:
                    job.done.set_exception(EngineFailed(event.error_type, event.error or ""))

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
