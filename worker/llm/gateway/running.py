"""The gateway engine's side of several text jobs at once (TEXT_START, TEXT_POLL, TEXT_CANCEL).

A sandbox call is one request at a time, so the engine cannot hold one TEXT_GENERATE call
open per chat. Instead each started job runs as a task on the engine's event loop (where
the swarm client lives), beside the others: their sessions step through the block
servers concurrently, which is what lets the servers batch them. What the jobs produce
(text, a result, a failure) is queued as `TextEvent`s, and the gateway process collects
them with short TEXT_POLL calls (`worker.llm.gateway.multiplex`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from protocol.engine import GeneratedText, TextEvent
from protocol.text import TextParams
from worker.llm.gateway.core import Generated, GenerationCore

__all__ = ["RunningJobs"]


class RunningJobs:
    """Called from the engine's request thread; the jobs run on `loop` (another thread)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        core: GenerationCore,
        answer: Callable[[Generated], GeneratedText],
    ) -> None:
        self._loop = loop
        self._core = core
        self._answer = answer
        self._tasks: dict[str, asyncio.Task[None]] = {}  # touched on the loop only
        self._events: list[TextEvent] = []
        self._ready = threading.Condition()

    def start(self, job: str, params: TextParams, requester: str | None = None) -> None:
        """ValueError if `job` is running already."""
        spawn = self._spawn(job, params, requester)
        asyncio.run_coroutine_threadsafe(spawn, self._loop).result()

    def cancel(self, job: str) -> None:
        asyncio.run_coroutine_threadsafe(self._cancel(job), self._loop).result()

    def poll(self, wait: float) -> list[TextEvent]:
        """The events since the last poll, waiting up to `wait` seconds for the first."""
        with self._ready:
            self._ready.wait_for(lambda: bool(self._events), timeout=wait)
            events, self._events = self._events, []
        return events

    async def _spawn(self, job: str, params: TextParams, requester: str | None) -> None:
        if job in self._tasks:
            raise ValueError(f"job {job} is running already")
        run = self._run(job, params, requester)
        self._tasks[job] = asyncio.create_task(run, name=f"job {job}")

    async def _cancel(self, job: str) -> None:
        task = self._tasks.get(job)
        if task is not None:
            task.cancel()

    def _push(self, event: TextEvent) -> None:
        with self._ready:
            last = self._events[-1] if self._events else None
            if event.text and last is not None and last.job == event.job and last.text:
                # consecutive text of one job travels as one event
                self._events[-1] = TextEvent(job=event.job, text=last.text + event.text)
            else:
                self._events.append(event)
            self._ready.notify_all()

    async def _run(self, job: str, params: TextParams, requester: str | None) -> None:
        async def on_text(delta: str) -> None:
            self._push(TextEvent(job=job, text=delta))

        try:
            generated = await self._core.run(params, on_text, requester)
            event = TextEvent(job=job, result=self._answer(generated))
        except asyncio.CancelledError:
            event = TextEvent(job=job, error_type="Cancelled", error="the gateway cancelled it")
        except Exception as exc:
            event = TextEvent(job=job, error_type=type(exc).__name__, error=str(exc))
        finally:
            self._tasks.pop(job, None)
        self._push(event)
